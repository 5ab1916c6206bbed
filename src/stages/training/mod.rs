//! What the kinds that train a classifier share: the train stage, and label_issues, which
//! trains one per fold. Not a kind itself, so both may use it (kinds never use each other).
//!
//! - [`config`]: the options as the manifest writes them, and their defaults;
//! - [`Model`]: those options checked, with the architecture they name and the pretrained
//!   weights they read; its checks when the manifest loads ([`Model::check`]) and against
//!   the stages upstream ([`Model::plan_issues`]);
//! - [`setup`]: the input normalisation, the network, the backbone features of head
//!   fine-tuning (memoised per image), the optimizer and the schedule;
//! - [`step`]: one optimizer step on a batch of rows, and class probabilities of rows.
//!
//! Checkpoints, epochs, validation and the artifact are the train stage's own.

mod config;
mod setup;
mod step;

use std::ops::Range;

use toml::Spanned;

use super::PlanView;
use crate::diagnostic::spans::show;
use crate::diagnostic::{Bounds, Checker, Issue};
use crate::formats::preprocess::{MAX_SIDE, Normalize};
use crate::formats::shards::MAX_BATCH;
use crate::nn::device::DeviceChoice;
use crate::nn::models::{Arch, CnnConfig};
use crate::nn::optim::OptimizerKind;
use crate::paths::normalize_dep;
use crate::task::{Outputs, Task};

pub use config::{ClassWeights, Config, EarlyStopping, Finetune, FinetuneMode, InputOverride, Monitor, PosWeight};
pub use setup::Prepared;
pub use step::{At, Batches, Data, Inputs, Objective, Stepped, Trainer, candle, gather};

/// Multi-hot shards go with independent classes (multi-label), and only with them: checked
/// when a stage runs too, since shards may come from stages the plan cannot see into.
pub fn encoding_fits(manifest: &crate::formats::shards::ShardManifest, outputs: Outputs) -> Result<(), String> {
    use crate::formats::shards::Encoding;
    match (manifest.encoding == Encoding::MultiHot, outputs == Outputs::Independent) {
        (true, false) => {
            Err("its shards give several classes per image (multi_hot), but the model takes one: use task = \"multi_label\"".into())
        }
        (false, true) => {
            Err("the model is multi-label but its shards give one class per image: write them with encoding = \"multi_hot\"".into())
        }
        _ => Ok(()),
    }
}

/// Bounds of a model's options (the README's validation notes list them).
pub const MAX_EPOCHS: u64 = 100_000;
/// The most weights a model may have: 100 M, about 1.6 GB with gradients and Adam's state.
pub const MAX_PARAMETERS: u128 = 100_000_000;
const MAX_CNN_STAGES: u64 = 12;
const MAX_CNN_WIDTH: u64 = 4096;
const MAX_CNN_CONVS: u64 = 8;
const MAX_HIDDEN: u64 = 65_536;

/// A model's options, checked: the architecture they name, and the pretrained weights file
/// (a dependency of the stage).
#[derive(Debug)]
pub struct Model {
    pub config: Config,
    pub arch: Arch,
    /// The `weights` file, when there is one.
    pub deps: Vec<Spanned<String>>,
}

/// What the network must be fed: a pretrained model's preset, overridden by `input`.
pub struct ExpectedInput {
    pub size: Option<[u32; 2]>,
    pub channels: Option<usize>,
    /// `Err` when `input` gives only one of `mean` and `std`.
    pub norm: Result<Option<Normalize>, String>,
}

