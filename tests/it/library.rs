//! The engine through its library API, with a stage kind of the test's own: an artifact
//! stage (the shape every built-in image stage has) must be committed from its staging
//! directory, shown at `outputs/<pipeline>/<stage>/`, cached, and fed to its dependents.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln::diagnostic::Issue;
use kiln::exec::{self, RunOptions};
use kiln::plan::Plan;
use kiln::report::{NullReporter, StageOutcome};
use kiln::stages::{ParseContext, Stage, StageContext, StageError, StageKind, StageRegistry};
use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeValue, ValueDeserializer};

static RUNS: AtomicUsize = AtomicUsize::new(0);

/// Counts the lines of every file of its upstream artifacts into `nested/counts.txt`.
struct LineCount;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLineCount {
    label: String,
}

#[derive(Debug)]
struct LineCountStage {
    label: String,
}

impl StageKind for LineCount {
    fn name(&self) -> &'static str {
        "linecount"
    }
    fn version(&self) -> u32 {
        1
    }
    fn parse(&self, table: Spanned<DeValue<'_>>, _cx: &ParseContext<'_>) -> Result<Arc<dyn Stage>, Vec<Issue>> {
        let span = table.span();
        let raw = RawLineCount::deserialize(ValueDeserializer::from(table)).map_err(|e| vec![Issue::from_toml(&e, span)])?;
        Ok(Arc::new(LineCountStage { label: raw.label }))
    }
}

impl Stage for LineCountStage {
    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "label": self.label })
    }
    fn run(&self, cx: &StageContext<'_>) -> Result<(), StageError> {
        RUNS.fetch_add(1, Ordering::SeqCst);
        let mut report = format!("{}\n", self.label);
        for (name, artifact) in cx.inputs {
            for entry in artifact.tree.entries() {
                let path = cx.input_file(artifact, &entry.path)?.expect("listed file");
                let text = std::fs::read_to_string(path).map_err(|e| StageError::Failed(e.to_string()))?;
                report.push_str(&format!("{name}/{}: {}\n", entry.path, text.lines().count()));
            }
        }
        std::fs::create_dir_all(cx.out_dir.join("nested")).map_err(|e| StageError::Failed(e.to_string()))?;
        std::fs::write(cx.out_dir.join("nested/counts.txt"), report).map_err(|e| StageError::Failed(e.to_string()))?;
        Ok(())
    }
}

fn registry() -> StageRegistry {
    let mut r = StageRegistry::builtin();
    r.register(Arc::new(LineCount));
    r
}

#[test]
fn artifact_stages_are_committed_shown_cached_and_chained() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.toml");
    let manifest = r#"
[pipeline]
name = "lib"

[stages.first]
kind = "linecount"
label = "first"

[stages.second]
kind = "linecount"
label = "second"
inputs = ["first"]

[stages.shell]
kind = "command"
inputs = ["second"]
cmd = "cp $KILN_INPUT_SECOND/nested/counts.txt from_second.txt"
outs = ["from_second.txt"]
"#;
    std::fs::write(&path, manifest).unwrap();
    let m = Plan::load(&path, &registry()).unwrap();
    let opts = RunOptions { jobs: 2, ..RunOptions::default() };

    let summary = exec::run(&m, &opts, &NullReporter, Default::default()).unwrap();
    assert!(summary.stages.iter().all(|(_, o)| matches!(o, StageOutcome::Ran { .. })), "{summary:?}");
    assert_eq!(summary.stages.len(), 3);
    assert_eq!(RUNS.load(Ordering::SeqCst), 2);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("from_second.txt")).unwrap(),
        "second\nfirst/nested/counts.txt: 1\n",
        "a command reads an upstream artifact in the same run"
    );
    let shown = dir.path().join("outputs/lib/second/nested/counts.txt");
    assert_eq!(std::fs::read_to_string(&shown).unwrap(), "second\nfirst/nested/counts.txt: 1\n");
    assert!(dir.path().join("outputs/lib/first/nested/counts.txt").is_file());
    assert!(std::fs::read_dir(dir.path().join("cache/tmp")).unwrap().next().is_none(), "staging directories are gone");

    std::fs::remove_dir_all(dir.path().join("outputs/lib")).unwrap();
    let summary = exec::run(&m, &opts, &NullReporter, Default::default()).unwrap();
    assert!(summary.stages.iter().all(|(_, o)| matches!(o, StageOutcome::Cached { .. })), "{summary:?}");
    assert_eq!(RUNS.load(Ordering::SeqCst), 2, "nothing reran");
    assert!(shown.is_file(), "views are rebuilt on every run");

    // Renaming a stage away drops its view.
    std::fs::write(&path, manifest.replace("second", "third").replace("SECOND", "THIRD")).unwrap();
    let m = Plan::load(&path, &registry()).unwrap();
    exec::run(&m, &opts, &NullReporter, Default::default()).unwrap();
    assert!(!dir.path().join("outputs/lib/second").exists());
    assert!(dir.path().join("outputs/lib/third/nested/counts.txt").is_file());
}
