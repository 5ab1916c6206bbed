//! `kind = "label_issues"`: finds items whose label is probably wrong, from what models that
//! never saw those labels predict (confident learning, as cleanlab does).
//!
//! ```toml
//! [stages.label_issues]
//! kind = "label_issues"
//! inputs = ["convert"]
//! folds = 5                            # 2 to 20
//! splits = ["train", "val", "test"]    # the rows judged (the default: all)
//! policy = "report"                    # or "drop": shards without the suspects
//! [stages.label_issues.train]          # the model of each fold: a train stage's options
//! model = "cnn"
//! cnn = { widths = [16, 32], hidden = 64 }
//! epochs = 10
//! ```
//!
//! The rows of the splits judged are dealt into `folds` folds: stratified by given label,
//! seeded, and with the copies of one image (clean's duplicate groups, offline augmented
//! copies) in one fold ([`folds`]). For each fold a model trains on the other folds, with
//! the train stage's own steps and in memory, and predicts the fold; with `finetune =
//! "head"` the backbone's features are computed once, for every fold. From those
//! out-of-fold probabilities, [`confident`] estimates per-class thresholds and the
//! confident joint and ranks the suspects by self-confidence. Rows whose label a person
//! already reviewed (a row of the label stage's corrections file) still count in those
//! estimates but are never suspects: the report counts them as `reviewed_not_suggested`.
//!
//! The artifact ([`output`]): `label_issues_report.json` (the suspects ranked, with given
//! and suggested label and score, counts per class, the estimate), `suggested_corrections.csv`
//! (`id,label,given,self_confidence`: once reviewed, the label stage's `corrections`),
//! `out_of_fold.csv` and `thumbs/NNNN.png`; with `policy = "drop"`, also the input's shards
//! without the suspects (`manifest.json`, `shards/`, `class_to_index.json`), which a train
//! stage can take as its input. The files are byte-reproducible on the CPU.

mod confident;
mod folds;
mod output;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::de::DeValue;

use super::training::{self, Inputs, Model};
use super::{ParseContext, PlanView, Stage, StageContext, StageError, StageKind, io, parse_config, upstream};
use crate::diagnostic::{Checker, Issue, ValueSpans};
use crate::formats::shards::{Encoding, ShardManifest};
use folds::Pool;

pub struct LabelIssuesKind;

/// The splits a stage may judge, in the order their rows are pooled.
const SPLITS: [&str; 3] = ["train", "val", "test"];
const MIN_FOLDS: u64 = 2;
const MAX_FOLDS: u64 = 20;
/// Above this share of suspects the models are more likely too weak than the labels wrong.
const SUSPICIOUS_SHARE: f64 = 0.25;

/// The model of each fold when the manifest gives no `train` table: a small CNN that trains
/// in seconds on small images. Every other option keeps a train stage's default.
const DEFAULT_TRAIN: &str = r#"
model = "cnn"
cnn = { widths = [16, 32], hidden = 64, dropout = 0.1 }
epochs = 10
batch_size = 32
lr = 0.002
schedule = "cosine"
"#;

/// What becomes of the suspects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Listed in the report; the data is left alone.
    #[default]
    Report,
    /// Also removed: the artifact holds the shards without them.
    Drop,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_folds")]
    folds: usize,
    #[serde(default)]
    policy: Policy,
    #[serde(default = "default_splits")]
    splits: Vec<String>,
    #[serde(default)]
    train: Option<training::Config>,
}

fn default_folds() -> usize {
    5
}
fn default_splits() -> Vec<String> {
    SPLITS.iter().map(|s| s.to_string()).collect()
}
fn default_train() -> training::Config {
    toml::from_str(DEFAULT_TRAIN).expect("the default fold model is a valid train table")
}

#[derive(Debug)]
pub struct LabelIssuesStage {
    folds: usize,
    policy: Policy,
    /// In pooling order (train, val, test), each once.
    splits: Vec<String>,
    model: Model,
}