impl Model {
    /// Range-checks `config` as the manifest loads, each problem at its value: `prefix` is
    /// where the options sit in the stage table (`""` for a train stage, `"train."` for
    /// label_issues' table). `None` when the model name is unknown (already reported).
    pub fn check(config: Config, ck: &mut Checker<'_>, prefix: &str) -> Option<Model> {
        let p = |key: &str| format!("{prefix}{key}");
        let arch = Arch::from_name(&config.model, config.cnn.clone());
        if arch.is_none() {
            ck.fail(&p("model"), format!("unknown model `{}`", config.model), format!("expected one of: {}", Arch::NAMES.join(", ")));
        }
        if config.cnn.is_some() && config.model != "cnn" {
            ck.fail(&p("cnn"), "`cnn` settings apply only to model = \"cnn\"", "remove `cnn`, or set model = \"cnn\"");
        }
        let cnn_ok = config.cnn.as_ref().is_none_or(|cnn| check_cnn(ck, cnn, prefix));
        if config.finetune != Finetune::Mode(FinetuneMode::Full) && config.weights.is_none() {
            ck.fail(&p("finetune"), "fine-tuning part of a model needs pretrained `weights`", "weights = \"path/to/model.safetensors\"");
        }
        if let Finetune::LastN { last_n_blocks } = config.finetune
            && let Some(a) = &arch
            && cnn_ok
            && (last_n_blocks == 0 || last_n_blocks > a.blocks().len())
        {
            ck.fail(
                &p("finetune.last_n_blocks"),
                format!("`last_n_blocks` must be between 1 and {} for {}", a.blocks().len(), a.name()),
                "blocks count from the output end: 1 trains the last block and the head",
            );
        }
        ck.int(&p("epochs"), config.epochs as u64, 1, MAX_EPOCHS, "passes over the training split");
        ck.int(&p("batch_size"), config.batch_size as u64, 1, MAX_BATCH, "images per optimizer step");
        let lr_ok = ck.float(&p("lr"), config.lr, Bounds::above(0.0, 10.0), "the base learning rate");
        ck.float(&p("weight_decay"), config.weight_decay, Bounds::closed(0.0, 1.0), "");
        ck.float(&p("momentum"), config.momentum, Bounds::below(0.0, 1.0), "SGD's momentum");
        if config.nesterov && (config.optimizer != OptimizerKind::Sgd || config.momentum == 0.0) {
            ck.fail(
                &p("nesterov"),
                "`nesterov = true` needs optimizer = \"sgd\" and a `momentum` above 0",
                "Nesterov momentum is a form of SGD momentum; Adam and AdamW have none",
            );
        }
        if ck.float(
            &p("warmup_epochs"),
            config.warmup_epochs,
            Bounds::closed(0.0, MAX_EPOCHS as f64),
            "epochs over which the rate rises to `lr`",
        ) && config.warmup_epochs > config.epochs as f64
        {
            ck.fail(
                &p("warmup_epochs"),
                format!("`warmup_epochs` = {} is longer than the run (`epochs` = {})", show(config.warmup_epochs), config.epochs),
                "warm up for part of the run, e.g. warmup_epochs = 1",
            );
        }
        if ck.float(&p("min_lr"), config.min_lr, Bounds::closed(0.0, 10.0), "the rate cosine decay ends at")
            && lr_ok
            && config.min_lr > config.lr
        {
            ck.fail(
                &p("min_lr"),
                format!("`min_lr` = {} is above `lr` = {}", show(config.min_lr), show(config.lr)),
                "cosine decay runs from `lr` down to `min_lr`: keep min_lr ≤ lr",
            );
        }
        ck.int(&p("step_epochs"), config.step_epochs as u64, 1, MAX_EPOCHS, "epochs between the step schedule's decays");
        ck.float(&p("gamma"), config.gamma, Bounds::above(0.0, 1.0), "the step schedule multiplies the rate by it");
        if let Some(clip) = config.clip_grad_norm {
            ck.float(&p("clip_grad_norm"), clip, Bounds::above(0.0, 1e6), "the largest gradient norm a step may take");
        }
        ck.float(
            &p("label_smoothing"),
            config.label_smoothing,
            Bounds::below(0.0, 1.0),
            "the probability moved from the true class to all classes",
        );
        match &config.class_weights {
            Some(ClassWeights::Named(n)) if n != "balanced" => ck.fail(
                &p("class_weights"),
                format!("`class_weights` = \"{n}\": expected \"balanced\" or a list of numbers"),
                "e.g. class_weights = \"balanced\", or one weight per class: [1.0, 2.0]",
            ),
            Some(ClassWeights::List(w)) if w.is_empty() => {
                ck.fail(&p("class_weights"), "`class_weights` is empty", "one weight per class, in class order")
            }
            Some(ClassWeights::List(w))
                if ck.floats(&p("class_weights"), w.iter().map(|v| f64::from(*v)), Bounds::closed(0.0, 1e6), "a loss weight per class")
                    && w.iter().all(|v| *v == 0.0) =>
            {
                ck.fail(
                    &p("class_weights"),
                    "every class weight is 0, so nothing would be learned",
                    "give at least one class a positive weight",
                );
            }
            _ => {}
        }
        check_task(ck, &config, prefix);
        ck.float(&p("backbone_lr_scale"), config.backbone_lr_scale, Bounds::closed(0.0, 10.0), "the backbone's rate as a multiple of `lr`");
        if let Some(es) = &config.early_stopping {
            ck.int(&p("early_stopping.patience"), es.patience as u64, 1, MAX_EPOCHS, "epochs without improvement before training stops");
            ck.float(
                &p("early_stopping.min_delta"),
                es.min_delta,
                Bounds::below(0.0, 1.0),
                "the smallest change that counts as an improvement",
            );
        }
        ck.float(
            &p("checkpoint_secs"),
            config.checkpoint_secs,
            Bounds::closed(0.0, 604_800.0),
            "seconds between mid-epoch checkpoints; 0 writes one after every batch",
        );
        if let Some(input) = &config.input {
            check_input(ck, input, prefix);
        }
        let device = config.device;
        if matches!(device.resolve(), DeviceChoice::Cuda(_)) && !candle_core::utils::cuda_is_available() {
            ck.fail(&p("device"), "device `cuda` needs a kiln built with `--features cuda`", "or use device = \"cpu\"");
        }
        if device.resolve() == DeviceChoice::Metal && !candle_core::utils::metal_is_available() {
            ck.fail(&p("device"), "device `metal` needs a kiln built with `--features metal`", "or use device = \"cpu\"");
        }
        let mut deps = Vec::new();
        if let Some(w) = &config.weights {
            match normalize_dep(w) {
                Ok(path) => deps.push(Spanned::new(ck.spans.get(&p("weights")), path)),
                Err(why) => ck.fail(&p("weights"), format!("invalid weights path `{w}`: {why}"), "a path relative to the workspace root"),
            }
        }
        arch.map(|arch| Model { config, arch, deps })
    }

