//! The bundled example pipelines run as shipped: the README's first command must keep working.

use std::path::Path;

use crate::support::{kiln, read_json, shipped, workspace_with};

fn run(ws: &Path, manifest: &str) -> String {
    let out = kiln(ws, &["run", manifest]);
    assert!(out.status.success(), "{manifest}:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A workspace holding the bundled `pipelines/NAME` as shipped.
fn workspace(pipeline: &str) -> tempfile::TempDir {
    let rel = format!("pipelines/{pipeline}");
    workspace_with(&rel, &shipped(&rel))
}

#[test]
fn quickstart_runs_then_is_all_cached() {
    let ws = workspace("quickstart.toml");
    let first = run(ws.path(), "pipelines/quickstart.toml");
    assert_eq!(first.lines().filter(|l| l.contains(" ran (")).count(), 8, "{first}");
    let second = run(ws.path(), "pipelines/quickstart.toml");
    assert!(second.lines().all(|l| l.trim_end().ends_with("cached")), "{second}");
    let manifest = read_json(ws.path().join("outputs/quickstart/convert/manifest.json"));
    assert_eq!(
        manifest["splits"]["train"]["rows"].as_u64().unwrap()
            + manifest["splits"]["val"]["rows"].as_u64().unwrap()
            + manifest["splits"]["test"]["rows"].as_u64().unwrap(),
        800
    );
    assert!(ws.path().join("reports/quickstart_rows.txt").is_file());
    let card = read_json(ws.path().join("outputs/quickstart/train/model.json"));
    assert_eq!(card["classes"], serde_json::json!(["circle", "square", "triangle", "star"]));
    // Four shapes, chance is 0.25; the shipped settings reach about 0.8.
    let acc = card["metrics"]["val_accuracy"].as_f64().unwrap();
    assert!(acc > 0.6, "validation accuracy {acc}");
}

#[test]
fn command_pipeline_runs() {
    let ws = workspace("commands.toml");
    let out = run(ws.path(), "pipelines/commands.toml");
    assert_eq!(out.lines().filter(|l| l.contains(" ran (")).count(), 4, "{out}");
    let metrics = read_json(ws.path().join("metrics/metrics.json"));
    assert!(metrics["accuracy"].as_f64().unwrap() > 0.5, "{metrics}");
}