impl StageKind for LabelIssuesKind {
    fn name(&self) -> &'static str {
        "label_issues"
    }

    fn version(&self) -> u32 {
        // 2: the fold models train with kiln's own convolution, pooling and batch norm ops.
        // 3: convolutions on small maps multiply several images at once (other blocking).
        3
    }

    fn parse(&self, table: Spanned<DeValue<'_>>, _cx: &ParseContext<'_>) -> Result<Arc<dyn Stage>, Vec<Issue>> {
        let spans = ValueSpans::of(&table);
        let config: Config = parse_config(table)?;
        let mut ck = Checker::new(&spans);
        ck.int(
            "folds",
            config.folds as u64,
            MIN_FOLDS,
            MAX_FOLDS,
            "each fold is predicted by a model trained on the others; 5 is usual, more costs more training",
        );
        if config.splits.is_empty() {
            ck.fail("splits", "`splits` is empty, so nothing would be judged", "e.g. splits = [\"train\", \"val\", \"test\"]");
        }
        for (i, s) in config.splits.iter().enumerate() {
            let path = format!("splits[{i}]");
            if !SPLITS.contains(&s.as_str()) {
                ck.fail(
                    &path,
                    format!("`splits` names `{s}`: expected \"train\", \"val\" or \"test\""),
                    "the splits of the convert stage's shards to judge",
                );
            } else if config.splits[..i].contains(s) {
                ck.fail(&path, format!("split `{s}` is listed twice in `splits`"), "list each split once");
            }
        }
        let written = config.train.is_some();
        let train = config.train.unwrap_or_else(default_train);
        if written {
            // Each fold model trains for `epochs` and predicts with its last weights: there is
            // no validation split to pick an epoch by, and nothing is kept to resume from.
            if train.early_stopping.is_some() {
                ck.fail(
                    "train.early_stopping",
                    "fold models train for every epoch: there is no validation split to stop on",
                    "remove `early_stopping`, and set `epochs` to what the model needs",
                );
            }
            if spans.has("train.monitor") {
                ck.fail("train.monitor", "fold models keep their last weights: there is no best epoch to monitor", "remove `monitor`");
            }
            if spans.has("train.checkpoint_secs") {
                ck.fail("train.checkpoint_secs", "fold models are trained in memory and never checkpointed", "remove `checkpoint_secs`");
            }
            if train.task == crate::task::Task::MultiLabel {
                ck.fail(
                    "train.task",
                    "label_issues judges one given class per image; a multi-label model has none to doubt",
                    "use task = \"classification\" or \"binary\" here",
                );
            }
        }
        let model = Model::check(train, &mut ck, "train.");
        let issues = ck.into_issues();
        let splits = SPLITS.iter().filter(|s| config.splits.iter().any(|x| x.as_str() == **s)).map(|s| s.to_string()).collect();
        match model {
            Some(model) if issues.is_empty() => {
                Ok(Arc::new(LabelIssuesStage { folds: config.folds, policy: config.policy, splits, model }))
            }
            _ => Err(issues),
        }
    }
}

impl Stage for LabelIssuesStage {
    fn params(&self) -> serde_json::Value {
        serde_json::json!({
            "folds": self.folds,
            "policy": self.policy,
            "splits": self.splits,
            "train": self.model.params(),
        })
    }

    fn path_deps(&self) -> Vec<Spanned<String>> {
        self.model.deps.clone()
    }

    /// The input must hold shards, with rows in some split judged; the fold model must fit
    /// the data (see [`Model::plan_issues`]).
    fn plan_issues(&self, plan: &dyn PlanView) -> Vec<Issue> {
        let mut issues: Vec<Issue> = super::one_input_issue(plan).into_iter().collect();
        let this = plan.this();
        let inputs = this.distinct_inputs();
        if let [only] = inputs.as_slice()
            && let Some(up) = plan.stage(only)
        {
            let no_shards = ["collect", "clean", "label", "preprocess", "train", "eval"].contains(&up.kind)
                || (up.kind == "label_issues" && up.stage.params()["policy"] != "drop");
            if no_shards {
                issues.push(
                    Issue::new(
                        plan.span("inputs"),
                        format!(
                            "label_issues judges the shards of a `convert` stage, but its input `{}` is a `{}` stage",
                            up.name, up.kind
                        ),
                    )
                    .help("e.g. inputs = [\"convert\"]"),
                );
            }
        }
        if let Some(convert) = plan.ancestor_stage("convert") {
            let p = convert.stage.params();
            let split = &p["split"];
            if split["from_items"].as_bool() == Some(false) && self.splits.iter().all(|s| split[s.as_str()].as_f64() == Some(0.0)) {
                issues.push(
                    Issue::new(
                        plan.span("splits"),
                        format!("stage `{}` puts nothing in the splits judged ({})", convert.name, self.splits.join(", ")),
                    )
                    .help("judge a split it fills, e.g. splits = [\"train\", \"val\", \"test\"]"),
                );
            }
        }
        let chain = upstream::dataset_chain(plan, &this);
        let classes = upstream::known_classes(&chain);
        issues.extend(self.model.plan_issues(plan, "train.", classes.as_ref()));
        issues
    }

