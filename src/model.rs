//! A trained model as the train stage leaves it: `model.json` (the card) beside
//! `model.safetensors`. Evaluation and prediction load it through here, so they see the
//! same architecture, classes and preprocessing that training used.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::imaging::transform::Transform;
use crate::nn::layers::Ctx;
use crate::nn::models::{Arch, Network};
use crate::nn::{ParamStore, read_weights};
use crate::task::{Binary, MultiLabel, Outputs, Task};

/// What a network takes: the preprocess transform, then per-channel normalisation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputCard {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub transform: Option<Transform>,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    pub format: String,
    pub model: String,
    pub architecture: Arch,
    pub classes: Vec<String>,
    /// What the model predicts; absent (classification) in the cards of classifiers.
    #[serde(default, skip_serializing_if = "Task::is_classification")]
    pub task: Task,
    /// A binary model's positive class and decision threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<Binary>,
    /// A multi-label model's threshold per class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multi_label: Option<MultiLabel>,
    pub input: InputCard,
    pub weights_digest: String,
    pub best_epoch: Option<usize>,
    pub epochs_run: usize,
    pub metrics: Option<serde_json::Value>,
    pub hyperparameters: serde_json::Value,
    pub parameters: usize,
    pub seed: u64,
    pub device_kind: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read model card {path}: {why}")]
    Card { path: String, why: String },
    #[error("cannot load weights {path}: {why}")]
    Weights { path: String, why: String },
    #[error("model forward pass: {0}")]
    Forward(#[from] candle_core::Error),
}

pub struct TrainedModel {
    pub card: ModelCard,
    pub net: Box<dyn Network>,
    pub device: Device,
    pub outputs: Outputs,
}

impl ModelCard {
    /// How the network's outputs read, from the task, checked against the classes.
    pub fn outputs(&self) -> Result<Outputs, String> {
        if self.classes.is_empty() {
            return Err("the card lists no classes".into());
        }
        match (self.task, &self.binary) {
            (Task::Classification, _) => Ok(Outputs::Softmax),
            (Task::Binary, Some(b)) if self.classes.len() == 2 => match self.classes.iter().position(|c| *c == b.positive) {
                Some(positive) if b.threshold.is_finite() && (0.0..=1.0).contains(&b.threshold) => Ok(Outputs::Sigmoid { positive }),
                Some(_) => Err(format!("binary threshold {} is not a probability", b.threshold)),
                None => Err(format!("binary positive class `{}` is not one of {:?}", b.positive, self.classes)),
            },
            (Task::Binary, Some(_)) => Err(format!("a binary model has 2 classes, this card lists {}", self.classes.len())),
            (Task::Binary, None) => Err("a binary model's card needs `binary` (positive class and threshold)".into()),
            (Task::MultiLabel, _) => match &self.multi_label {
                Some(m) if m.thresholds.len() == self.classes.len() && m.thresholds.iter().all(|t| (0.0..=1.0).contains(t)) => {
                    Ok(Outputs::Independent)
                }
                Some(m) => Err(format!(
                    "a multi-label model needs one threshold in [0, 1] per class: {} classes, thresholds {:?}",
                    self.classes.len(),
                    m.thresholds
                )),
                None => Err("a multi-label model's card needs `multi_label` (a threshold per class)".into()),
            },
        }
    }

    /// How a binary model calls a row of probabilities (in class order); `None` for a
    /// classifier, which calls the most probable class.
    pub fn decision(&self) -> Option<crate::metrics::Decision> {
        match (self.outputs(), &self.binary) {
            (Ok(Outputs::Sigmoid { positive }), Some(b)) => Some(crate::metrics::Decision { positive, threshold: b.threshold }),
            _ => None,
        }
    }

    /// The class a row of probabilities is called (a multi-label model's most probable).
    pub fn decide(&self, probs: &[f32]) -> usize {
        self.decision().map_or_else(|| crate::metrics::argmax(probs), |d| d.decide(probs))
    }

    /// The classes a multi-label model calls present in a row of probabilities; `None` for
    /// the other tasks.
    pub fn present(&self, probs: &[f32]) -> Option<Vec<usize>> {
        self.multi_label.as_ref().filter(|_| self.task == Task::MultiLabel).map(|m| m.present(probs))
    }
}

