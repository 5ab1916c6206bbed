//! What a model predicts: its task, and how its outputs become the probabilities every
//! later step reads.
//!
//! - `classification` (the default): one class per image, one logit per class, softmax.
//! - `binary`: one class of two is the positive one; the network has a single logit and a
//!   sigmoid gives the positive class's probability (Keras' `Dense(1, 'sigmoid')` with
//!   binary cross-entropy). The probability of the other class is its complement, so eval,
//!   predict and serve read a probability per class for both tasks, in class order; what a
//!   binary model adds is the decision threshold chosen on validation (see [`Binary`]).
//!
//! A classification model's card, params and lock file are what they were before tasks
//! existed: the task is written only when it is not `classification`.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::nn::Result;
use crate::nn::layers::softmax;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    #[default]
    Classification,
    Binary,
    /// Any number of classes per image (tags): one logit and one sigmoid per class.
    MultiLabel,
}

impl Task {
    pub const NAMES: [&'static str; 3] = ["classification", "binary", "multi_label"];

    pub fn is_classification(&self) -> bool {
        *self == Task::Classification
    }

    pub fn name(self) -> &'static str {
        match self {
            Task::Classification => "classification",
            Task::Binary => "binary",
            Task::MultiLabel => "multi_label",
        }
    }
}

/// How a network's logits become per-class probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outputs {
    /// One logit per class.
    Softmax,
    /// One logit, the log-odds of class `positive` (0 or 1) against the other.
    Sigmoid { positive: usize },
    /// One logit per class, each the log-odds of that class being present.
    Independent,
}

impl Outputs {
    /// The network's output width for `classes` classes.
    pub fn width(self, classes: usize) -> usize {
        match self {
            Outputs::Softmax | Outputs::Independent => classes,
            Outputs::Sigmoid { .. } => 1,
        }
    }

    /// Probabilities `[N, classes]` in class order from logits `[N, width]` (for
    /// independent classes each row's need not sum to 1).
    pub fn probabilities(self, logits: &Tensor) -> Result<Tensor> {
        match self {
            Outputs::Softmax => softmax(logits),
            Outputs::Independent => candle_nn::ops::sigmoid(logits),
            Outputs::Sigmoid { positive } => {
                let p = candle_nn::ops::sigmoid(logits)?;
                let q = p.affine(-1.0, 1.0)?;
                if positive == 0 { Tensor::cat(&[&p, &q], 1) } else { Tensor::cat(&[&q, &p], 1) }
            }
        }
    }

    /// The class each row of logits predicts at even odds (a binary model's own threshold
    /// is applied to its probabilities, not here); for independent classes, the most
    /// probable one.
    pub fn predicted(self, logits: &Tensor) -> Result<Vec<u32>> {
        match self {
            Outputs::Softmax | Outputs::Independent => logits.argmax(candle_core::D::Minus1)?.to_vec1(),
            Outputs::Sigmoid { positive } => {
                let z: Vec<f32> = logits.flatten_all()?.to_vec1()?;
                Ok(z.iter().map(|&v| if v > 0.0 { positive as u32 } else { 1 - positive as u32 }).collect())
            }
        }
    }
}

/// What a binary model decides with: the positive class and the probability from which an
/// image is called positive (the one that gave the best F1 on validation), in its card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Binary {
    pub positive: String,
    pub threshold: f64,
}

/// What a multi-label model decides with: a class is called present from its threshold on
/// (each the one with the best F1 for that class on validation; 0.5 where validation has
/// none of the class).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultiLabel {
    pub thresholds: Vec<f64>,
}

impl MultiLabel {
    /// The classes called present in a row of probabilities, in class order.
    pub fn present(&self, probs: &[f32]) -> Vec<usize> {
        probs.iter().zip(&self.thresholds).enumerate().filter(|(_, (p, t))| f64::from(**p) >= **t).map(|(c, _)| c).collect()
    }
}

/// The threshold with the best F1 when images scoring at least it are called positive, and
/// that F1, over (score, is positive) pairs; `None` without a positive. Each distinct score
/// is a candidate (scikit-learn's `precision_recall_curve` thresholds); of equal F1s the
/// highest threshold wins, so the choice does not depend on the order of the pairs.
pub fn best_f1_threshold(scores: &[(f64, bool)]) -> Option<(f64, f64)> {
    let mut s = scores.to_vec();
    s.sort_by(|a, b| b.0.total_cmp(&a.0));
    let pos = s.iter().filter(|x| x.1).count();
    if pos == 0 {
        return None;
    }
    let (mut tp, mut fp, mut best): (usize, usize, Option<(f64, f64)>) = (0, 0, None);
    let mut i = 0;
    while i < s.len() {
        let mut j = i;
        while j < s.len() && s[j].0 == s[i].0 {
            if s[j].1 {
                tp += 1
            } else {
                fp += 1
            }
            j += 1;
        }
        // F1 = 2TP / (2TP + FP + FN), with FN = pos - TP.
        let f1 = 2.0 * tp as f64 / (2 * tp + fp + (pos - tp)) as f64;
        if best.is_none_or(|(_, b)| f1 > b) {
            best = Some((s[i].0, f1));
        }
        i = j;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_sigmoid_gives_both_classes_in_class_order() {
        let z = Tensor::from_vec(vec![0f32, 2.0, -1.0], (3, 1), &Device::Cpu).unwrap();
        let s = |v: f32| 1.0 / (1.0 + (-v).exp());
        for positive in [0, 1] {
            let p: Vec<Vec<f32>> = Outputs::Sigmoid { positive }.probabilities(&z).unwrap().to_vec2().unwrap();
            for (row, v) in p.iter().zip([0f32, 2.0, -1.0]) {
                assert!((row[positive] - s(v)).abs() < 1e-6 && (row[1 - positive] - (1.0 - s(v))).abs() < 1e-6, "{row:?}");
            }
            // Even odds are not a positive call.
            assert_eq!(
                Outputs::Sigmoid { positive }.predicted(&z).unwrap(),
                vec![1 - positive as u32, positive as u32, 1 - positive as u32]
            );
        }
        assert_eq!(Outputs::Sigmoid { positive: 1 }.width(2), 1);
        assert_eq!(Outputs::Softmax.width(7), 7);
    }

    #[test]
    fn the_threshold_is_the_score_with_the_best_f1() {
        // Called positive from 0.35 on: TP 2, FP 1, FN 0 → F1 0.8; from 0.8: F1 2/3;
        // from 0.4: TP 1, FP 1 → 0.5; from 0.1: 2/3.
        let s = [(0.1, false), (0.4, false), (0.35, true), (0.8, true)];
        let (t, f1) = best_f1_threshold(&s).unwrap();
        assert_eq!(t, 0.35);
        assert!((f1 - 0.8).abs() < 1e-12);
        // Ties keep the highest threshold, whatever the order.
        // From 0.9: F1 2/3; from 0.4: TP 2, FP 2 → 2/3 as well.
        let tied = [(0.9, true), (0.6, false), (0.5, false), (0.4, true)];
        let mut rev = tied;
        rev.reverse();
        assert_eq!(best_f1_threshold(&tied).unwrap().0, 0.9);
        assert_eq!(best_f1_threshold(&tied), best_f1_threshold(&rev));
        assert_eq!(best_f1_threshold(&[(0.3, false)]), None);
    }
}