    /// The options as they go into a cache key: the numbers depend on the kind of device,
    /// not on whether it was chosen by `auto`.
    pub fn params(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.config).expect("training config serialises");
        v["device_kind"] = self.config.device.kind().into();
        v
    }

    /// How the network's outputs read for the dataset's `classes`: a binary model's
    /// positive class must be one of exactly two.
    pub fn outputs(&self, classes: &[String]) -> Result<Outputs, String> {
        match self.config.task {
            Task::Classification => Ok(Outputs::Softmax),
            Task::MultiLabel => Ok(Outputs::Independent),
            Task::Binary if classes.len() != 2 => {
                Err(format!("a binary model needs exactly 2 classes, but the data has {}: {}", classes.len(), classes.join(", ")))
            }
            Task::Binary => match &self.config.positive {
                None => Ok(Outputs::Sigmoid { positive: 1 }),
                Some(p) => classes
                    .iter()
                    .position(|c| c == p)
                    .map(|positive| Outputs::Sigmoid { positive })
                    .ok_or_else(|| format!("`positive` = \"{p}\" is not a class; the classes are {}", classes.join(", "))),
            },
        }
    }

    /// What the network must be fed: a pretrained model's preset, overridden by `input`.
    pub fn expected_input(&self) -> ExpectedInput {
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

    /// The model against the data that will reach it, found when the manifest loads rather
    /// than after hours of upstream work: at least two classes (`classes`, where the plan
    /// knows them), one class weight per class, a pretrained model's input matching what
    /// the nearest preprocess stage writes, and a CNN that fits the input size. `prefix` as
    /// for [`Model::check`].
    pub fn plan_issues(&self, plan: &dyn PlanView, prefix: &str, classes: Option<&(Vec<String>, Range<usize>)>) -> Vec<Issue> {
        let p = |key: &str| format!("{prefix}{key}");
        let mut issues = Vec::new();
        if let Some((names, span)) = classes
            && names.len() < 2
        {
            issues.push(
                Issue::new(span.clone(), format!("a classifier needs at least 2 classes, but the data has {}: {:?}", names.len(), names))
                    .help("list two or more classes, or draw more than one shape"),
            );
        }
        if self.config.task == Task::Binary
            && let Some((names, _)) = classes
        {
            if names.len() != 2 {
                issues.push(
                    Issue::new(
                        plan.span(&p("task")),
                        format!("a binary model needs exactly 2 classes, but the data has {}: {}", names.len(), names.join(", ")),
                    )
                    .help("map the classes onto two in the label stage (`classes` and `aliases`), or use task = \"classification\""),
                );
            } else if let Some(pos) = &self.config.positive
                && !names.contains(pos)
            {
                issues.push(
                    Issue::new(
                        plan.span(&p("positive")),
                        format!("`positive` = \"{pos}\" is not a class; the classes are {}", names.join(", ")),
                    )
                    .help(format!("e.g. positive = \"{}\"", names[1])),
                );
            }
        }
        if let Some(ClassWeights::List(w)) = &self.config.class_weights
            && let Some((names, _)) = classes
            && names.len() >= 2
            && w.len() != names.len()
        {
            issues.push(
                Issue::new(
                    plan.span(&p("class_weights")),
                    format!("`class_weights` has {} values for {} classes ({})", w.len(), names.len(), names.join(", ")),
                )
                .help("one weight per class, in class order, or class_weights = \"balanced\""),
            );
        }
        if let Some(convert) = plan.ancestor_stage("convert") {
            let multi_hot = convert.stage.params()["encoding"] == "multi_hot";
            let multi_label = self.config.task == Task::MultiLabel;
            if multi_hot && !multi_label {
                issues.push(
                    Issue::new(
                        convert.spans.get("encoding"),
                        format!(
                            "stage `{}` writes several labels per image (multi_hot), but this model's task is \"{}\", one class per image",
                            convert.name,
                            self.config.task.name()
                        ),
                    )
                    .help(if prefix.is_empty() {
                        "set task = \"multi_label\" in the model, or give each item one label and encoding = \"index\""
                    } else {
                        "label_issues judges one class per image: give each item one label, and encoding = \"index\""
                    }),
                );
            } else if multi_label && !multi_hot {
                issues.push(
                    Issue::new(
                        plan.span(&p("task")),
                        format!("a multi-label model reads multi-hot labels, but stage `{}` writes one class per image", convert.name),
                    )
                    .help(format!("set encoding = \"multi_hot\" in stage `{}`", convert.name)),
                );
            }
        }
        let Some(pre) = plan.ancestor_stage("preprocess") else { return issues };
        let name = pre.name;
        let want = self.expected_input();
        // The preprocess stage's parameters are its `Spec`: the transform, then normalize.
        let params = pre.stage.params();
        let t = &params["transform"];
        let size = t["width"].as_u64().zip(t["height"].as_u64());
        let model_or = |path: &str| if plan.this().spans.has(&p(path)) { plan.span(&p(path)) } else { plan.span(&p("model")) };
        if let (Some(expect), Some((w, h))) = (want.size, size)
            && [u64::from(expect[0]), u64::from(expect[1])] != [w, h]
        {
            issues.push(
                Issue::new(model_or("input.size"), format!(
                    "model `{}` expects {}x{} input but stage `{name}` writes {w}x{h}: set `size = [{}, {}]` there, or `input = {{ size = [{w}, {h}] }}` here to accept it",
                    self.config.model, expect[0], expect[1], expect[0], expect[1]
                ))
                .help("a pretrained network is fed images of the size it was trained on"),
            );
        }
        let grayscale = t["color"] == "grayscale";
        if want.channels == Some(3) && grayscale {
            issues.push(
                Issue::new(
                    plan.span(&p("model")),
                    format!(
                        "model `{}` expects RGB input but stage `{name}` writes grayscale: set `color = \"rgb\"` there",
                        self.config.model
                    ),
                )
                .help("pretrained weights were learned on three channels"),
            );
        }
        let channels = if grayscale { 1 } else { 3 };
        if let Some(mean) = self.config.input.as_ref().and_then(|i| i.mean.as_ref())
            && want.channels.is_none_or(|c| c == channels)
            && mean.len() != channels
        {
            issues.push(
                Issue::new(
                    plan.span(&p("input.mean")),
                    format!("`input.mean` has {} values but stage `{name}` writes {channels} channel(s)", mean.len()),
                )
                .help("one mean and one std per channel"),
            );
        }
        let have: Option<Normalize> = params.get("normalize").and_then(|n| serde_json::from_value(n.clone()).ok());
        if let (Ok(Some(w)), Some(h)) = (&want.norm, &have)
            && !w.approx_eq(h)
        {
            issues.push(
                Issue::new(model_or("input.mean"), format!(
                    "model `{}` expects normalize = {{ mean = {:?}, std = {:?} }} but stage `{name}` uses mean = {:?}, std = {:?}: change it there, or set `input = {{ mean = …, std = … }}` here to accept it",
                    self.config.model, w.mean, w.std, h.mean, h.std
                ))
                .help("a pretrained network expects the normalisation it was trained with"),
            );
        }
        if let Some((w, h)) = size {
            let min = min_input_side(&self.arch);
            if w < min || h < min {
                let stages = match &self.arch {
                    Arch::Cnn(cnn) => cnn.widths.len(),
                    _ => 0,
                };
                issues.push(
                    Issue::new(pre.spans.get("size"), format!(
                        "model `{}` halves its input {stages} times (2x2 pooling), so it needs at least {min}x{min} pixels, but stage `{name}` writes {w}x{h}",
                        self.config.model
                    ))
                    .help(format!("set `size = [{min}, {min}]` or larger in stage `{name}`, or give the model fewer `cnn.widths`")),
                );
            } else if let Arch::Cnn(cnn) = &self.arch {
                let n_classes = classes.map_or(2, |(names, _)| names.len().max(2));
                let (conv, dense) = cnn_parameters(cnn, channels, Some([w as u32, h as u32]), n_classes);
                let total = conv.saturating_add(dense);
                if total > MAX_PARAMETERS {
                    issues.push(
                        Issue::new(plan.span(&p(if dense > conv { "cnn.hidden" } else { "cnn.widths" })), format!(
                            "model `cnn` would have {total} weights on the {w}x{h} input of stage `{name}`, more than kiln trains ({MAX_PARAMETERS})"
                        ))
                        .help("shrink `cnn.hidden` or the last width, add a stage (each quarters the flattened size), or set `hidden = 0` to pool instead of flattening"),
                    );
                }
            }
        }
        issues
    }
}

