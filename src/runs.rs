//! Run records: what each `kiln run` did, kept in the cache so runs can be listed, ranked and
//! compared (`kiln runs`, `kiln metrics diff r3 r7`).
//!
//! A record holds the `--set` overrides, every stage's key, artifact digest, parameters,
//! outcome and headline metrics. Records are numbered `r1`, `r2`, … per cache; the number is
//! claimed with a hard link, so two writers can never share one. `kiln gc` keeps the
//! entries that experiment records (`--set`, `--sweep`) name, so experiments stay comparable
//! item by item until their records are dropped (`kiln runs --drop`); plain runs are kept
//! by the lock file like before, and their superseded results are collected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cache::lockfile::LockFile;
use crate::digest::Digest;
use crate::manifest::{Manifest, Override};
use crate::report::StageOutcome;

/// What `kiln run` did: the engine's answer ([`crate::exec::run`]), from which the run's
/// record is made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    /// Every selected stage in run order.
    pub stages: Vec<(String, StageOutcome)>,
    /// The lock file as this run leaves it (also when it was not written).
    pub lock: LockFile,
}

impl RunSummary {
    pub fn failed(&self) -> usize {
        self.stages.iter().filter(|(_, o)| matches!(o, StageOutcome::Failed { .. })).count()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunRecord {
    /// `r` and a number, unique within the cache.
    pub id: String,
    /// Seconds since the Unix epoch when the run started.
    pub started: u64,
    pub seconds: f64,
    pub pipeline: String,
    pub manifest: String,
    /// The digest of the manifest's text as written, `--set` overrides apart (see
    /// [`manifest_digest`]): runs of different versions of the file differ here. Absent from
    /// records written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<Digest>,
    #[serde(default)]
    pub overrides: Vec<Override>,
    /// Runs started by one `--sweep` share the id of the sweep's first run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<String>,
    pub stages: BTreeMap<String, RunStage>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunStage {
    pub kind: String,
    /// `ran`, `cached`, `failed`, `skipped`, or `not selected` (the stage was outside the
    /// run's targets; key and artifact are then the lock file's).
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<Digest>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub params: serde_json::Value,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunsError {
    #[error("cannot {action} run records in `{path}`: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("run record `{path}` is corrupt: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("no run `{id}` in `{dir}`; `kiln runs` lists them")]
    Unknown { id: String, dir: PathBuf },
}

/// The run records of one cache.
pub struct RunLog {
    dir: PathBuf,
}

impl RunLog {
    pub fn new(cache_dir: &Path) -> RunLog {
        RunLog { dir: cache_dir.join("runs") }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether `word` names a run (`r12`) rather than, say, a git revision.
    pub fn is_run_id(word: &str) -> bool {
        word.strip_prefix('r').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }

    fn path(&self, number: u64) -> PathBuf {
        self.dir.join(format!("r{number}.json"))
    }

    fn numbers(&self) -> Result<Vec<u64>, RunsError> {
        let items = match std::fs::read_dir(&self.dir) {
            Ok(items) => items,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(RunsError::Io { action: "list", path: self.dir.clone(), source }),
        };
        let mut numbers: Vec<u64> = items
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix('r')?.strip_suffix(".json")?.parse().ok()
            })
            .collect();
        numbers.sort_unstable();
        Ok(numbers)
    }

    /// Stores `record` under the next free number and returns its id.
    pub fn append(&self, record: &mut RunRecord) -> Result<String, RunsError> {
        let io = |action, source| RunsError::Io { action, path: self.dir.clone(), source };
        std::fs::create_dir_all(&self.dir).map_err(|e| io("create", e))?;
        let mut number = self.numbers()?.last().copied().unwrap_or(0) + 1;
        // `sweep: Some("")` marks the first run of a sweep, which names the sweep after itself.
        let names_itself = record.sweep.as_deref() == Some("");
        loop {
            record.id = format!("r{number}");
            if names_itself {
                record.sweep = Some(record.id.clone());
            }
            let tmp = self.dir.join(format!(".r{number}.tmp-{}", std::process::id()));
            let mut bytes = serde_json::to_vec_pretty(record).expect("run records serialise");
            bytes.push(b'\n');
            std::fs::write(&tmp, bytes).map_err(|e| io("write", e))?;
            // A hard link fails if the name is taken, so a number is claimed exactly once,
            // and readers only ever see a complete file.
            let claimed = std::fs::hard_link(&tmp, self.path(number));
            let _ = std::fs::remove_file(&tmp);
            match claimed {
                Ok(()) => return Ok(record.id.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => number += 1,
                Err(e) => return Err(io("write", e)),
            }
        }
    }

    pub fn get(&self, id: &str) -> Result<RunRecord, RunsError> {
        let number: u64 =
            id.strip_prefix('r').and_then(|n| n.parse().ok()).ok_or_else(|| RunsError::Unknown { id: id.into(), dir: self.dir.clone() })?;
        let path = self.path(number);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RunsError::Unknown { id: id.into(), dir: self.dir.clone() });
            }
            Err(source) => return Err(RunsError::Io { action: "read", path, source }),
        };
        serde_json::from_slice(&bytes).map_err(|source| RunsError::Corrupt { path, source })
    }

    /// Every record, oldest first.
    pub fn list(&self) -> Result<Vec<RunRecord>, RunsError> {
        self.numbers()?.into_iter().map(|n| self.get(&format!("r{n}"))).collect()
    }

    /// Drops the records `keep` says no to; returns how many went.
    pub fn drop_where(&self, mut drop: impl FnMut(&RunRecord) -> bool) -> Result<usize, RunsError> {
        let mut n = 0;
        for record in self.list()? {
            if drop(&record) {
                let path = self.dir.join(format!("{}.json", record.id));
                std::fs::remove_file(&path).map_err(|source| RunsError::Io { action: "remove", path, source })?;
                n += 1;
            }
        }
        Ok(n)
    }
}

impl RunRecord {
    /// The record of a finished run: outcomes from `summary`, keys, artifacts and metrics
    /// from the lock file the run left behind.
    pub fn new(manifest: &Manifest, summary: &RunSummary, lock: &LockFile, started: std::time::SystemTime, sweep: Option<String>) -> Self {
        let outcomes: BTreeMap<&str, &StageOutcome> = summary.stages.iter().map(|(n, o)| (n.as_str(), o)).collect();
        let mut stages = BTreeMap::new();
        for decl in &manifest.stages {
            let outcome = outcomes.get(decl.name.as_str());
            let locked = lock.stages.get(&decl.name).filter(|_| outcome.is_none_or(|o| o.is_success()));
            let (word, seconds) = match outcome {
                None => ("not selected", None),
                Some(StageOutcome::Ran { seconds_millis }) => ("ran", Some(*seconds_millis as f64 / 1000.0)),
                Some(StageOutcome::Cached { .. }) => ("cached", None),
                Some(StageOutcome::Failed { .. }) => ("failed", None),
                Some(StageOutcome::Skipped { .. } | StageOutcome::Cancelled) => ("skipped", None),
            };
            stages.insert(
                decl.name.clone(),
                RunStage {
                    kind: decl.kind.clone(),
                    outcome: word.into(),
                    seconds,
                    key: locked.map(|l| l.key),
                    artifact: locked.map(|l| l.artifact),
                    params: decl.stage.params(),
                    metrics: locked.map(|l| l.metrics.clone()).unwrap_or_default(),
                },
            );
        }
        RunRecord {
            id: String::new(),
            started: started.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            seconds: started.elapsed().map_or(0.0, |d| d.as_secs_f64()),
            pipeline: manifest.name.clone(),
            manifest: manifest.path.display().to_string(),
            manifest_digest: Some(manifest_digest(manifest)),
            overrides: manifest.overrides.clone(),
            sweep,
            stages,
        }
    }

