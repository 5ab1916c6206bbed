//! `kind = "eval"`: scores a trained model on one split of the convert stage's shards.
//!
//! ```toml
//! [stages.eval]
//! kind = "eval"
//! inputs = ["train", "convert"]   # the model and the data, in either order
//! split = "test"                  # the default
//! ```
//!
//! Writes `metrics.json` (accuracy, balanced accuracy, per-class and macro/weighted
//! precision, recall and F1, confusion matrix, top-k accuracy, log loss, calibration error,
//! and ROC-AUC / PR-AUC for two classes; for a binary model, `binary`: precision, recall and
//! F1 of the positive class at the model's threshold, with the ROC and PR curves),
//! `predictions.csv` (one row per item: id, source,
//! true and predicted class (a binary model's at its threshold), the top probability, whether it was right, then the
//! probability of every class), and `mistakes.json` with `mistakes/*.png`: the most
//! confident wrong predictions and the images the model saw.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::de::DeValue;

use super::{Artifact, ParseContext, PlanStage, PlanView, Stage, StageContext, StageError, StageKind, io, parse_config, upstream};
use crate::diagnostic::{Checker, Issue, ValueSpans};
use crate::formats::csv_field;
use crate::formats::preprocess::Normalize;
use crate::formats::shards::{MAX_BATCH, ShardManifest, Split};
use crate::metrics;
use crate::model::TrainedModel;
use crate::nn::device::DeviceChoice;
use crate::task::Outputs;

pub struct EvalKind;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_split")]
    split: String,
    #[serde(default = "default_batch")]
    batch_size: usize,
    #[serde(default)]
    device: DeviceChoice,
}

fn default_split() -> String {
    "test".into()
}
fn default_batch() -> usize {
    64
}

#[derive(Debug)]
pub struct EvalStage {
    config: Config,
}

impl StageKind for EvalKind {
    fn name(&self) -> &'static str {
        "eval"
    }

    fn version(&self) -> u32 {
        // 3: batch norm at inference is one scale and shift per channel (other rounding).
        3
    }

    fn parse(&self, table: Spanned<DeValue<'_>>, _cx: &ParseContext<'_>) -> Result<Arc<dyn Stage>, Vec<Issue>> {
        let spans = ValueSpans::of(&table);
        let config: Config = parse_config(table)?;
        let mut ck = Checker::new(&spans);
        if !["train", "val", "test"].contains(&config.split.as_str()) {
            ck.fail(
                "split",
                format!("`split` = \"{}\": expected \"train\", \"val\" or \"test\"", config.split),
                "the split of the convert stage's shards to score",
            );
        }
        ck.int("batch_size", config.batch_size as u64, 1, MAX_BATCH, "images scored at once");
        let issues = ck.into_issues();
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(Arc::new(EvalStage { config }))
    }
}

fn find<'a>(cx: &'a StageContext<'_>, file: &str) -> Option<(&'a str, &'a Artifact)> {
    cx.inputs.iter().find(|(_, a)| a.tree.entries().iter().any(|e| e.path == file)).map(|(n, a)| (n.as_str(), a))
}

