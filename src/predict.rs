//! Prediction with a trained model: image bytes → the model's own preprocessing (from its
//! card: colour mode, resize/crop, normalisation) → class probabilities. `kiln predict` and
//! `kiln serve` both go through [`Predictor`]; the pixel path is [`crate::nn::input`], the
//! same transform and normalisation code the preprocess and train stages use.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::cache::ArtifactReader;
use crate::cache::lockfile::LockFile;
use crate::imaging::transform::{ColorMode, Interpolation, ResizeMode, Transform};
use crate::imaging::{DecodeLimits, Defect};
use crate::model::{ModelError, TrainedModel};

#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error("model `{spec}`: {why}")]
    Model { spec: String, why: String },
    #[error(transparent)]
    Load(#[from] ModelError),
    #[error("forward pass: {0}")]
    Forward(#[from] candle_core::Error),
}

/// Why one input could not be classified. The server maps these to 4xx statuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InputError {
    #[error("{0}")]
    Image(Defect),
    #[error("the image decoder failed on this input: {0}")]
    DecoderPanic(String),
}

/// Where a model's card and weights are.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub card: PathBuf,
    pub weights: PathBuf,
    /// What the user named, for messages.
    pub spec: String,
}

impl ModelFiles {
    /// `DIR` (holding model.json and model.safetensors), `DIR/model.json`, or
    /// `MANIFEST.toml:STAGE` — that train stage's artifact as the lock file names it, read
    /// from the cache.
    pub fn resolve(spec: &str) -> Result<ModelFiles, PredictError> {
        let fail = |why: String| PredictError::Model { spec: spec.to_string(), why };
        if let Some((manifest, stage)) = spec.rsplit_once(':')
            && manifest.ends_with(".toml")
        {
            let plan =
                crate::plan::Plan::load(Path::new(manifest), &crate::stages::StageRegistry::builtin()).map_err(|e| fail(e.to_string()))?;
            let manifest = plan.manifest();
            let decl = manifest.stage(stage).ok_or_else(|| {
                fail(format!(
                    "no stage `{stage}`; stages: {}",
                    manifest.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                ))
            })?;
            if decl.kind != "train" {
                return Err(fail(format!("stage `{stage}` is a {} stage, not a train stage", decl.kind)));
            }
            let lock = LockFile::read(&manifest.lock_path()).map_err(|e| fail(e.to_string()))?;
            let locked = lock.stages.get(stage).ok_or_else(|| {
                fail(format!("the lock file has no result for `{stage}`: run `kiln run {}` first", manifest.path.display()))
            })?;
            let reader = ArtifactReader::new(&manifest.cache_dir);
            let path = |file: &str| {
                reader
                    .file_path(&locked.artifact, file)
                    .map_err(|e| fail(e.to_string()))?
                    .ok_or_else(|| fail(format!("{file} of `{stage}` is not in the cache: rerun the pipeline")))
            };
            return Ok(ModelFiles { card: path("model.json")?, weights: path("model.safetensors")?, spec: spec.to_string() });
        }
        let p = Path::new(spec);
        let dir = if p.is_dir() { p.to_path_buf() } else { p.parent().map(Path::to_path_buf).unwrap_or_default() };
        let card = if p.is_dir() { dir.join("model.json") } else { p.to_path_buf() };
        if !card.is_file() {
            return Err(fail("expected a directory with model.json and model.safetensors, a model.json, or MANIFEST.toml:STAGE".into()));
        }
        Ok(ModelFiles { card, weights: dir.join("model.safetensors"), spec: spec.to_string() })
    }
}

/// A loaded model and the preprocessing it was trained with.
pub struct Predictor {
    pub model: TrainedModel,
    pub transform: Transform,
    pub limits: DecodeLimits,
    /// blake3 of the weights file, to tell clients which model answered.
    pub digest: String,
}

/// One class and its probability.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Scored {
    pub class: String,
    pub probability: f32,
}