    fn run(&self, cx: &StageContext<'_>) -> Result<(), StageError> {
        let started = Instant::now();
        let (input, artifact) = io::single_input(cx)?;
        let manifest = ShardManifest::read(cx, input, artifact)?;
        let classes = manifest.classes.len();
        if classes < 2 {
            return Err(StageError::Failed(format!("input `{input}` has {classes} class(es): a classifier needs at least 2")));
        }
        if manifest.encoding == Encoding::MultiHot {
            return Err(StageError::data(
                input,
                "its shards give several labels per image (multi_hot): label_issues judges one class per image",
            ));
        }
        let norm = self.model.resolve_input(&manifest)?;
        let Pool { split, rows } = Pool::load(cx, input, artifact, &manifest, &self.splits)?;
        if rows.judged.is_empty() {
            return Err(StageError::data(input, format!("its splits judged ({}) are empty", self.splits.join(", "))));
        }
        let dealt = folds::assign(&rows.labels, &rows.groups, self.folds, cx.seed).map_err(|why| StageError::data(input, why))?;
        let oof = folds::out_of_fold(cx, &self.model, &manifest, norm, (split, &rows), &dealt)?;
        let given: Vec<usize> = rows.judged.iter().map(|&r| rows.labels[r] as usize).collect();
        let (suspects, estimate) = confident::find_label_issues(&given, &oof.probs, classes)
            .map_err(|e| StageError::Failed(format!("out-of-fold probabilities: {e}")))?;
        // A label a person already reviewed stays as they decided: the models' doubt about it
        // is counted, not suggested again (nor dropped).
        let (reviewed, suspects): (Vec<_>, Vec<_>) = suspects.into_iter().partition(|s| rows.reviewed[rows.judged[s.index]]);
        let accuracy = out_of_fold_accuracy(&given, &oof.probs, classes);

        let dropped = match self.policy {
            Policy::Drop => {
                let ids: BTreeSet<&str> = suspects.iter().map(|s| rows.ids[rows.judged[s.index]].as_str()).collect();
                output::write_without(cx, input, artifact, &manifest, &ids)?
            }
            Policy::Report => BTreeMap::new(),
        };
        let mut summary = oof.summary;
        // Thumbnails need the pixels: the fold models trained on them, unless they trained
        // on backbone features; then they are read again.
        let pixels = match oof.data.inputs {
            Inputs::Images { train, .. } => train,
            Inputs::Features { .. } => Pool::load(cx, input, artifact, &manifest, &self.splits)?.split,
        };
        output::write(
            cx,
            &output::Findings {
                manifest: &manifest,
                rows: &rows,
                probs: &oof.probs,
                suspects: &suspects,
                estimate: &estimate,
                accuracy,
                folds: self.folds,
                splits: &self.splits,
                policy: self.policy,
                reviewed: reviewed.len(),
                dropped: &dropped,
                pixels: &pixels,
            },
        )?;

        let judged = rows.judged.len();
        let share = suspects.len() as f64 / judged as f64;
        summary.push(format!(
            "{judged} items of {} judged in {} folds: out-of-fold accuracy {accuracy:.4}",
            self.splits.join(", "),
            self.folds
        ));
        summary.push(format!("{} suspected wrong labels ({:.1} %; see {})", suspects.len(), 100.0 * share, output::REPORT));
        if !reviewed.is_empty() {
            summary
                .push(format!("{} more doubted labels were reviewed by a person (corrections file): not suggested again", reviewed.len()));
        }
        if !dropped.is_empty() {
            let per_split: Vec<String> = dropped.iter().map(|(s, n)| format!("{s} {n}")).collect();
            summary.push(format!("rows dropped: {}", per_split.join(", ")));
        }
        summary.push(format!(
            "{:.1} s in all ({} fold models of {} epochs)",
            started.elapsed().as_secs_f64(),
            self.folds,
            self.model.config.epochs
        ));
        cx.reporter.summary(cx.stage, &summary);
        if share > SUSPICIOUS_SHARE {
            cx.reporter.warn(&format!(
                "stage `{}`: {:.0} % of the labels are suspect, with an out-of-fold accuracy of {accuracy:.2}: the fold models may be too weak for this data (more `train.epochs`, or a pretrained model) rather than the labels this wrong",
                cx.stage,
                100.0 * share
            ));
        }
        Ok(())
    }
}

