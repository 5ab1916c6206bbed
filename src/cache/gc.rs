//! `kiln gc` and `kiln verify`: keeping the cache small and honest.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use super::{Cache, CacheError, StageEntry, Tree};
use crate::digest::Digest;

/// What gc must keep: the stage keys and dependency snapshots that lock files name.
#[derive(Debug, Default)]
pub struct Roots {
    pub keys: HashSet<Digest>,
    pub trees: HashSet<Digest>,
}

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub entries_removed: usize,
    pub trees_removed: usize,
    pub blobs_removed: usize,
    pub bytes_freed: u64,
    pub entries_kept: usize,
    pub blobs_kept: usize,
    /// Checkpoints of interrupted training runs (no lock file can name them: a key is
    /// locked only once its stage finishes).
    pub scratch_removed: usize,
}

/// Removes every stage entry not in `roots`, then every tree and blob nothing kept refers
/// to. With `dry_run`, only counts.
pub fn collect_garbage(cache: &Cache, roots: &Roots, dry_run: bool) -> Result<GcReport, CacheError> {
    let mut report = GcReport::default();
    let mut live_trees = roots.trees.clone();
    let mut live_blobs = HashSet::new();
    for (key, path) in cache.entries()? {
        if roots.keys.contains(&key) {
            report.entries_kept += 1;
            if let Some(entry) = read_entry(&path) {
                live_trees.insert(entry.artifact);
                if let Some(tree) = cache.get_tree(&entry.artifact)? {
                    live_blobs.extend(tree.entries().iter().map(|e| e.digest));
                }
            }
        } else {
            report.entries_removed += 1;
            report.bytes_freed += file_len(&path);
            if !dry_run {
                cache.remove_entry(&key)?;
            }
        }
    }
    for (digest, path) in objects(&cache.dir().join("trees"))? {
        if !live_trees.contains(&digest) {
            report.trees_removed += 1;
            report.bytes_freed += file_len(&path);
            if !dry_run {
                remove_file(&path)?;
            }
        }
    }
    for (digest, path) in objects(&cache.dir().join("blobs"))? {
        if live_blobs.contains(&digest) {
            report.blobs_kept += 1;
        } else {
            report.blobs_removed += 1;
            report.bytes_freed += file_len(&path);
            if !dry_run {
                remove_file(&path)?;
            }
        }
    }
    let scratch = cache.dir().join("scratch");
    if let Ok(dirs) = std::fs::read_dir(&scratch) {
        for dir in dirs.flatten() {
            report.scratch_removed += 1;
            if !dry_run {
                super::remove_path(&dir.path())?;
            }
        }
    }
    Ok(report)
}

#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub blobs_checked: usize,
    pub trees_checked: usize,
    pub entries_checked: usize,
    /// Everything found wrong, one line each, already removed.
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Rehashes every blob and tree, checks every stage entry refers to objects that exist,
/// and removes whatever is corrupt so the next run recomputes it.
pub fn verify(cache: &Cache) -> Result<VerifyReport, CacheError> {
    let mut report = VerifyReport::default();
    let blobs = objects(&cache.dir().join("blobs"))?;
    report.blobs_checked = blobs.len();
    let bad_blobs: Vec<(Digest, PathBuf, String)> = blobs
        .into_par_iter()
        .filter_map(|(digest, path)| match Digest::of_file(&path) {
            Ok((actual, _)) if actual == digest => None,
            Ok((actual, _)) => Some((digest, path, format!("content hashes to {}", actual.short()))),
            Err(e) => Some((digest, path, format!("unreadable: {e}"))),
        })
        .collect();
    for (digest, path, why) in bad_blobs {
        report.problems.push(format!("blob {}: {why}; removed", digest.short()));
        remove_file(&path)?;
    }

    for (digest, path) in objects(&cache.dir().join("trees"))? {
        report.trees_checked += 1;
        let ok = std::fs::read(&path).ok().and_then(|b| Tree::decode(&b).ok()).is_some_and(|t| t.digest() == digest);
        if !ok {
            report.problems.push(format!("tree {}: unreadable or wrong digest; removed", digest.short()));
            remove_file(&path)?;
        }
    }

    for (key, path) in cache.entries()? {
        report.entries_checked += 1;
        let problem = match read_entry(&path) {
            None => Some("unreadable".to_string()),
            Some(entry) if entry.key.digest() != key => Some("key does not match its file name".into()),
            Some(entry) => match cache.get_tree(&entry.artifact) {
                Ok(Some(tree)) => tree
                    .entries()
                    .iter()
                    .find(|e| !cache.has_blob(&e.digest))
                    .map(|e| format!("output `{}` lost its blob {}", e.path, e.digest.short())),
                _ => Some("artifact tree missing".into()),
            },
        };
        if let Some(why) = problem {
            report.problems.push(format!("stage entry {}: {why}; removed, the stage will run again", key.short()));
            cache.remove_entry(&key)?;
        }
    }
    Ok(report)
}

fn read_entry(path: &Path) -> Option<StageEntry> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Objects stored as `dir/ab/cdef…`, by digest.
fn objects(dir: &Path) -> Result<Vec<(Digest, PathBuf)>, CacheError> {
    let mut out = Vec::new();
    let Ok(fans) = std::fs::read_dir(dir) else { return Ok(out) };
    for fan in fans.flatten() {
        let prefix = fan.file_name().to_string_lossy().into_owned();
        let Ok(items) = std::fs::read_dir(fan.path()) else { continue };
        for item in items.flatten() {
            let name = format!("{prefix}{}", item.file_name().to_string_lossy());
            if let Ok(d) = name.parse::<Digest>() {
                out.push((d, item.path()));
            }
        }
    }
    Ok(out)
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn remove_file(path: &Path) -> Result<(), CacheError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CacheError::io("remove", path)(e)),
        _ => Ok(()),
    }
}
