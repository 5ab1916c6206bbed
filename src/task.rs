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
}
