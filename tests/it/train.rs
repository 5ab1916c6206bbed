//! The train stage end to end through the CLI, on images kiln draws itself (no shared data):
//! reproducible weights, resume after `kill -9`, exactly which stages rerun, clear errors.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::{command, read_json, unwrap_diagnostic, workspace_with};

const MANIFEST: &str = r#"
[pipeline]
name = "t"
seed = 7

[params]
lr = 0.004

[stages.collect]
kind = "collect"
[[stages.collect.sources]]
type = "synthetic"
count = 240
size = 24

[stages.preprocess]
kind = "preprocess"
inputs = ["collect"]
color = "grayscale"
size = [16, 16]
normalize = { mean = [0.5], std = [0.25] }
[stages.preprocess.augment]
horizontal_flip = true
rotation_range = 10.0

[stages.convert]
kind = "convert"
inputs = ["preprocess"]
split = { train = 0.7, val = 0.15, test = 0.15 }

[stages.train]
kind = "train"
inputs = ["convert"]
model = "cnn"
cnn = { widths = [8, 16], hidden = 32, dropout = 0.1 }
epochs = EPOCHS
batch_size = 16
lr = "${params.lr}"
schedule = "cosine"
device = "cpu"
checkpoint_secs = CHECKPOINT

[stages.eval]
kind = "eval"
inputs = ["train", "convert"]
"#;

fn workspace(epochs: usize, checkpoint_secs: f64) -> tempfile::TempDir {
    let text = MANIFEST.replace("EPOCHS", &epochs.to_string()).replace("CHECKPOINT", &format!("{checkpoint_secs:?}"));
    workspace_with("kiln.toml", &text)
}

/// `kiln ARGS --no-progress` in `ws`.
fn kiln(ws: &Path, args: &[&str]) -> Output {
    command(ws).args(args).arg("--no-progress").output().unwrap()
}

fn run_ok(ws: &Path, args: &[&str]) -> String {
    let out = kiln(ws, args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{args:?}:\n{text}");
    text
}

/// `stage → ran|cached` from the run's stdout.
fn outcomes(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let (stage, what) = (parts.next()?, parts.next()?);
            matches!(what, "ran" | "cached").then(|| (stage.to_string(), what.to_string()))
        })
        .collect()
}

fn model_card(ws: &Path) -> serde_json::Value {
    read_json(ws.join("outputs/t/train/model.json"))
}

fn scratch_progress(ws: &Path) -> Option<PathBuf> {
    std::fs::read_dir(ws.join("cache/scratch")).ok()?.flatten().map(|d| d.path().join("progress.json")).find(|p| p.is_file())
}

