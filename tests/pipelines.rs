//! The bundled example pipelines run as shipped: the README's first command must keep working.

use std::path::Path;
use std::process::Command;

fn run(ws: &Path, manifest: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(["run", manifest]).current_dir(ws).output().unwrap();
    assert!(out.status.success(), "{manifest}:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn workspace_with(pipeline: &str) -> tempfile::TempDir {
    let ws = tempfile::tempdir().unwrap();
    std::fs::create_dir(ws.path().join("pipelines")).unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines").join(pipeline);
    std::fs::copy(shipped, ws.path().join("pipelines").join(pipeline)).unwrap();
    ws
}

#[test]
fn quickstart_runs_then_is_all_cached() {
    let ws = workspace_with("quickstart.toml");
    let first = run(ws.path(), "pipelines/quickstart.toml");
    assert_eq!(first.lines().filter(|l| l.contains(" ran (")).count(), 8, "{first}");
    let second = run(ws.path(), "pipelines/quickstart.toml");
    assert!(second.lines().all(|l| l.trim_end().ends_with("cached")), "{second}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ws.path().join("outputs/quickstart/convert/manifest.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["splits"]["train"]["rows"].as_u64().unwrap()
            + manifest["splits"]["val"]["rows"].as_u64().unwrap()
            + manifest["splits"]["test"]["rows"].as_u64().unwrap(),
        800
    );
    assert!(ws.path().join("reports/quickstart_rows.txt").is_file());
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ws.path().join("outputs/quickstart/train/model.json")).unwrap()).unwrap();
    assert_eq!(card["classes"], serde_json::json!(["circle", "square", "triangle", "star"]));
    // Four shapes, chance is 0.25; the shipped settings reach about 0.8.
    let acc = card["metrics"]["val_accuracy"].as_f64().unwrap();
    assert!(acc > 0.6, "validation accuracy {acc}");
}

#[test]
fn command_pipeline_runs() {
    let ws = workspace_with("commands.toml");
    let out = run(ws.path(), "pipelines/commands.toml");
    assert_eq!(out.lines().filter(|l| l.contains(" ran (")).count(), 4, "{out}");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ws.path().join("metrics/metrics.json")).unwrap()).unwrap();
    assert!(metrics["accuracy"].as_f64().unwrap() > 0.5, "{metrics}");
}
