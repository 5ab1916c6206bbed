//! One `kiln run` at a time per cache (an advisory lock on `cache/run.lock`) and per
//! workspace (`outputs/.kiln-run.lock`): two manifests with different caches still share
//! the workspace's outputs, and two runs must not delete and restore them under each other.
//! Both are taken in that order (workspace, then cache), so two runs never wait on each
//! other in a circle.
//!
//! The lock belongs to the open file, so the kernel releases it when the process dies,
//! however it dies: a `kill -9` never leaves a stale lock behind.

use std::fs::{File, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("{what} `{}` is in use by another kiln process{}", path.display(), holder.as_ref().map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Busy { what: &'static str, path: PathBuf, holder: Option<String> },
    #[error("cannot lock `{path}`: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Held while a command reads or writes the cache; released on drop.
#[derive(Debug)]
pub struct RunGuard {
    _file: File,
}

impl RunGuard {
    /// Takes the lock. If another process holds it: with `wait`, calls `on_wait` once and
    /// blocks until it is free; without, fails with [`GuardError::Busy`].
    pub fn acquire(cache_dir: &Path, wait: bool, on_wait: impl FnOnce(&str)) -> Result<RunGuard, GuardError> {
        Self::acquire_file(&cache_dir.join("run.lock"), "cache", cache_dir, wait, on_wait)
    }

    /// The workspace's lock, for commands that write its outputs.
    pub fn acquire_workspace(root: &Path, wait: bool, on_wait: impl FnOnce(&str)) -> Result<RunGuard, GuardError> {
        Self::acquire_file(&root.join("outputs").join(".kiln-run.lock"), "workspace", root, wait, on_wait)
    }

    fn acquire_file(path: &Path, what: &'static str, dir: &Path, wait: bool, on_wait: impl FnOnce(&str)) -> Result<RunGuard, GuardError> {
        let path = path.to_path_buf();
        let io = |source| GuardError::Io { path: path.clone(), source };
        std::fs::create_dir_all(path.parent().unwrap_or(dir)).map_err(io)?;
        let mut file = File::options().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
                if !wait {
                    return Err(GuardError::Busy { what, path: dir.to_path_buf(), holder });
                }
                let who = holder.map(|p| format!(" (pid {p})")).unwrap_or_default();
                on_wait(&format!("waiting for another kiln process{who} to release {what} `{}`", dir.display()));
                file.lock().map_err(io)?;
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        Ok(RunGuard { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_without_wait() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunGuard::acquire(dir.path(), false, |_| {}).unwrap();
        let err = RunGuard::acquire(dir.path(), false, |_| {}).unwrap_err();
        assert!(matches!(err, GuardError::Busy { holder: Some(_), .. }), "{err}");
        drop(first);
        RunGuard::acquire(dir.path(), false, |_| {}).unwrap();
    }

    #[test]
    fn one_run_per_workspace_whatever_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let _cache_a = RunGuard::acquire(&dir.path().join("cache-a"), false, |_| {}).unwrap();
        let _cache_b = RunGuard::acquire(&dir.path().join("cache-b"), false, |_| {}).unwrap();
        let first = RunGuard::acquire_workspace(dir.path(), false, |_| {}).unwrap();
        let err = RunGuard::acquire_workspace(dir.path(), false, |_| {}).unwrap_err();
        assert!(matches!(err, GuardError::Busy { what: "workspace", .. }), "{err}");
        drop(first);
        RunGuard::acquire_workspace(dir.path(), false, |_| {}).unwrap();
    }
}
