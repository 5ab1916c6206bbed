//! What preprocessing a dataset went through, carried in its `dataset.json` and in the
//! shards' `manifest.json`, so training, eval and predict redo exactly the same.

use serde::{Deserialize, Serialize};

use crate::imaging::augment::Augment;
use crate::imaging::transform::Transform;

/// The largest side a preprocessed image (or a model's input) may have, in pixels.
pub const MAX_SIDE: u32 = 8192;

/// Mean and std per channel, as fractions of 255.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalize {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalize {
    /// Pixels as fractions of 255, unchanged.
    pub fn identity(channels: usize) -> Self {
        Normalize { mean: vec![0.0; channels], std: vec![1.0; channels] }
    }

    /// Equal to within 1e-3 per value (presets are written as rounded decimals).
    pub fn approx_eq(&self, other: &Normalize) -> bool {
        self.mean.len() == other.mean.len()
            && self.std.len() == other.std.len()
            && self.mean.iter().chain(&self.std).zip(other.mean.iter().chain(&other.std)).all(|(a, b)| (a - b).abs() < 1e-3)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AugmentWhere {
    /// Fresh draws every epoch, in the train stage.
    #[default]
    Online,
    /// Fixed augmented copies of each training image, written by convert.
    Offline,
}

/// What preprocessing a dataset went through: carried in its `dataset.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub transform: Transform,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize: Option<Normalize>,
    #[serde(default)]
    pub augment: Augment,
    #[serde(default)]
    pub augmentation: AugmentWhere,
}
