//! Tasks beyond one class per image, end to end: a binary model (one logit, a sigmoid,
//! binary cross-entropy) trained on real image files decides at the threshold it chose on
//! validation, in eval, in predict and in the server's answers alike; and a task that does
//! not fit the data or the other options is a plan-time error at its value.

use std::collections::BTreeMap;

use crate::serve::{TINY, make_images};
use crate::support::{Workspace, kiln, ok, read_json, stage_map, text, unwrap_diagnostic, workspace_with};

const MANIFEST: &str = "pipelines/tiny.toml";

/// The serve tests' two classes of photo-like files (dark and bright), as a binary model whose
/// positive class is the first one: the sigmoid's column is not simply the second.
fn binary_manifest() -> String {
    let binary = "task = \"binary\"\npositive = \"dark\"\npos_weight = 2.0\nmonitor = \"val_f1\"\nmodel = \"cnn\"\n";
    let text = TINY.replacen("model = \"cnn\"\n", binary, 1);
    assert_ne!(text, TINY, "the train stage's `model` line is where the task goes");
    text
}

/// The output width of the trained network's head (rows of its weight matrices).
fn head_outputs(ws: &std::path::Path) -> Vec<usize> {
    let weights = std::fs::read(ws.join("outputs/tiny/train/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&weights).unwrap();
    st.names().into_iter().filter(|n| n.starts_with("head") && n.ends_with("weight")).map(|n| st.tensor(n).unwrap().shape()[0]).collect()
}

/// The columns of eval's predictions.csv, by name, one map per row.
fn rows(csv: &str) -> Vec<BTreeMap<String, String>> {
    let mut lines = csv.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    lines.map(|l| header.iter().cloned().zip(l.split(',').map(String::from)).collect()).collect()
}

#[test]
fn a_binary_model_decides_at_its_validation_threshold_in_eval_and_predict() {
    let dir = workspace_with(MANIFEST, &binary_manifest());
    make_images(&dir.path().join("data"));
    let ws = dir.path();
    let out = kiln(ws, &["run", MANIFEST]);
    assert!(out.status.success(), "{}", text(&out));
    let ran = stage_map(&String::from_utf8_lossy(&out.stdout));
    assert!(ran.values().all(|s| s.starts_with("ran")) && ran.len() == 6, "{}", text(&out));
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(summary.contains("val ROC-AUC") && summary.contains("the threshold in the model card"), "{summary}");
    assert!(summary.contains("`dark` from p ≥"), "eval's summary gives the binary figures: {summary}");

    // The card: the task, the positive class, and the best epoch's threshold.
    let card = read_json(ws.join("outputs/tiny/train/model.json"));
    assert_eq!(card["task"], "binary");
    assert_eq!(card["binary"]["positive"], "dark");
    let threshold = card["binary"]["threshold"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&threshold), "{card}");
    let history = read_json(ws.join("outputs/tiny/train/history.json"));
    let best = card["best_epoch"].as_u64().unwrap() as usize;
    assert_eq!(history[best - 1]["threshold"].as_f64(), Some(threshold), "the card's threshold is the kept epoch's: {history}");
    assert!(history[best - 1]["val_f1"].as_f64().is_some() && history[best - 1]["val_auc"].as_f64().is_some(), "{history}");
    // One logit: the head has one output row.
    assert_eq!(head_outputs(ws), vec![1], "a binary network has a single logit");

    // eval: the positive class's figures at the card's threshold, and every prediction taken there.
    let metrics = read_json(ws.join("outputs/tiny/eval/metrics.json"));
    assert_eq!(metrics["binary"]["positive"], "dark");
    assert_eq!(metrics["binary"]["threshold"].as_f64(), Some(threshold));
    assert!(metrics["binary"]["roc_auc"].as_f64().is_some() && metrics["binary"]["roc_curve"][0] == serde_json::json!([0.0, 0.0]));
    let predictions = rows(&std::fs::read_to_string(ws.join("outputs/tiny/eval/predictions.csv")).unwrap());
    assert!(!predictions.is_empty());
    let mut eval_probs: BTreeMap<String, (f32, String)> = BTreeMap::new();
    for r in &predictions {
        let (dark, bright): (f32, f32) = (r["p_dark"].parse().unwrap(), r["p_bright"].parse().unwrap());
        assert!((dark + bright - 1.0).abs() < 1e-6, "{r:?}");
        let called = if f64::from(dark) >= threshold { "dark" } else { "bright" };
        assert_eq!(r["predicted"], called, "{r:?} at threshold {threshold}");
        eval_probs.insert(r["source"].clone(), (dark, called.to_string()));
    }
    // The binary figures are the positive class's at the threshold, recounted from the rows.
    let count = |called: bool, truth: bool| {
        predictions.iter().filter(|r| (r["predicted"] == "dark") == called && (r["label"] == "dark") == truth).count() as f64
    };
    let (tp, fp, fn_) = (count(true, true), count(true, false), count(false, true));
    let f1 = metrics["binary"]["f1"].as_f64().unwrap();
    assert!((f1 - if tp > 0.0 { 2.0 * tp / (2.0 * tp + fp + fn_) } else { 0.0 }).abs() < 1e-12, "{f1}: tp {tp} fp {fp} fn {fn_}");

    // predict on the original files: eval's probability, and the same call.
    let predicted: serde_json::Value =
        serde_json::from_str(&ok(ws, &["predict", &format!("{MANIFEST}:train"), "data", "--format", "json"])).unwrap();
    assert_eq!(predicted["binary"]["threshold"].as_f64(), Some(threshold));
    let mut matched = 0;
    for r in predicted["results"].as_array().unwrap() {
        let path = r["path"].as_str().unwrap();
        let Some((source, (p, called))) = eval_probs.iter().find(|(s, _)| path.ends_with(s.as_str())) else { continue };
        let q = r["probabilities"][0].as_f64().unwrap() as f32;
        assert!((p - q).abs() < 1e-5, "{source}: eval {p}, predict {q}");
        assert_eq!(r["predicted"]["class"], called.as_str(), "{source}");
        matched += 1;
    }
    assert_eq!(matched, eval_probs.len(), "predict saw every file eval scored");

    // Nothing changed: nothing runs. Back to a classifier, `positive` no longer fits.
    let again = ok(ws, &["run", MANIFEST]);
    assert!(stage_map(&again).values().all(|s| s == "cached"), "{again}");
    let out = kiln(ws, &["run", MANIFEST, "--set", "train.task=\"classification\""]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = unwrap_diagnostic(&String::from_utf8_lossy(&out.stderr));
    assert!(err.contains("`positive` applies to task = \"binary\" only"), "{err}");
}

/// Synthetic shapes: their classes are known when the manifest loads.
fn shapes_manifest(shapes: &str, encoding: &str, train: &str) -> String {
    format!(
        r#"[stages.collect]
kind = "collect"
[[stages.collect.sources]]
type = "synthetic"
count = 40
size = 16
shapes = {shapes}

[stages.preprocess]
kind = "preprocess"
inputs = ["collect"]
size = [16, 16]

[stages.convert]
kind = "convert"
inputs = ["preprocess"]
encoding = "{encoding}"

[stages.train]
kind = "train"
inputs = ["convert"]
model = "cnn"
device = "cpu"
{train}
"#
    )
}

#[test]
fn a_task_that_does_not_fit_the_data_or_the_options_is_a_plan_error_at_its_value() {
    let all = r#"["circle", "square", "triangle", "star"]"#;
    let two = r#"["circle", "square"]"#;
    // Lines: 22 is `model`, 24 the first of `train`; `encoding` is on line 17.
    for (manifest, expected) in [
        (
            shapes_manifest(all, "index", "task = \"binary\""),
            vec![("kiln.toml:24:8", "a binary model needs exactly 2 classes, but the data has 4: circle, square, star, triangle")],
        ),
        (
            shapes_manifest(two, "index", "task = \"binary\"\npositive = \"star\""),
            vec![("kiln.toml:25:12", "`positive` = \"star\" is not a class; the classes are circle, square")],
        ),
        (
            shapes_manifest(two, "index", "pos_weight = 2.0\nmonitor = \"val_auc\""),
            vec![
                ("kiln.toml:24:14", "`pos_weight` applies to task = \"binary\" or \"multi_label\" only"),
                ("kiln.toml:25:11", "`monitor = \"val_auc\"` applies to task = \"binary\" or \"multi_label\" only"),
            ],
        ),
        (
            shapes_manifest(two, "index", "task = \"binary\"\nclass_weights = \"balanced\""),
            vec![("kiln.toml:25:17", "a binary model weighs its classes with `pos_weight`")],
        ),
        (
            shapes_manifest(two, "multi_hot", "task = \"binary\""),
            vec![("kiln.toml:17:12", "stage `convert` writes several labels per image (multi_hot), but this model's task is \"binary\"")],
        ),
        (
            shapes_manifest(two, "index", "task = \"multi_label\""),
            vec![("kiln.toml:24:8", "a multi-label model reads multi-hot labels, but stage `convert` writes one class per image")],
        ),
        (shapes_manifest(two, "index", "task = \"regression_to_the_mean\""), vec![("kiln.toml:24:8", "unknown variant")]),
    ] {
        let ws = Workspace::new(&manifest);
        let out = ws.kiln(&["run"]);
        let err = unwrap_diagnostic(&String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(2), "{manifest}\n{}", text(&out));
        for (at, message) in expected {
            // `FILE:LINE:COL: MESSAGE` as the value is read, `FILE:LINE:COL: stage `train`:
            // MESSAGE` when checked against the stages upstream.
            assert!(
                err.contains(&format!("{at}: {message}")) || err.contains(&format!("{at}: stage `train`: {message}")),
                "expected {at}: {message} in\n{err}"
            );
        }
        assert!(!ws.path("cache").exists(), "an invalid manifest touches nothing");
    }
    // The same two shapes with a fitting task plan cleanly.
    let ws = Workspace::new(&shapes_manifest(two, "index", "task = \"binary\"\npositive = \"circle\"\npos_weight = \"balanced\""));
    let out = ws.kiln(&["dag"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// The serve tests' files with tags from a mapping file: each image's tone (`dark` or
/// `bright`), and `jpg` for those stored as JPEG, which an alias turns into two tags.
fn multi_label_manifest() -> String {
    let label = "from = \"folder\"\nclasses = [\"dark\", \"bright\"]\n";
    let tags = "from = \"mapping\"\nmapping = { path = \"tags.csv\" }\nclasses = [\"bright\", \"dark\", \"jpeg\", \"lossy\"]\naliases = { jpg = \"lossy|jpeg\" }\n";
    let text = TINY
        .replacen(label, tags, 1)
        .replacen(
            "split = { train = 0.6, val = 0.1, test = 0.3 }\n",
            "split = { train = 0.6, val = 0.1, test = 0.3 }\nencoding = \"multi_hot\"\n",
            1,
        )
        .replacen("model = \"cnn\"\n", "task = \"multi_label\"\nmodel = \"cnn\"\n", 1);
    assert_eq!(text.matches("multi").count(), 2, "{text}");
    text
}

#[test]
fn a_multi_label_model_calls_each_tag_at_its_threshold_in_eval_and_predict() {
    let dir = workspace_with(MANIFEST, &multi_label_manifest());
    let ws = dir.path();
    make_images(&ws.join("data"));
    let mut tags = String::from("path,label\n");
    for tone in ["dark", "bright"] {
        let mut files: Vec<String> =
            std::fs::read_dir(ws.join("data").join(tone)).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        files.sort();
        for f in files {
            let jpeg = if f.ends_with(".jpg") { "|jpg" } else { "" };
            tags.push_str(&format!("data/{tone}/{f},{tone}{jpeg}\n"));
        }
    }
    std::fs::write(ws.join("tags.csv"), tags).unwrap();
    let out = kiln(ws, &["run", MANIFEST]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stage_map(&String::from_utf8_lossy(&out.stdout)).values().all(|s| s.starts_with("ran")), "{}", text(&out));

    // One logit per tag; a threshold per tag in the card.
    let card = read_json(ws.join("outputs/tiny/train/model.json"));
    assert_eq!(card["task"], "multi_label");
    let thresholds: Vec<f64> = card["multi_label"]["thresholds"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap()).collect();
    assert_eq!(thresholds.len(), 4);
    assert!(thresholds.iter().all(|t| (0.0..=1.0).contains(t)), "{thresholds:?}");
    assert_eq!(head_outputs(ws), vec![4], "one logit per tag");

    // eval: the called tags are those at or above their thresholds; the truth is the mapping's.
    let metrics = read_json(ws.join("outputs/tiny/eval/metrics.json"));
    assert_eq!(metrics["task"], "multi_label");
    let samples = metrics["samples"].as_u64().unwrap() as usize;
    let predictions = rows(&std::fs::read_to_string(ws.join("outputs/tiny/eval/predictions.csv")).unwrap());
    assert_eq!(predictions.len(), samples);
    let classes = ["bright", "dark", "jpeg", "lossy"];
    let mut eval_rows: BTreeMap<String, (Vec<f32>, String)> = BTreeMap::new();
    let mut wrong_pairs = 0;
    for r in &predictions {
        let p: Vec<f32> = classes.iter().map(|c| r[&format!("p_{c}")].parse().unwrap()).collect();
        let called: Vec<&str> = (0..4).filter(|&c| f64::from(p[c]) >= thresholds[c]).map(|c| classes[c]).collect();
        assert_eq!(r["predicted"], called.join("|"), "{r:?}");
        // The alias named two tags; the label stage sorts them.
        let truth = format!(
            "{}{}",
            if r["source"].contains("/dark/") { "dark" } else { "bright" },
            if r["source"].ends_with(".jpg") { "|jpeg|lossy" } else { "" }
        );
        let mut truth_sorted: Vec<&str> = truth.split('|').collect();
        truth_sorted.sort();
        assert_eq!(r["labels"], truth_sorted.join("|"), "{r:?}");
        wrong_pairs += classes.iter().filter(|c| truth_sorted.contains(c) != called.contains(c)).count();
        eval_rows.insert(r["source"].clone(), (p, called.join("|")));
    }
    // Tone is plain to see (dark images are ~60 levels, bright ~180): a model whose targets
    // were not its images' would not learn it.
    for tone in ["dark", "bright"] {
        let auc = metrics["per_class"][tone]["roc_auc"].as_f64().unwrap();
        assert!(auc >= 0.95, "{tone}: ROC-AUC {auc}: {metrics}");
    }
    let hamming = metrics["hamming_loss"].as_f64().unwrap();
    assert!((hamming - wrong_pairs as f64 / (4 * samples) as f64).abs() < 1e-12, "{hamming} vs {wrong_pairs} wrong of {}", 4 * samples);
    assert!(predictions.iter().any(|r| r["labels"].contains("jpeg|lossy")), "some test image is a JPEG");

    // predict: eval's probabilities, and the same tags called.
    let predicted: serde_json::Value =
        serde_json::from_str(&ok(ws, &["predict", &format!("{MANIFEST}:train"), "data", "--format", "json"])).unwrap();
    let mut matched = 0;
    for r in predicted["results"].as_array().unwrap() {
        let path = r["path"].as_str().unwrap();
        let Some((source, (p, called))) = eval_rows.iter().find(|(s, _)| path.ends_with(s.as_str())) else { continue };
        let q: Vec<f32> = r["probabilities"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert!(p.iter().zip(&q).all(|(a, b)| (a - b).abs() < 1e-5), "{source}: eval {p:?}, predict {q:?}");
        let labels: Vec<&str> = r["labels"].as_array().unwrap().iter().map(|s| s["class"].as_str().unwrap()).collect();
        assert_eq!(labels.join("|"), *called, "{source}");
        matched += 1;
    }
    assert_eq!(matched, eval_rows.len(), "predict saw every file eval scored");
    // The table leads with the tags called (`-` for none).
    let (source, (_, called)) = eval_rows.iter().next().unwrap();
    let table = ok(ws, &["predict", "outputs/tiny/train", source]);
    let first = table.lines().nth(1).unwrap().split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(first, if called.is_empty() { "-" } else { called.as_str() }, "{table}");

    // Head fine-tuning from these weights: the targets follow the memoised backbone
    // features row for row (tone is learned again), with per-class balanced weights.
    std::fs::copy(ws.join("outputs/tiny/train/model.safetensors"), ws.join("pre.safetensors")).unwrap();
    let manifest = std::fs::read_to_string(ws.join(MANIFEST)).unwrap().replacen(
        "task = \"multi_label\"\n",
        "task = \"multi_label\"\nweights = \"pre.safetensors\"\nfinetune = \"head\"\npos_weight = \"balanced\"\nepochs = 6\n",
        1,
    );
    std::fs::write(ws.join(MANIFEST), manifest.replacen("epochs = 2\n", "", 1)).unwrap();
    let out = kiln(ws, &["run", MANIFEST]);
    assert!(out.status.success(), "{}", text(&out));
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(summary.contains("backbone features:") && summary.contains("computed"), "{summary}");
    let metrics = read_json(ws.join("outputs/tiny/eval/metrics.json"));
    for tone in ["dark", "bright"] {
        let auc = metrics["per_class"][tone]["roc_auc"].as_f64().unwrap();
        assert!(auc >= 0.95, "head fine-tuning, {tone}: ROC-AUC {auc}: {metrics}");
    }
    assert_eq!(read_json(ws.join("outputs/tiny/train/model.json"))["hyperparameters"]["finetune"], "head");
}
