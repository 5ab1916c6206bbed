//! Learning-rate schedules, evaluated per optimizer step.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    #[default]
    Constant,
    /// Multiply by `gamma` every `step_epochs` epochs.
    Step,
    /// Cosine decay from the base rate to `min_lr` over the run.
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub step_epochs: usize,
    pub gamma: f64,
}

impl Schedule {
    /// The rate for optimizer step `step` (0-based) of a run of `epochs` epochs with
    /// `steps_per_epoch` steps each. Warmup rises linearly from lr/steps to lr.
    pub fn lr(&self, step: u64, steps_per_epoch: usize, epochs: usize) -> f64 {
        let spe = steps_per_epoch.max(1) as f64;
        let pos = step as f64;
        let warm = self.warmup_epochs * spe;
        if pos < warm {
            return self.lr * (pos + 1.0) / warm;
        }
        match self.kind {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Step => {
                let epoch = (pos / spe).floor() as i32;
                self.lr * self.gamma.powi(epoch / self.step_epochs.max(1) as i32)
            }
            ScheduleKind::Cosine => {
                let total = (epochs as f64 * spe - warm).max(1.0);
                let t = ((pos - warm) / total).clamp(0.0, 1.0);
                self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(kind: ScheduleKind, warmup: f64) -> Schedule {
        Schedule { kind, lr: 0.1, min_lr: 0.0, warmup_epochs: warmup, step_epochs: 2, gamma: 0.5 }
    }

    #[test]
    fn schedules_follow_their_formulas() {
        let c = s(ScheduleKind::Cosine, 0.0);
        assert!((c.lr(0, 10, 4) - 0.1).abs() < 1e-12);
        assert!((c.lr(20, 10, 4) - 0.05).abs() < 1e-12);
        assert!(c.lr(39, 10, 4) < 0.001);
        let st = s(ScheduleKind::Step, 0.0);
        assert_eq!([st.lr(0, 10, 6), st.lr(19, 10, 6), st.lr(20, 10, 6), st.lr(45, 10, 6)], [0.1, 0.1, 0.05, 0.025]);
        let w = s(ScheduleKind::Constant, 1.0);
        assert!((w.lr(0, 10, 3) - 0.01).abs() < 1e-12);
        assert!((w.lr(9, 10, 3) - 0.1).abs() < 1e-12);
        assert_eq!(w.lr(10, 10, 3), 0.1);
    }
}
