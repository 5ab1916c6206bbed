//! The convert stage's shards, in memory, as batches a network can take.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::imaging::augment::Augment;
use crate::imaging::transform::{ColorMode, into_pixels, normalize_chw, to_image};
use crate::rng::Rng;
use crate::stages::convert::{Dtype, Encoding, ShardManifest};
use crate::stages::preprocess::Normalize;
use crate::stages::{Artifact, StageContext, StageError};

/// Pixels as the shards store them.
pub enum Pixels {
    /// `[N, C, H, W]` bytes, normalised when batched.
    U8(Vec<u8>),
    /// Already normalised by convert.
    F32(Vec<f32>),
}

/// One split: rows of pixels with their class index and item id.
pub struct Split {
    pub pixels: Pixels,
    pub labels: Vec<u32>,
    pub ids: Vec<String>,
    /// Each row's source (empty for shards written before sources were recorded).
    pub sources: Vec<String>,
    pub shape: [usize; 3],
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn row_len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn load(cx: &StageContext<'_>, input: &str, artifact: &Artifact, m: &ShardManifest, split: &str) -> Result<Split, StageError> {
        let fail = |what: String| StageError::Failed(format!("input `{input}`: {what}"));
        let shape = [m.channels, m.height as usize, m.width as usize];
        let row: usize = shape.iter().product();
        let mut out = Split {
            pixels: match m.dtype {
                Dtype::U8 => Pixels::U8(Vec::new()),
                Dtype::F32 => Pixels::F32(Vec::new()),
            },
            labels: Vec::new(),
            ids: Vec::new(),
            sources: Vec::new(),
            shape,
        };
        let Some(info) = m.splits.get(split) else { return Ok(out) };
        for shard in &info.shards {
            let path = cx.input_file(artifact, &shard.file)?.ok_or_else(|| fail(format!("shard `{}` is missing", shard.file)))?;
            let bytes = std::fs::read(&path).map_err(|e| fail(format!("cannot read shard `{}`: {e}", shard.file)))?;
            let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| fail(format!("shard `{}`: {e}", shard.file)))?;
            let images = st.tensor("images").map_err(|e| fail(format!("shard `{}`: {e}", shard.file)))?;
            let labels = st.tensor("labels").map_err(|e| fail(format!("shard `{}`: {e}", shard.file)))?;
            if images.shape().get(1..) != Some(&shape[..]) || images.shape()[0] != shard.rows {
                return Err(fail(format!(
                    "shard `{}` has shape {:?}, the manifest says {} rows of {shape:?}",
                    shard.file,
                    images.shape(),
                    shard.rows
                )));
            }
            match &mut out.pixels {
                Pixels::U8(v) => v.extend_from_slice(images.data()),
                Pixels::F32(v) => v.extend(images.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))),
            }
            match m.encoding {
                Encoding::Index => {
                    out.labels.extend(labels.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as u32))
                }
                Encoding::OneHot => {
                    let k = m.classes.len();
                    let vals: Vec<f32> =
                        labels.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
                    out.labels.extend(vals.chunks_exact(k).map(|r| r.iter().position(|v| *v > 0.5).unwrap_or(0) as u32));
                }
                Encoding::MultiHot => return Err(fail("multi-label (multi_hot) shards cannot train a single-label classifier yet".into())),
            }
            out.ids.extend(shard.ids.iter().cloned());
            out.sources.extend((0..shard.rows).map(|r| shard.sources.get(r).cloned().unwrap_or_default()));
        }
        if out.labels.len() * row
            != match &out.pixels {
                Pixels::U8(v) => v.len(),
                Pixels::F32(v) => v.len(),
            }
        {
            return Err(fail(format!("split `{split}`: labels and images disagree in length")));
        }
        Ok(out)
    }

    /// Row `r` as CHW bytes; f32 rows are mapped back through the normalisation that
    /// convert applied (`applied`), or read as fractions of 1.
    pub fn row_bytes(&self, r: usize, applied: Option<&Normalize>) -> Vec<u8> {
        let row_len = self.row_len();
        let plane = self.shape[1] * self.shape[2];
        match &self.pixels {
            Pixels::U8(v) => v[r * row_len..(r + 1) * row_len].to_vec(),
            Pixels::F32(v) => v[r * row_len..(r + 1) * row_len]
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    let ch = i / plane;
                    let x = applied.map_or(x, |n| x * n.std[ch] + n.mean[ch]);
                    (x * 255.0).round().clamp(0.0, 255.0) as u8
                })
                .collect(),
        }
    }

    /// Network input for `rows`: normalised CHW floats, augmented when `augment` is given
    /// (each row drawn from its own stream, so batches can be built in any order).
    pub fn batch(
        &self,
        rows: &[usize],
        norm: &Normalize,
        augment: Option<(&Augment, u64, u64)>,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let [c, h, w] = self.shape;
        let row_len = self.row_len();
        let data: Vec<f32> = match &self.pixels {
            Pixels::F32(v) => rows.iter().flat_map(|&r| v[r * row_len..(r + 1) * row_len].iter().copied()).collect(),
            Pixels::U8(v) => {
                let per_row: Vec<Vec<f32>> = rows
                    .par_iter()
                    .map(|&r| {
                        let chw = &v[r * row_len..(r + 1) * row_len];
                        let mut hwc = vec![0u8; row_len];
                        for ch in 0..c {
                            for (p, &b) in chw[ch * h * w..(ch + 1) * h * w].iter().enumerate() {
                                hwc[p * c + ch] = b;
                            }
                        }
                        if let Some((aug, seed, epoch)) = augment {
                            let color = if c == 1 { ColorMode::Grayscale } else { ColorMode::Rgb };
                            let mut rng = Rng::for_item(seed, "augment", (epoch << 32) | r as u64);
                            let img = aug.apply(to_image(hwc, w as u32, h as u32, color), &mut rng);
                            hwc = into_pixels(img, color).0;
                        }
                        normalize_chw(&hwc, c, &norm.mean, &norm.std)
                    })
                    .collect();
                per_row.concat()
            }
        };
        Tensor::from_vec(data, (rows.len(), c, h, w), device)
    }
}
