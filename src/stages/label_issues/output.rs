//! What a label_issues stage leaves: `label_issues_report.json` (the suspects ranked, with
//! what the fold models said of them, counts per class and the confident-learning
//! estimate), `suggested_corrections.csv` (a corrections file for the label stage, to be
//! reviewed), `out_of_fold.csv` (every judged row's out-of-fold probabilities),
//! `thumbs/NNNN.png` (the first suspects' images as the model saw them) and, with
//! `policy = "drop"`, the shards without the suspects in the layout convert writes.

use std::collections::{BTreeMap, BTreeSet};

use safetensors::tensor::TensorView;
use serde::Serialize;

use super::Policy;
use super::confident::{Estimate, LabelIssue};
use super::folds::{Rows, is_copy, item_id};
use crate::formats::csv_field;
use crate::formats::preprocess::Normalize;
use crate::formats::shards::{ShardInfo, ShardManifest, Split, SplitInfo};
use crate::stages::{Artifact, StageContext, StageError, io};

/// The report's name: `kiln report FILE STAGE` reads `<kind>_report.json`.
pub(super) const REPORT: &str = "label_issues_report.json";
/// Thumbnails are written for this many suspects, the first in rank order.
pub(super) const MAX_THUMBNAILS: usize = 256;

/// Everything the stage found, for its files.
pub(super) struct Findings<'a> {
    pub(super) manifest: &'a ShardManifest,
    pub(super) rows: &'a Rows,
    /// Out-of-fold probabilities of the judged rows, row-major.
    pub(super) probs: &'a [f32],
    /// Ranked, most suspect first.
    pub(super) suspects: &'a [LabelIssue],
    pub(super) estimate: &'a Estimate,
    pub(super) accuracy: f64,
    pub(super) folds: usize,
    pub(super) splits: &'a [String],
    pub(super) policy: Policy,
    /// Suspects left out because a person reviewed their label.
    pub(super) reviewed: usize,
    /// Rows dropped per split (`policy = "drop"`).
    pub(super) dropped: &'a BTreeMap<String, usize>,
    /// The pool's pixels, for thumbnails.
    pub(super) pixels: &'a Split,
}

#[derive(Debug, Serialize)]
struct ClassRow {
    class: String,
    /// Judged items with this label.
    given: usize,
    /// Suspects with this label.
    flagged: usize,
    /// Suspects suggested into this class.
    suggested: usize,
}

#[derive(Debug, Serialize)]
struct Suspect {
    /// 1 is the most suspect.
    rank: usize,
    id: String,
    source: String,
    split: &'static str,
    given: String,
    suggested: String,
    /// The out-of-fold probability of the given label.
    self_confidence: f64,
    /// The out-of-fold probability of the suggested one.
    p_suggested: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    thumbnail: Option<String>,
}

#[derive(Serialize)]
struct Report<'a> {
    judged: usize,
    splits: &'a [String],
    folds: usize,
    policy: Policy,
    out_of_fold_accuracy: f64,
    suspected: usize,
    /// Doubted labels a person already reviewed (the label stage's corrections): not
    /// among `suspects`.
    #[serde(skip_serializing_if = "is_zero")]
    reviewed_not_suggested: usize,
    classes: Vec<ClassRow>,
    estimate: &'a Estimate,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    dropped: BTreeMap<String, usize>,
    suspects: Vec<Suspect>,
}

