//! What a finished training run leaves: the best weights (`model.safetensors`) and the
//! last (`last.safetensors`), the model card (`model.json`), the history (`history.json`,
//! `history.csv`), the learning curves (`curves.svg`) and `train_report.json`; and the
//! stage's summary.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{Device, Tensor};

use super::super::TrainStage;
use super::setup::Session;
use crate::model::{InputCard, ModelCard};
use crate::nn::weights_digest;
use crate::stages::training::candle;
use crate::stages::{Stage, StageContext, StageError, io};
use crate::task::{Binary, MultiLabel, Outputs};

/// What the whole run did, beyond what its [`Session`] holds.
pub(super) struct Totals {
    /// Images trained on by this process.
    pub(super) images_trained: u64,
    pub(super) times: Times,
    pub(super) stopped_early: bool,
}

/// Where this process's time went.
pub(super) struct Times {
    /// When the stage started.
    pub(super) started: Instant,
    /// Seconds from the start to the first batch: data, model, backbone features, resume.
    pub(super) setup_seconds: f64,
    /// Seconds of training (epochs and validation) in this process.
    pub(super) train_seconds: f64,
    /// Seconds trained by the runs this one resumed.
    pub(super) resumed_seconds: f64,
}

impl Times {
    /// The summary's timing line: the whole stage (this process), then its parts.
    fn line(&self, features_seconds: f64, images_trained: u64, writing_seconds: f64) -> String {
        let total = self.started.elapsed().as_secs_f64();
        let mut parts = vec![format!("setup {:.1} s", (self.setup_seconds - features_seconds).max(0.0))];
        if features_seconds > 0.0 {
            parts.push(format!("backbone features {features_seconds:.1} s"));
        }
        parts.push(format!("training {:.1} s ({:.0} images/s)", self.train_seconds, images_trained as f64 / self.train_seconds.max(1e-9)));
        parts.push(format!("writing {writing_seconds:.1} s"));
        let mut line = format!("{total:.1} s in all: {}", parts.join(", "));
        if self.resumed_seconds > 0.0 {
            line.push_str(&format!("; {:.1} s of training before the resume", self.resumed_seconds));
        }
        line
    }
}

