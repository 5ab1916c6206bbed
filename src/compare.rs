//! Comparing two states of a pipeline's results — two git revisions of the lock file, two
//! recorded runs, or one of each: metric deltas, per-class deltas, and the test items whose
//! prediction flipped between right and wrong.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::cache::ArtifactReader;
use crate::cache::lockfile::LockFile;
use crate::digest::Digest;
use crate::runs::RunRecord;

/// The results of one pipeline state: per stage, its headline metrics and its artifact.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// What the user named: `HEAD`, `workspace`, `r3`.
    pub label: String,
    pub stages: BTreeMap<String, SnapStage>,
}

#[derive(Debug, Clone)]
pub struct SnapStage {
    pub metrics: BTreeMap<String, f64>,
    pub artifact: Option<Digest>,
}

impl Snapshot {
    pub fn from_lock(label: &str, lock: &LockFile) -> Snapshot {
        let stages = lock
            .stages
            .iter()
            .filter(|(_, s)| !s.metrics.is_empty())
            .map(|(n, s)| (n.clone(), SnapStage { metrics: s.metrics.clone(), artifact: Some(s.artifact) }))
            .collect();
        Snapshot { label: label.to_string(), stages }
    }

    pub fn from_run(run: &RunRecord) -> Snapshot {
        let stages = run
            .stages
            .iter()
            .filter(|(_, s)| !s.metrics.is_empty())
            .map(|(n, s)| (n.clone(), SnapStage { metrics: s.metrics.clone(), artifact: s.artifact }))
            .collect();
        Snapshot { label: run.id.clone(), stages }
    }
}

/// One row of an eval stage's `predictions.csv`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub id: String,
    pub source: String,
    pub label: String,
    pub predicted: String,
    pub p_max: f64,
    pub correct: bool,
}

pub fn parse_predictions(bytes: &[u8]) -> Result<Vec<Prediction>, String> {
    let mut reader = csv::Reader::from_reader(bytes);
    let headers = reader.headers().map_err(|e| e.to_string())?.clone();
    let col = |name: &str| headers.iter().position(|h| h == name).ok_or_else(|| format!("predictions.csv has no `{name}` column"));
    let (id, label, predicted, p_max, correct) = (col("id")?, col("label")?, col("predicted")?, col("p_max")?, col("correct")?);
    let source = headers.iter().position(|h| h == "source");
    reader
        .records()
        .map(|r| {
            let r = r.map_err(|e| e.to_string())?;
            let get = |i: usize| r.get(i).unwrap_or_default().to_string();
            Ok(Prediction {
                id: get(id),
                source: source.map(get).unwrap_or_default(),
                label: get(label),
                predicted: get(predicted),
                p_max: get(p_max).parse().map_err(|_| format!("row `{}`: p_max is not a number", get(id)))?,
                correct: get(correct) == "1",
            })
        })
        .collect()
}

/// An item right in one state and wrong in the other.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Flip {
    pub id: String,
    pub source: String,
    pub label: String,
    pub before: String,
    pub p_before: f64,
    pub after: String,
    pub p_after: f64,
    /// Wrong before, right after.
    pub fixed: bool,
}

/// Items present in both whose correctness changed, most confident `after` first.
pub fn flips(before: &[Prediction], after: &[Prediction]) -> Vec<Flip> {
    let old: HashMap<&str, &Prediction> = before.iter().map(|p| (p.id.as_str(), p)).collect();
    let mut out: Vec<Flip> = after
        .iter()
        .filter_map(|new| {
            let old = old.get(new.id.as_str())?;
            (old.correct != new.correct).then(|| Flip {
                id: new.id.clone(),
                source: new.source.clone(),
                label: new.label.clone(),
                before: old.predicted.clone(),
                p_before: old.p_max,
                after: new.predicted.clone(),
                p_after: new.p_max,
                fixed: new.correct,
            })
        })
        .collect();
    out.sort_by(|a, b| b.fixed.cmp(&a.fixed).then(b.p_after.total_cmp(&a.p_after)).then_with(|| a.id.cmp(&b.id)));
    out
}

/// Per-class precision, recall, F1 and support before and after.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassDelta {
    pub class: String,
    /// `[before, after]`; `None` where the class is absent from that side.
    pub precision: [Option<f64>; 2],
    pub recall: [Option<f64>; 2],
    pub f1: [Option<f64>; 2],
    pub support: [Option<u64>; 2],
}

/// From two `metrics.json` documents, in the order of the later one's classes.
pub fn class_deltas(before: &serde_json::Value, after: &serde_json::Value) -> Vec<ClassDelta> {
    let classes = |doc: &serde_json::Value| -> Vec<String> {
        doc["classes"].as_array().into_iter().flatten().filter_map(|c| c.as_str().map(str::to_string)).collect()
    };
    let mut names = classes(after);
    for c in classes(before) {
        if !names.contains(&c) {
            names.push(c);
        }
    }
    let get = |doc: &serde_json::Value, class: &str, field: &str| doc["per_class"][class][field].as_f64();
    names
        .into_iter()
        .map(|c| ClassDelta {
            precision: [get(before, &c, "precision"), get(after, &c, "precision")],
            recall: [get(before, &c, "recall"), get(after, &c, "recall")],
            f1: [get(before, &c, "f1"), get(after, &c, "f1")],
            support: [before["per_class"][&c]["support"].as_u64(), after["per_class"][&c]["support"].as_u64()],
            class: c,
        })
        .collect()
}

