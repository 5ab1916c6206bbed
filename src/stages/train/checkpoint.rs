//! Resumable training state in the stage's scratch directory.
//!
//! `state.safetensors` holds the weights, batch-norm buffers and optimizer moments;
//! `progress.json` says where in the run they were taken (epoch, next batch, steps, the
//! partial epoch's running sums, the history so far). Both are written to temporary names
//! and renamed, the tensors first: `progress.json` names the tensor file it belongs to, so
//! a kill between the two renames leaves the previous, consistent pair.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::EpochRecord;
use crate::stages::StageError;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Epoch in progress (0-based) and the first batch of it not yet trained.
    pub epoch: usize,
    pub batch: usize,
    pub steps: u64,
    pub loss_sum: f64,
    pub correct: u64,
    pub seen: u64,
    pub history: Vec<EpochRecord>,
    /// Epoch whose weights are in `best.safetensors`, and its monitored value.
    pub best: Option<(usize, f64)>,
    pub stale_epochs: usize,
    pub train_seconds: f64,
    /// The tensor file these figures belong to.
    pub tensors: String,
}

/// A checkpoint file that could not be written (weights are written by candle, whose
/// errors are not I/O errors: they are carried as one).
fn unwritten(path: &Path, e: impl std::fmt::Display) -> StageError {
    StageError::io("write checkpoint", path)(std::io::Error::other(e.to_string()))
}

pub fn save(dir: &Path, progress: &mut Progress, tensors: &BTreeMap<String, Tensor>) -> Result<(), StageError> {
    std::fs::create_dir_all(dir).map_err(StageError::io("create checkpoint directory", dir))?;
    let name = format!("state-{}-{}.safetensors", progress.epoch, progress.batch);
    let tmp = dir.join(format!("{name}.tmp"));
    crate::nn::save_weights(tensors, &tmp).map_err(|e| unwritten(&tmp, e))?;
    std::fs::rename(&tmp, dir.join(&name)).map_err(StageError::io("write checkpoint", &tmp))?;
    let previous = std::mem::replace(&mut progress.tensors, name);
    let json = dir.join("progress.json");
    let tmp = dir.join("progress.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(progress).expect("progress serialises"))
        .map_err(StageError::io("write checkpoint", &tmp))?;
    std::fs::rename(&tmp, &json).map_err(StageError::io("write checkpoint", &json))?;
    if !previous.is_empty() && previous != progress.tensors {
        let _ = std::fs::remove_file(dir.join(previous));
    }
    Ok(())
}

/// The last consistent checkpoint, if an earlier run of this same stage key left one.
pub fn load(dir: &Path) -> Option<(Progress, BTreeMap<String, Tensor>)> {
    let progress: Progress = serde_json::from_slice(&std::fs::read(dir.join("progress.json")).ok()?).ok()?;
    let tensors = candle_core::safetensors::load(dir.join(&progress.tensors), &Device::Cpu).ok()?;
    Some((progress, tensors.into_iter().collect()))
}

pub fn save_best(dir: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<(), StageError> {
    std::fs::create_dir_all(dir).map_err(StageError::io("create checkpoint directory", dir))?;
    let tmp = dir.join("best.safetensors.tmp");
    crate::nn::save_weights(tensors, &tmp).map_err(|e| unwritten(&tmp, e))?;
    std::fs::rename(&tmp, dir.join("best.safetensors")).map_err(StageError::io("write checkpoint", &tmp))
}