/// The small CNN's shape: every size in range, and conv weights that fit in memory (the
/// hidden layer depends on the input size, checked against the preprocess stage when the
/// plan is). Whether all is well.
fn check_cnn(ck: &mut Checker<'_>, cnn: &CnnConfig, prefix: &str) -> bool {
    let p = |key: &str| format!("{prefix}{key}");
    let before = ck.issues.len();
    let stages = cnn.widths.len() as u64;
    if !(1..=MAX_CNN_STAGES).contains(&stages) {
        ck.fail(
            &p("cnn.widths"),
            format!("`cnn.widths` lists {stages} stages"),
            format!("give 1 to {MAX_CNN_STAGES} widths: each stage halves the resolution"),
        );
    }
    for (i, w) in cnn.widths.iter().enumerate() {
        ck.int(&p(&format!("cnn.widths[{i}]")), *w as u64, 1, MAX_CNN_WIDTH, "output channels of the stage");
    }
    ck.int(&p("cnn.convs_per_stage"), cnn.convs_per_stage as u64, 1, MAX_CNN_CONVS, "3x3 convolutions in each stage");
    ck.int(&p("cnn.hidden"), cnn.hidden as u64, 0, MAX_HIDDEN, "units of the hidden layer; 0 pools straight into the head");
    ck.float(&p("cnn.dropout"), cnn.dropout, Bounds::below(0.0, 1.0), "the share of units dropped while training");
    if ck.issues.len() > before {
        return false;
    }
    let (conv, _) = cnn_parameters(cnn, 3, None, 2);
    if conv > MAX_PARAMETERS {
        ck.fail(
            &p("cnn.widths"),
            format!("the CNN's convolutions alone would have {conv} weights, more than kiln trains ({MAX_PARAMETERS})"),
            "use narrower `widths` or fewer `convs_per_stage`",
        );
        return false;
    }
    true
}