/// The share of rows whose most probable class is their given label.
fn out_of_fold_accuracy(given: &[usize], probs: &[f32], classes: usize) -> f64 {
    if given.is_empty() {
        return 0.0;
    }
    let right = given.iter().enumerate().filter(|&(i, &g)| crate::metrics::argmax(&probs[i * classes..(i + 1) * classes]) == g).count();
    right as f64 / given.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `[stages.li]` with `body` through the registry, as a manifest would.
    fn parse(body: &str) -> Result<serde_json::Value, Vec<String>> {
        let text = format!("[stages.li]\nkind = \"label_issues\"\n{body}");
        let (doc, errors) = toml::de::DeTable::parse_recoverable(&text);
        assert!(errors.is_empty(), "{errors:?}");
        let mut doc = doc.into_inner();
        let stages = doc.remove("stages").expect("stages");
        let toml::de::DeValue::Table(mut stages) = stages.into_inner() else { panic!("a table") };
        let li = stages.remove("li").expect("li");
        let span = li.span();
        let toml::de::DeValue::Table(mut table) = li.into_inner() else { panic!("a table") };
        table.remove("kind");
        let params = serde_json::json!({});
        let cx = ParseContext { params: &params };
        match LabelIssuesKind.parse(Spanned::new(span, toml::de::DeValue::Table(table)), &cx) {
            Ok(stage) => Ok(stage.params()),
            Err(issues) => Err(issues.into_iter().map(|i| i.message).collect()),
        }
    }

    #[test]
    fn defaults_are_a_small_cnn_judging_every_split() {
        let p = parse("").unwrap();
        assert_eq!(p["folds"], 5);
        assert_eq!(p["policy"], "report");
        assert_eq!(p["splits"], serde_json::json!(["train", "val", "test"]));
        assert_eq!(p["train"]["model"], "cnn");
        assert_eq!(p["train"]["cnn"]["widths"], serde_json::json!([16, 32]));
        assert_eq!(p["train"]["epochs"], 10);
        // Splits are judged in one order, whatever order the manifest lists them in.
        let p = parse("splits = [\"test\", \"train\"]\npolicy = \"drop\"\n[stages.li.train]\nmodel = \"cnn\"\nepochs = 3\n").unwrap();
        assert_eq!(p["splits"], serde_json::json!(["train", "test"]));
        assert_eq!(p["policy"], "drop");
        assert_eq!(p["train"]["epochs"], 3);
        assert_eq!(p["train"]["batch_size"], 64, "a written `train` table takes a train stage's defaults");
    }

    #[test]
    fn every_option_is_checked_with_its_path() {
        let errors = parse("folds = 1\nsplits = [\"train\", \"holdout\", \"train\"]\n").unwrap_err();
        assert!(errors.iter().any(|e| e.contains("`folds` = 1 is out of range")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("`holdout`")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("listed twice")), "{errors:?}");
        let errors = parse("splits = []\n").unwrap_err();
        assert!(errors.iter().any(|e| e.contains("nothing would be judged")), "{errors:?}");
        let errors = parse("policy = \"relabel\"\n").unwrap_err();
        assert!(errors.iter().any(|e| e.contains("relabel")), "{errors:?}");
        let errors = parse("threshold = 0.5\n").unwrap_err();
        assert!(errors.iter().any(|e| e.contains("threshold")), "unknown keys are refused: {errors:?}");
        let errors =
            parse("[stages.li.train]\nmodel = \"cnn\"\nepochs = 0\nearly_stopping = { patience = 2 }\nmonitor = \"val_loss\"\ncheckpoint_secs = 5.0\n")
                .unwrap_err();
        assert!(errors.iter().any(|e| e.contains("`train.epochs` = 0 is out of range")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("no validation split to stop on")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("no best epoch")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("never checkpointed")), "{errors:?}");
        let errors = parse("[stages.li.train]\nmodel = \"vgg\"\n").unwrap_err();
        assert!(errors.iter().any(|e| e.contains("unknown model `vgg`")), "{errors:?}");
    }

    #[test]
    fn accuracy_counts_argmax_hits() {
        let probs = [0.9, 0.1, 0.2, 0.8, 0.6, 0.4];
        assert!((out_of_fold_accuracy(&[0, 1, 1], &probs, 2) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(out_of_fold_accuracy(&[], &[], 2), 0.0);
    }
}