impl Predictor {
    pub fn load(files: &ModelFiles, device: Device, limits: DecodeLimits) -> Result<Predictor, PredictError> {
        let model = TrainedModel::load(&files.card, &files.weights, device)?;
        let input = &model.card.input;
        // Cards of models trained on shards without a recorded transform: the plain resize
        // convert would have needed.
        let transform = input.transform.clone().unwrap_or(Transform {
            color: if input.channels == 1 { ColorMode::Grayscale } else { ColorMode::Rgb },
            width: input.width as u32,
            height: input.height as u32,
            resize: ResizeMode::Exact,
            interpolation: Interpolation::Bilinear,
            pad: 0,
            crop_pct: 1.0,
        });
        let digest = model.card.weights_digest.clone();
        Ok(Predictor { model, transform, limits, digest })
    }

    /// Decodes (under the decode limits) and preprocesses one image to normalised CHW floats.
    /// Never panics: a decoder panic on hostile bytes becomes an error.
    pub fn prepare(&self, bytes: &[u8]) -> Result<Vec<f32>, InputError> {
        let input = &self.model.card.input;
        let run = || -> Result<Vec<f32>, InputError> {
            let (_, img) = crate::imaging::decode(bytes, &self.limits).map_err(InputError::Image)?;
            Ok(crate::nn::input::image_chw(&img, &self.transform, &input.mean, &input.std))
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|p| {
            let why = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
            Err(InputError::DecoderPanic(why))
        })
    }

    /// Probabilities for prepared images, in one forward pass.
    pub fn probabilities(&self, images: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, PredictError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let input = &self.model.card.input;
        let data: Vec<f32> = images.iter().flatten().copied().collect();
        let x = Tensor::from_vec(data, (images.len(), input.channels, input.height, input.width), &Device::Cpu)?;
        Ok(self.model.probabilities(&x)?)
    }

    /// The class the model calls, with its probability: the most probable, or for a binary
    /// model the positive class from its threshold on (as eval calls it).
    pub fn predicted(&self, probs: &[f32]) -> Scored {
        let c = self.model.card.decide(probs);
        Scored { class: self.model.card.classes[c].clone(), probability: probs[c] }
    }

    /// The classes a multi-label model calls present, each from its own threshold on, in
    /// class order; `None` for the other tasks.
    pub fn present(&self, probs: &[f32]) -> Option<Vec<Scored>> {
        let card = &self.model.card;
        card.present(probs).map(|cs| cs.into_iter().map(|c| Scored { class: card.classes[c].clone(), probability: probs[c] }).collect())
    }

    /// A multi-label model's call as one label: the classes present joined by `|` (empty
    /// for none) and the smallest of their probabilities; `None` for the other tasks.
    pub fn present_label(&self, probs: &[f32]) -> Option<(String, Option<f32>)> {
        self.present(probs).map(|present| {
            (present.iter().map(|s| s.class.as_str()).collect::<Vec<_>>().join("|"), present.iter().map(|s| s.probability).reduce(f32::min))
        })
    }

    /// The `k` most probable classes, most probable first (ties by class order).
    pub fn top_k(&self, probs: &[f32], k: usize) -> Vec<Scored> {
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        order.into_iter().take(k.max(1)).map(|i| Scored { class: self.model.card.classes[i].clone(), probability: probs[i] }).collect()
    }
}

/// Image files under `paths` (directories are walked, sorted), by extension.
pub fn image_files(paths: &[PathBuf]) -> Vec<PathBuf> {
    const EXT: [&str; 9] = ["png", "jpg", "jpeg", "gif", "bmp", "webp", "tif", "tiff", "pgm"];
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = walkdir::WalkDir::new(p)
                .into_iter()
                .flatten()
                .filter(|e| e.file_type().is_file())
                .map(|e| e.into_path())
                .filter(|f| f.extension().is_some_and(|x| EXT.contains(&x.to_string_lossy().to_ascii_lowercase().as_str())))
                .collect();
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_specs_that_name_nothing_are_errors() {
        let e = ModelFiles::resolve("/no/such/dir").err().unwrap();
        assert!(e.to_string().contains("MANIFEST.toml:STAGE"), "{e}");
    }
}