/// The options that belong to some tasks only (`positive` to binary; `pos_weight` and the
/// AUC and F1 monitors to the sigmoid tasks, binary and multi-label) are errors under
/// another, and a sigmoid model weighs its classes with `pos_weight`, not `class_weights`.
fn check_task(ck: &mut Checker<'_>, config: &Config, prefix: &str) {
    let p = |key: &str| format!("{prefix}{key}");
    let task = config.task;
    let sigmoid = matches!(task, Task::Binary | Task::MultiLabel);
    let only = |ck: &mut Checker<'_>, key: &str, what: &str, tasks: &str| {
        ck.fail(
            &p(key),
            format!("{what} applies to task = {tasks} only, and this model's task is \"{}\"", task.name()),
            format!("set task = {tasks}, or remove `{key}`"),
        )
    };
    if config.positive.is_some() && task != Task::Binary {
        only(ck, "positive", "`positive`", "\"binary\"");
    }
    match &config.pos_weight {
        Some(_) if !sigmoid => only(ck, "pos_weight", "`pos_weight`", "\"binary\" or \"multi_label\""),
        Some(PosWeight::Named(n)) if n != "balanced" => ck.fail(
            &p("pos_weight"),
            format!("`pos_weight` = \"{n}\": expected \"balanced\" or a number"),
            "e.g. pos_weight = 3.0 (a positive counts three times), or \"balanced\" (negatives per positive)",
        ),
        Some(PosWeight::Value(w)) => {
            ck.float(&p("pos_weight"), *w, Bounds::above(0.0, 1e6), "how much more a positive counts in the loss");
        }
        _ => {}
    }
    if matches!(config.monitor, Monitor::ValAuc | Monitor::ValF1) && !sigmoid {
        let name = if config.monitor == Monitor::ValAuc { "val_auc" } else { "val_f1" };
        only(ck, "monitor", &format!("`monitor = \"{name}\"`"), "\"binary\" or \"multi_label\"");
    }
    if sigmoid && config.class_weights.is_some() {
        ck.fail(
            &p("class_weights"),
            format!("a {} model weighs its classes with `pos_weight`, not `class_weights`", task.name()),
            "e.g. pos_weight = \"balanced\", or pos_weight = 3.0",
        );
    }
}

