//! Which directories are kiln caches. kiln empties `tmp/` and removes unreferenced objects
//! in its cache, so it must never take a directory that holds somebody else's files for one.

use std::path::Path;

use super::{CacheError, unique_suffix};

/// Marks a directory as a kiln cache (the CACHEDIR.TAG convention, so backup tools skip
/// it too). kiln cleans, collects and verifies only directories that carry it.
pub const CACHE_TAG: &str = "CACHEDIR.TAG";
const CACHE_TAG_TEXT: &str = "Signature: 8a477f597d28d172789f06886806bc55\n# This directory is a kiln cache: blobs, trees and stage entries by digest.\n# kiln creates, cleans and deletes files here; see `kiln gc` and `kiln verify`.\n";

/// What a kiln cache directory may hold; a directory made by kiln before the tag existed
/// holds nothing else, and is adopted.
const CACHE_NAMES: &[&str] = &["blobs", "trees", "stages", "tmp", "scratch", "runs", "state.redb", "run.lock", CACHE_TAG];

/// Makes `dir` a kiln cache if it is new or empty, and checks that an existing one is
/// kiln's: a directory with other contents and no [`CACHE_TAG`] is refused, because kiln
/// empties `tmp/` and removes unreferenced objects in its cache.
pub fn claim_dir(dir: &Path) -> Result<(), CacheError> {
    if let Some(found) = foreign_contents(dir).map_err(CacheError::io("list", dir))? {
        return Err(CacheError::NotACache { path: dir.to_path_buf(), found });
    }
    if dir.join(CACHE_TAG).is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(CacheError::io("create cache directory", dir))?;
    let staged = dir.join(format!(".{CACHE_TAG}.{}", unique_suffix()));
    std::fs::write(&staged, CACHE_TAG_TEXT).map_err(CacheError::io("write", &staged))?;
    std::fs::rename(&staged, dir.join(CACHE_TAG)).map_err(CacheError::io("write", &dir.join(CACHE_TAG)))
}

/// What makes `dir` not a kiln cache (`None` when it is one, is empty or does not
/// exist): a few of the names it holds that a kiln cache does not.
pub fn foreign_contents(dir: &Path) -> std::io::Result<Option<String>> {
    if dir.join(CACHE_TAG).is_file() {
        return Ok(None);
    }
    let names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(items) => items
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(&format!(".{CACHE_TAG}.")))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => return Ok(Some("a file, not a directory".into())),
        Err(e) => return Err(e),
    };
    let foreign: Vec<&String> = names.iter().filter(|n| !CACHE_NAMES.contains(&n.as_str())).collect();
    // A cache made before the tag existed has kiln's names only, objects among them; a
    // directory that merely has a `tmp/` is somebody else's.
    let kilns = ["blobs", "trees", "stages"].iter().all(|k| names.iter().any(|n| n == k));
    if names.is_empty() || (foreign.is_empty() && kilns) {
        return Ok(None);
    }
    let foreign: Vec<&String> = if foreign.is_empty() { names.iter().collect() } else { foreign };
    let mut shown: Vec<String> = foreign.iter().take(3).map(|n| format!("`{n}`")).collect();
    if foreign.len() > 3 {
        shown.push(format!("{} more", foreign.len() - 3));
    }
    Ok(Some(shown.join(", ")))
}
