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
use crate::task::{Binary, Outputs, Task};

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
        match (self.task, &self.binary) {
            (Task::Classification, _) => Ok(Outputs::Softmax),
            (Task::Binary, Some(b)) if self.classes.len() == 2 => match self.classes.iter().position(|c| *c == b.positive) {
                Some(positive) if b.threshold.is_finite() && (0.0..=1.0).contains(&b.threshold) => Ok(Outputs::Sigmoid { positive }),
                Some(_) => Err(format!("binary threshold {} is not a probability", b.threshold)),
                None => Err(format!("binary positive class `{}` is not one of {:?}", b.positive, self.classes)),
            },
            (Task::Binary, Some(_)) => Err(format!("a binary model has 2 classes, this card lists {}", self.classes.len())),
            (Task::Binary, None) => Err("a binary model's card needs `binary` (positive class and threshold)".into()),
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

    /// The class a row of probabilities is called.
    pub fn decide(&self, probs: &[f32]) -> usize {
        self.decision().map_or_else(|| crate::metrics::argmax(probs), |d| d.decide(probs))
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
