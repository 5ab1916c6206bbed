//! The options of a model a stage trains, as the manifest writes them (`deny_unknown_fields`),
//! with their defaults: a train stage's table, and label_issues' `train` table. Their ranges
//! are checked by [`super::Model::check`].

use serde::{Deserialize, Serialize};

use crate::nn::device::DeviceChoice;
use crate::nn::models::CnnConfig;
use crate::nn::optim::OptimizerKind;
use crate::nn::schedule::ScheduleKind;
use crate::task::Task;

/// Which weights learn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", untagged)]
pub enum Finetune {
    Mode(FinetuneMode),
    LastN { last_n_blocks: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinetuneMode {
    /// Every weight trains.
    Full,
    /// The backbone is frozen; its features are computed once per image (memoised across
    /// runs) and only the new head trains.
    Head,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Monitor {
    #[default]
    ValAccuracy,
    ValLoss,
    /// Binary models: ROC-AUC on validation.
    ValAuc,
    /// Binary models: F1 on validation at its best threshold.
    ValF1,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    #[serde(default = "default_patience")]
    pub patience: usize,
    #[serde(default)]
    pub min_delta: f64,
}

fn default_patience() -> usize {
    3
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ClassWeights {
    /// `"balanced"`: inverse class frequency in the training split.
    Named(String),
    List(Vec<f32>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PosWeight {
    /// `"balanced"`: negatives per positive in the training split.
    Named(String),
    Value(f64),
}

/// The model input a pretrained network should get, overriding its preset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputOverride {
    pub size: Option<[u32; 2]>,
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// What the model predicts; written into the key only when it is not `classification`.
    #[serde(default, skip_serializing_if = "Task::is_classification")]
    pub task: Task,
    /// Binary: the class whose probability the single logit gives (default: the second
    /// class in class order, as Keras' `class_mode = "binary"` takes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positive: Option<String>,
    /// Binary: the weight of the positive term of the loss (PyTorch's `pos_weight`), a
    /// number or `"balanced"` (negatives / positives in the training split).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pos_weight: Option<PosWeight>,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnn: Option<CnnConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    #[serde(default = "default_finetune")]
    pub finetune: Finetune,
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default)]
    pub optimizer: OptimizerKind,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    #[serde(default)]
    pub nesterov: bool,
    #[serde(default)]
    pub schedule: ScheduleKind,
    #[serde(default)]
    pub warmup_epochs: f64,
    #[serde(default)]
    pub min_lr: f64,
    #[serde(default = "default_step_epochs")]
    pub step_epochs: usize,
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_grad_norm: Option<f64>,
    #[serde(default)]
    pub label_smoothing: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_weights: Option<ClassWeights>,
    /// Learning-rate multiplier for everything but the head (discriminative rates).
    #[serde(default = "default_scale")]
    pub backbone_lr_scale: f64,
    #[serde(default)]
    pub monitor: Monitor,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<EarlyStopping>,
    #[serde(default)]
    pub device: DeviceChoice,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<InputOverride>,
    /// Seconds between mid-epoch checkpoints. Not part of the key: resuming gives the same
    /// weights whenever the checkpoint was taken.
    #[serde(default = "default_checkpoint_secs", skip_serializing)]
    pub checkpoint_secs: f64,
}

fn default_finetune() -> Finetune {
    Finetune::Mode(FinetuneMode::Full)
}
fn default_epochs() -> usize {
    10
}
fn default_batch() -> usize {
    64
}
fn default_lr() -> f64 {
    1e-3
}
fn default_wd() -> f64 {
    1e-4
}
fn default_momentum() -> f64 {
    0.9
}
fn default_step_epochs() -> usize {
    10
}
fn default_gamma() -> f64 {
    0.1
}
fn default_scale() -> f64 {
    1.0
}
fn default_checkpoint_secs() -> f64 {
    60.0
}
