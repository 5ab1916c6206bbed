//! Everything a training run needs before its first batch: the data, the model (with
//! pretrained weights), the inputs it trains on, the optimizer and schedule (all built as
//! [`crate::stages::training`] builds them), and where an interrupted run of the same stage
//! key left off.

use std::collections::BTreeMap;

use candle_core::Tensor;

use super::super::TrainStage;
use super::super::checkpoint::{self, Progress};
use crate::formats::shards::{ShardManifest, Split};
use crate::nn::ParamStore;
use crate::nn::optim::Optimizer;
use crate::stages::training::{Batches, Data, Prepared, Trainer, candle};
use crate::stages::{StageContext, StageError, io};

/// A training run in progress: what [`super::epoch`] advances and [`super::artifact`] writes.
pub(super) struct Session {
    pub(super) manifest: ShardManifest,
    pub(super) data: Data,
    pub(super) trainer: Trainer,
    /// Where the run is; restored from a checkpoint when one was left.
    pub(super) progress: Progress,
    /// Lines of the stage's summary, in the order they came about.
    pub(super) summary: Vec<String>,
    pub(super) batches: Batches,
    /// Seconds spent computing backbone features (head fine-tuning), memo lookups included.
    pub(super) features_seconds: f64,
}

impl Session {
    pub(super) fn new(stage: &TrainStage, cx: &StageContext<'_>) -> Result<Session, StageError> {
        let model = &stage.model;
        let cfg = &model.config;
        let (input, artifact) = io::single_input(cx)?;
        let manifest = ShardManifest::read(cx, input, artifact)?;
        let norm = model.resolve_input(&manifest)?;
        let classes = manifest.classes.len();
        if classes < 2 {
            return Err(StageError::Failed(format!("input `{input}` has {classes} class(es): a classifier needs at least 2")));
        }
        let train = Split::load(cx, input, artifact, &manifest, "train")?;
        let val = Split::load(cx, input, artifact, &manifest, "val")?;
        if train.is_empty() {
            return Err(StageError::Failed(format!("input `{input}` has an empty train split")));
        }
        let device = cfg.device.open().map_err(candle("open device"))?;
        let outputs = model.outputs(&manifest.classes).map_err(|why| StageError::data(input, why))?;
        crate::stages::training::encoding_fits(&manifest, outputs).map_err(|why| StageError::data(input, why))?;
        let (mut ps, net, mut summary) = model.build(cx, &device, cx.seed, train.shape, outputs.width(classes))?;
        let Prepared { data, features_line, features_seconds } = model.prepare(cx, net.as_ref(), &manifest, norm, &device, (train, val))?;
        summary.extend(features_line);
        let objective = model.objective(data.inputs.train_labels(), &data.multi[0], &manifest.classes)?;
        let mut opt = model.optimizer(&ps);
        let schedule = model.schedule();
        let progress = resume(cx, &mut ps, &mut opt, &mut summary)?;
        let batches = Batches::new(data.inputs.train_len(), cfg.batch_size);
        let trainer = Trainer { device, ps, net, opt, schedule, objective };
        Ok(Session { manifest, data, trainer, progress, summary, batches, features_seconds })
    }
}

/// Restores the weights, optimizer state and progress of the last checkpoint an earlier
/// run of this stage key left, if any.
fn resume(cx: &StageContext<'_>, ps: &mut ParamStore, opt: &mut Optimizer, summary: &mut Vec<String>) -> Result<Progress, StageError> {
    let mut progress = Progress::default();
    if let Some((p, tensors)) = checkpoint::load(cx.scratch) {
        ps.load(&strip_optim(&tensors), |_| false).map_err(|e| StageError::Failed(format!("checkpoint: {e}")))?;
        opt.restore(&tensors, p.steps).map_err(candle("checkpoint"))?;
        summary.push(format!("resumed from a checkpoint at epoch {}, batch {}", p.epoch + 1, p.batch));
        progress = p;
    }
    Ok(progress)
}

fn strip_optim(t: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    t.iter().filter(|(k, _)| !k.starts_with("optim.")).map(|(k, v)| (k.clone(), v.clone())).collect()
}