pub(super) fn write(cx: &StageContext<'_>, f: &Findings<'_>) -> Result<(), StageError> {
    let classes = &f.manifest.classes;
    let k = classes.len();
    let applied = f.manifest.normalization.as_ref().filter(|_| f.manifest.normalization_applied);
    let mut suspects = Vec::with_capacity(f.suspects.len());
    for (rank, issue) in f.suspects.iter().enumerate() {
        let row = f.rows.judged[issue.index];
        let thumbnail = if rank < MAX_THUMBNAILS { write_thumbnail(cx, f.pixels, row, applied, rank)? } else { None };
        suspects.push(Suspect {
            rank: rank + 1,
            id: f.rows.ids[row].clone(),
            source: f.rows.sources[row].clone(),
            split: f.rows.split_of[row],
            given: classes[issue.given].clone(),
            suggested: classes[issue.suggested].clone(),
            self_confidence: issue.self_confidence,
            p_suggested: f.probs[issue.index * k + issue.suggested],
            thumbnail,
        });
    }
    let mut per_class: Vec<ClassRow> = classes.iter().map(|c| ClassRow { class: c.clone(), given: 0, flagged: 0, suggested: 0 }).collect();
    for &r in &f.rows.judged {
        if let Some(c) = per_class.get_mut(f.rows.labels[r] as usize) {
            c.given += 1;
        }
    }
    for issue in f.suspects {
        per_class[issue.given].flagged += 1;
        per_class[issue.suggested].suggested += 1;
    }
    let report = Report {
        judged: f.rows.judged.len(),
        splits: f.splits,
        folds: f.folds,
        policy: f.policy,
        out_of_fold_accuracy: f.accuracy,
        suspected: f.suspects.len(),
        reviewed_not_suggested: f.reviewed,
        classes: per_class,
        estimate: f.estimate,
        dropped: f.dropped.clone(),
        suspects,
    };
    io::write_json(cx, REPORT, &report)?;

    // Ready to commit as the label stage's `corrections` once reviewed: `label` is what the
    // models suggest; blank it (or write `-`) to keep the given label.
    let mut csv = String::from("id,label,given,self_confidence\n");
    for s in &report.suspects {
        csv.push_str(&format!("{},{},{},{:.6}\n", csv_field(&s.id), csv_field(&s.suggested), csv_field(&s.given), s.self_confidence));
    }
    write_text(cx, "suggested_corrections.csv", csv)?;

    let mut csv = String::from("id,given");
    for c in classes {
        csv.push_str(&format!(",{}", csv_field(&format!("p_{c}"))));
    }
    csv.push('\n');
    for (i, &r) in f.rows.judged.iter().enumerate() {
        let given = classes.get(f.rows.labels[r] as usize).map_or("", String::as_str);
        csv.push_str(&format!("{},{}", csv_field(&f.rows.ids[r]), csv_field(given)));
        // Shortest round-trip text: a reader gets the exact f32 probabilities back.
        for v in &f.probs[i * k..(i + 1) * k] {
            csv.push_str(&format!(",{v}"));
        }
        csv.push('\n');
    }
    write_text(cx, "out_of_fold.csv", csv)
}

fn write_text(cx: &StageContext<'_>, name: &str, text: String) -> Result<(), StageError> {
    let path = cx.out_dir.join(name);
    std::fs::write(&path, text).map_err(StageError::io("write", &path))
}

/// Row `row`'s image as the model saw it (after preprocessing), as `thumbs/NNNN.png`;
/// `None` for images of neither one nor three channels.
fn write_thumbnail(
    cx: &StageContext<'_>,
    split: &Split,
    row: usize,
    applied: Option<&Normalize>,
    rank: usize,
) -> Result<Option<String>, StageError> {
    let name = format!("thumbs/{rank:04}.png");
    let path = cx.out_dir.join(&name);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(StageError::io("create", dir))?;
    }
    if !split.save_row_png(row, applied, &path).map_err(StageError::io("write", &path))? {
        return Ok(None);
    }
    Ok(Some(name))
}

