//! The `dir` source: an ImageFolder tree, labelled by its folders (`layout`).
//!
//! The engine's scan of the folder gives the digests; a walk that only lists names
//! ([`files::walk`]) refuses what must not be collected, and every image is stored once by
//! content, read within `max_bytes` and checked against the scan's digest.

use std::borrow::Cow;
use std::collections::HashSet;

use rayon::prelude::*;

use super::{DirSource, Layout, Problem, files};
use crate::cache::tree::unescape_os;
use crate::formats::dataset::Item;
use crate::paths::dep_path;
use crate::stages::{StageContext, StageError};

/// Image extensions collected from a directory when the manifest names none.
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff"];

pub(super) fn collect(
    cx: &StageContext<'_>,
    source: &DirSource,
    label: &str,
    items: &mut Vec<Item>,
    problems: &mut Vec<Problem>,
) -> Result<(), StageError> {
    let DirSource { path, layout, extensions, include, exclude, follow_links, max_bytes, .. } = source;
    let root = dep_path(cx.root, path);
    // The engine scanned this folder to build the stage key, and its scan has the digests;
    // the walk below only lists names (no `stat` of regular files) to refuse what must
    // not be collected, which the scan does not tell apart.
    let scan = match cx.dep_scan(path) {
        Some(scan) => Cow::Borrowed(scan),
        None => Cow::Owned(cx.cache.state().scan(&root, cx.reporter).map_err(|e| StageError::Failed(format!("source `{label}`: {e}")))?),
    };
    let globs = |patterns: &[String]| -> Result<Option<globset::GlobSet>, StageError> {
        if patterns.is_empty() {
            return Ok(None);
        }
        let mut b = globset::GlobSetBuilder::new();
        for p in patterns {
            b.add(globset::Glob::new(p).map_err(|e| StageError::Failed(format!("invalid glob `{p}`: {e}")))?);
        }
        b.build().map(Some).map_err(|e| StageError::Failed(e.to_string()))
    };
    let (include, exclude) = (globs(include)?, globs(exclude)?);
    let wanted_ext: Vec<String> = extensions
        .clone()
        .unwrap_or_else(|| IMAGE_EXTENSIONS.iter().map(|e| e.to_string()).collect())
        .iter()
        .map(|e| e.trim_start_matches('.').to_ascii_lowercase())
        .collect();
    let selected = |rel: &str| {
        let ext = rel.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
        wanted_ext.contains(&ext) && include.as_ref().is_none_or(|g| g.is_match(rel)) && !exclude.as_ref().is_some_and(|g| g.is_match(rel))
    };
    // A problem is worth reporting when the entry would have been collected, or when its
    // name has no extension (a folder, a link, a pipe: it may hide images).
    let reportable = |rel: &str| selected(rel) || !rel.rsplit('/').next().unwrap_or(rel).contains('.');
    let walked = files::walk(&root, *follow_links).map_err(|e| StageError::Failed(format!("source `{label}`: {e}")))?;
    // What the walk refused stands for everything below it (a loop, a linked folder).
    let refused: HashSet<&str> = walked.refused.iter().map(|r| r.rel.as_str()).collect();
    let hidden = |rel: &str| {
        let mut at = rel;
        loop {
            if refused.contains(at) {
                return true;
            }
            match at.rsplit_once('/') {
                Some((parent, _)) => at = parent,
                None => return false,
            }
        }
    };
    let mut found: Vec<(String, String)> =
        walked.refused.iter().filter(|r| r.always || reportable(&r.rel)).map(|r| (r.rel.clone(), r.reason.clone())).collect();
    found.extend(scan.problems.iter().filter(|(rel, _)| !hidden(rel) && reportable(rel)).cloned());
    let broken: HashSet<&str> = scan.problems.iter().map(|(p, _)| p.as_str()).collect();
    let mut entries = Vec::new();
    for e in scan.tree.entries() {
        if broken.contains(e.path.as_str()) || !selected(&e.path) {
            continue;
        }
        if !walked.files.contains(&e.path) {
            // Below a refused entry (reported there), or gone since the scan.
            if !hidden(&e.path) {
                found.push((e.path.clone(), "changed while being collected (run again)".into()));
            }
            continue;
        }
        if e.size > *max_bytes {
            found.push((e.path.clone(), format!("{} bytes, over the {max_bytes}-byte limit (`max_bytes`)", e.size)));
            continue;
        }
        entries.push(e);
    }
    found.sort();
    found.dedup_by(|a, b| a.0 == b.0);
    for (rel, reason) in found {
        problems.push(Problem { source: label.to_string(), path: format!("{path}/{rel}"), reason });
    }
    // Store every image once by content; a blob already in the cache is not read again.
    // The read is bounded and checks the content against the scan's digest.
    let stored: Vec<Result<(), String>> = entries
        .par_iter()
        .map(|e| -> Result<(), String> {
            if cx.cache.has_blob(&e.digest) {
                return Ok(());
            }
            let file = if e.path.is_empty() { root.clone() } else { root.join(unescape_os(&e.path)) };
            let bytes = files::read_regular(&file, *max_bytes, "`max_bytes`")?;
            match cx.cache.put_blob_bytes(&bytes) {
                Ok(digest) if digest == e.digest => Ok(()),
                Ok(_) => Err("changed while being collected (run again)".to_string()),
                Err(err) => Err(err.to_string()),
            }
        })
        .collect();
    for (e, stored) in entries.into_iter().zip(stored) {
        if let Err(reason) = stored {
            problems.push(Problem { source: label.to_string(), path: format!("{path}/{}", e.path), reason });
            continue;
        }
        let parts: Vec<&str> = e.path.split('/').collect();
        let mut item = Item::new(format!("{label}/{}", e.path), format!("{path}/{}", e.path), e.digest, e.size);
        match layout {
            Layout::Class if parts.len() >= 2 => item.label = Some(parts[0].to_string()),
            Layout::SplitClass if parts.len() >= 3 => {
                item.split = Some(parts[0].to_string());
                item.label = Some(parts[1].to_string());
            }
            _ => {}
        }
        items.push(item);
    }
    Ok(())
}