pub(super) fn write(stage: &TrainStage, cx: &StageContext<'_>, session: Session, totals: Totals) -> Result<(), StageError> {
    let writing_started = Instant::now();
    let Session { manifest, data, trainer, progress, mut summary, features_seconds, .. } = session;
    let outputs = trainer.objective.outputs;
    let (norm, ps) = (data.norm, trainer.ps);
    let Totals { images_trained, times, stopped_early } = totals;
    let last = ps.tensors();
    let best_file = cx.scratch.join("best.safetensors");
    let best: BTreeMap<String, Tensor> = match progress.best {
        Some(_) if best_file.is_file() => {
            candle_core::safetensors::load(&best_file, &Device::Cpu).map_err(candle("best checkpoint"))?.into_iter().collect()
        }
        _ => last.clone(),
    };
    crate::nn::save_weights(&best, &cx.out_dir.join("model.safetensors")).map_err(candle("save model"))?;
    crate::nn::save_weights(&last, &cx.out_dir.join("last.safetensors")).map_err(candle("save model"))?;
    let digest = weights_digest(&best).map_err(candle("digest"))?;
    let best_epoch = progress.best.map(|b| b.0);
    let best_record = best_epoch.and_then(|e| progress.history.iter().find(|r| r.epoch == e));
    let card = ModelCard {
        format: "kiln-model/1".into(),
        model: stage.model.config.model.clone(),
        architecture: stage.model.arch.clone(),
        classes: manifest.classes.clone(),
        task: stage.model.config.task,
        binary: match outputs {
            // Without validation (or without a positive in it) there is nothing to choose a
            // threshold on: even odds.
            Outputs::Sigmoid { positive } => Some(Binary {
                positive: manifest.classes[positive].clone(),
                threshold: best_record.and_then(|r| r.threshold).unwrap_or(0.5),
            }),
            Outputs::Softmax | Outputs::Independent => None,
        },
        multi_label: (outputs == Outputs::Independent).then(|| MultiLabel {
            thresholds: best_record.and_then(|r| r.thresholds.clone()).unwrap_or_else(|| vec![0.5; manifest.classes.len()]),
        }),
        input: InputCard {
            channels: manifest.channels,
            height: manifest.height as usize,
            width: manifest.width as usize,
            transform: manifest.transform.clone(),
            mean: norm.mean.clone(),
            std: norm.std.clone(),
        },
        weights_digest: digest.clone(),
        best_epoch,
        epochs_run: progress.history.len(),
        metrics: best_record.map(|r| serde_json::to_value(r).expect("record serialises")),
        hyperparameters: stage.params(),
        parameters: ps.parameter_count(),
        seed: cx.seed,
        device_kind: stage.model.config.device.kind().into(),
    };
    io::write_json(cx, "model.json", &card)?;
    io::write_json(cx, "history.json", &progress.history)?;
    let binary = matches!(outputs, Outputs::Sigmoid { .. } | Outputs::Independent);
    let mut csv = String::from("epoch,lr,train_loss,train_accuracy,val_loss,val_accuracy");
    csv.push_str(if binary { ",val_auc,val_f1,threshold\n" } else { "\n" });
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
    for r in &progress.history {
        csv.push_str(&format!(
            "{},{:.8},{:.6},{:.6},{},{}",
            r.epoch,
            r.lr,
            r.train_loss,
            r.train_accuracy,
            opt(r.val_loss),
            opt(r.val_accuracy)
        ));
        if binary {
            csv.push_str(&format!(",{},{},{}", opt(r.val_auc), opt(r.val_f1), opt(r.threshold)));
        }
        csv.push('\n');
    }
    std::fs::write(cx.out_dir.join("history.csv"), csv).map_err(|e| StageError::Failed(format!("cannot write history.csv: {e}")))?;
    match super::super::curves::svg(&progress.history, &format!("{} — {}", cx.pipeline, cx.stage)) {
        Ok(svg) => {
            std::fs::write(cx.out_dir.join("curves.svg"), svg).map_err(|e| StageError::Failed(format!("cannot write curves.svg: {e}")))?
        }
        Err(e) => cx.reporter.warn(&format!("{}: cannot draw learning curves: {e}", cx.stage)),
    }
    // Only what the seed determines goes into the artifact: timings (in the summary line,
    // the stage entry and the run record) would make every rerun a different artifact and
    // defeat early cutoff for everything downstream.
    let report = serde_json::json!({
        "weights_digest": digest,
        "stopped_early": stopped_early,
        "best_epoch": best_epoch,
    });
    io::write_json(cx, "train_report.json", &report)?;
    if let Some(r) = best_record {
        summary.push(format!(
            "best epoch {} of {}: val accuracy {}, val loss {}",
            r.epoch,
            progress.history.len(),
            r.val_accuracy.map_or("-".into(), |v| format!("{v:.4}")),
            r.val_loss.map_or("-".into(), |v| format!("{v:.4}"))
        ));
        if let (Some(auc), Some(f1), Some(t)) = (r.val_auc, r.val_f1, r.threshold) {
            summary.push(format!("val ROC-AUC {auc:.4}; best val F1 {f1:.4} from p ≥ {t:.4}, the threshold in the model card"));
        }
        if let (Some(auc), Some(f1), Some(_)) = (r.val_auc, r.val_f1, &r.thresholds) {
            summary.push(format!("val macro ROC-AUC {auc:.4}; val micro F1 {f1:.4} at each class's best threshold, in the model card"));
        }
    }
    summary.push(format!("weights {}", &digest[..16]));
    summary.push(times.line(features_seconds, images_trained, writing_started.elapsed().as_secs_f64()));
    cx.reporter.summary(cx.stage, &summary);
    Ok(())
}
