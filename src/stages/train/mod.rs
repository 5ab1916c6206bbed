//! `kind = "train"`: trains a classifier on the convert stage's shards with candle.
//!
//! ```toml
//! [stages.train]
//! kind = "train"
//! inputs = ["convert"]
//! # task = "binary"             # classification (default) | binary: one sigmoid logit
//! # positive = "dog"            # binary: the class the logit scores (default: the second)
//! # pos_weight = "balanced"     # binary: a number, or negatives per positive
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
//! `model.json` (classes, preprocessing, hyperparameters, metrics; a binary model's task,
//! positive class and decision threshold), `history.csv` and
//! `history.json` (per-epoch figures), `curves.svg` and `train_report.json` (best epoch,
//! early stop; no timings, so the artifact is byte-reproducible). An interrupted run
//! resumes from its last checkpoint (see [`checkpoint`]) and, on the CPU, ends with the same
//! weights as an uninterrupted one.

mod checkpoint;
mod curves;
mod fit;

use std::sync::Arc;

use toml::Spanned;
use toml::de::DeValue;

use super::training::{Config, Model};
use super::{ParseContext, PlanView, Stage, StageContext, StageError, StageKind, parse_config, upstream};
use crate::diagnostic::{Checker, Issue, ValueSpans};

pub use fit::EpochRecord;

pub struct TrainKind;

#[derive(Debug)]
pub struct TrainStage {
    model: Model,
}

impl StageKind for TrainKind {
    fn name(&self) -> &'static str {
        "train"
    }

    fn version(&self) -> u32 {
        // 2: train_report.json holds no timings, so the artifact is reproducible.
        // 3: kiln's own convolution, max pool and fused batch norm + activation: other
        //    summation orders, and max pooling passes the whole gradient (candle's passed 1/k²).
        // 4: convolutions on small maps multiply several images at once (other blocking).
        4
    }

    fn parse(&self, table: Spanned<DeValue<'_>>, _cx: &ParseContext<'_>) -> Result<Arc<dyn Stage>, Vec<Issue>> {
        let spans = ValueSpans::of(&table);
        let config: Config = parse_config(table)?;
        let mut ck = Checker::new(&spans);
        let model = Model::check(config, &mut ck, "");
        let issues = ck.into_issues();
        match model {
            Some(model) if issues.is_empty() => Ok(Arc::new(TrainStage { model })),
            _ => Err(issues),
        }
    }
}

impl Stage for TrainStage {
    fn params(&self) -> serde_json::Value {
        self.model.params()
    }

    fn path_deps(&self) -> Vec<Spanned<String>> {
        self.model.deps.clone()
    }

    /// Found when the manifest loads rather than after hours of upstream work: the input
    /// must hold shards, with a train split; the model must fit the data (see
    /// [`Model::plan_issues`]).
    fn plan_issues(&self, plan: &dyn PlanView) -> Vec<Issue> {
        let mut issues: Vec<Issue> = super::one_input_issue(plan).into_iter().collect();
        let this = plan.this();
        let inputs = this.distinct_inputs();
        if let [only] = inputs.as_slice()
            && let Some(up) = plan.stage(only)
        {
            if ["collect", "clean", "label", "preprocess", "train", "eval"].contains(&up.kind) {
                issues.push(
                    Issue::new(
                        plan.span("inputs"),
                        format!("train reads the shards of a `convert` stage, but its input `{}` is a `{}` stage", up.name, up.kind),
                    )
                    .help("add a convert stage between them, e.g. `[stages.convert]` with `kind = \"convert\"` and `inputs = [\"...\"]`"),
                );
            } else if up.kind == "label_issues" && up.stage.params()["policy"] != "drop" {
                issues.push(
                    Issue::new(
                        plan.span("inputs"),
                        format!(
                            "stage `{}` only reports suspected wrong labels (`policy = \"report\"`), so it has no shards to train on",
                            up.name
                        ),
                    )
                    .help(format!(
                        "set `policy = \"drop\"` in stage `{}` to train without its suspects, or read the convert stage it judges",
                        up.name
                    )),
                );
            }
        }
        let chain = upstream::dataset_chain(plan, &this);
        let classes = upstream::known_classes(&chain);
        if let Some(convert) = plan.ancestor_stage("convert") {
            let p = convert.stage.params();
            if p["split"]["from_items"].as_bool() == Some(false) && p["split"]["train"].as_f64() == Some(0.0) {
                issues.push(
                    Issue::new(convert.spans.get("split.train"), format!("stage `{}` puts nothing in the train split", convert.name))
                        .help("give the train split a share, e.g. split = { train = 0.8, val = 0.1, test = 0.1 }"),
                );
            }
        }
        issues.extend(self.model.plan_issues(plan, "", classes.as_ref()));
        issues
    }

    fn run(&self, cx: &StageContext<'_>) -> Result<(), StageError> {
        fit::run(self, cx)
    }
}
