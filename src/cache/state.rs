//! `cache/state.redb`: one database that holds two caches, the file-state index
//! ([`index`](super::index): path → size, mtime, inode, digest) and the item memo store
//! ([`memo`](super::memo): item digest, op digest → bytes). This module owns what they
//! share: the handle, opening it (and rebuilding a damaged file), and durability.
//!
//! Both are caches: losing recent writes costs recomputation, never correctness, so writes
//! are committed without fsync and made durable once per command by [`StateDb::flush`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::stats::WorkStats;

/// The file-state index's table (see [`index`](super::index)).
pub(super) const FILE_STATE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("file_state");
/// The memo store's table (see [`memo`](super::memo)).
pub(super) const MEMO: TableDefinition<&[u8], &[u8]> = TableDefinition::new("memo");

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot open state database `{path}`: {source}")]
    Open { path: PathBuf, source: redb::DatabaseError },
    #[error("cannot rebuild state database `{path}`: {why}")]
    Damaged { path: PathBuf, why: String },
    #[error("state database: {0}")]
    Db(#[from] redb::Error),
    #[error("dependency `{path}` does not exist")]
    Missing { path: PathBuf },
    #[error("cannot read `{path}`: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(impl From<$t> for StateError { fn from(e: $t) -> Self { StateError::Db(e.into()) } })*};
}
db_err!(redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError, redb::SetDurabilityError);

/// The open `state.redb`: [`hash_tree`](StateDb::hash_tree), [`scan`](StateDb::scan) and
/// [`remember`](StateDb::remember) use its file-state index, [`memo`](StateDb::memo) its
/// memo store.
pub struct StateDb {
    pub(super) db: Database,
    pub(super) stats: Arc<WorkStats>,
    /// Set by every non-durable commit; `flush` only syncs when something was written.
    dirty: std::sync::atomic::AtomicBool,
}

impl StateDb {
    /// Opens the index at `path`. It only remembers what can be recomputed, so a damaged
    /// file (truncated, overwritten) is not an error: it is replaced by an empty index,
    /// with a warning, and the run hashes files and redoes memoised work again.
    pub fn open(path: &Path, stats: Arc<WorkStats>) -> Result<Self, StateError> {
        match Self::open_checked(path, stats.clone()) {
            Ok(state) => Ok(state),
            Err(why) => {
                tracing::warn!(
                    "the state index `{}` is damaged ({why}); rebuilding it: files are hashed again and memoised work is redone",
                    path.display()
                );
                match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(StateError::Io { path: path.to_path_buf(), source: e });
                    }
                    _ => {}
                }
                Self::open_checked(path, stats).map_err(|why| StateError::Damaged { path: path.to_path_buf(), why })
            }
        }
    }

    /// Opens the database and reads a little of each table, so that damage shows here,
    /// where it can be repaired, rather than in the middle of a run. redb panics on some
    /// damaged files instead of returning an error; that is caught too.
    fn open_checked(path: &Path, stats: Arc<WorkStats>) -> Result<Self, String> {
        // Silence the panic message of this thread only: other threads' panics (tests run
        // in parallel) still reach the hook that was in place.
        let previous: std::sync::Arc<dyn Fn(&std::panic::PanicHookInfo<'_>) + Send + Sync> = std::panic::take_hook().into();
        let here = std::thread::current().id();
        let others = previous.clone();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().id() != here {
                others(info);
            }
        }));
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<Self, String> {
            let state = Self::open_unchecked(path, stats).map_err(|e| e.to_string())?;
            let tx = state.db.begin_read().map_err(|e| e.to_string())?;
            for table in [FILE_STATE, MEMO] {
                let table = tx.open_table(table).map_err(|e| e.to_string())?;
                for row in table.iter().map_err(|e| e.to_string())?.take(64) {
                    row.map_err(|e| e.to_string())?;
                }
                if let Some(row) = table.last().map_err(|e| e.to_string())? {
                    drop(row);
                }
            }
            drop(tx);
            Ok(state)
        }));
        std::panic::set_hook(Box::new(move |info| previous(info)));
        opened.unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the database library panicked".into());
            Err(message)
        })
    }

    fn open_unchecked(path: &Path, stats: Arc<WorkStats>) -> Result<Self, StateError> {
        let db = Database::create(path).map_err(|source| StateError::Open { path: path.to_path_buf(), source })?;
        let state = StateDb { db, stats, dirty: Default::default() };
        // A write here would make every read-only command sync the database on exit.
        let ready = {
            let tx = state.db.begin_read()?;
            tx.open_table(FILE_STATE).is_ok() && tx.open_table(MEMO).is_ok()
        };
        if !ready {
            let tx = state.db.begin_write()?;
            tx.open_table(FILE_STATE)?;
            tx.open_table(MEMO)?;
            tx.commit()?;
        }
        Ok(state)
    }

    pub fn stats(&self) -> &Arc<WorkStats> {
        &self.stats
    }

    /// Makes every earlier non-durable commit durable.
    pub fn flush(&self) -> Result<(), StateError> {
        if !self.dirty.swap(false, std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        tx.commit()?;
        Ok(())
    }

    /// A write transaction that is not synced: [`StateDb::flush`] makes it durable later.
    pub(super) fn begin_cache_write(&self) -> Result<redb::WriteTransaction, StateError> {
        self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::None)?;
        Ok(tx)
    }
}

#[cfg(test)]
pub(super) mod test_support {
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    /// Moves a file's mtime out of the racy window, so the index vouches for it.
    pub fn backdate(path: &Path) {
        let old = SystemTime::now() - Duration::from_secs(10);
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(old).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::backdate;
    use super::*;
    use crate::report::NullReporter;

    #[test]
    fn a_damaged_index_is_rebuilt_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("a"), "a").unwrap();
        backdate(&data.join("a"));
        let path = dir.path().join("state.redb");
        let want = {
            let db = StateDb::open(&path, Default::default()).unwrap();
            let tree = db.hash_tree(&data, &NullReporter).unwrap();
            db.flush().unwrap();
            tree.digest()
        };
        let len = std::fs::metadata(&path).unwrap().len();
        let mut noise = vec![0u8; len as usize];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        type Damage = Box<dyn Fn(&Path)>;
        let damages: [(&str, Damage); 3] = [
            ("truncated", Box::new(move |p: &Path| std::fs::File::options().write(true).open(p).unwrap().set_len(len / 2).unwrap())),
            ("random bytes", Box::new(move |p: &Path| std::fs::write(p, &noise).unwrap())),
            ("empty", Box::new(|p: &Path| std::fs::write(p, b"").unwrap())),
        ];
        for (what, damage) in damages {
            damage(&path);
            let db = StateDb::open(&path, Default::default()).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(db.hash_tree(&data, &NullReporter).unwrap().digest(), want, "{what}");
            db.flush().unwrap();
        }
    }
}
