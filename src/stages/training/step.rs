//! The numerics of training, shared by every kind that trains: how an epoch is cut into
//! batches, one optimizer step on a batch of rows, and class probabilities of rows. The
//! train stage's runs are bitwise reproducible on the CPU and resume after a kill with the
//! same weights, so what happens in a step (its seeded draws included) must not change.

use candle_core::{Device, Tensor};

use super::Config;
use crate::formats::preprocess::Normalize;
use crate::formats::shards::Split;
use crate::imaging::augment::Augment;
use crate::nn::ParamStore;
use crate::nn::layers::Ctx;
use crate::nn::loss::{binary_cross_entropy, cross_entropy};
use crate::nn::models::Network;
use crate::nn::optim::Optimizer;
use crate::nn::schedule::Schedule;
use crate::rng::Rng;
use crate::stages::StageError;
use crate::task::Outputs;

/// For `map_err`: a candle error while doing `what`.
pub fn candle(what: &str) -> impl Fn(candle_core::Error) -> StageError + '_ {
    move |e| StageError::Failed(format!("{what}: {e}"))
}

/// What a network is given: images, or (head fine-tuning) memoised backbone features.
// One per training run: boxing the larger variant would save nothing worth an indirection.
#[allow(clippy::large_enum_variant)]
pub enum Inputs {
    Images { train: Split, val: Split },
    Features { train: (Tensor, Vec<u32>), val: (Tensor, Vec<u32>) },
}

impl Inputs {
    pub fn train_len(&self) -> usize {
        match self {
            Inputs::Images { train, .. } => train.len(),
            Inputs::Features { train, .. } => train.1.len(),
        }
    }

    pub fn val_len(&self) -> usize {
        match self {
            Inputs::Images { val, .. } => val.len(),
            Inputs::Features { val, .. } => val.1.len(),
        }
    }

    /// The class of every training row.
    pub fn train_labels(&self) -> &[u32] {
        match self {
            Inputs::Images { train, .. } => &train.labels,
            Inputs::Features { train, .. } => &train.1,
        }
    }
}

/// The rows a model trains on, and how they reach the network.
pub struct Data {
    /// Applied to byte shards as batches are built.
    pub norm: Normalize,
    pub inputs: Inputs,
    /// Online augmentation of training batches (u8 shards only).
    pub augment: Option<Augment>,
    /// Multi-hot shards: the 0/1 targets of the train and the val rows, row-major (one
    /// value per class); both empty otherwise.
    pub multi: [Vec<f32>; 2],
}

/// The multi-hot rows `rows` of `multi` (`k` values each); empty when `multi` is.
pub fn gather(multi: &[f32], k: usize, rows: impl IntoIterator<Item = usize>) -> Vec<f32> {
    if multi.is_empty() {
        return Vec::new();
    }
    rows.into_iter().flat_map(|r| multi[r * k..(r + 1) * k].iter().copied()).collect()
}

/// How an epoch is cut into batches.
#[derive(Debug, Clone, Copy)]
pub struct Batches {
    /// Training rows.
    pub rows: usize,
    pub size: usize,
    pub per_epoch: usize,
}

impl Batches {
    /// `rows` must be at least 1.
    pub fn new(rows: usize, batch_size: usize) -> Batches {
        // A last batch of one sample would give batch norm a zero variance: fold it into the previous one.
        let size = batch_size.min(rows);
        let mut per_epoch = rows / size;
        if rows % size > 1 {
            per_epoch += 1;
        }
        Batches { rows, size, per_epoch }
    }

    /// The rows of batch `b` in the order `order`: the last batch takes what is left.
    pub fn rows_of<'a>(&self, order: &'a [usize], b: usize) -> &'a [usize] {
        let end = if b + 1 == self.per_epoch { self.rows } else { (b + 1) * self.size };
        &order[b * self.size..end]
    }
}

/// Where a batch falls in a run: its seeded draws (dropout, augmentation) depend on it, and
/// a diverged run names it.
#[derive(Debug, Clone, Copy)]
pub struct At {
    /// 0-based.
    pub epoch: usize,
    /// 0-based, within the epoch.
    pub batch: usize,
    /// Optimizer steps taken before this one.
    pub step: u64,
}

/// What one step saw: the batch's mean loss, and how many of its rows the network got
/// right before the step.
#[derive(Debug, Clone, Copy)]
pub struct Stepped {
    pub loss: f64,
    pub correct: u64,
}

/// A network being trained: its weights, the optimizer's state and the schedule.
pub struct Trainer {
    pub device: Device,
    pub ps: ParamStore,
    pub net: Box<dyn Network>,
    pub opt: Optimizer,
    pub schedule: Schedule,
    pub objective: Objective,
}

/// What a model is trained to do: how its outputs read ([`Outputs`]), and the loss.
#[derive(Debug, Clone)]
pub struct Objective {
    pub outputs: Outputs,
    pub classes: usize,
    /// Softmax: the loss's per-class weights.
    pub class_weights: Option<Vec<f32>>,
    /// Sigmoids: the weight of each output's positive term.
    pub pos_weight: Vec<f64>,
    /// The target's share moved to even odds between classes (training only).
    pub label_smoothing: f64,
}

