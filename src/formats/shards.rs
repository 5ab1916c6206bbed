//! The tensor shards convert writes and train and eval read: `manifest.json` ([`ShardManifest`])
//! and `shards/<split>-NNNNN.safetensors` with `images` (N×C×H×W) and `labels`; in memory,
//! one split is a [`Split`] a network takes in batches. Loading them from a stage's input
//! is [`crate::stages::io`]'s ([`ShardManifest::read`], [`Split::load`]).

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::preprocess::Normalize;
use crate::imaging::augment::Augment;
use crate::imaging::transform::{ColorMode, Transform, into_pixels, normalize_chw, to_image};
use crate::rng::Rng;

/// The most images a stage takes from the shards at once (train's and eval's `batch_size`).
pub const MAX_BATCH: u64 = 65_536;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    #[default]
    Index,
    OneHot,
    MultiHot,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    #[default]
    U8,
    F32,
}

/// One safetensors file of a split.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub rows: usize,
    /// Item id of every row, in order (augmented copies as `id#augN`).
    pub ids: Vec<String>,
    /// Where each row's image came from (the item's `source`), for people.
    #[serde(default)]
    pub sources: Vec<String>,
    /// The duplicate group of each row (the id of the copy clean kept; empty for an image
    /// with no copies), so that later stages keep copies together; absent when no row of
    /// the shard has one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Whether a person reviewed each row's label (see `Item::reviewed`); absent when no
    /// row of the shard was when convert wrote it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reviewed: Vec<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SplitInfo {
    pub rows: usize,
    pub items: usize,
    pub shards: Vec<ShardInfo>,
}

/// `manifest.json`: what the shards hold and how to read them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardManifest {
    pub format: String,
    pub layout: String,
    pub dtype: Dtype,
    pub channels: usize,
    pub height: u32,
    pub width: u32,
    pub encoding: Encoding,
    pub classes: Vec<String>,
    /// The preprocess stage's deterministic transform (what predict must redo on new images).
    #[serde(default)]
    pub transform: Option<Transform>,
    /// Mean and std per channel, as fractions of 255. Already applied when `dtype` is
    /// `f32`; to apply at load time when it is `u8`.
    pub normalization: Option<Normalize>,
    pub normalization_applied: bool,
    /// `{ mode, spec, copies }` when the preprocess stage asked for augmentation.
    pub augmentation: Option<serde_json::Value>,
    pub splits: BTreeMap<String, SplitInfo>,
}

impl ShardManifest {
    /// The augmentation to apply while training, when it is online.
    pub fn online_augment(&self) -> Option<Augment> {
        let a = self.augmentation.as_ref()?;
        if a.get("mode")?.as_str()? != "online" {
            return None;
        }
        serde_json::from_value(a.get("spec")?.clone()).ok()
    }
}

/// Pixels as the shards store them.
pub enum Pixels {
    /// `[N, C, H, W]` bytes, normalised when batched.
    U8(Vec<u8>),
    /// Already normalised by convert.
    F32(Vec<f32>),
}

/// One split in memory: rows of pixels with their class index and item id.
pub struct Split {
    pub pixels: Pixels,
    /// Each row's class (with several, multi-hot shards: the first).
    pub labels: Vec<u32>,
    /// Multi-hot shards: every row's 0/1 per class, row-major; empty otherwise.
    pub multi: Vec<f32>,
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

    /// Row `r` as a PNG at `path`, as the model saw it (after preprocessing); `false` for
    /// images of neither one nor three channels, which have no PNG colour type.
    pub fn save_row_png(&self, r: usize, applied: Option<&Normalize>, path: &std::path::Path) -> std::io::Result<bool> {
        let [c, h, w] = self.shape;
        let chw = self.row_bytes(r, applied);
        let (color, pixels) = match c {
            1 => (image::ExtendedColorType::L8, chw),
            3 => {
                let mut hwc = vec![0u8; chw.len()];
                for ch in 0..3 {
                    for p in 0..h * w {
                        hwc[p * 3 + ch] = chw[ch * h * w + p];
                    }
                }
                (image::ExtendedColorType::Rgb8, hwc)
            }
            _ => return Ok(false),
        };
        image::save_buffer_with_format(path, &pixels, w as u32, h as u32, color, image::ImageFormat::Png).map_err(std::io::Error::other)?;
        Ok(true)
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
