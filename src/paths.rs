//! Workspace paths named in a manifest: normalised, compared, and found on disk.
//!
//! Paths are kept as `/`-separated strings relative to the workspace root, so that the
//! cache key of a stage is the same on every machine and every checkout location. The
//! manifest, the graph, the engine and the stage kinds all use these helpers, so they sit
//! at the bottom of the crate.

use std::ops::Range;
use std::path::{Path, PathBuf};

/// A workspace path a stage writes, with where the manifest names it.
#[derive(Debug, Clone)]
pub struct Out {
    pub path: String,
    pub span: Range<usize>,
}

/// Where a dependency path (normalised, as the manifest names it) lives on disk.
pub fn dep_path(root: &Path, dep: &str) -> PathBuf {
    if dep.starts_with('/') { PathBuf::from(dep) } else { root.join(dep) }
}

/// A path a stage reads. May leave the workspace (`../shared/data`) or be absolute
/// (`/usr/share/datasets`): data often lives outside the repository.
pub fn normalize_dep(raw: &str) -> Result<String, &'static str> {
    normalize(raw, true)
}

/// A path a stage writes. Must stay inside the workspace: kiln deletes it before the stage
/// runs and restores it from the cache.
pub fn normalize_out(raw: &str) -> Result<String, &'static str> {
    normalize(raw, false)
}

fn normalize(raw: &str, may_leave_root: bool) -> Result<String, &'static str> {
    if raw.trim().is_empty() {
        return Err("the path is empty");
    }
    let absolute = raw.starts_with('/');
    if absolute && !may_leave_root {
        return Err("outputs must be relative to the workspace root");
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&last) if last != ".." => {
                    parts.pop();
                }
                _ if absolute => return Err("the path climbs above `/`"),
                _ if !may_leave_root => return Err("outputs must stay inside the workspace root"),
                _ => parts.push(".."),
            },
            other => parts.push(other),
        }
    }
    if parts.is_empty() && !absolute {
        return Err("the path names the workspace root itself");
    }
    let joined = parts.join("/");
    Ok(if absolute { format!("/{joined}") } else { joined })
}

/// True when `a` and `b` are the same path or one contains the other.
pub fn overlaps(a: &str, b: &str) -> bool {
    contains(a, b) || contains(b, a)
}

/// True when `inner` is `outer` or lies below it.
pub fn contains(outer: &str, inner: &str) -> bool {
    inner == outer || (inner.starts_with(outer) && inner.as_bytes().get(outer.len()) == Some(&b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_separators_and_dots() {
        assert_eq!(normalize_dep("./data//raw/").unwrap(), "data/raw");
        assert_eq!(normalize_dep("data/x/../y").unwrap(), "data/y");
        assert_eq!(normalize_dep("../shared/d").unwrap(), "../shared/d");
        assert_eq!(normalize_dep("/usr/share/x").unwrap(), "/usr/share/x");
        assert!(normalize_dep(".").is_err());
        assert!(normalize_out("../x").is_err());
        assert!(normalize_out("/tmp/x").is_err());
        assert_eq!(normalize_out("out/a.txt").unwrap(), "out/a.txt");
    }

    #[test]
    fn overlap_is_by_path_component() {
        assert!(overlaps("data", "data/x"));
        assert!(overlaps("data/x", "data"));
        assert!(overlaps("data", "data"));
        assert!(!overlaps("data", "database"));
    }
}