#[test]
fn trains_reproducibly_and_writes_its_artifact() {
    let a = workspace(3, 60.0);
    let b = workspace(3, 60.0);
    let out = run_ok(a.path(), &["run", "kiln.toml"]);
    run_ok(b.path(), &["run", "kiln.toml"]);
    assert!(outcomes(&out).iter().all(|(_, o)| o == "ran"), "{out}");
    let (ca, cb) = (model_card(a.path()), model_card(b.path()));
    assert_eq!(ca["weights_digest"], cb["weights_digest"], "same manifest and seed, same weights");
    assert_eq!(ca["classes"].as_array().unwrap().len(), 4);
    assert_eq!(ca["epochs_run"], 3);
    assert_eq!(ca["input"]["mean"], serde_json::json!([0.5]));
    assert_eq!(ca["input"]["transform"]["color"], "grayscale");
    let dir = a.path().join("outputs/t/train");
    for f in ["model.safetensors", "last.safetensors", "history.csv", "history.json", "curves.svg", "train_report.json"] {
        assert!(dir.join(f).is_file(), "{f} is missing");
    }
    let csv = std::fs::read_to_string(dir.join("history.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(std::fs::read_to_string(dir.join("curves.svg")).unwrap().contains("<svg"));
    // The checkpoint loads back into the same architecture.
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(weights["head.weight"].dims(), &[4, 32]);
    assert!(weights.contains_key("stages.0.0.bn.running_var"));
    // A finished stage leaves no resumable state behind.
    assert!(scratch_progress(a.path()).is_none());

    // eval: metrics agree with the per-item predictions it wrote.
    let metrics = read_json(a.path().join("outputs/t/eval/metrics.json"));
    let predictions = std::fs::read_to_string(a.path().join("outputs/t/eval/predictions.csv")).unwrap();
    let header: Vec<&str> = predictions.lines().next().unwrap().split(',').collect();
    let correct_col = header.iter().position(|h| *h == "correct").unwrap();
    let rows: Vec<&str> = predictions.lines().skip(1).collect();
    let manifest = read_json(a.path().join("outputs/t/convert/manifest.json"));
    assert_eq!(rows.len() as u64, manifest["splits"]["test"]["rows"].as_u64().unwrap());
    assert_eq!(metrics["samples"].as_u64().unwrap(), rows.len() as u64);
    let correct = rows.iter().filter(|r| r.split(',').nth(correct_col) == Some("1")).count();
    assert!((metrics["accuracy"].as_f64().unwrap() - correct as f64 / rows.len() as f64).abs() < 1e-12);
    let cm = metrics["confusion_matrix"].as_array().unwrap();
    let diagonal: u64 = (0..4).map(|i| cm[i][i].as_u64().unwrap()).sum();
    assert_eq!(diagonal as usize, correct);
    for key in ["balanced_accuracy", "macro_avg", "weighted_avg", "log_loss", "ece", "top_k_accuracy", "per_class"] {
        assert!(metrics.get(key).is_some(), "metrics.json lacks {key}");
    }

    // predict checks the weights against the card: damaged weights are an error, not NaN.
    let image = a.path().join("probe.png");
    image::GrayImage::from_fn(24, 24, |x, y| image::Luma([((x * 10 + y * 3) % 256) as u8])).save(&image).unwrap();
    let copy = a.path().join("model-copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["model.json", "model.safetensors"] {
        std::fs::copy(dir.join(f), copy.join(f)).unwrap();
    }
    let args = |m: &Path| vec!["predict".to_string(), m.display().to_string(), image.display().to_string()];
    let good = kiln(a.path(), &args(&copy).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
    let mut bytes = std::fs::read(copy.join("model.safetensors")).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x40;
    std::fs::write(copy.join("model.safetensors"), bytes).unwrap();
    let bad = kiln(a.path(), &args(&copy).iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && stderr.contains("damaged"), "{stderr}");
    assert!(!String::from_utf8_lossy(&bad.stdout).contains("NaN"));
}

#[test]
fn early_stopping_ends_the_run_and_keeps_the_best_epoch() {
    let ws = workspace(6, 60.0);
    let path = ws.path().join("kiln.toml");
    // No later epoch can beat the first by 0.5 accuracy: patience 2 stops after epoch 3.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("device = \"cpu\"", "device = \"cpu\"\nearly_stopping = { patience = 2, min_delta = 0.5 }");
    std::fs::write(&path, text).unwrap();
    let out = run_ok(ws.path(), &["run", "kiln.toml"]);
    assert!(out.contains("stopped early after epoch 3"), "{out}");
    let card = model_card(ws.path());
    assert_eq!((card["epochs_run"].as_u64(), card["best_epoch"].as_u64()), (Some(3), Some(1)));
}

#[test]
fn last_n_blocks_trains_only_the_top_of_a_pretrained_model() {
    let base = workspace(1, 60.0);
    run_ok(base.path(), &["run", "kiln.toml"]);
    let ws = workspace(2, 60.0);
    std::fs::copy(base.path().join("outputs/t/train/model.safetensors"), ws.path().join("pre.safetensors")).unwrap();
    let path = ws.path().join("kiln.toml");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "device = \"cpu\"",
        "device = \"cpu\"\nweights = \"pre.safetensors\"\nfinetune = { last_n_blocks = 1 }\nbackbone_lr_scale = 0.1",
    );
    std::fs::write(&path, text).unwrap();
    let out = run_ok(ws.path(), &["run", "kiln.toml"]);
    // The last block is the 32-unit hidden layer (16·4·4·32 + 32), plus the new head (32·4 + 4).
    assert!(out.contains("8356 trainable"), "{out}");
    let load = |p: &Path| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    let (before, after) = (load(&ws.path().join("pre.safetensors")), load(&ws.path().join("outputs/t/train/model.safetensors")));
    let same = |name: &str| {
        let d = (&before[name] - &after[name]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        d == 0.0
    };
    assert!(same("stages.0.0.conv.weight") && same("stages.1.0.bn.weight"), "frozen blocks keep their weights");
    assert!(same("stages.1.0.bn.running_mean"), "frozen batch norm keeps its statistics");
    assert!(!same("hidden.weight"), "the last block trains");
}

#[test]
fn head_fine_tuning_memoises_backbone_features_across_runs() {
    let base = workspace(1, 60.0);
    run_ok(base.path(), &["run", "kiln.toml"]);
    let ws = workspace(2, 60.0);
    std::fs::copy(base.path().join("outputs/t/train/model.safetensors"), ws.path().join("pre.safetensors")).unwrap();
    let path = ws.path().join("kiln.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("device = \"cpu\"", "device = \"cpu\"\nweights = \"pre.safetensors\"\nfinetune = \"head\"");
    std::fs::write(&path, text).unwrap();
    let first = run_ok(ws.path(), &["run", "kiln.toml"]);
    let manifest = read_json(ws.path().join("outputs/t/convert/manifest.json"));
    let rows = manifest["splits"]["train"]["rows"].as_u64().unwrap() + manifest["splits"]["val"]["rows"].as_u64().unwrap();
    assert!(first.contains(&format!("backbone features: {rows} computed, 0 memoised")), "{first}");
    // Only the head's settings change: the backbone's features come from the memo.
    let text = std::fs::read_to_string(&path).unwrap().replace("lr = 0.004", "lr = 0.002");
    std::fs::write(&path, text).unwrap();
    let second = run_ok(ws.path(), &["run", "kiln.toml"]);
    assert!(second.contains(&format!("backbone features: 0 computed, {rows} memoised")), "{second}");
    assert_eq!(model_card(ws.path())["hyperparameters"]["finetune"], "head");
}

#[test]
fn thread_count_does_not_change_the_weights() {
    let one = workspace(2, 60.0);
    let two = workspace(2, 60.0);
    for (ws, threads) in [(&one, "1"), (&two, "2")] {
        let out = command(ws.path()).args(["run", "kiln.toml", "--no-progress"]).env("RAYON_NUM_THREADS", threads).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(model_card(one.path())["weights_digest"], model_card(two.path())["weights_digest"]);
}

#[test]
fn changing_lr_reruns_only_train_and_checkpoint_frequency_reruns_nothing() {
    let ws = workspace(1, 60.0);
    run_ok(ws.path(), &["run", "kiln.toml"]);
    let path = ws.path().join("kiln.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("lr = 0.004", "lr = 0.002")).unwrap();
    let out = run_ok(ws.path(), &["run", "kiln.toml"]);
    let expect: Vec<(String, String)> =
        [("collect", "cached"), ("preprocess", "cached"), ("convert", "cached"), ("train", "ran"), ("eval", "ran")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
    assert_eq!(outcomes(&out), expect, "{out}");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("checkpoint_secs = 60.0", "checkpoint_secs = 5.0")).unwrap();
    let out = run_ok(ws.path(), &["run", "kiln.toml"]);
    assert!(outcomes(&out).iter().all(|(_, o)| o == "cached"), "{out}");
}

#[test]
fn killed_mid_training_resumes_and_ends_with_the_same_weights() {
    // Reference: uninterrupted.
    let reference = workspace(4, 0.0);
    run_ok(reference.path(), &["run", "kiln.toml"]);
    let want = model_card(reference.path())["weights_digest"].clone();

    let ws = workspace(4, 0.0);
    run_ok(ws.path(), &["run", "kiln.toml", "convert"]);
    let mut child =
        command(ws.path()).args(["run", "kiln.toml", "--no-progress"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // Kill once a checkpoint inside the second epoch exists.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let at = scratch_progress(ws.path())
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map(|v| (v["epoch"].as_u64().unwrap_or(0), v["batch"].as_u64().unwrap_or(0)));
        if at.is_some_and(|(e, b)| e >= 1 && b >= 1) {
            break;
        }
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("training finished before it could be killed ({status})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let out = run_ok(ws.path(), &["run", "kiln.toml"]);
    assert!(out.contains("resumed from a checkpoint at epoch 2"), "{out}");
    assert_eq!(model_card(ws.path())["weights_digest"], want, "resuming gives the uninterrupted run's weights");
    // Not only the weights: the whole artifact (the history reloaded from the checkpoint
    // included, to the last bit) and so the lock, or eval would run again for nothing.
    let read = |ws: &Path, file: &str| std::fs::read(ws.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert!(
        read(ws.path(), "outputs/t/train/history.json") == read(reference.path(), "outputs/t/train/history.json"),
        "history.json differs"
    );
    assert_eq!(
        String::from_utf8(read(ws.path(), "kiln.lock")).unwrap(),
        String::from_utf8(read(reference.path(), "kiln.lock")).unwrap(),
        "a resumed run locks exactly what an uninterrupted one does"
    );
}

#[test]
fn a_pretrained_model_on_mismatched_input_is_a_manifest_error() {
    let ws = workspace(1, 60.0);
    let path = ws.path().join("kiln.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(ws.path().join("w.safetensors"), b"not really").unwrap();
    let text = text.replace(
        "model = \"cnn\"\ncnn = { widths = [8, 16], hidden = 32, dropout = 0.1 }",
        "model = \"efficientnet_lite0\"\nweights = \"w.safetensors\"\nfinetune = \"head\"",
    );
    std::fs::write(&path, text).unwrap();
    let out = kiln(ws.path(), &["status", "kiln.toml"]);
    // Undo the diagnostic's line wrapping.
    let text = unwrap_diagnostic(&String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "found when the manifest loads, before anything runs: {text}");
    assert!(text.contains("expects 224x224 input but stage `preprocess` writes 16x16"), "{text}");
    assert!(text.contains("expects RGB input but stage `preprocess` writes grayscale"), "{text}");
    assert!(text.contains("kiln.toml:"), "{text}");
    // `input` accepts another size and normalisation, but a colour model still needs colour.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("finetune = \"head\"", "finetune = \"head\"\ninput = { size = [16, 16], mean = [0.5], std = [0.25] }");
    std::fs::write(&path, text).unwrap();
    let out = kiln(ws.path(), &["status", "kiln.toml"]);
    let text = unwrap_diagnostic(&String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(2));
    assert!(text.contains("1 problem") && text.contains("expects RGB input"), "{text}");
}

#[test]
fn bad_train_settings_are_manifest_errors() {
    let ws = workspace(1, 60.0);
    let path = ws.path().join("kiln.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("model = \"cnn\"", "model = \"vgg\"").replace("device = \"cpu\"", "device = \"cpu\"\nfinetune = \"head\""),
    )
    .unwrap();
    let out = kiln(ws.path(), &["run", "kiln.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("unknown model `vgg`"), "{err}");
    assert!(err.contains("kiln.toml:"), "{err}");
}

/// The train stage's timing line (`train: 3.2 s in all: setup 0.1 s, …`): the total and
/// each part's seconds by name.
fn train_times(out: &str) -> (f64, std::collections::BTreeMap<String, f64>) {
    let line = out
        .lines()
        .map(str::trim_start)
        .find(|l| l.starts_with("train: ") && l.contains(" s in all: "))
        .unwrap_or_else(|| panic!("no `train: … s in all: …` line in\n{out}"));
    let (total, parts) = line["train: ".len()..].split_once(" s in all: ").unwrap();
    let parts = parts.split(';').next().unwrap();
    let parts = parts
        .split(", ")
        .map(|p| {
            let (name, secs) = p.split_once(" s").and_then(|(head, _)| head.rsplit_once(' ')).unwrap_or_else(|| panic!("{p} in {line}"));
            (name.to_string(), secs.parse::<f64>().unwrap_or_else(|e| panic!("{p}: {e}")))
        })
        .collect();
    (total.parse().unwrap_or_else(|e| panic!("{total}: {e}")), parts)
}

#[test]
fn the_train_summary_times_the_whole_stage() {
    // Head fine-tuning: the backbone feature pass, before the first epoch, is part of the
    // stage (it was left out: `train: 1.2 s` for a stage of 72.7 s).
    let base = workspace(1, 60.0);
    run_ok(base.path(), &["run", "kiln.toml"]);
    let ws = workspace(2, 60.0);
    std::fs::copy(base.path().join("outputs/t/train/model.safetensors"), ws.path().join("pre.safetensors")).unwrap();
    let path = ws.path().join("kiln.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("device = \"cpu\"", "device = \"cpu\"\nweights = \"pre.safetensors\"\nfinetune = \"head\"");
    std::fs::write(&path, text).unwrap();
    let out = run_ok(ws.path(), &["run", "kiln.toml"]);
    let (total, parts) = train_times(&out);
    let names: Vec<&str> = parts.keys().map(String::as_str).collect();
    assert_eq!(names, ["backbone features", "setup", "training", "writing"], "{out}");
    // Every figure is rounded to 0.1 s: the parts add up to the total within that.
    let sum: f64 = parts.values().sum();
    assert!(total + 0.05 * (parts.len() + 1) as f64 + 1e-9 >= sum, "total {total} s < parts {sum} s: {out}");
    // And the total is no more than the stage's own line says it took (`train  ran (3.4s)`).
    let ran: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("train").map(str::trim_start).and_then(|r| r.strip_prefix("ran (")).and_then(|r| r.strip_suffix("s)")))
        .unwrap_or_else(|| panic!("no `train ran (…s)` line in\n{out}"))
        .parse()
        .unwrap();
    assert!(total <= ran + 0.1, "the summary's {total} s is within the stage's {ran} s: {out}");
}
