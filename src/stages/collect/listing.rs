//! The `listing` source: a CSV (with a header) or JSONL file of image paths, relative to
//! the listing's folder, with an optional label column. [`read_rows`] also reads the
//! `http` source's listing of URLs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::{ListingSource, Problem, files};
use crate::digest::Digest;
use crate::formats::dataset::Item;
use crate::paths::dep_path;
use crate::stages::{StageContext, StageError};

pub(super) fn collect(
    cx: &StageContext<'_>,
    source: &ListingSource,
    label: &str,
    items: &mut Vec<Item>,
    problems: &mut Vec<Problem>,
) -> Result<(), StageError> {
    let ListingSource { path, path_field, label_field, max_bytes, .. } = source;
    let listing = dep_path(cx.root, path);
    let base = listing.parent().map(Path::to_path_buf).unwrap_or_default();
    let fail = |e: String| StageError::Failed(format!("listing `{path}`: {e}"));
    let rows = read_rows(&listing, path)?;
    let mut wanted = Vec::with_capacity(rows.len());
    for (n, row) in rows.iter().enumerate() {
        let Some(rel) = row.get(path_field) else {
            return Err(fail(format!("row {} has no `{path_field}` column", n + 1)));
        };
        // An absolute path is allowed (a listing names what it names), but like any other
        // it is read only if it is a regular file within `max_bytes`.
        let file = if Path::new(rel).is_absolute() { PathBuf::from(rel) } else { base.join(rel) };
        wanted.push((rel.clone(), file, label_field.as_ref().and_then(|f| row.get(f)).cloned()));
    }
    let stored: Vec<Result<(Digest, u64), String>> = wanted
        .par_iter()
        .map(|(_, file, _)| -> Result<(Digest, u64), String> {
            let bytes = files::read_regular(file, *max_bytes, "`max_bytes`")?;
            let digest = cx.cache.put_blob_bytes(&bytes).map_err(|e| e.to_string())?;
            Ok((digest, bytes.len() as u64))
        })
        .collect();
    for ((rel, _, item_label), stored) in wanted.into_iter().zip(stored) {
        match stored {
            Ok((digest, bytes)) => {
                let mut item = Item::new(format!("{label}/{rel}"), rel.clone(), digest, bytes);
                item.label = item_label.filter(|l| !l.is_empty());
                items.push(item);
            }
            Err(reason) => problems.push(Problem { source: label.to_string(), path: rel, reason }),
        }
    }
    Ok(())
}

/// The rows of a CSV (with a header) or JSONL listing, as text fields. The listing must be
/// a regular file of at most [`files::TABLE_MAX_BYTES`].
pub(super) fn read_rows(file: &Path, shown: &str) -> Result<Vec<BTreeMap<String, String>>, StageError> {
    let fail = |e: String| StageError::Failed(format!("listing `{shown}`: {e}"));
    let bytes = files::read_regular(file, files::TABLE_MAX_BYTES, "kiln's limit for listings").map_err(fail)?;
    if shown.ends_with(".jsonl") || shown.ends_with(".ndjson") {
        let text = std::str::from_utf8(&bytes).map_err(|e| fail(format!("not UTF-8 text: {e}")))?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(n, l)| {
                let v: BTreeMap<String, serde_json::Value> = serde_json::from_str(l).map_err(|e| fail(format!("line {}: {e}", n + 1)))?;
                Ok(v.into_iter().map(|(k, v)| (k, v.as_str().map(String::from).unwrap_or_else(|| v.to_string()))).collect())
            })
            .collect()
    } else {
        let mut reader = csv::Reader::from_reader(bytes.as_slice());
        reader.deserialize().collect::<Result<_, _>>().map_err(|e| fail(e.to_string()))
    }
}
