//! Reading a stage's inputs and turning them into its cache key.

use std::collections::BTreeMap;

use crate::cache::{Cache, CacheKey, KEY_FORMAT, Scan, StateError};
use crate::digest::Digest;
use crate::manifest::{Manifest, StageDecl};
use crate::paths::dep_path;
use crate::report::Reporter;

/// The scan (tree and unreadable entries) of every dependency path; `None` for a path
/// that does not exist. Stages get these scans too, so no dependency is walked twice.
pub fn hash_deps(
    manifest: &Manifest,
    decl: &StageDecl,
    cache: &Cache,
    reporter: &dyn Reporter,
) -> Result<BTreeMap<String, Option<Scan>>, StateError> {
    let mut trees = BTreeMap::new();
    for dep in &decl.deps {
        let path = dep_path(&manifest.root, dep.get_ref());
        let tree = match cache.state().scan(&path, reporter) {
            Ok(t) => Some(t),
            Err(StateError::Missing { .. }) => None,
            Err(e) => return Err(e),
        };
        trees.insert(dep.get_ref().clone(), tree);
    }
    Ok(trees)
}

pub fn make_key(manifest: &Manifest, decl: &StageDecl, deps: BTreeMap<String, Digest>, upstream: BTreeMap<String, Digest>) -> CacheKey {
    CacheKey {
        format: KEY_FORMAT,
        kind: decl.kind.clone(),
        implementation: decl.kind_version,
        params: decl.stage.params(),
        uses: decl.uses.clone(),
        seed: manifest.seed,
        deps,
        upstream,
        outs: decl.stage.outs().iter().map(|o| o.path.clone()).collect(),
    }
}

/// `a/b` as it appears inside a tree (each component escaped like file names on disk).
pub fn tree_path(path: &str) -> String {
    path.split('/').map(|c| crate::cache::tree::escape_os(std::ffi::OsStr::new(c))).collect::<Vec<_>>().join("/")
}