/// `input = { size, mean, std }`: sizes in range, one value per channel, both or neither.
fn check_input(ck: &mut Checker<'_>, input: &InputOverride, prefix: &str) {
    let p = |key: &str| format!("{prefix}{key}");
    if let Some(size) = input.size {
        for (i, side) in size.iter().enumerate() {
            ck.int(&p(&format!("input.size[{i}]")), u64::from(*side), 1, u64::from(MAX_SIDE), "pixels; `size` is [width, height]");
        }
    }
    if input.mean.is_some() != input.std.is_some() {
        ck.fail(
            &p(if input.mean.is_some() { "input.mean" } else { "input.std" }),
            "`input` needs both `mean` and `std`, or neither",
            "e.g. input = { mean = [0.5], std = [0.25] }",
        );
    }
    for (name, values, bounds, why) in [
        ("mean", &input.mean, Bounds::closed(0.0, 1.0), "a fraction of 255"),
        ("std", &input.std, Bounds::above(0.0, 10.0), "a fraction of 255; pixels are divided by it"),
    ] {
        let Some(values) = values else { continue };
        let path = p(&format!("input.{name}"));
        if values.len() != 1 && values.len() != 3 {
            ck.fail(&path, format!("`{path}` has {} values", values.len()), "one value per channel: 1 for grayscale, 3 for rgb");
        }
        ck.floats(&path, values.iter().map(|v| f64::from(*v)), bounds, why);
    }
    if let (Some(m), Some(s)) = (&input.mean, &input.std)
        && m.len() != s.len()
    {
        ck.fail(&p("input.std"), format!("`input` has {} mean but {} std values", m.len(), s.len()), "one of each per channel");
    }
}