/// What a diff of one stage found.
#[derive(Debug, Clone, Serialize)]
pub struct StageDiff {
    pub stage: String,
    /// `metric → [before, after]`.
    pub metrics: BTreeMap<String, [Option<f64>; 2]>,
    pub per_class: Vec<ClassDelta>,
    pub flips: Vec<Flip>,
    /// Why per-class deltas or flips are missing (an artifact not in this cache…).
    pub notes: Vec<String>,
}

/// Compares every stage with metrics on either side, reading per-class metrics and
/// predictions from the cache where both artifacts are there.
pub fn diff(a: &Snapshot, b: &Snapshot, reader: &ArtifactReader) -> Result<Vec<StageDiff>, crate::cache::CacheError> {
    let names: std::collections::BTreeSet<&String> = a.stages.keys().chain(b.stages.keys()).collect();
    let mut out = Vec::new();
    for name in names {
        let (sa, sb) = (a.stages.get(name), b.stages.get(name));
        let keys: std::collections::BTreeSet<&String> = sa.iter().chain(sb.iter()).flat_map(|s| s.metrics.keys()).collect();
        let metrics = keys
            .into_iter()
            .map(|k| (k.clone(), [sa.and_then(|s| s.metrics.get(k).copied()), sb.and_then(|s| s.metrics.get(k).copied())]))
            .collect();
        let mut d = StageDiff { stage: name.clone(), metrics, per_class: Vec::new(), flips: Vec::new(), notes: Vec::new() };
        let artifact = |s: Option<&SnapStage>, label: &str, notes: &mut Vec<String>| match s.and_then(|s| s.artifact) {
            Some(x) => Some(x),
            None => {
                notes.push(format!("`{name}` has no result in {label}"));
                None
            }
        };
        let (aa, ab) = (artifact(sa, &a.label, &mut d.notes), artifact(sb, &b.label, &mut d.notes));
        if let (Some(aa), Some(ab)) = (aa, ab) {
            if aa == ab {
                out.push(d);
                continue;
            }
            let mut load = |art: &Digest, file: &str, label: &str| -> Result<Option<Vec<u8>>, crate::cache::CacheError> {
                let bytes = reader.file(art, file)?;
                if bytes.is_none() {
                    d.notes.push(format!("{file} of `{name}` in {label} is not in this cache (gc'd, or made elsewhere: rerun that state)"));
                }
                Ok(bytes)
            };
            let (ma, mb) = (load(&aa, "metrics.json", &a.label)?, load(&ab, "metrics.json", &b.label)?);
            if let (Some(ma), Some(mb)) = (ma, mb)
                && let (Ok(ja), Ok(jb)) = (serde_json::from_slice(&ma), serde_json::from_slice(&mb))
            {
                d.per_class = class_deltas(&ja, &jb);
            }
            let (pa, pb) = (load(&aa, "predictions.csv", &a.label)?, load(&ab, "predictions.csv", &b.label)?);
            if let (Some(pa), Some(pb)) = (pa, pb) {
                match (parse_predictions(&pa), parse_predictions(&pb)) {
                    (Ok(pa), Ok(pb)) => d.flips = flips(&pa, &pb),
                    (Err(e), _) | (_, Err(e)) => d.notes.push(format!("`{name}`: {e}")),
                }
            }
        }
        out.push(d);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "id,source,label,predicted,p_max,correct,p_a,p_b\nx,data/x.png,a,a,0.9,1,0.9,0.1\ny,data/y.png,b,a,0.6,0,0.6,0.4\nz,,b,b,0.8,1,0.2,0.8\n";
    const B: &str = "id,source,label,predicted,p_max,correct,p_a,p_b\nx,data/x.png,a,b,0.7,0,0.3,0.7\ny,data/y.png,b,b,0.95,1,0.05,0.95\nz,,b,b,0.9,1,0.1,0.9\nnew,,a,a,0.5,1,0.5,0.5\n";

    #[test]
    fn flips_are_the_items_whose_correctness_changed() {
        let (a, b) = (parse_predictions(A.as_bytes()).unwrap(), parse_predictions(B.as_bytes()).unwrap());
        assert_eq!(a[1].source, "data/y.png");
        let f = flips(&a, &b);
        assert_eq!(f.len(), 2, "z stayed right, `new` is only in B");
        assert_eq!((f[0].id.as_str(), f[0].fixed, f[0].before.as_str(), f[0].after.as_str()), ("y", true, "a", "b"));
        assert_eq!((f[1].id.as_str(), f[1].fixed, f[1].p_before, f[1].p_after), ("x", false, 0.9, 0.7));
        assert!(parse_predictions(b"id,label\nx,a\n").unwrap_err().contains("predicted"));
    }

    #[test]
    fn class_deltas_follow_the_later_classes() {
        let a = serde_json::json!({"classes": ["a", "b"], "per_class": {"a": {"precision": 0.5, "recall": 1.0, "f1": 0.6, "support": 3}, "b": {"precision": 1.0, "recall": 0.5, "f1": 0.7, "support": 4}}});
        let b = serde_json::json!({"classes": ["b", "c"], "per_class": {"b": {"precision": 0.9, "recall": 0.6, "f1": 0.72, "support": 4}, "c": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}}});
        let d = class_deltas(&a, &b);
        let names: Vec<&str> = d.iter().map(|c| c.class.as_str()).collect();
        assert_eq!(names, ["b", "c", "a"]);
        assert_eq!(d[0].precision, [Some(1.0), Some(0.9)]);
        assert_eq!(d[1].f1, [None, Some(1.0)]);
        assert_eq!(d[2].support, [Some(3), None]);
    }
}