impl Objective {
    /// The batch's mean loss, on the rows' classes `labels` or (independent classes) their
    /// multi-hot targets `multi`: while training with the manifest's weights and smoothing;
    /// for validation plain, so that epochs and runs compare.
    pub fn loss(&self, logits: &Tensor, labels: &[u32], multi: &[f32], training: bool) -> candle_core::Result<Tensor> {
        let eps = if training { self.label_smoothing } else { 0.0 };
        let smooth = |y: f32| y * (1.0 - eps as f32) + 0.5 * eps as f32;
        let ones = vec![1.0; self.pos_weight.len()];
        let weights = if training { &self.pos_weight } else { &ones };
        match self.outputs {
            Outputs::Softmax => cross_entropy(logits, labels, eps, self.class_weights.as_deref().filter(|_| training)),
            Outputs::Sigmoid { positive } => {
                let y: Vec<f32> = labels.iter().map(|&l| smooth(f32::from(l as usize == positive))).collect();
                binary_cross_entropy(logits, &y, weights)
            }
            Outputs::Independent => binary_cross_entropy(logits, &multi.iter().map(|&y| smooth(y)).collect::<Vec<_>>(), weights),
        }
    }

    /// How many rows of a batch the logits get right at even odds: the class `labels` says,
    /// or (independent classes) every class of `multi` (the subset accuracy's count).
    pub fn correct(&self, logits: &Tensor, labels: &[u32], multi: &[f32]) -> candle_core::Result<u64> {
        if self.outputs == Outputs::Independent {
            let z: Vec<f32> = logits.flatten_all()?.to_vec1()?;
            let k = self.classes.max(1);
            return Ok(
                z.chunks(k).zip(multi.chunks(k)).filter(|(z, y)| z.iter().zip(*y).all(|(z, y)| (*z > 0.0) == (*y > 0.5))).count() as u64
            );
        }
        let pred = self.outputs.predicted(logits)?;
        Ok(pred.iter().zip(labels).filter(|(p, l)| p == l).count() as u64)
    }
}

impl Trainer {
    /// One optimizer step at rate `lr` on training rows `rows` of `data`; `seed` seeds the
    /// dropout and augmentation draws, with `at`.
    pub fn step(&mut self, data: &Data, cfg: &Config, seed: u64, at: At, rows: &[usize], lr: f64) -> Result<Stepped, StageError> {
        let mut ctx = Ctx::train(Rng::for_item(seed, "dropout", at.step));
        let (logits, labels) = match &data.inputs {
            Inputs::Images { train, .. } => {
                let x = train
                    .batch(rows, &data.norm, data.augment.as_ref().map(|a| (a, seed, at.epoch as u64)), &self.device)
                    .map_err(candle("batch"))?;
                (self.net.forward(&x, &mut ctx).map_err(candle("forward"))?, rows.iter().map(|&r| train.labels[r]).collect::<Vec<_>>())
            }
            Inputs::Features { train, .. } => {
                let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), &self.device)
                    .map_err(candle("batch"))?;
                let x = train.0.index_select(&idx, 0).map_err(candle("batch"))?;
                (self.net.classify(&x, &mut ctx).map_err(candle("forward"))?, rows.iter().map(|&r| train.1[r]).collect())
            }
        };
        let multi = gather(&data.multi[0], self.objective.classes, rows.iter().copied());
        let loss = self.objective.loss(&logits, &labels, &multi, true).map_err(candle("loss"))?;
        let loss_value = f64::from(loss.to_scalar::<f32>().map_err(candle("loss"))?);
        if !loss_value.is_finite() {
            return Err(StageError::Failed(format!(
                "training diverged at epoch {}, batch {} (loss {loss_value}): lower `lr` (now {}) or set `clip_grad_norm`",
                at.epoch + 1,
                at.batch + 1,
                cfg.lr
            )));
        }
        let mut grads = loss.backward().map_err(candle("backward"))?;
        if let Some(max) = cfg.clip_grad_norm {
            self.opt.clip_grad_norm(&mut grads, max).map_err(candle("clip"))?;
        }
        self.opt.step(&grads, lr).map_err(candle("optimizer step"))?;
        let correct = self.objective.correct(&logits, &labels, &multi).map_err(candle("accuracy"))?;
        Ok(Stepped { loss: loss_value, correct })
    }

    /// Class probabilities of training rows `rows` of `data` (no dropout, batch norm on its
    /// running statistics, no augmentation), `batch` rows at a time: one row of
    /// probabilities per row, one after another.
    pub fn probabilities(&self, data: &Data, rows: &[usize], batch: usize) -> Result<Vec<f32>, StageError> {
        let mut out = Vec::new();
        for chunk in rows.chunks(batch.max(1)) {
            let logits = match &data.inputs {
                Inputs::Images { train, .. } => {
                    let x = train.batch(chunk, &data.norm, None, &self.device).map_err(candle("batch"))?;
                    self.net.forward(&x, &mut Ctx::eval()).map_err(candle("forward"))?
                }
                Inputs::Features { train, .. } => {
                    let idx = Tensor::from_vec(chunk.iter().map(|&r| r as u32).collect::<Vec<_>>(), chunk.len(), &self.device)
                        .map_err(candle("batch"))?;
                    let x = train.0.index_select(&idx, 0).map_err(candle("batch"))?;
                    self.net.classify(&x, &mut Ctx::eval()).map_err(candle("forward"))?
                }
            };
            let p: Vec<Vec<f32>> = self
                .objective
                .outputs
                .probabilities(&logits)
                .and_then(|p| p.to_device(&Device::Cpu))
                .and_then(|p| p.to_vec2())
                .map_err(candle("probabilities"))?;
            out.extend(p.into_iter().flatten());
        }
        Ok(out)
    }
}
