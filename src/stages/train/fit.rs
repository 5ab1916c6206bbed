//! The training loop: data, model, optimizer, checkpoints, metrics.
//!
//! [`run`] is three steps, one module each: [`setup`] opens the data, builds the model and
//! optimizer and resumes from a checkpoint; [`epoch`] trains one epoch, validates it and
//! records it; [`artifact`] writes the best and last weights, the model card, the history,
//! the learning curves and the report. What happens inside a step is shared with the other
//! kinds that train ([`crate::stages::training`]).

mod artifact;
mod epoch;
mod setup;

use serde::{Deserialize, Serialize};

use super::TrainStage;
use crate::stages::{StageContext, StageError};

/// One epoch's figures (deterministic: no timings, so equal runs write equal histories).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    /// Binary models: validation ROC-AUC, and the best F1 with the threshold that gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_auc: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_f1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Multi-label models: each class's threshold with its best validation F1 (`val_f1` is
    /// the micro F1 at them, `val_auc` the macro ROC-AUC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds: Option<Vec<f64>>,
}

pub fn run(stage: &TrainStage, cx: &StageContext<'_>) -> Result<(), StageError> {
    // The summary's time is the whole stage's: setup (with the backbone feature pass of
    // head fine-tuning), training and writing the artifact.
    let started = std::time::Instant::now();
    let mut session = setup::Session::new(stage, cx)?;
    let setup_seconds = started.elapsed().as_secs_f64();
    let mut clock = epoch::Clock::start();
    let mut images_trained = 0u64;
    let mut stopped_early = false;
    while session.progress.epoch < stage.model.config.epochs {
        let ran = epoch::run(&mut session, stage, cx, &mut clock)?;
        images_trained += ran.images;
        if ran.stop {
            stopped_early = true;
            break;
        }
    }
    let times = artifact::Times { started, setup_seconds, train_seconds: clock.elapsed(), resumed_seconds: session.progress.train_seconds };
    artifact::write(stage, cx, session, artifact::Totals { images_trained, times, stopped_early })
}
