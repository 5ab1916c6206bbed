//! One epoch: train on every batch (checkpointing now and then), validate, record the
//! epoch, keep the best weights, and decide whether to stop early.

use std::time::Instant;

use candle_core::Device;

use super::super::TrainStage;
use super::super::checkpoint::{self, Progress};
use super::EpochRecord;
use super::setup::Session;
use crate::metrics;
use crate::nn::ParamStore;
use crate::nn::layers::Ctx;
use crate::nn::optim::Optimizer;
use crate::rng::Rng;
use crate::stages::training::{At, Data, Inputs, Monitor, Trainer, candle, gather};
use crate::stages::{StageContext, StageError};
use crate::task::Outputs;

/// The run's wall clocks: since training started (this process), and since the last
/// checkpoint was written.
pub(super) struct Clock {
    started: Instant,
    last_checkpoint: Instant,
}

impl Clock {
    pub(super) fn start() -> Clock {
        let started = Instant::now();
        let last_checkpoint = Instant::now();
        Clock { started, last_checkpoint }
    }

    /// Seconds trained by this process.
    pub(super) fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

/// What one epoch did.
pub(super) struct Ran {
    /// Images trained on in this process (a resumed epoch counts only its rest).
    pub(super) images: u64,
    /// Early stopping ended the run after this epoch.
    pub(super) stop: bool,
}

/// Runs the epoch `s.progress.epoch` from its next batch to its end.
pub(super) fn run(s: &mut Session, stage: &TrainStage, cx: &StageContext<'_>, clock: &mut Clock) -> Result<Ran, StageError> {
    let images = train(s, stage, cx, clock)?;
    let stop = close(s, stage, cx, clock)?;
    Ok(Ran { images, stop })
}

/// The batches of the epoch, in its seeded order, each one an optimizer step.
fn train(s: &mut Session, stage: &TrainStage, cx: &StageContext<'_>, clock: &mut Clock) -> Result<u64, StageError> {
    let cfg = &stage.model.config;
    let batches = s.batches;
    let progress = &mut s.progress;
    let epoch = progress.epoch;
    let mut order: Vec<usize> = (0..batches.rows).collect();
    Rng::for_item(cx.seed, "shuffle", epoch as u64).shuffle(&mut order);
    let bar = cx.reporter.progress(&format!("{}: epoch {}/{}", cx.stage, epoch + 1, cfg.epochs), batches.per_epoch as u64, "batches");
    bar.inc(progress.batch as u64);
    let epoch_started = Instant::now();
    let mut epoch_images = 0u64;
    for b in progress.batch..batches.per_epoch {
        let rows = batches.rows_of(&order, b);
        let lr = s.trainer.schedule.lr(progress.steps, batches.per_epoch, cfg.epochs);
        let stepped = s.trainer.step(&s.data, cfg, cx.seed, At { epoch, batch: b, step: progress.steps }, rows, lr)?;
        progress.steps += 1;
        progress.loss_sum += stepped.loss * rows.len() as f64;
        progress.correct += stepped.correct;
        progress.seen += rows.len() as u64;
        progress.batch = b + 1;
        epoch_images += rows.len() as u64;
        bar.inc(1);
        let secs = epoch_started.elapsed().as_secs_f64().max(1e-9);
        bar.set_detail(&format!(
            "loss {:.4} acc {:.3} {:.0} img/s",
            progress.loss_sum / progress.seen as f64,
            progress.correct as f64 / progress.seen as f64,
            epoch_images as f64 / secs
        ));
        if clock.last_checkpoint.elapsed().as_secs_f64() >= cfg.checkpoint_secs && b + 1 < batches.per_epoch {
            save_state(cx, &s.trainer.ps, &s.trainer.opt, progress, clock.elapsed())?;
            clock.last_checkpoint = Instant::now();
        }
    }
    bar.finish();
    Ok(epoch_images)
}

/// Validates the epoch just trained, records it, keeps its weights if they are the best
/// so far, and checkpoints. Returns whether early stopping ends the run here.
fn close(s: &mut Session, stage: &TrainStage, cx: &StageContext<'_>, clock: &mut Clock) -> Result<bool, StageError> {
    let cfg = &stage.model.config;
    let batches = s.batches;
    let epoch = s.progress.epoch;
    let val = evaluate(&s.trainer, &s.data, batches.size.max(64)).map_err(candle("validation"))?;
    let progress = &mut s.progress;
    let record = EpochRecord {
        epoch: epoch + 1,
        lr: s.trainer.schedule.lr(progress.steps.saturating_sub(1), batches.per_epoch, cfg.epochs),
        train_loss: progress.loss_sum / progress.seen.max(1) as f64,
        train_accuracy: progress.correct as f64 / progress.seen.max(1) as f64,
        val_loss: val.as_ref().map(|v| v.loss),
        val_accuracy: val.as_ref().map(|v| v.accuracy),
        val_auc: val.as_ref().and_then(|v| v.auc),
        val_f1: val.as_ref().and_then(|v| v.best_f1.map(|b| b.1)),
        threshold: val.as_ref().filter(|v| v.thresholds.is_empty()).and_then(|v| v.best_f1.map(|b| b.0)),
        thresholds: val.as_ref().map(|v| v.thresholds.clone()).filter(|t| !t.is_empty()),
    };
    tracing::info!(stage = cx.stage, epoch = epoch + 1, train_loss = record.train_loss, val_accuracy = ?record.val_accuracy, "epoch done");
    // Higher is better for accuracy, AUC and F1, lower for loss; without a validation split
    // the training loss decides, and where validation holds one class only (AUC and F1
    // undefined, in every epoch alike) its loss does.
    let score = match (cfg.monitor, &val) {
        (Monitor::ValAccuracy, Some(v)) => v.accuracy,
        (Monitor::ValAuc, Some(v)) => v.auc.unwrap_or(-v.loss),
        (Monitor::ValF1, Some(v)) => v.best_f1.map_or(-v.loss, |b| b.1),
        (Monitor::ValLoss, Some(v)) => -v.loss,
        (_, None) => -record.train_loss,
    };
    let min_delta = cfg.early_stopping.as_ref().map_or(0.0, |e| e.min_delta);
    let improved = progress.best.is_none_or(|(_, best)| score > best + min_delta);
    if improved {
        progress.best = Some((epoch + 1, score));
        progress.stale_epochs = 0;
        checkpoint::save_best(cx.scratch, &s.trainer.ps.tensors())?;
    } else {
        progress.stale_epochs += 1;
    }
    progress.history.push(record);
    progress.epoch += 1;
    progress.batch = 0;
    progress.loss_sum = 0.0;
    progress.correct = 0;
    progress.seen = 0;
    save_state(cx, &s.trainer.ps, &s.trainer.opt, progress, clock.elapsed())?;
    clock.last_checkpoint = Instant::now();
    if let Some(es) = &cfg.early_stopping
        && progress.stale_epochs >= es.patience
    {
        s.summary.push(format!("stopped early after epoch {}: no improvement for {} epochs", progress.epoch, es.patience));
        return Ok(true);
    }
    Ok(false)
}

struct Eval {
    loss: f64,
    accuracy: f64,
    /// Binary models: ROC-AUC, and the threshold with the best F1 with that F1;
    /// multi-label models: macro ROC-AUC, and the micro F1 at `thresholds`.
    auc: Option<f64>,
    best_f1: Option<(f64, f64)>,
    /// Multi-label models: each class's threshold with its best F1.
    thresholds: Vec<f64>,
}

fn evaluate(trainer: &Trainer, data: &Data, batch: usize) -> candle_core::Result<Option<Eval>> {
    let (net, objective, device) = (trainer.net.as_ref(), &trainer.objective, &trainer.device);
    let (inputs, norm, k) = (&data.inputs, &data.norm, objective.classes);
    let n = inputs.val_len();
    if n == 0 {
        return Ok(None);
    }
    let (mut loss, mut correct) = (0f64, 0u64);
    // (score, is positive) of the positive class (binary), or of each class (multi-label).
    let mut scores: Vec<Vec<(f64, bool)>> = vec![Vec::new(); if objective.outputs == Outputs::Independent { k } else { 1 }];
    for start in (0..n).step_by(batch) {
        let rows: Vec<usize> = (start..(start + batch).min(n)).collect();
        let (logits, labels) = match inputs {
            Inputs::Images { val, .. } => {
                let x = val.batch(&rows, norm, None, device)?;
                (net.forward(&x, &mut Ctx::eval())?, rows.iter().map(|&r| val.labels[r]).collect::<Vec<_>>())
            }
            Inputs::Features { val, .. } => {
                let x = val.0.narrow(0, start, rows.len())?;
                (net.classify(&x, &mut Ctx::eval())?, val.1[start..start + rows.len()].to_vec())
            }
        };
        let multi = gather(&data.multi[1], k, rows.iter().copied());
        loss += f64::from(objective.loss(&logits, &labels, &multi, false)?.to_scalar::<f32>()?) * rows.len() as f64;
        correct += objective.correct(&logits, &labels, &multi)?;
        if objective.outputs == Outputs::Softmax {
            continue;
        }
        let p: Vec<Vec<f32>> = objective.outputs.probabilities(&logits)?.to_device(&Device::Cpu)?.to_vec2()?;
        match objective.outputs {
            Outputs::Sigmoid { positive } => {
                scores[0].extend(p.iter().zip(&labels).map(|(p, &l)| (f64::from(p[positive]), l as usize == positive)))
            }
            _ => {
                for (row, p) in p.iter().enumerate() {
                    for c in 0..k {
                        scores[c].push((f64::from(p[c]), multi[row * k + c] > 0.5));
                    }
                }
            }
        }
    }
    let mut val = Eval { loss: loss / n as f64, accuracy: correct as f64 / n as f64, auc: None, best_f1: None, thresholds: Vec::new() };
    match objective.outputs {
        Outputs::Sigmoid { .. } => {
            val.auc = metrics::roc_auc(&scores[0]);
            val.best_f1 = metrics::best_f1_threshold(&scores[0]);
        }
        Outputs::Independent => {
            // Macro ROC-AUC over the classes validation has both sides of; micro F1 with each
            // class at its own best threshold (0.5 for a class validation never shows).
            let aucs: Vec<f64> = scores.iter().filter_map(|s| metrics::roc_auc(s)).collect();
            val.auc = (!aucs.is_empty()).then(|| aucs.iter().sum::<f64>() / aucs.len() as f64);
            val.thresholds = scores.iter().map(|s| metrics::best_f1_threshold(s).map_or(0.5, |b| b.0)).collect();
            let (tp, fp, fn_) =
                metrics::tally(scores.iter().zip(&val.thresholds).flat_map(|(s, t)| s.iter().map(move |&(p, y)| (p >= *t, y))));
            val.best_f1 = (tp + fn_ > 0).then(|| (0.5, 2.0 * tp as f64 / (2 * tp + fp + fn_) as f64));
        }
        Outputs::Softmax => {}
    }
    Ok(Some(val))
}

/// Writes a checkpoint to resume from: `elapsed` (seconds trained by this process) is
/// counted in the checkpoint's `train_seconds`, not in `progress`.
fn save_state(cx: &StageContext<'_>, ps: &ParamStore, opt: &Optimizer, progress: &mut Progress, elapsed: f64) -> Result<(), StageError> {
    let mut tensors = ps.tensors();
    tensors.extend(opt.state());
    let before = progress.train_seconds;
    progress.train_seconds = before + elapsed;
    let r = checkpoint::save(cx.scratch, progress, &tensors);
    progress.train_seconds = before;
    r
}