impl Stage for EvalStage {
    /// A model and shards among the inputs, and a split that the convert stage fills.
    fn plan_issues(&self, plan: &dyn PlanView) -> Vec<Issue> {
        let mut issues = Vec::new();
        let this = plan.this();
        let inputs: Vec<PlanStage<'_>> = this.distinct_inputs().into_iter().filter_map(|n| plan.stage(n)).collect();
        // A command or a library kind may write a model.json or shards too: judge only
        // when every input is a built-in artifact kind.
        let builtin = ["collect", "clean", "label", "preprocess", "convert", "train", "eval"];
        if inputs.iter().all(|s| builtin.contains(&s.kind)) {
            for (kind, file) in [("train", "the model"), ("convert", "the shards")] {
                if !inputs.iter().any(|s| s.kind == kind) {
                    issues.push(
                        Issue::new(plan.span("inputs"), format!("no input is a `{kind}` stage, so {file} to score cannot be found"))
                            .help("e.g. inputs = [\"train\", \"convert\"]: the model and the data, in either order"),
                    );
                }
            }
        }
        let Some(convert) = inputs.iter().find(|s| s.kind == "convert").cloned().or_else(|| plan.ancestor_stage("convert")) else {
            return issues;
        };
        let p = convert.stage.params();
        let split = &p["split"];
        let name = self.config.split.as_str();
        let from_items = split["from_items"].as_bool().unwrap_or(false);
        let share = split[name].as_f64();
        let why = match (from_items, name) {
            (false, _) | (true, "val") if share == Some(0.0) => Some(format!("its `split.{name}` is 0")),
            (true, "test") => {
                let chain = upstream::dataset_chain(plan, &convert);
                upstream::synthetic_labels(&chain).map(|known| {
                    format!(
                        "it keeps the sources' splits (`from_items = true`) and the synthetic items of stage `{}` have none",
                        known.collect
                    )
                })
            }
            _ => None,
        };
        if let Some(why) = why {
            issues.push(
                Issue::new(plan.span("split"), format!("split `{name}` of stage `{}` is empty: {why}", convert.name))
                    .help(format!("score another split (`split = \"val\"`), or give stage `{}` a {name} share, e.g. split = {{ train = 0.7, val = 0.15, test = 0.15 }}", convert.name)),
            );
        }
        issues
    }

    fn params(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.config).expect("eval config serialises");
        v["device"] = self.config.device.kind().into();
        v.as_object_mut().expect("object").remove("batch_size");
        v
    }

    fn run(&self, cx: &StageContext<'_>) -> Result<(), StageError> {
        let (model_input, model_art) = find(cx, "model.json")
            .ok_or_else(|| StageError::Config("no input holds a model.json: list the train stage in `inputs`".into()))?;
        let (data_input, data_art) = find(cx, "manifest.json")
            .ok_or_else(|| StageError::Config("no input holds shards (manifest.json): list the convert stage in `inputs`".into()))?;
        let path = |a: &Artifact, f: &str| cx.input_file(a, f)?.ok_or_else(|| StageError::data(model_input, format!("it is missing {f}")));
        let device = self.config.device.open().map_err(|e| StageError::Config(format!("open device: {e}")))?;
        let model = TrainedModel::load(&path(model_art, "model.json")?, &path(model_art, "model.safetensors")?, device.clone())
            .map_err(|e| StageError::data(model_input, e.to_string()))?;
        let manifest = ShardManifest::read(cx, data_input, data_art)?;
        if manifest.classes != model.card.classes {
            return Err(StageError::Config(format!(
                "the model from `{model_input}` knows classes {:?}, the shards of `{data_input}` have {:?}",
                model.card.classes, manifest.classes
            )));
        }
        let input = &model.card.input;
        if (input.channels, input.height, input.width) != (manifest.channels, manifest.height as usize, manifest.width as usize) {
            return Err(StageError::Config(format!(
                "the model takes {}x{}x{} input, the shards of `{data_input}` are {}x{}x{}",
                input.channels, input.height, input.width, manifest.channels, manifest.height, manifest.width
            )));
        }
        crate::stages::training::encoding_fits(&manifest, model.outputs).map_err(|why| StageError::data(data_input, why))?;
        let split = Split::load(cx, data_input, data_art, &manifest, &self.config.split)?;
        if split.is_empty() {
            return Err(StageError::Config(format!("split `{}` of `{data_input}` is empty", self.config.split)));
        }
        let norm = Normalize { mean: input.mean.clone(), std: input.std.clone() };
        let progress = cx.reporter.progress(&format!("{}: predicting", cx.stage), split.len() as u64, "images");
        let mut probs = Vec::with_capacity(split.len());
        let rows: Vec<usize> = (0..split.len()).collect();
        for chunk in rows.chunks(self.config.batch_size) {
            let x = split.batch(chunk, &norm, None, &device).map_err(|e| StageError::Failed(format!("batch: {e}")))?;
            probs.extend(model.probabilities(&x).map_err(|e| StageError::Failed(e.to_string()))?);
            progress.inc(chunk.len() as u64);
        }
        progress.finish();
        if let Some(m) = model.card.multi_label.as_ref().filter(|_| model.outputs == Outputs::Independent) {
            return multi_label(cx, &self.config.split, &split, &probs, &manifest.classes, &m.thresholds, data_input);
        }
        let decision = model.card.decision();
        let decide = |p: &[f32]| model.card.decide(p);
        let report = metrics::report(&probs, &split.labels, &manifest.classes, decision);
        io::write_json(cx, "metrics.json", &report)?;
        write_predictions(cx, &split, &probs, &manifest.classes, &decide)?;
        let mistakes = confident_mistakes(&split, &probs, &manifest.classes, MISTAKES, &decide);
        write_thumbnails(cx, &split, &mistakes, manifest.normalization.as_ref().filter(|_| manifest.normalization_applied))?;
        io::write_json(cx, "mistakes.json", &mistakes)?;
        let mut lines = vec![format!(
            "{} {} images: accuracy {:.4}, balanced {:.4}, macro F1 {:.4}, log loss {:.4}",
            self.config.split, report.samples, report.accuracy, report.balanced_accuracy, report.macro_avg.f1, report.log_loss
        )];
        if let Some(b) = &report.binary {
            let auc = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
            lines.push(format!(
                "`{}` from p ≥ {:.4}: precision {:.4}, recall {:.4}, F1 {:.4}; ROC-AUC {}, PR-AUC {}",
                b.positive,
                b.threshold,
                b.precision,
                b.recall,
                b.f1,
                auc(b.roc_auc),
                auc(b.pr_auc)
            ));
        }
        cx.reporter.summary(cx.stage, &lines);
        Ok(())
    }
}

