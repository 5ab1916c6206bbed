//! A stage's outputs: committing what it wrote, restoring workspace outputs of a cached
//! result, and the views at `outputs/<pipeline>/<stage>/` that people read.

use std::collections::BTreeMap;
use std::path::Path;

use super::inputs::tree_path;
use crate::Error;
use crate::cache::{Cache, CacheError, Ingest, StageEntry, StateError, Tree, TreeEntry, remove_path};
use crate::digest::Digest;
use crate::manifest::{Manifest, StageDecl};
use crate::paths::dep_path;
use crate::report::Reporter;
use crate::stages::StageError;
use crate::workspace::Confined;

/// Moves what an artifact stage wrote into the store and adds the blobs it attached.
pub(super) fn commit_artifact(
    cache: &Cache,
    staging: &Path,
    attached: Vec<TreeEntry>,
    reporter: &dyn Reporter,
) -> Result<(Digest, BTreeMap<String, Digest>), StageError> {
    let tree = cache.state().hash_tree_transient(staging, reporter).map_err(CacheError::from)?;
    let digest = cache.ingest(staging, &tree, Ingest::Move)?;
    if attached.is_empty() {
        return Ok((digest, BTreeMap::new()));
    }
    if let Some(missing) = attached.iter().find(|e| !cache.has_blob(&e.digest)) {
        return Err(CacheError::MissingBlob { digest: missing.digest }.into());
    }
    let mut entries = tree.entries().to_vec();
    entries.extend(attached);
    Ok((cache.put_tree(&Tree::new(entries))?, BTreeMap::new()))
}

/// Stores the workspace outputs (`outs`, below `root`) a stage wrote: one tree with each
/// output under its path, and each output's own digest.
pub(super) fn commit_workspace_outs(
    root: &Path,
    cache: &Cache,
    outs: &[String],
    reporter: &dyn Reporter,
) -> Result<(Digest, BTreeMap<String, Digest>), StageError> {
    let mut entries = Vec::new();
    let mut digests = BTreeMap::new();
    for out in outs {
        let abs = root.join(out);
        let tree = match cache.state().hash_tree(&abs, reporter) {
            Ok(t) => t,
            Err(StateError::Missing { .. }) => return Err(StageError::MissingOutput(out.clone())),
            Err(e) => return Err(CacheError::from(e).into()),
        };
        cache.ingest(&abs, &tree, Ingest::Copy)?;
        digests.insert(out.clone(), tree.digest());
        entries.extend(tree.prefixed(&tree_path(out)));
    }
    let artifact = cache.put_tree(&Tree::new(entries))?;
    Ok((artifact, digests))
}

/// Puts back workspace outputs of a cached stage that are missing or were changed.
pub(super) fn restore_outputs(
    root: &Path,
    workspace: &Confined,
    cache: &Cache,
    reporter: &dyn Reporter,
    entry: &StageEntry,
) -> Result<usize, StageError> {
    if entry.outs.is_empty() {
        return Ok(0);
    }
    let tree = cache.get_tree(&entry.artifact)?.ok_or(CacheError::MissingTree { digest: entry.artifact })?;
    let mut restored = 0;
    for (out, want) in &entry.outs {
        let abs = dep_path(root, out);
        let intact = match cache.state().hash_tree(&abs, reporter) {
            Ok(t) => t.digest() == *want,
            Err(StateError::Missing { .. }) => false,
            Err(e) => return Err(CacheError::from(e).into()),
        };
        if !intact {
            workspace.check(&abs).map_err(StageError::Escape)?;
            remove_path(&abs)?;
            cache.restore(&tree.subtree(&tree_path(out)), &abs)?;
            restored += 1;
        }
    }
    Ok(restored)
}

/// Rebuilds `outputs/<pipeline>/<stage>/` for an artifact stage as soon as it finishes,
/// so people (and `command` stages below it, through `KILN_INPUT_<STAGE>`) see the result
/// of this run, not of the last one.
pub(super) fn show_artifact(
    manifest: &Manifest,
    workspace: &Confined,
    cache: &Cache,
    decl: &StageDecl,
    artifact: &Digest,
) -> Result<(), StageError> {
    if decl.stage.writes_workspace() {
        return Ok(());
    }
    let view = manifest.outputs_dir().join(&decl.name);
    workspace.check(&view).map_err(StageError::Escape)?;
    let tree = cache.get_tree(artifact)?.ok_or(CacheError::MissingTree { digest: *artifact })?;
    cache.link_view(&tree, &view)?;
    Ok(())
}

/// Drops views of stages the manifest no longer has (or that now write the workspace).
pub(super) fn prune_outputs(manifest: &Manifest, workspace: &Confined) -> Result<(), Error> {
    let dir = manifest.outputs_dir();
    let Ok(items) = std::fs::read_dir(&dir) else { return Ok(()) };
    for item in items.flatten() {
        let name = item.file_name().to_string_lossy().into_owned();
        let keep = manifest.stage(&name).is_some_and(|s| !s.stage.writes_workspace());
        if !name.starts_with('.') && !keep && workspace.check(&item.path()).is_ok() {
            remove_path(&item.path())?;
        }
    }
    let ignore = manifest.root.join("outputs").join(".gitignore");
    if !ignore.exists() {
        let _ = std::fs::write(&ignore, "# kiln's views of cached artifacts; rebuilt by every run\n*\n");
    }
    Ok(())
}
