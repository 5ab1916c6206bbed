//! One `kiln run` at a time per cache: an advisory lock on `cache/run.lock`.
//!
//! The lock belongs to the open file, so the kernel releases it when the process dies,
//! however it dies: a `kill -9` never leaves a stale lock behind.

use std::fs::{File, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("cache `{}` is in use by another kiln process{}", path.display(), holder.as_ref().map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Busy { path: PathBuf, holder: Option<String> },
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
        let path = cache_dir.join("run.lock");
        let io = |source| GuardError::Io { path: path.clone(), source };
        std::fs::create_dir_all(cache_dir).map_err(io)?;
        let mut file = File::options().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
                if !wait {
                    return Err(GuardError::Busy { path: cache_dir.to_path_buf(), holder });
                }
                let who = holder.map(|p| format!(" (pid {p})")).unwrap_or_default();
                on_wait(&format!("waiting for another kiln process{who} to release cache `{}`", cache_dir.display()));
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
}