    /// Every stage's metrics as `NAME` (when only one stage has metrics) or `STAGE.NAME`.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let with: Vec<(&String, &RunStage)> = self.stages.iter().filter(|(_, s)| !s.metrics.is_empty()).collect();
        let qualify = with.len() > 1;
        let mut out = BTreeMap::new();
        for (stage, s) in with {
            for (k, v) in &s.metrics {
                out.insert(if qualify { format!("{stage}.{k}") } else { k.clone() }, *v);
            }
        }
        out
    }
}

/// The line [`crate::manifest::Manifest::parse`] puts between the manifest's text and the
/// `--set` overrides it appends as comments.
const OVERRIDES_HEADER: &str = "\n# overrides from the command line\n";

/// The digest of `manifest`'s text as written: without the `--set` overrides appended to
/// its source, and with one final newline, so that a run with `--set` and a plain run of
/// the same file agree.
pub fn manifest_digest(manifest: &Manifest) -> Digest {
    let source: &str = &manifest.source;
    let text = match source.rfind(OVERRIDES_HEADER) {
        Some(at) if !manifest.overrides.is_empty() => &source[..at],
        _ => source,
    };
    let mut text = text.trim_end_matches('\n').to_string();
    text.push('\n');
    Digest::of_bytes(text.as_bytes())
}

/// The metric a user means by `name`: the exact key, else the first key (alphabetically)
/// whose last parts are `name` — `f1` is `macro_avg.f1`, `top_k_accuracy.3` is itself.
pub fn resolve_metric<'a>(name: &str, keys: impl IntoIterator<Item = &'a String>) -> Option<String> {
    let keys: Vec<&String> = keys.into_iter().collect();
    if let Some(k) = keys.iter().find(|k| k.as_str() == name) {
        return Some((*k).clone());
    }
    let suffix = format!(".{name}");
    let mut found: Vec<&String> = keys.into_iter().filter(|k| k.ends_with(&suffix)).collect();
    // `f1` is the macro average's wherever there is one: a binary model's `binary.f1` (its
    // positive class) sorts first but means something else.
    found.sort_by_key(|k| (!k.contains("macro_avg."), k.as_str()));
    found.first().map(|k| (*k).clone())
}