/// Weights of the small CNN: (conv stages with their batch norm, then hidden layer and
/// head). Without the input size only the conv part is known (the second is 0).
fn cnn_parameters(cnn: &CnnConfig, channels: usize, size: Option<[u32; 2]>, classes: usize) -> (u128, u128) {
    let k = cnn.convs_per_stage.max(1) as u128;
    let mut c = channels as u128;
    let mut conv: u128 = 0;
    for &w in &cnn.widths {
        let w = w as u128;
        // The first conv maps c → w, the others w → w; each has a batch norm (2 × w).
        let first = 9u128.saturating_mul(c).saturating_mul(w);
        let rest = (k - 1).saturating_mul(9).saturating_mul(w).saturating_mul(w);
        conv = conv.saturating_add(first).saturating_add(rest).saturating_add(k.saturating_mul(2).saturating_mul(w));
        c = w;
    }
    let Some([width, height]) = size else { return (conv, 0) };
    let n = cnn.widths.len() as u32;
    let (h, w) = (u128::from(height.checked_shr(n).unwrap_or(0)), u128::from(width.checked_shr(n).unwrap_or(0)));
    let classes = classes as u128;
    let dense = if cnn.hidden > 0 {
        let hidden = cnn.hidden as u128;
        c.saturating_mul(h).saturating_mul(w).saturating_add(1).saturating_mul(hidden).saturating_add((hidden + 1).saturating_mul(classes))
    } else {
        (c + 1).saturating_mul(classes)
    };
    (conv, dense)
}