/// With `policy = "drop"`: the input's shards without the rows of the items in `suspects`
/// (offline augmented copies go with their item), with a `manifest.json` like convert's,
/// so a train stage can read them. A shard that loses no row is shared with the input,
/// not copied. Returns the rows dropped per split.
pub(super) fn write_without(
    cx: &StageContext<'_>,
    input: &str,
    artifact: &Artifact,
    manifest: &ShardManifest,
    suspects: &BTreeSet<&str>,
) -> Result<BTreeMap<String, usize>, StageError> {
    let mut out = manifest.clone();
    let mut dropped = BTreeMap::new();
    for (name, info) in &manifest.splits {
        let mut shards = Vec::new();
        let mut lost = 0;
        for shard in &info.shards {
            let keep: Vec<usize> = (0..shard.rows).filter(|&r| shard.ids.get(r).is_none_or(|id| !suspects.contains(item_id(id)))).collect();
            lost += shard.rows - keep.len();
            if keep.is_empty() {
                continue;
            }
            if keep.len() == shard.rows {
                let entry = artifact
                    .tree
                    .entries()
                    .iter()
                    .find(|e| e.path == shard.file)
                    .ok_or_else(|| StageError::data(input, format!("shard `{}` is missing", shard.file)))?;
                cx.attach_blob(&shard.file, entry.digest, entry.size);
                shards.push(shard.clone());
            } else {
                write_rows(cx, input, artifact, shard, &keep)?;
                shards.push(ShardInfo {
                    file: shard.file.clone(),
                    rows: keep.len(),
                    ids: pick(&shard.ids, &keep),
                    sources: pick(&shard.sources, &keep),
                    groups: pick(&shard.groups, &keep),
                    reviewed: pick(&shard.reviewed, &keep),
                });
            }
        }
        let rows = shards.iter().map(|s| s.rows).sum();
        let items = shards.iter().flat_map(|s| &s.ids).filter(|id| !is_copy(id)).count();
        out.splits.insert(name.clone(), SplitInfo { rows, items, shards });
        dropped.insert(name.clone(), lost);
    }
    io::write_json(cx, "manifest.json", &out)?;
    if let Some(e) = artifact.tree.entries().iter().find(|e| e.path == "class_to_index.json") {
        cx.attach_blob(&e.path, e.digest, e.size);
    }
    Ok(dropped)
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The entries of a per-row list at rows `keep` (an empty list stays empty).
fn pick<T: Clone>(values: &[T], keep: &[usize]) -> Vec<T> {
    if values.is_empty() {
        return Vec::new();
    }
    keep.iter().filter_map(|&r| values.get(r).cloned()).collect()
}

/// Writes shard `shard` of the input with only its rows `keep`: every tensor (`images`,
/// `labels`) cut row by row, whatever its type, so pixels and labels are copied exactly.
fn write_rows(cx: &StageContext<'_>, input: &str, artifact: &Artifact, shard: &ShardInfo, keep: &[usize]) -> Result<(), StageError> {
    let fail = |why: String| StageError::data(input, format!("shard `{}`: {why}", shard.file));
    let path = cx.input_file(artifact, &shard.file)?.ok_or_else(|| fail("it is missing".to_string()))?;
    let bytes = std::fs::read(&path).map_err(StageError::io("read", &path))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| fail(e.to_string()))?;
    let mut cut: Vec<(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in ["images", "labels"] {
        let t = st.tensor(name).map_err(|e| fail(e.to_string()))?;
        let mut shape = t.shape().to_vec();
        let rows = shape.first().copied().unwrap_or(0);
        if rows != shard.rows {
            return Err(fail(format!("`{name}` has {rows} rows, the manifest says {}", shard.rows)));
        }
        let per_row = t.data().len() / rows;
        let mut data = Vec::with_capacity(per_row * keep.len());
        for &r in keep {
            data.extend_from_slice(&t.data()[r * per_row..(r + 1) * per_row]);
        }
        shape[0] = keep.len();
        cut.push((name, t.dtype(), shape, data));
    }
    let views = cut
        .iter()
        .map(|(name, dtype, shape, data)| TensorView::new(*dtype, shape.clone(), data).map(|v| (*name, v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    let out = safetensors::serialize(views, None).map_err(|e| fail(e.to_string()))?;
    let dest = cx.out_dir.join(&shard.file);
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(StageError::io("create", dir))?;
    }
    std::fs::write(&dest, out).map_err(StageError::io("write", &dest))
}