impl TrainedModel {
    pub fn load(card_path: &Path, weights_path: &Path, device: Device) -> Result<Self, ModelError> {
        let card_err = |why: String| ModelError::Card { path: card_path.display().to_string(), why };
        let text = std::fs::read_to_string(card_path).map_err(|e| card_err(e.to_string()))?;
        let card: ModelCard = serde_json::from_str(&text).map_err(|e| card_err(e.to_string()))?;
        let outputs = card.outputs().map_err(card_err)?;
        let w_err = |why: String| ModelError::Weights { path: weights_path.display().to_string(), why };
        // Nothing trains here: every weight is a plain tensor, so the forward pass records no
        // graph and each activation is freed as soon as the next layer has consumed it
        // (tracked weights kept a whole batch's activations alive: 12.9 GB for Lite0 at 64).
        let mut ps = ParamStore::new(device.clone(), card.seed).with_trainable(|_| false);
        let net = card
            .architecture
            .build(&mut ps, card.input.channels, [card.input.width as u32, card.input.height as u32], outputs.width(card.classes.len()))
            .map_err(|e| w_err(e.to_string()))?;
        let tensors = read_weights(weights_path).map_err(|e| w_err(e.to_string()))?;
        // The card names the weights it was written with: damaged or swapped weights must
        // fail here, not give confident wrong answers (NaN probabilities, say) downstream.
        let digest = crate::nn::weights_digest(&tensors).map_err(|e| w_err(e.to_string()))?;
        if digest != card.weights_digest {
            return Err(w_err(format!(
                "the weights hash to {} but the model card expects {}: the file is damaged or belongs to another model",
                &digest[..digest.len().min(12)],
                &card.weights_digest[..card.weights_digest.len().min(12)]
            )));
        }
        let loaded = ps.load(&tensors, |_| false).map_err(|e| w_err(e.to_string()))?;
        if loaded.len() != ps.len() {
            let missing: Vec<&str> = ps.names().filter(|n| !loaded.iter().any(|l| l == n)).take(5).collect();
            return Err(w_err(format!("{} of {} tensors are missing (first: {})", ps.len() - loaded.len(), ps.len(), missing.join(", "))));
        }
        Ok(TrainedModel { card, net, device, outputs })
    }

    /// Class probabilities `[N, classes]` (in class order, whatever the task) for a
    /// normalised batch `[N, C, H, W]`.
    pub fn probabilities(&self, x: &Tensor) -> Result<Vec<Vec<f32>>, ModelError> {
        let logits = self.net.forward(&x.to_device(&self.device)?, &mut Ctx::eval())?;
        Ok(self.outputs.probabilities(&logits)?.to_device(&Device::Cpu)?.to_vec2()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::models::Arch;

    fn card(task: Task, classes: &[&str]) -> ModelCard {
        ModelCard {
            format: "kiln-model/1".into(),
            model: "cnn".into(),
            architecture: Arch::from_name("cnn", None).unwrap(),
            classes: classes.iter().map(|c| c.to_string()).collect(),
            task,
            binary: None,
            multi_label: None,
            input: InputCard { channels: 1, height: 8, width: 8, transform: None, mean: vec![0.5], std: vec![0.5] },
            weights_digest: String::new(),
            best_epoch: None,
            epochs_run: 0,
            metrics: None,
            hyperparameters: serde_json::Value::Null,
            parameters: 0,
            seed: 0,
            device_kind: "cpu".into(),
        }
    }

    /// A binary model calls its positive class from the threshold on, not from even odds;
    /// cards that cannot say how to decide are refused (a hand-edited model.json must not
    /// reach an index out of range or a NaN comparison).
    #[test]
    fn a_card_says_how_its_model_decides_or_is_refused() {
        let mut b = card(Task::Binary, &["cat", "dog"]);
        assert!(b.outputs().unwrap_err().contains("needs `binary`"));
        b.binary = Some(Binary { positive: "cat".into(), threshold: 0.8 });
        assert_eq!(b.outputs(), Ok(Outputs::Sigmoid { positive: 0 }));
        // 0.7 for `cat` is the more probable class but below its threshold.
        assert_eq!(b.decide(&[0.7, 0.3]), 1);
        assert_eq!(b.decide(&[0.8, 0.2]), 0);
        for bad in [f64::NAN, 1.5, -0.1] {
            b.binary = Some(Binary { positive: "cat".into(), threshold: bad });
            assert!(b.outputs().is_err(), "{bad}");
        }
        b.binary = Some(Binary { positive: "cow".into(), threshold: 0.5 });
        assert!(b.outputs().unwrap_err().contains("cow"));
        let mut three = card(Task::Binary, &["a", "b", "c"]);
        three.binary = Some(Binary { positive: "a".into(), threshold: 0.5 });
        assert!(three.outputs().unwrap_err().contains("2 classes"));

        let mut m = card(Task::MultiLabel, &["a", "b", "c"]);
        assert!(m.outputs().is_err());
        m.multi_label = Some(MultiLabel { thresholds: vec![0.5, 0.9] });
        assert!(m.outputs().is_err(), "one threshold per class");
        m.multi_label = Some(MultiLabel { thresholds: vec![0.5, 0.9, 0.2] });
        assert_eq!(m.outputs(), Ok(Outputs::Independent));
        assert_eq!(m.present(&[0.6, 0.8, 0.2]), Some(vec![0, 2]));
        let plain = card(Task::Classification, &["a", "b", "c"]);
        assert_eq!(plain.present(&[0.6, 0.8, 0.2]), None);
        assert_eq!(plain.decide(&[0.2, 0.5, 0.3]), 1);
        // A classifier's card reads as it did before tasks: no task, binary or multi_label key.
        let text = serde_json::to_string(&plain).unwrap();
        assert!(!text.contains("\"task\"") && !text.contains("binary") && !text.contains("multi_label"), "{text}");
    }
}
