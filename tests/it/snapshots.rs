//! Snapshots of the CLI's human output (`tests/it/snapshots/*.snap`): what `kiln run`,
//! `kiln status`, `kiln dag` and a manifest error look like to a person, on a small pipeline
//! of shell commands (fast and deterministic).
//!
//! Each snapshot holds the command line, the exit code, stdout and stderr. Filters replace
//! what differs between runs: the workspace's path, durations, digests and process ids.
//! Colour is off (`NO_COLOR=1`), `RUST_LOG` and colour-forcing variables are removed, and
//! stdin is closed so that no terminal sets the width diagnostics wrap at.
//!
//! After an intended change of the output: `INSTA_UPDATE=always cargo test --test it
//! snapshots::` (or `cargo insta review`), then read the diff of the `.snap` files.

use std::process::Stdio;

use crate::support::{Workspace, text};

/// Three chained stages and one on its own, reading one param.
const PIPELINE: &str = r#"
[pipeline]
name = "snap"
seed = 1

[params]
scale = 2

[stages.prep]
kind = "command"
cmd = "mkdir -p data && seq 1 5 > data/numbers"
outs = ["data/numbers"]

[stages.train]
kind = "command"
cmd = "awk '{s+=$1*${params.scale}} END {print s}' data/numbers > model.txt"
deps = ["data/numbers"]
outs = ["model.txt"]

[stages.eval]
kind = "command"
inputs = ["train"]
cmd = "cat model.txt > metrics.txt"
deps = ["model.txt"]
outs = ["metrics.txt"]

[stages.notes]
kind = "command"
cmd = "echo notes > notes.txt"
outs = ["notes.txt"]
"#;

/// Runs `kiln ARGS` in `ws` and lays out what a person would see.
fn shown(ws: &Workspace, args: &[&str]) -> String {
    // `Workspace::command` has set NO_COLOR=1 and removed RUST_LOG.
    let out = ws
        .command(args)
        .env_remove("CLICOLOR_FORCE")
        .env_remove("FORCE_COLOR")
        .env_remove("FORCE_HYPERLINK")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let code = out.status.code().map_or_else(|| "none (killed by a signal)".to_string(), |c| c.to_string());
    format!(
        "$ kiln {}\nexit code: {code}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Checks `kiln ARGS`'s output in `ws` against the snapshot `name`, with what varies from
/// run to run filtered out.
fn assert_shown(name: &str, ws: &Workspace, args: &[&str]) {
    let output = shown(ws, args);
    let root = regex::escape(&ws.root().display().to_string());
    let canonical = regex::escape(&ws.root().canonicalize().unwrap().display().to_string());
    insta::with_settings!({
        filters => vec![
            (root.as_str(), "[WS]"),
            (canonical.as_str(), "[WS]"),
            // Any other temporary directory tempfile makes.
            (r"/\S*/\.tmp[0-9A-Za-z]{6}", "[TMP]"),
            // `ran (0.3s)`, `2.3 s`, `15ms`.
            (r"\b\d+(?:\.\d+)?\s?(?:ms|s)\b", "[DURATION]"),
            // Content digests and cache keys, whole or shortened to 12.
            (r"\b[0-9a-f]{12,}\b", "[DIGEST]"),
            (r"\bpid \d+\b", "pid [PID]"),
        ]
    }, {
        insta::assert_snapshot!(name, output);
    });
}

#[test]
fn run_then_a_cached_run() {
    let ws = Workspace::new(PIPELINE);
    assert_shown("run_first", &ws, &["run", "-j", "1"]);
    assert_shown("run_cached", &ws, &["run", "-j", "1"]);
}

#[test]
fn status_after_a_param_change() {
    let ws = Workspace::new(PIPELINE);
    let first = ws.kiln(&["run", "-j", "1"]);
    assert!(first.status.success(), "{}", text(&first));
    ws.write("kiln.toml", &PIPELINE.replace("scale = 2", "scale = 3"));
    assert_shown("status_after_param_change", &ws, &["status"]);
}

#[test]
fn dag_as_text() {
    let ws = Workspace::new(PIPELINE);
    assert_shown("dag_text", &ws, &["dag", "--format", "text"]);
}

#[test]
fn a_manifest_error() {
    let ws = Workspace::new(&PIPELINE.replace("inputs = [\"train\"]", "inputs = [\"trian\"]"));
    assert_shown("manifest_error", &ws, &["run"]);
}

/// A classification `metrics.json` as an eval stage writes it: four classes, 120 items.
const METRICS_JSON: &str = r#"{
  "samples": 120,
  "accuracy": 0.8833333333333333,
  "balanced_accuracy": 0.8833333333333333,
  "macro_avg": { "precision": 0.9011904761904762, "recall": 0.8833333333333333, "f1": 0.8820486303097462 },
  "weighted_avg": { "precision": 0.9011904761904762, "recall": 0.8833333333333333, "f1": 0.8820486303097462 },
  "log_loss": 0.3125,
  "top_k_accuracy": { "2": 0.975, "3": 1.0 },
  "ece": 0.0421,
  "per_class": {
    "circle": { "precision": 0.9047619047619048, "recall": 0.6333333333333333, "f1": 0.7450980392156863, "support": 30 },
    "square": { "precision": 0.7, "recall": 0.9333333333333333, "f1": 0.8, "support": 30 },
    "star": { "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 30 },
    "triangle": { "precision": 1.0, "recall": 0.9666666666666667, "f1": 0.9830508474576272, "support": 30 }
  },
  "confusion_matrix": [[19, 11, 0, 0], [2, 28, 0, 0], [0, 1, 29, 0], [0, 0, 0, 30]],
  "classes": ["circle", "square", "triangle", "star"]
}
"#;

#[test]
fn metrics_show_of_a_metrics_json() {
    let ws = Workspace::new(PIPELINE);
    ws.write("results/metrics.json", METRICS_JSON);
    let args = ["metrics", "show", "results/metrics.json"];
    // The matrix's rows are counts under a header of class names, not digits run together
    // (`191100` for [19, 11, 0, 0]).
    let out = ws.kiln(&args);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let matrix: Vec<Vec<&str>> =
        stdout.lines().skip_while(|l| !l.contains("confusion matrix")).skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(matrix.len(), 5, "{stdout}");
    assert_eq!(matrix[0], ["true", "\\", "predicted", "circle", "square", "triangle", "star"], "{stdout}");
    assert_eq!(matrix[1], ["circle", "19", "11", "0", "0"], "{stdout}");
    assert_eq!(matrix[4], ["star", "0", "0", "0", "30"], "{stdout}");
    assert_shown("metrics_show_json", &ws, &args);
}
