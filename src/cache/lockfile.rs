//! The pipeline lock file, `pipelines/NAME.lock`: what goes into git.
//!
//! Per stage it records the stage key and everything that went into it (params, seed,
//! dependency and upstream digests) plus the output digests, in TOML with sorted keys, so
//! `git diff` of a lock shows what changed in a run. It is rewritten (atomically) after
//! each stage that succeeds, so an interrupted run keeps what finished.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::key::{CacheKey, KEY_FORMAT};
use crate::digest::Digest;

const HEADER: &str = "# Written by kiln after every stage that succeeds. Commit it with the manifest; do not edit.\n\n";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    pub format: u32,
    #[serde(default)]
    pub stages: BTreeMap<String, LockedStage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedStage {
    pub kind: String,
    pub implementation: u32,
    pub key: Digest,
    pub seed: u64,
    /// Digest of everything the stage produced.
    pub artifact: Digest,
    #[serde(default, skip_serializing_if = "is_empty_object")]
    pub params: serde_json::Value,
    /// `[params]` entries the stage referenced.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub uses: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub deps: BTreeMap<String, Digest>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub upstream: BTreeMap<String, Digest>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outs: BTreeMap<String, Digest>,
    /// Headline numbers of the stage's `metrics.json`, so `git diff` of the lock shows them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

/// The numbers worth a line in the lock: numeric leaves of a metrics document down to
/// two levels (`accuracy`, `macro_avg.f1`, `top_k_accuracy.3`), keyed by dotted path.
/// Deeper values (per-class tables) and arrays (confusion matrices) stay in the file.
pub fn headline_metrics(doc: &serde_json::Value) -> BTreeMap<String, f64> {
    fn walk(prefix: &str, v: &serde_json::Value, depth: usize, out: &mut BTreeMap<String, f64>) {
        match v {
            serde_json::Value::Number(n) => {
                if let Some(x) = n.as_f64() {
                    out.insert(prefix.to_string(), x);
                }
            }
            serde_json::Value::Object(map) if depth < 2 => {
                for (k, v) in map {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&key, v, depth + 1, out);
                }
            }
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    walk("", doc, 0, &mut out);
    out
}

fn is_empty_object(v: &serde_json::Value) -> bool {
    v.as_object().is_some_and(|o| o.is_empty()) || v.is_null()
}

#[derive(Debug, thiserror::Error)]
pub enum LockFileError {
    #[error("cannot {action} lock file `{path}`: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("cannot parse lock file `{path}`: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("cannot record stage `{stage}` in the lock file: {message}")]
    Encode { stage: String, message: String },
}

impl LockedStage {
    pub fn new(key: &CacheKey, artifact: Digest, outs: BTreeMap<String, Digest>) -> Self {
        LockedStage {
            kind: key.kind.clone(),
            implementation: key.implementation,
            key: key.digest(),
            seed: key.seed,
            artifact,
            params: key.params.clone(),
            uses: key.uses.clone(),
            deps: key.deps.clone(),
            upstream: key.upstream.clone(),
            outs,
            metrics: BTreeMap::new(),
        }
    }
}

impl LockFile {
    pub fn empty() -> Self {
        LockFile { format: KEY_FORMAT, stages: BTreeMap::new() }
    }

    /// Reads a lock file; a missing one is empty.
    pub fn read(path: &Path) -> Result<LockFile, LockFileError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(LockFile::empty()),
            Err(source) => {
                return Err(LockFileError::Io { action: "read", path: path.to_path_buf(), source });
            }
        };
        toml::from_str(&text).map_err(|e| LockFileError::Parse { path: path.to_path_buf(), message: e.to_string().trim().to_string() })
    }

    /// The lock as TOML. Every value in it comes from a validated manifest, but TOML has
    /// no null: a value it cannot hold is an error naming the stage, never a panic.
    pub fn try_to_toml(&self) -> Result<String, LockFileError> {
        let body = toml::to_string(self).map_err(|e| {
            let stage = self.stages.iter().find(|(_, s)| toml::to_string(s).is_err()).map(|(n, _)| n.clone()).unwrap_or_default();
            LockFileError::Encode { stage, message: e.to_string() }
        })?;
        Ok(format!("{HEADER}{body}"))
    }

    /// Writes via a temporary file and a rename, so readers never see half a lock file.
    pub fn write(&self, path: &Path) -> Result<(), LockFileError> {
        let io = |action, source| LockFileError::Io { action, path: path.to_path_buf(), source };
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        std::fs::write(&tmp, self.try_to_toml()?).map_err(|e| io("write", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("replace", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trip_is_stable() {
        let key = CacheKey {
            format: KEY_FORMAT,
            kind: "command".into(),
            implementation: 1,
            params: serde_json::json!({"cmd": "echo", "nested": {"lr": 0.5, "layers": [1, 2]}}),
            uses: BTreeMap::from([("lr".into(), serde_json::json!(0.5))]),
            seed: 3,
            deps: BTreeMap::from([("data".into(), Digest::of_bytes(b"d"))]),
            upstream: BTreeMap::new(),
            outs: vec!["out".into()],
        };
        let mut lock = LockFile::empty();
        lock.stages
            .insert("b".into(), LockedStage::new(&key, Digest::of_bytes(b"a"), BTreeMap::from([("out".into(), Digest::of_bytes(b"o"))])));
        lock.stages.insert("a".into(), LockedStage::new(&key, Digest::of_bytes(b"a"), BTreeMap::new()));
        let text = lock.try_to_toml().unwrap();
        assert!(text.find("[stages.a]").unwrap() < text.find("[stages.b]").unwrap());
        let back: LockFile = toml::from_str(&text).unwrap();
        assert_eq!(back, lock);
        assert_eq!(back.try_to_toml().unwrap(), text, "writing is deterministic");
    }

    #[test]
    fn headline_metrics_take_two_levels_of_numbers() {
        let doc = serde_json::json!({
            "accuracy": 0.9, "samples": 10, "classes": ["a", "b"],
            "macro_avg": {"f1": 0.8, "note": "x"},
            "per_class": {"a": {"f1": 0.7}},
            "confusion_matrix": [[1, 2], [3, 4]]
        });
        let m = headline_metrics(&doc);
        let keys: Vec<&str> = m.keys().map(String::as_str).collect();
        assert_eq!(keys, ["accuracy", "macro_avg.f1", "samples"]);
        assert_eq!(m["macro_avg.f1"], 0.8);
        let mut lock = LockFile::empty();
        let key = CacheKey {
            format: KEY_FORMAT,
            kind: "eval".into(),
            implementation: 1,
            params: serde_json::json!({"split": "test"}),
            uses: BTreeMap::new(),
            seed: 0,
            deps: BTreeMap::new(),
            upstream: BTreeMap::new(),
            outs: vec![],
        };
        let mut stage = LockedStage::new(&key, Digest::of_bytes(b"a"), BTreeMap::new());
        stage.metrics = m;
        lock.stages.insert("eval".into(), stage);
        let text = lock.try_to_toml().unwrap();
        assert!(text.contains("[stages.eval.metrics]") && text.contains("\"macro_avg.f1\" = 0.8"), "{text}");
        assert_eq!(toml::from_str::<LockFile>(&text).unwrap(), lock);
    }
}