/// A multi-label model's metrics, its predictions (the true and the called classes joined
/// by `|`, whether all were right, then every class's probability) and no mistakes list:
/// "most confident wrong class" has no meaning when several classes are called at once.
fn multi_label(
    cx: &StageContext<'_>,
    name: &str,
    split: &Split,
    probs: &[Vec<f32>],
    classes: &[String],
    thresholds: &[f64],
    input: &str,
) -> Result<(), StageError> {
    let k = classes.len();
    if split.multi.len() != split.len() * k {
        return Err(StageError::data(input, "the model is multi-label but its shards are not multi-hot (encoding = \"multi_hot\")"));
    }
    let flat: Vec<f32> = probs.iter().flatten().copied().collect();
    let report = metrics::multi_label::report(&flat, &split.multi, classes, thresholds);
    io::write_json(cx, "metrics.json", &report)?;
    let mut csv = String::from("id,source,labels,predicted,correct");
    for c in classes {
        csv.push_str(&format!(",{}", csv_field(&format!("p_{c}"))));
    }
    csv.push('\n');
    for (row, p) in probs.iter().enumerate() {
        let truth: Vec<&str> = (0..k).filter(|&c| split.multi[row * k + c] > 0.5).map(|c| classes[c].as_str()).collect();
        let called: Vec<&str> = (0..k).filter(|&c| f64::from(p[c]) >= thresholds[c]).map(|c| classes[c].as_str()).collect();
        csv.push_str(&format!(
            "{},{},{},{},{}",
            csv_field(&split.ids[row]),
            csv_field(split.sources.get(row).map_or("", String::as_str)),
            csv_field(&truth.join("|")),
            csv_field(&called.join("|")),
            u8::from(truth == called)
        ));
        for v in p {
            csv.push_str(&format!(",{v}"));
        }
        csv.push('\n');
    }
    let path = cx.out_dir.join("predictions.csv");
    std::fs::write(&path, csv).map_err(StageError::io("write", &path))?;
    io::write_json(cx, "mistakes.json", &Vec::<Mistake>::new())?;
    let show = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
    cx.reporter.summary(
        cx.stage,
        &[format!(
            "{name} {} images, {k} labels: subset accuracy {:.4}, Hamming loss {:.4}, micro F1 {:.4}, macro F1 {:.4}, mAP {}",
            report.samples,
            report.subset_accuracy,
            report.hamming_loss,
            report.micro_avg.f1,
            report.macro_avg.f1,
            show(report.mean_average_precision)
        )],
    );
    Ok(())
}

