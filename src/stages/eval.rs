//! `kind = "eval"`: scores a trained model on one split of the convert stage's shards.
//!
//! ```toml
//! [stages.eval]
//! kind = "eval"
//! inputs = ["train", "convert"]   # the model and the data, in either order
//! split = "test"                  # the default
//! ```
//!
//! Writes `metrics.json` (accuracy, balanced accuracy, per-class and macro/weighted
//! precision, recall and F1, confusion matrix, top-k accuracy, log loss, calibration error,
//! and ROC-AUC / PR-AUC for two classes) and `predictions.csv` (one row per item: id, true
//! and predicted class, the predicted probability, whether it was right).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::de::DeValue;

use super::convert::ShardManifest;
use super::preprocess::Normalize;
use super::train::data::Split;
use super::{Artifact, ParseContext, Stage, StageContext, StageError, StageKind, parse_config};
use crate::dataset;
use crate::manifest::Issue;
use crate::metrics;
use crate::model::TrainedModel;
use crate::nn::device::DeviceChoice;

pub struct EvalKind;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_split")]
    split: String,
    #[serde(default = "default_batch")]
    batch_size: usize,
    #[serde(default)]
    device: DeviceChoice,
}

fn default_split() -> String {
    "test".into()
}
fn default_batch() -> usize {
    64
}

#[derive(Debug)]
pub struct EvalStage {
    config: Config,
}

impl StageKind for EvalKind {
    fn name(&self) -> &'static str {
        "eval"
    }

    fn version(&self) -> u32 {
        1
    }

    fn parse(&self, table: Spanned<DeValue<'_>>, _cx: &ParseContext<'_>) -> Result<Arc<dyn Stage>, Vec<Issue>> {
        let span = table.span();
        let config: Config = parse_config(table)?;
        if !["train", "val", "test"].contains(&config.split.as_str()) {
            return Err(vec![Issue::new(span, format!("`split` = \"{}\": expected \"train\", \"val\" or \"test\"", config.split))]);
        }
        if config.batch_size == 0 {
            return Err(vec![Issue::new(span, "`batch_size` must be at least 1")]);
        }
        Ok(Arc::new(EvalStage { config }))
    }
}

fn find<'a>(cx: &'a StageContext<'_>, file: &str) -> Option<(&'a str, &'a Artifact)> {
    cx.inputs.iter().find(|(_, a)| a.tree.entries().iter().any(|e| e.path == file)).map(|(n, a)| (n.as_str(), a))
}

impl Stage for EvalStage {
    fn params(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.config).expect("eval config serialises");
        v["device"] = self.config.device.kind().into();
        v.as_object_mut().expect("object").remove("batch_size");
        v
    }

    fn run(&self, cx: &StageContext<'_>) -> Result<(), StageError> {
        let (model_input, model_art) = find(cx, "model.json")
            .ok_or_else(|| StageError::Failed("no input holds a model.json: list the train stage in `inputs`".into()))?;
        let (data_input, data_art) = find(cx, "manifest.json")
            .ok_or_else(|| StageError::Failed("no input holds shards (manifest.json): list the convert stage in `inputs`".into()))?;
        let path = |a: &Artifact, f: &str| cx.input_file(a, f).ok_or_else(|| StageError::Failed(format!("input is missing {f}")));
        let device = self.config.device.open().map_err(|e| StageError::Failed(format!("open device: {e}")))?;
        let model = TrainedModel::load(&path(model_art, "model.json")?, &path(model_art, "model.safetensors")?, device.clone())
            .map_err(|e| StageError::Failed(format!("input `{model_input}`: {e}")))?;
        let manifest = ShardManifest::read(cx, data_input, data_art)?;
        if manifest.classes != model.card.classes {
            return Err(StageError::Failed(format!(
                "the model from `{model_input}` knows classes {:?}, the shards of `{data_input}` have {:?}",
                model.card.classes, manifest.classes
            )));
        }
        let input = &model.card.input;
        if (input.channels, input.height, input.width) != (manifest.channels, manifest.height as usize, manifest.width as usize) {
            return Err(StageError::Failed(format!(
                "the model takes {}x{}x{} input, the shards of `{data_input}` are {}x{}x{}",
                input.channels, input.height, input.width, manifest.channels, manifest.height, manifest.width
            )));
        }
        let split = Split::load(cx, data_input, data_art, &manifest, &self.config.split)?;
        if split.is_empty() {
            return Err(StageError::Failed(format!("split `{}` of `{data_input}` is empty", self.config.split)));
        }
        let norm = Normalize { mean: input.mean.clone(), std: input.std.clone() };
        let progress = cx.reporter.progress(&format!("{}: predicting", cx.stage), split.len() as u64, "images");
        let mut probs = Vec::with_capacity(split.len());
        let rows: Vec<usize> = (0..split.len()).collect();
        for chunk in rows.chunks(self.config.batch_size) {
            let x = split.batch(chunk, &norm, None, &device).map_err(|e| StageError::Failed(format!("batch: {e}")))?;
            probs.extend(model.probabilities(&x).map_err(|e| StageError::Failed(e.to_string()))?);
            progress.inc(chunk.len() as u64);
        }
        progress.finish();
        let report = metrics::report(&probs, &split.labels, &manifest.classes);
        dataset::write_json(cx, "metrics.json", &report)?;
        let mut csv = String::from("id,label,predicted,p_max,correct\n");
        for ((id, &label), p) in split.ids.iter().zip(&split.labels).zip(&probs) {
            let pred = metrics::argmax(p);
            let field = |s: &str| if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() };
            csv.push_str(&format!(
                "{},{},{},{:.6},{}\n",
                field(id),
                field(&manifest.classes[label as usize]),
                field(&manifest.classes[pred]),
                p[pred],
                u8::from(pred == label as usize)
            ));
        }
        std::fs::write(cx.out_dir.join("predictions.csv"), csv)
            .map_err(|e| StageError::Failed(format!("cannot write predictions.csv: {e}")))?;
        cx.reporter.summary(
            cx.stage,
            &[format!(
                "{} {} images: accuracy {:.4}, balanced {:.4}, macro F1 {:.4}, log loss {:.4}",
                self.config.split, report.samples, report.accuracy, report.balanced_accuracy, report.macro_avg.f1, report.log_loss
            )],
        );
        Ok(())
    }
}