/// Lower is better for losses and errors; higher for everything else.
pub fn lower_is_better(metric: &str) -> bool {
    let last = metric.rsplit('.').next().unwrap_or(metric);
    last.contains("loss") || last.contains("error") || last == "ece" || last == "mae" || last == "mse" || last == "rmse"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(metrics: &[(&str, f64)]) -> RunRecord {
        RunRecord {
            id: String::new(),
            started: 0,
            seconds: 1.0,
            pipeline: "p".into(),
            manifest: "p.toml".into(),
            manifest_digest: Some(Digest::of_bytes(b"[stages]\n")),
            overrides: vec![Override::parse("train.lr=0.1").unwrap()],
            sweep: None,
            stages: BTreeMap::from([(
                "eval".to_string(),
                RunStage {
                    kind: "eval".into(),
                    outcome: "ran".into(),
                    seconds: Some(1.0),
                    key: Some(Digest::of_bytes(b"k")),
                    artifact: Some(Digest::of_bytes(b"a")),
                    params: serde_json::json!({"split": "test"}),
                    metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                },
            )]),
        }
    }

    #[test]
    fn records_get_consecutive_ids_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let log = RunLog::new(dir.path());
        assert!(log.list().unwrap().is_empty());
        let mut a = record(&[("accuracy", 0.5)]);
        let mut b = record(&[("accuracy", 0.7)]);
        assert_eq!(log.append(&mut a).unwrap(), "r1");
        assert_eq!(log.append(&mut b).unwrap(), "r2");
        assert_eq!(log.get("r2").unwrap(), b);
        assert_eq!(log.list().unwrap().len(), 2);
        assert!(matches!(log.get("r9"), Err(RunsError::Unknown { .. })));
        assert_eq!(log.drop_where(|r| r.id == "r1").unwrap(), 1);
        let mut c = record(&[]);
        c.sweep = Some(String::new());
        assert_eq!(log.append(&mut c).unwrap(), "r3", "numbers are never reused while a later one exists");
        assert_eq!(c.sweep.as_deref(), Some("r3"), "the first run of a sweep names it");
        assert!(RunLog::is_run_id("r12") && !RunLog::is_run_id("r") && !RunLog::is_run_id("HEAD~1") && !RunLog::is_run_id("rabc"));
    }

    #[test]
    fn the_manifest_digest_is_of_the_text_as_written() {
        let registry = crate::stages::StageRegistry::builtin();
        let text = "[pipeline]\nname = \"p\"\n\n[params]\nlr = 0.1\n\n[stages.a]\nkind = \"command\"\ncmd = \"echo ${params.lr}\"\n";
        let parse = |text: &str, set: &[&str]| {
            let overrides: Vec<Override> = set.iter().map(|s| Override::parse(s).unwrap()).collect();
            let parsed = Manifest::parse(Path::new("/w/p.toml"), text, &registry, &overrides);
            assert!(parsed.issues.is_empty(), "{:?}", parsed.issues);
            manifest_digest(&parsed.manifest.unwrap())
        };
        let plain = parse(text, &[]);
        assert_eq!(parse(text, &["params.lr=0.5"]), plain, "`--set` values are not part of the text as written");
        assert_eq!(parse(text.trim_end(), &["params.lr=0.5"]), plain, "nor is a missing final newline");
        assert_ne!(parse(&text.replace("echo", "printf"), &[]), plain, "an edit is");
    }

    #[test]
    fn metric_names_resolve_by_suffix() {
        let keys: Vec<String> = ["accuracy", "macro_avg.f1", "weighted_avg.f1", "log_loss"].iter().map(|s| s.to_string()).collect();
        assert_eq!(resolve_metric("f1", &keys).as_deref(), Some("macro_avg.f1"));
        assert_eq!(resolve_metric("weighted_avg.f1", &keys).as_deref(), Some("weighted_avg.f1"));
        assert_eq!(resolve_metric("accuracy", &keys).as_deref(), Some("accuracy"));
        assert_eq!(resolve_metric("auc", &keys), None);
        // A binary model's figures sort before `macro_avg` but do not take its short names.
        let binary: Vec<String> =
            ["binary.f1", "binary.recall", "macro_avg.f1", "macro_avg.recall"].iter().map(|s| s.to_string()).collect();
        assert_eq!(resolve_metric("f1", &binary).as_deref(), Some("macro_avg.f1"));
        assert_eq!(resolve_metric("recall", &binary).as_deref(), Some("macro_avg.recall"));
        assert_eq!(resolve_metric("binary.f1", &binary).as_deref(), Some("binary.f1"));
        assert!(lower_is_better("log_loss") && lower_is_better("eval.ece") && !lower_is_better("macro_avg.f1"));
    }
}