/// The smallest side a model accepts: the CNN halves its input once per stage (2×2 max
/// pooling, which needs 2 pixels); the pretrained networks pad every convolution and pool,
/// so any size gives them at least one pixel.
fn min_input_side(arch: &Arch) -> u64 {
    match arch {
        Arch::Cnn(cnn) => 1u64.checked_shl(cnn.widths.len() as u32).unwrap_or(u64::MAX),
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(toml_text: &str) -> Model {
        let config: Config = toml::from_str(toml_text).unwrap();
        let arch = Arch::from_name(&config.model, config.cnn.clone()).unwrap();
        Model { config, arch, deps: Vec::new() }
    }

    /// A classifier's parameters (so its key and lock file) are what they were before tasks
    /// existed; each binary option enters them, and changes them.
    #[test]
    fn the_task_enters_the_key_only_when_it_is_not_classification() {
        let plain = model("model = \"cnn\"\ndevice = \"cpu\"").params();
        assert_eq!(
            serde_json::to_string(&plain).unwrap(),
            r#"{"backbone_lr_scale":1.0,"batch_size":64,"device":"cpu","device_kind":"cpu","epochs":10,"finetune":"full","gamma":0.1,"label_smoothing":0.0,"lr":0.001,"min_lr":0.0,"model":"cnn","momentum":0.9,"monitor":"val_accuracy","nesterov":false,"optimizer":"adamw","schedule":"constant","step_epochs":10,"warmup_epochs":0.0,"weight_decay":0.0001}"#
        );
        assert_eq!(model("model = \"cnn\"\ndevice = \"cpu\"\ntask = \"classification\"").params(), plain);
        let binary = model("model = \"cnn\"\ndevice = \"cpu\"\ntask = \"binary\"").params();
        assert_eq!(binary["task"], "binary");
        let variants = [
            "task = \"binary\"\npositive = \"a\"",
            "task = \"binary\"\npositive = \"b\"",
            "task = \"binary\"\npos_weight = 2.0",
            "task = \"binary\"\npos_weight = \"balanced\"",
            "task = \"binary\"\nmonitor = \"val_auc\"",
            "task = \"binary\"\nmonitor = \"val_f1\"",
        ];
        let mut seen = vec![plain, binary];
        for v in variants {
            let p = model(&format!("model = \"cnn\"\ndevice = \"cpu\"\n{v}")).params();
            assert!(!seen.contains(&p), "{v} must change the key");
            seen.push(p);
        }
    }

    #[test]
    fn a_binary_model_scores_its_positive_class() {
        let classes = ["cat".to_string(), "dog".to_string()];
        assert_eq!(model("model = \"cnn\"\ntask = \"binary\"").outputs(&classes), Ok(Outputs::Sigmoid { positive: 1 }));
        assert_eq!(model("model = \"cnn\"\ntask = \"binary\"\npositive = \"cat\"").outputs(&classes), Ok(Outputs::Sigmoid { positive: 0 }));
        assert!(
            model("model = \"cnn\"\ntask = \"binary\"\npositive = \"cow\"")
                .outputs(&classes)
                .unwrap_err()
                .contains("\"cow\" is not a class")
        );
        let three = ["a".to_string(), "b".to_string(), "c".to_string()];
        assert!(model("model = \"cnn\"\ntask = \"binary\"").outputs(&three).unwrap_err().contains("exactly 2 classes"));
        assert_eq!(model("model = \"cnn\"").outputs(&three), Ok(Outputs::Softmax));
    }

    /// `pos_weight = "balanced"` is negatives per positive in the rows trained on.
    #[test]
    fn balanced_pos_weight_is_negatives_per_positive() {
        let classes = ["cat".to_string(), "dog".to_string()];
        let o = model("model = \"cnn\"\ntask = \"binary\"\npos_weight = \"balanced\"").objective(&[0, 0, 0, 1], &[], &classes).unwrap();
        assert_eq!(o.pos_weight, vec![3.0]);
        let o = model("model = \"cnn\"\ntask = \"binary\"\npositive = \"cat\"\npos_weight = \"balanced\"")
            .objective(&[0, 0, 0, 1], &[], &classes)
            .unwrap();
        assert!((o.pos_weight[0] - 1.0 / 3.0).abs() < 1e-12);
        // Multi-label: one weight per class, from its column of the multi-hot targets.
        let o = model("model = \"cnn\"\ntask = \"multi_label\"\npos_weight = \"balanced\"")
            .objective(&[0, 0, 0], &[1.0, 1.0, 0.0, 1.0, 0.0, 0.0], &classes)
            .unwrap();
        assert_eq!(o.pos_weight, vec![2.0, 0.5]);
        assert!(
            model("model = \"cnn\"\ntask = \"multi_label\"\npos_weight = \"balanced\"").objective(&[0], &[1.0, 0.0], &classes).is_err()
        );
        assert!(model("model = \"cnn\"\ntask = \"binary\"\npos_weight = \"balanced\"").objective(&[0, 0], &[], &classes).is_err());
        // A class on every row has no negatives: its weight would be 0.
        let every =
            model("model = \"cnn\"\ntask = \"multi_label\"\npos_weight = \"balanced\"").objective(&[0, 0], &[1.0, 1.0, 1.0, 0.0], &classes);
        assert!(every.unwrap_err().to_string().contains("every training row has `cat`"));
    }

    /// Multi-hot shards and a multi-label model go together, at run time too.
    #[test]
    fn the_shards_encoding_must_fit_the_task() {
        let manifest = |encoding: &str| -> crate::formats::shards::ShardManifest {
            serde_json::from_value(serde_json::json!({
                "format": "kiln-shards/1", "layout": "NCHW", "dtype": "u8", "channels": 1, "height": 8, "width": 8,
                "encoding": encoding, "classes": ["a", "b"], "normalization": null, "normalization_applied": false,
                "augmentation": null, "splits": {}
            }))
            .unwrap()
        };
        assert!(encoding_fits(&manifest("multi_hot"), Outputs::Independent).is_ok());
        assert!(encoding_fits(&manifest("index"), Outputs::Softmax).is_ok());
        assert!(encoding_fits(&manifest("multi_hot"), Outputs::Softmax).unwrap_err().contains("task = \"multi_label\""));
        assert!(encoding_fits(&manifest("multi_hot"), Outputs::Sigmoid { positive: 1 }).is_err());
        assert!(encoding_fits(&manifest("one_hot"), Outputs::Independent).unwrap_err().contains("encoding = \"multi_hot\""));
    }
}
