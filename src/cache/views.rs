//! Putting cached files back in front of people: restored workspace outputs (independent
//! copies) and views in `outputs/` (hard links), each checked against the tree it shows.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::{Cache, CacheError, Tree, make_writable, remove_path, tree, unique_suffix};
use crate::digest::Digest;

/// Written into every view: the digest of the tree it shows.
const VIEW_MARKER: &str = ".kiln-view";

/// Views leave out hidden entries (a path component starting with `.`, such as a
/// dataset's `.images/`).
fn shown_in_view(path: &str) -> bool {
    !path.split('/').any(|c| c.starts_with('.'))
}

impl Cache {
    /// Whether the view at `dest` already shows `tree`: its marker names the tree, it holds
    /// exactly the files the tree shows with their digests, and their blobs are still in
    /// the cache. A marker alone is not enough: a view is a set of hard links, and one that
    /// outlived its blob (removed by `kiln verify`) keeps whatever bytes it had. The files
    /// are judged through the file-state index, as workspace outputs are: an unchanged view
    /// costs a `stat` per file, and a file written since is hashed again.
    pub fn view_is_current(&self, dest: &Path, tree: &Tree) -> bool {
        if !std::fs::read_to_string(dest.join(VIEW_MARKER)).is_ok_and(|m| m == tree.digest().to_hex()) {
            return false;
        }
        let Ok(found) = self.state().hash_tree(dest, &crate::report::NullReporter) else { return false };
        let found = found.entries().iter().filter(|e| e.path != VIEW_MARKER).map(|e| (e.path.as_str(), e.digest));
        let shown = tree.entries().iter().filter(|e| shown_in_view(&e.path)).map(|e| (e.path.as_str(), e.digest));
        // The blobs too: a view that outlived its blob shows a result the cache has lost.
        found.eq(shown) && tree.entries().par_iter().filter(|e| shown_in_view(&e.path)).all(|e| self.has_blob(&e.digest))
    }

    /// Writes the files of `tree` at `dest` as independent, writable files (reflink when
    /// the file system can, else a copy), replacing what is there, and records them in the
    /// file-state index so they are not hashed again.
    pub fn restore(&self, tree: &Tree, dest: &Path) -> Result<(), CacheError> {
        let written: Vec<(PathBuf, Digest)> = tree
            .entries()
            .par_iter()
            .map(|e| {
                let target = if e.path.is_empty() { dest.to_path_buf() } else { dest.join(tree::unescape_os(&e.path)) };
                let blob = self.verified_blob_path(&e.digest)?;
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(CacheError::io("create", parent))?;
                }
                remove_path(&target)?;
                reflink_copy::reflink_or_copy(&blob, &target).map_err(CacheError::io("restore", &target))?;
                let mode = if e.executable { 0o755 } else { 0o644 };
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                    .map_err(CacheError::io("set permissions on", &target))?;
                Ok::<_, CacheError>((std::path::absolute(&target).unwrap_or(target), e.digest))
            })
            .collect::<Result<_, _>>()?;
        self.state.remember(&written)?;
        Ok(())
    }

    /// Builds `dest` as a read-only view of `tree`: hard links into the cache where
    /// possible (no copy, no extra space), copies otherwise. `dest` is replaced whole.
    /// Hidden entries (a path component starting with `.`, such as a dataset's
    /// `.images/`) are left out, and a view already showing `tree` is left alone.
    pub fn link_view(&self, tree: &Tree, dest: &Path) -> Result<(), CacheError> {
        if self.view_is_current(dest, tree) {
            return Ok(());
        }
        let digest = tree.digest().to_hex();
        let parent = dest.parent().expect("view directories have a parent");
        std::fs::create_dir_all(parent).map_err(CacheError::io("create", parent))?;
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let building = parent.join(format!(".{name}.kiln-new-{}", unique_suffix()));
        std::fs::create_dir_all(&building).map_err(CacheError::io("create", &building))?;
        let shown = tree.entries().par_iter().filter(|e| shown_in_view(&e.path));
        let linked = shown.try_for_each(|e| {
            let target = building.join(tree::unescape_os(&e.path));
            if let Some(p) = target.parent() {
                std::fs::create_dir_all(p).map_err(CacheError::io("create", p))?;
            }
            let blob = self.verified_blob_path(&e.digest)?;
            if std::fs::hard_link(&blob, &target).is_err() {
                std::fs::copy(&blob, &target).map_err(CacheError::io("copy", &target))?;
            }
            Ok::<_, CacheError>(())
        });
        if let Err(e) = linked {
            make_writable(&building);
            let _ = std::fs::remove_dir_all(&building);
            return Err(e);
        }
        std::fs::write(building.join(VIEW_MARKER), &digest).map_err(CacheError::io("write", &building))?;
        let old = parent.join(format!(".{name}.kiln-old-{}", unique_suffix()));
        if dest.exists() {
            std::fs::rename(dest, &old).map_err(CacheError::io("replace", dest))?;
        }
        std::fs::rename(&building, dest).map_err(CacheError::io("replace", dest))?;
        if old.exists() {
            make_writable(&old);
            let _ = std::fs::remove_dir_all(&old);
        }
        Ok(())
    }
}
