//! `kind = "train"`: trains a classifier on the convert stage's shards with candle.
//!
//! ```toml
//! [stages.train]
//! kind = "train"
//! inputs = ["convert"]
//! model = "cnn"                 # cnn | resnet18 | resnet34 | resnet50 | efficientnet_lite0
//! cnn = { widths = [32, 64], hidden = 128, dropout = 0.25 }
//! # weights = "models/efficientnet_lite0.safetensors"   # pretrained backbone (local file)
//! # finetune = "head"           # full (default) | head | { last_n_blocks = 2 }
//! epochs = 10
//! batch_size = 64
//! optimizer = "adamw"           # adamw | adam | sgd
//! lr = 0.001
//! schedule = "cosine"           # constant | step | cosine; warmup_epochs, min_lr, step_epochs, gamma
//! early_stopping = { patience = 3 }
//! device = "auto"               # auto | cpu | cuda | cuda:N | metal
//! ```
//!
//! The artifact holds `model.safetensors` (best epoch by `monitor`), `last.safetensors`,
//! `model.json` (classes, preprocessing, hyperparameters, metrics), `history.csv` and
//! `history.json` (per-epoch figures), `curves.svg` and `train_report.json` (best epoch,
//! early stop; no timings, so the artifact is byte-reproducible). An interrupted run
//! resumes from its last checkpoint (see [`checkpoint`]) and, on the CPU, ends with the same
//! weights as an uninterrupted one.

mod checkpoint;
mod curves;
pub mod data;
mod fit;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::de::DeValue;

use super::{ParseContext, Stage, StageContext, StageError, StageKind, parse_config};
use crate::manifest::{Issue, normalize_dep};
use crate::nn::device::DeviceChoice;
use crate::nn::models::{Arch, CnnConfig};
use crate::nn::optim::OptimizerKind;
use crate::nn::schedule::ScheduleKind;
use crate::stages::preprocess::Normalize;

pub use fit::EpochRecord;

pub struct TrainKind;

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

#[derive(Debug)]
pub struct TrainStage {
    config: Config,
    arch: Arch,
    deps: Vec<Spanned<String>>,
}

impl StageKind for TrainKind {
    fn name(&self) -> &'static str {
        "train"
    }

    fn version(&self) -> u32 {
        // 2: train_report.json holds no timings, so the artifact is reproducible.
        2
    }

    fn parse(&self, table: Spanned<DeValue<'_>>, _cx: &ParseContext<'_>) -> Result<Arc<dyn Stage>, Vec<Issue>> {
        let span = table.span();
        let config: Config = parse_config(table)?;
        let mut issues = Vec::new();
        let issue = |msg: String| Issue::new(span.clone(), msg);
        let arch = Arch::from_name(&config.model, config.cnn.clone());
        if arch.is_none() {
            issues.push(issue(format!("unknown model `{}`", config.model)).help(format!("expected one of: {}", Arch::NAMES.join(", "))));
        }
        if config.cnn.is_some() && config.model != "cnn" {
            issues.push(issue("`cnn` settings apply only to model = \"cnn\"".into()));
        }
        if config.finetune != Finetune::Mode(FinetuneMode::Full) && config.weights.is_none() {
            issues.push(
                issue("fine-tuning part of a model needs pretrained `weights`".into()).help("weights = \"path/to/model.safetensors\""),
            );
        }
        if let Finetune::LastN { last_n_blocks } = config.finetune
            && let Some(a) = &arch
            && (last_n_blocks == 0 || last_n_blocks > a.blocks().len())
        {
            issues.push(issue(format!("`last_n_blocks` must be between 1 and {} for {}", a.blocks().len(), a.name())));
        }
        if config.epochs == 0 || config.batch_size == 0 {
            issues.push(issue("`epochs` and `batch_size` must be at least 1".into()));
        }
        if !(config.lr > 0.0 && config.lr.is_finite()) {
            issues.push(issue(format!("`lr` must be positive, got {}", config.lr)));
        }
        if !(0.0..1.0).contains(&config.label_smoothing) {
            issues.push(issue("`label_smoothing` must be in [0, 1)".into()));
        }
        if let Some(ClassWeights::Named(n)) = &config.class_weights
            && n != "balanced"
        {
            issues.push(issue(format!("`class_weights` = \"{n}\": expected \"balanced\" or a list of numbers")));
        }
        let device = config.device;
        if matches!(device.resolve(), DeviceChoice::Cuda(_)) && !candle_core::utils::cuda_is_available() {
            issues.push(issue("device `cuda` needs a kiln built with `--features cuda`".into()));
        }
        if device.resolve() == DeviceChoice::Metal && !candle_core::utils::metal_is_available() {
            issues.push(issue("device `metal` needs a kiln built with `--features metal`".into()));
        }
        let mut deps = Vec::new();
        if let Some(w) = &config.weights {
            match normalize_dep(w) {
                Ok(p) => deps.push(Spanned::new(span.clone(), p)),
                Err(why) => issues.push(issue(format!("invalid weights path `{w}`: {why}"))),
            }
        }
        match arch {
            Some(arch) if issues.is_empty() => Ok(Arc::new(TrainStage { config, arch, deps })),
            _ => Err(issues),
        }
    }
}