/// How many of the most confident mistakes `mistakes.json` lists (with thumbnails).
const MISTAKES: usize = 24;

/// One wrong prediction, for people: what it was, what the model said, how sure it was.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Mistake {
    pub id: String,
    pub source: String,
    pub label: String,
    pub predicted: String,
    pub p_predicted: f32,
    pub p_label: f32,
    /// The thumbnail in the artifact, `mistakes/NN.png`.
    pub thumbnail: String,
    #[serde(skip)]
    row: usize,
}

/// The class a row of probabilities is called: the most probable, or at a binary model's
/// threshold.
type Decide<'a> = &'a dyn Fn(&[f32]) -> usize;

fn write_predictions(
    cx: &StageContext<'_>,
    split: &Split,
    probs: &[Vec<f32>],
    classes: &[String],
    decide: Decide<'_>,
) -> Result<(), StageError> {
    let mut csv = String::from("id,source,label,predicted,p_max,correct");
    for c in classes {
        csv.push_str(&format!(",{}", csv_field(&format!("p_{c}"))));
    }
    csv.push('\n');
    for (row, p) in probs.iter().enumerate() {
        let label = split.labels[row] as usize;
        let pred = decide(p);
        csv.push_str(&format!(
            "{},{},{},{},{:.6},{}",
            csv_field(&split.ids[row]),
            csv_field(split.sources.get(row).map_or("", String::as_str)),
            csv_field(&classes[label]),
            csv_field(&classes[pred]),
            p[pred],
            u8::from(pred == label)
        ));
        // Shortest round-trip text: a reader gets kiln's exact f32 probabilities back.
        for v in p {
            csv.push_str(&format!(",{v}"));
        }
        csv.push('\n');
    }
    let path = cx.out_dir.join("predictions.csv");
    std::fs::write(&path, csv).map_err(StageError::io("write", &path))
}

/// The `n` wrong predictions with the highest predicted probability; ties by id, so the
/// list is deterministic.
fn confident_mistakes(split: &Split, probs: &[Vec<f32>], classes: &[String], n: usize, decide: Decide<'_>) -> Vec<Mistake> {
    let mut wrong: Vec<(usize, usize, f32)> = probs
        .iter()
        .enumerate()
        .filter_map(|(row, p)| {
            let pred = decide(p);
            (pred != split.labels[row] as usize).then_some((row, pred, p[pred]))
        })
        .collect();
    wrong.sort_by(|a, b| b.2.total_cmp(&a.2).then_with(|| split.ids[a.0].cmp(&split.ids[b.0])));
    wrong
        .into_iter()
        .take(n)
        .enumerate()
        .map(|(k, (row, pred, p))| {
            let label = split.labels[row] as usize;
            Mistake {
                id: split.ids[row].clone(),
                source: split.sources.get(row).cloned().unwrap_or_default(),
                label: classes[label].clone(),
                predicted: classes[pred].clone(),
                p_predicted: p,
                p_label: probs[row][label],
                thumbnail: format!("mistakes/{k:02}.png"),
                row,
            }
        })
        .collect()
}

/// Each mistake's image as the model saw it (after preprocessing), as PNG.
fn write_thumbnails(cx: &StageContext<'_>, split: &Split, mistakes: &[Mistake], applied: Option<&Normalize>) -> Result<(), StageError> {
    if mistakes.is_empty() {
        return Ok(());
    }
    let dir = cx.out_dir.join("mistakes");
    std::fs::create_dir_all(&dir).map_err(StageError::io("create", &dir))?;
    for m in mistakes {
        let path = cx.out_dir.join(&m.thumbnail);
        if !split.save_row_png(m.row, applied, &path).map_err(StageError::io("write", &path))? {
            return Ok(());
        }
    }
    Ok(())
}
