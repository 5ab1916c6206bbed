//! How the engine tells the outside world what it is doing.
//!
//! The engine never prints: it calls a [`Reporter`]. The CLI renders progress bars and
//! per-stage lines; tests and library users pass [`NullReporter`] or their own.

use std::time::Duration;

/// One unit of long work (hashing a tree, running a per-item stage).
pub trait Progress: Send + Sync {
    fn inc(&self, n: u64);
    fn finish(&self);
    /// Live figures shown beside the bar (a training loss, say).
    fn set_detail(&self, _detail: &str) {}
}

/// What became of one stage in a run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum StageOutcome {
    /// Taken from the cache; `restored` counts workspace outputs that had to be put back.
    Cached {
        restored: usize,
        /// The result came from the remote cache.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pulled: bool,
    },
    Ran {
        seconds_millis: u64,
    },
    Failed {
        reason: String,
    },
    /// Not run because an upstream stage failed.
    Skipped {
        upstream: String,
    },
    /// Not started: `--fail-fast` stopped the run.
    Cancelled,
}

impl StageOutcome {
    pub fn ran(elapsed: Duration) -> Self {
        StageOutcome::Ran { seconds_millis: elapsed.as_millis() as u64 }
    }

    pub fn is_success(&self) -> bool {
        matches!(self, StageOutcome::Cached { .. } | StageOutcome::Ran { .. })
    }

    /// The one-word status plus detail shown by `kiln run`.
    pub fn describe(&self) -> String {
        match self {
            StageOutcome::Cached { restored: 0, pulled: false } => "cached".into(),
            StageOutcome::Cached { restored: 0, pulled: true } => "cached (from remote)".into(),
            StageOutcome::Cached { restored, pulled } => format!(
                "cached ({}restored {restored} output{})",
                if *pulled { "from remote, " } else { "" },
                if *restored == 1 { "" } else { "s" }
            ),
            StageOutcome::Ran { seconds_millis } => format!("ran ({:.1}s)", *seconds_millis as f64 / 1000.0),
            StageOutcome::Failed { reason } => format!("failed ({reason})"),
            StageOutcome::Skipped { upstream } => format!("skipped (upstream `{upstream}` failed)"),
            StageOutcome::Cancelled => "skipped (run stopped by --fail-fast)".into(),
        }
    }
}

pub trait Reporter: Send + Sync {
    /// Long work is starting; `total` is in `unit`s (files, items, bytes).
    fn progress(&self, label: &str, total: u64, unit: &'static str) -> Box<dyn Progress>;
    fn stage_started(&self, _stage: &str) {}
    fn stage_finished(&self, _stage: &str, _outcome: &StageOutcome) {}
    /// A few lines a stage wants people to read (counts per reason, class balance…).
    fn summary(&self, stage: &str, lines: &[String]) {
        for line in lines {
            tracing::info!(stage, "{line}");
        }
    }
    /// Something the user should see but that does not stop the run.
    fn warn(&self, message: &str) {
        tracing::warn!("{message}");
    }
}

pub struct NullReporter;

struct NullProgress;

impl Progress for NullProgress {
    fn inc(&self, _n: u64) {}
    fn finish(&self) {}
}

impl Reporter for NullReporter {
    fn progress(&self, _label: &str, _total: u64, _unit: &'static str) -> Box<dyn Progress> {
        Box::new(NullProgress)
    }
}