/// What the network must be fed: a pretrained model's preset, overridden by `input`.
struct ExpectedInput {
    size: Option<[u32; 2]>,
    channels: Option<usize>,
    /// `Err` when `input` gives only one of `mean` and `std`.
    norm: Result<Option<Normalize>, String>,
}

impl TrainStage {
    fn expected_input(&self) -> ExpectedInput {
        let preset = self.arch.preset().filter(|_| self.config.weights.is_some());
        let over = self.config.input.as_ref();
        let norm = match (over.and_then(|o| o.mean.clone()), over.and_then(|o| o.std.clone())) {
            (Some(mean), Some(std)) => Ok(Some(Normalize { mean, std })),
            (None, None) => Ok(preset.as_ref().map(|p| Normalize { mean: p.mean.clone(), std: p.std.clone() })),
            _ => Err("`input` needs both `mean` and `std`, or neither".to_string()),
        };
        ExpectedInput {
            size: over.and_then(|o| o.size).or(preset.as_ref().map(|p| p.size)),
            channels: preset.as_ref().map(|p| p.channels),
            norm,
        }
    }
}

impl Stage for TrainStage {
    fn params(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.config).expect("train config serialises");
        // The numbers depend on the kind of device, not on whether it was chosen by `auto`.
        v["device_kind"] = self.config.device.kind().into();
        v
    }

    fn path_deps(&self) -> Vec<Spanned<String>> {
        self.deps.clone()
    }

    /// A pretrained model's input must match what preprocess produces: found here, when
    /// the manifest loads, rather than after hours of upstream work.
    fn check_plan(&self, plan: &dyn super::PlanView) -> Vec<String> {
        let Some((name, pre)) = plan.ancestor("preprocess") else { return Vec::new() };
        let want = self.expected_input();
        let mut problems = Vec::new();
        // The preprocess stage's parameters are its `Spec`: the transform, then normalize.
        let t = &pre["transform"];
        let size = t["width"].as_u64().zip(t["height"].as_u64()).map(|(w, h)| [w as u32, h as u32]);
        if let (Some(want), Some(have)) = (want.size, size)
            && want != have
        {
            problems.push(format!(
                "model `{}` expects {}x{} input but stage `{name}` writes {}x{}: set `size = [{}, {}]` there, or `input = {{ size = [{}, {}] }}` here to accept it",
                self.config.model, want[0], want[1], have[0], have[1], want[0], want[1], have[0], have[1]
            ));
        }
        if want.channels == Some(3) && t["color"] == "grayscale" {
            problems.push(format!(
                "model `{}` expects RGB input but stage `{name}` writes grayscale: set `color = \"rgb\"` there",
                self.config.model
            ));
        }
        // A half-given `input` normalisation is reported when the stage runs.
        let have: Option<Normalize> = pre.get("normalize").and_then(|n| serde_json::from_value(n.clone()).ok());
        if let (Ok(Some(w)), Some(h)) = (&want.norm, &have)
            && !w.approx_eq(h)
        {
            problems.push(format!(
                "model `{}` expects normalize = {{ mean = {:?}, std = {:?} }} but stage `{name}` uses mean = {:?}, std = {:?}: change it there, or set `input = {{ mean = …, std = … }}` here to accept it",
                self.config.model, w.mean, w.std, h.mean, h.std
            ));
        }
        problems
    }

    fn run(&self, cx: &StageContext<'_>) -> Result<(), StageError> {
        fit::run(self, cx)
    }
}
