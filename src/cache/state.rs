//! `cache/state.redb`: the file-state index and the item memo store.
//!
//! **File-state index** — (absolute path) → (size, mtime, inode, digest), like git's index
//! and DVC's state db: checking an unchanged tree stats its files and reads no contents.
//! An entry is only trusted when the file's mtime is older than [`RACY_WINDOW`] at the
//! moment it was stat'ed, because file systems stamp mtimes with a coarse clock: a file
//! rewritten within the same tick with the same size would otherwise look unchanged
//! (git's "racily clean" problem).
//!
//! **Memo store** — (item digest, op digest) → bytes, for per-item work such as decoding
//! or resizing one image. Later stages call [`MemoStore::map`]; adding 10 items to 10 000
//! then computes 10.
//!
//! Both are caches: losing recent writes costs recomputation, never correctness, so writes
//! are committed without fsync and made durable once per command by [`StateDb::flush`].

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::tree::{Tree, TreeEntry, escape_os};
use crate::digest::Digest;
use crate::report::Reporter;
use crate::stats::WorkStats;

const FILE_STATE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("file_state");
const MEMO: TableDefinition<&[u8], &[u8]> = TableDefinition::new("memo");

/// Entries whose mtime is this close to "now" are hashed but not remembered.
pub const RACY_WINDOW: Duration = Duration::from_millis(50);

/// How many memo results are computed before they are written in one transaction, to
/// bound memory on large datasets.
const MEMO_CHUNK: usize = 4096;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileState {
    size: u64,
    mtime_ns: i64,
    inode: u64,
    digest: Digest,
}

impl FileState {
    fn encode(&self) -> [u8; 56] {
        let mut out = [0u8; 56];
        out[..8].copy_from_slice(&self.size.to_le_bytes());
        out[8..16].copy_from_slice(&self.mtime_ns.to_le_bytes());
        out[16..24].copy_from_slice(&self.inode.to_le_bytes());
        out[24..].copy_from_slice(&self.digest.0);
        out
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != 56 {
            return None;
        }
        Some(FileState {
            size: u64::from_le_bytes(b[..8].try_into().ok()?),
            mtime_ns: i64::from_le_bytes(b[8..16].try_into().ok()?),
            inode: u64::from_le_bytes(b[16..24].try_into().ok()?),
            digest: Digest(b[24..].try_into().ok()?),
        })
    }

    fn same_file(&self, other: &FileState) -> bool {
        self.size == other.size && self.mtime_ns == other.mtime_ns && self.inode == other.inode
    }
}

type HashResult = Result<(Digest, u64), std::io::Error>;

/// A file found while walking a tree, with what `stat` said of it.
struct Found {
    rel: String,
    abs: PathBuf,
    stat: FileState,
    executable: bool,
    /// Why the entry cannot be read (broken symlink, permission denied), if it cannot.
    problem: Option<String>,
}

/// A hashed tree plus the entries that could not be read. Each of those is in the tree
/// with a digest of its reason, so fixing it changes the tree's digest.
#[derive(Debug, Clone)]
pub struct Scan {
    pub tree: Tree,
    /// (path inside the tree, reason), sorted by path.
    pub problems: Vec<(String, String)>,
}

fn problem_digest(reason: &str) -> Digest {
    Digest::of_bytes(format!("kiln-unreadable\0{reason}").as_bytes())
}

pub struct StateDb {
    db: Database,
    stats: Arc<WorkStats>,
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
        let previous_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
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
        std::panic::set_hook(previous_hook);
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

    /// Hashes a file or directory into a [`Tree`], reading only files the index does not
    /// vouch for. Symlinks are followed; empty directories do not count (as in git).
    pub fn hash_tree(&self, path: &Path, reporter: &dyn Reporter) -> Result<Tree, StateError> {
        self.hash_tree_with(path, reporter, true)
    }

    /// Hashes a tree that is about to move (a stage's staging directory): reads every
    /// file and leaves the index alone, since the paths will not exist tomorrow.
    pub fn hash_tree_transient(&self, path: &Path, reporter: &dyn Reporter) -> Result<Tree, StateError> {
        self.hash_tree_with(path, reporter, false)
    }

    fn hash_tree_with(&self, path: &Path, reporter: &dyn Reporter, use_index: bool) -> Result<Tree, StateError> {
        self.scan_with(path, reporter, use_index).map(|s| s.tree)
    }

    /// Like [`StateDb::hash_tree`], but entries that cannot be read are reported instead
    /// of failing the whole tree: one broken symlink must not stop a 70 000-image collect.
    pub fn scan(&self, path: &Path, reporter: &dyn Reporter) -> Result<Scan, StateError> {
        self.scan_with(path, reporter, true)
    }

    fn scan_with(&self, path: &Path, reporter: &dyn Reporter, use_index: bool) -> Result<Scan, StateError> {
        let (found, broken): (Vec<Found>, Vec<Found>) = walk(path)?.into_iter().partition(|f| f.problem.is_none());
        let mut problems: Vec<(String, String)> = broken.into_iter().map(|f| (f.rel, f.problem.unwrap_or_default())).collect();
        let now_ns = now_ns();
        let mut known = Vec::with_capacity(found.len());
        let mut unknown = Vec::new();
        if !use_index {
            unknown = found;
        } else {
            // The index is ordered by path, so the files of one tree are one contiguous
            // range: a single scan merged with the sorted walk beats a lookup per file.
            let mut found = found;
            found.sort_unstable_by(|a, b| path_bytes(&a.abs).cmp(path_bytes(&b.abs)));
            let tx = self.db.begin_read()?;
            let table = tx.open_table(FILE_STATE)?;
            let start = found.first().map(|f| path_key(&f.abs)).unwrap_or_default();
            let mut index = table.range::<&[u8]>(start.as_slice()..)?.peekable();
            for f in found {
                let key = path_bytes(&f.abs);
                let mut hit = None;
                while let Some(Ok((k, _))) = index.peek() {
                    match k.value().cmp(key) {
                        std::cmp::Ordering::Less => {
                            index.next();
                        }
                        std::cmp::Ordering::Equal => {
                            if let Some(Ok((_, v))) = index.next() {
                                hit = FileState::decode(v.value()).filter(|old| old.same_file(&f.stat));
                            }
                            break;
                        }
                        std::cmp::Ordering::Greater => break,
                    }
                }
                if let Some(Err(_)) = index.peek() {
                    // Surface a storage error rather than treating it as a miss.
                    if let Some(Err(e)) = index.next() {
                        return Err(e.into());
                    }
                }
                match hit {
                    Some(old) => known.push((f, old.digest)),
                    None => unknown.push(f),
                }
            }
        }
        WorkStats::add(&self.stats.files_from_index, known.len() as u64);

        if !unknown.is_empty() {
            let bytes: u64 = unknown.iter().map(|f| f.stat.size).sum();
            let label = format!("hashing {}", path.display());
            let progress = reporter.progress(&label, bytes, "bytes");
            let hashed: Vec<(Found, HashResult)> = unknown
                .into_par_iter()
                .map(|f| {
                    let r = Digest::of_file(&f.abs);
                    progress.inc(f.stat.size);
                    (f, r)
                })
                .collect();
            progress.finish();
            let tx = self.begin_cache_write()?;
            {
                let mut table = tx.open_table(FILE_STATE)?;
                for (f, result) in hashed {
                    let (digest, read) = match result {
                        Ok(r) => r,
                        Err(e) => {
                            problems.push((f.rel, format!("cannot read: {e}")));
                            continue;
                        }
                    };
                    WorkStats::add(if use_index { &self.stats.files_hashed } else { &self.stats.outputs_hashed }, 1);
                    WorkStats::add(&self.stats.bytes_hashed, read);
                    let racy = f.stat.mtime_ns > now_ns - RACY_WINDOW.as_nanos() as i64;
                    // A size mismatch means the file changed while we read it: do not vouch.
                    if use_index && !racy && read == f.stat.size {
                        let state = FileState { digest, ..f.stat };
                        table.insert(path_key(&f.abs).as_slice(), state.encode().as_slice())?;
                    }
                    known.push((f, digest));
                }
            }
            tx.commit()?;
        }

        let mut entries: Vec<TreeEntry> =
            known.into_iter().map(|(f, digest)| TreeEntry { path: f.rel, digest, size: f.stat.size, executable: f.executable }).collect();
        problems.sort();
        entries.extend(problems.iter().map(|(rel, why)| TreeEntry {
            path: rel.clone(),
            digest: problem_digest(why),
            size: 0,
            executable: false,
        }));
        Ok(Scan { tree: Tree::new(entries), problems })
    }

    /// Records the state of files kiln itself just wrote with known content (restored
    /// outputs), so the next check does not read them back.
    pub fn remember(&self, files: &[(PathBuf, Digest)]) -> Result<(), StateError> {
        if files.is_empty() {
            return Ok(());
        }
        let now_ns = now_ns();
        let tx = self.begin_cache_write()?;
        {
            let mut table = tx.open_table(FILE_STATE)?;
            for (path, digest) in files {
                let meta = std::fs::metadata(path).map_err(|source| StateError::Io { path: path.clone(), source })?;
                let stat = stat_of(&meta, *digest);
                if stat.mtime_ns <= now_ns - RACY_WINDOW.as_nanos() as i64 {
                    table.insert(path_key(path).as_slice(), stat.encode().as_slice())?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn memo(&self) -> MemoStore<'_> {
        MemoStore { db: self }
    }

    fn begin_cache_write(&self) -> Result<redb::WriteTransaction, StateError> {
        self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::None)?;
        Ok(tx)
    }
}

/// Per-item results keyed by (item digest, operation digest).
pub struct MemoStore<'a> {
    db: &'a StateDb,
}

impl MemoStore<'_> {
    pub fn get(&self, item: &Digest, op: &Digest) -> Result<Option<Vec<u8>>, StateError> {
        let tx = self.db.db.begin_read()?;
        let table = tx.open_table(MEMO)?;
        Ok(table.get(memo_key(item, op).as_slice())?.map(|v| v.value().to_vec()))
    }

    pub fn put(&self, item: &Digest, op: &Digest, value: &[u8]) -> Result<(), StateError> {
        let tx = self.db.begin_cache_write()?;
        tx.open_table(MEMO)?.insert(memo_key(item, op).as_slice(), value)?;
        tx.commit()?;
        Ok(())
    }

    /// Stores many results of `op` in one transaction.
    pub fn put_many(&self, op: &Digest, entries: &[(Digest, Vec<u8>)]) -> Result<(), StateError> {
        let tx = self.db.begin_cache_write()?;
        {
            let mut table = tx.open_table(MEMO)?;
            for (item, value) in entries {
                table.insert(memo_key(item, op).as_slice(), value.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// For every item, the memoised result of `op`, computing the misses in parallel with
    /// `compute(index)`. Failed computations are returned, not memoised.
    pub fn map<E, F>(&self, items: &[Digest], op: &Digest, compute: F) -> Result<Vec<Result<Vec<u8>, E>>, StateError>
    where
        E: Send,
        F: Fn(usize) -> Result<Vec<u8>, E> + Sync,
    {
        let stats = &self.db.stats;
        let mut out: Vec<Option<Result<Vec<u8>, E>>> = Vec::with_capacity(items.len());
        for chunk_start in (0..items.len()).step_by(MEMO_CHUNK) {
            let chunk = &items[chunk_start..(chunk_start + MEMO_CHUNK).min(items.len())];
            let mut misses = Vec::new();
            {
                let tx = self.db.db.begin_read()?;
                let table = tx.open_table(MEMO)?;
                for (i, item) in chunk.iter().enumerate() {
                    match table.get(memo_key(item, op).as_slice())? {
                        Some(v) => out.push(Some(Ok(v.value().to_vec()))),
                        None => {
                            out.push(None);
                            misses.push(chunk_start + i);
                        }
                    }
                }
            }
            WorkStats::add(&stats.memo_hits, (chunk.len() - misses.len()) as u64);
            WorkStats::add(&stats.memo_misses, misses.len() as u64);
            let computed: Vec<(usize, Result<Vec<u8>, E>)> = misses.into_par_iter().map(|i| (i, compute(i))).collect();
            let tx = self.db.begin_cache_write()?;
            {
                let mut table = tx.open_table(MEMO)?;
                for (i, result) in &computed {
                    if let Ok(bytes) = result {
                        table.insert(memo_key(&items[*i], op).as_slice(), bytes.as_slice())?;
                    }
                }
            }
            tx.commit()?;
            for (i, result) in computed {
                out[i] = Some(result);
            }
        }
        Ok(out.into_iter().map(|r| r.expect("every item is either a hit or computed")).collect())
    }

    /// Drops every memo entry (`kiln gc --memo`). Returns how many were removed.
    pub fn clear(&self) -> Result<u64, StateError> {
        let tx = self.db.begin_cache_write()?;
        let n;
        {
            let mut table = tx.open_table(MEMO)?;
            n = table.len()?;
            table.retain(|_, _| false)?;
        }
        tx.commit()?;
        Ok(n)
    }
}

fn memo_key(item: &Digest, op: &Digest) -> [u8; 64] {
    let mut k = [0u8; 64];
    k[..32].copy_from_slice(&item.0);
    k[32..].copy_from_slice(&op.0);
    k
}

fn path_key(path: &Path) -> Vec<u8> {
    path_bytes(path).to_vec()
}

fn path_bytes(path: &Path) -> &[u8] {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes()
}

fn stat_of_nothing() -> FileState {
    FileState { size: 0, mtime_ns: 0, inode: 0, digest: Digest([0; 32]) }
}

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

fn stat_of(meta: &std::fs::Metadata, digest: Digest) -> FileState {
    FileState { size: meta.len(), mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(), inode: meta.ino(), digest }
}

/// No real dataset nests this deep (loops through symlinks are caught before this).
const MAX_DEPTH: usize = 64;

/// A directory's identity (device, inode): a linked folder with the identity of one the
/// walk is inside (or of one above the root) is a symlink loop.
type DirId = (u64, u64);

fn dir_id(meta: &std::fs::Metadata) -> DirId {
    (meta.dev(), meta.ino())
}

/// Lists every regular file below `root` (following symlinks) with its `stat`.
///
/// Files are stat'ed relative to their directory's open handle (`fstatat` through
/// `DirEntry::metadata`), not by full path: on a 20 000-file tree re-resolving each
/// absolute path was a third of a no-op check. Directories are read in parallel.
fn walk(root: &Path) -> Result<Vec<Found>, StateError> {
    let io = |path: &Path, source| StateError::Io { path: path.to_path_buf(), source };
    let meta = match std::fs::metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StateError::Missing { path: root.to_path_buf() }),
        Err(e) => return Err(io(root, e)),
    };
    let abs = std::path::absolute(root).map_err(|e| io(root, e))?;
    if meta.is_file() {
        return Ok(vec![Found {
            rel: String::new(),
            executable: meta.mode() & 0o111 != 0,
            stat: stat_of(&meta, Digest([0; 32])),
            abs,
            problem: None,
        }]);
    }
    // The folders above the root are ancestors too: a link to one leads back to the root.
    let mut ancestors: Vec<DirId> = match std::fs::canonicalize(&abs) {
        Ok(canonical) => canonical.ancestors().skip(1).filter_map(|a| std::fs::metadata(a).ok()).map(|m| dir_id(&m)).collect(),
        Err(_) => Vec::new(),
    };
    ancestors.push(dir_id(&meta));
    walk_dir(&abs, "", 0, &ancestors)
}

/// `ancestors`: the identities of `dir` and of every folder above it.
fn walk_dir(dir: &Path, rel: &str, depth: usize, ancestors: &[DirId]) -> Result<Vec<Found>, StateError> {
    let io = |path: &Path, source| StateError::Io { path: path.to_path_buf(), source };
    if depth > MAX_DEPTH {
        return Err(io(dir, std::io::Error::other("directories nest too deep")));
    }
    let mut files = Vec::new();
    let mut subdirs = Vec::new();
    let broken =
        |rel: String, abs: PathBuf, why: String| Found { rel, abs, stat: stat_of_nothing(), executable: false, problem: Some(why) };
    let listing = match std::fs::read_dir(dir) {
        Ok(l) => l,
        Err(e) if depth > 0 => return Ok(vec![broken(rel.to_string(), dir.to_path_buf(), format!("cannot list directory: {e}"))]),
        Err(e) => return Err(io(dir, e)),
    };
    for entry in listing {
        let entry = entry.map_err(|e| io(dir, e))?;
        let name = entry.file_name();
        let child_rel = if rel.is_empty() { escape_os(&name) } else { format!("{rel}/{}", escape_os(&name)) };
        let kind = match entry.file_type() {
            Ok(k) => k,
            Err(e) => {
                files.push(broken(child_rel, entry.path(), format!("cannot stat: {e}")));
                continue;
            }
        };
        let meta = if kind.is_symlink() {
            match std::fs::metadata(entry.path()) {
                Ok(m) => m,
                Err(e) => {
                    let why = if e.kind() == std::io::ErrorKind::NotFound {
                        "broken symlink".to_string()
                    } else {
                        format!("cannot follow symlink: {e}")
                    };
                    files.push(broken(child_rel, entry.path(), why));
                    continue;
                }
            }
        } else if kind.is_dir() {
            match entry.metadata() {
                Ok(m) => subdirs.push((entry.path(), child_rel, dir_id(&m))),
                Err(e) => files.push(broken(child_rel, entry.path(), format!("cannot stat: {e}"))),
            }
            continue;
        } else {
            match entry.metadata() {
                Ok(m) => m,
                Err(e) => {
                    files.push(broken(child_rel, entry.path(), format!("cannot stat: {e}")));
                    continue;
                }
            }
        };
        if meta.is_dir() {
            // Only a symlink gets here: one back to a folder the walk is inside is one
            // unreadable entry, not an endless (or exponential) descent.
            if ancestors.contains(&dir_id(&meta)) {
                files.push(broken(child_rel, entry.path(), "symlink loop".to_string()));
            } else {
                subdirs.push((entry.path(), child_rel, dir_id(&meta)));
            }
        } else if meta.is_file() {
            let stat = stat_of(&meta, Digest([0; 32]));
            files.push(Found { rel: child_rel, executable: meta.mode() & 0o111 != 0, stat, abs: entry.path(), problem: None });
        }
    }
    let nested: Vec<Vec<Found>> = subdirs
        .into_par_iter()
        .map(|(path, r, id)| {
            let chain: Vec<DirId> = ancestors.iter().copied().chain([id]).collect();
            walk_dir(&path, &r, depth + 1, &chain)
        })
        .collect::<Result<_, _>>()?;
    files.extend(nested.into_iter().flatten());
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::NullReporter;
    use std::sync::atomic::Ordering;

    fn backdate(path: &Path) {
        let old = SystemTime::now() - Duration::from_secs(10);
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(old).unwrap();
    }

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

    #[test]
    fn unchanged_files_are_not_reread_and_changed_ones_are() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("sub")).unwrap();
        for i in 0..20 {
            let p = data.join(if i % 2 == 0 { format!("f{i}") } else { format!("sub/f{i}") });
            std::fs::write(&p, format!("content {i}")).unwrap();
            backdate(&p);
        }
        let stats = Arc::new(WorkStats::default());
        let db = StateDb::open(&dir.path().join("state.redb"), stats.clone()).unwrap();
        let first = db.hash_tree(&data, &NullReporter).unwrap();
        assert_eq!(stats.files_hashed.load(Ordering::Relaxed), 20);
        let second = db.hash_tree(&data, &NullReporter).unwrap();
        assert_eq!(first.digest(), second.digest());
        assert_eq!(stats.files_hashed.load(Ordering::Relaxed), 20, "second pass reads nothing");

        std::fs::write(data.join("sub/f1"), "changed!!").unwrap();
        backdate(&data.join("sub/f1"));
        let third = db.hash_tree(&data, &NullReporter).unwrap();
        assert_eq!(stats.files_hashed.load(Ordering::Relaxed), 21, "only the changed file is read");
        assert_eq!(Tree::diff(&first, &third).modified, ["sub/f1"]);
    }

    #[test]
    fn racy_entries_are_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("fresh");
        std::fs::write(&f, "a").unwrap();
        // A future mtime is inside the racy window however slowly this test runs.
        std::fs::File::options().write(true).open(&f).unwrap().set_modified(SystemTime::now() + Duration::from_secs(5)).unwrap();
        let stats = Arc::new(WorkStats::default());
        let db = StateDb::open(&dir.path().join("state.redb"), stats.clone()).unwrap();
        db.hash_tree(&f, &NullReporter).unwrap();
        db.hash_tree(&f, &NullReporter).unwrap();
        assert_eq!(stats.files_hashed.load(Ordering::Relaxed), 2, "a just-written file is rehashed");
    }

    #[test]
    fn a_symlink_loop_is_one_unreadable_entry_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("cat")).unwrap();
        std::fs::create_dir_all(data.join("dog")).unwrap();
        std::fs::write(data.join("cat/a"), "a").unwrap();
        std::fs::write(data.join("dog/b"), "b").unwrap();
        std::os::unix::fs::symlink("..", data.join("cat/loop")).unwrap();
        std::os::unix::fs::symlink("../..", data.join("dog/up")).unwrap();
        let db = StateDb::open(&dir.path().join("state.redb"), Default::default()).unwrap();
        let scan = db.scan(&data, &NullReporter).unwrap();
        assert_eq!(
            scan.problems,
            [("cat/loop".to_string(), "symlink loop".to_string()), ("dog/up".to_string(), "symlink loop".to_string())]
        );
        let files: Vec<&str> = scan.tree.entries().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(files, ["cat/a", "cat/loop", "dog/b", "dog/up"]);
    }

    #[test]
    fn a_broken_symlink_is_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("ok"), "fine").unwrap();
        std::os::unix::fs::symlink(data.join("gone"), data.join("dangling")).unwrap();
        let db = StateDb::open(&dir.path().join("state.redb"), Default::default()).unwrap();
        let scan = db.scan(&data, &NullReporter).unwrap();
        assert_eq!(scan.problems, [("dangling".to_string(), "broken symlink".to_string())]);
        assert_eq!(scan.tree.entries().len(), 2, "the problem is part of the tree, so fixing it changes the digest");
        let before = scan.tree.digest();
        std::fs::write(data.join("gone"), "now here").unwrap();
        assert_ne!(db.hash_tree(&data, &NullReporter).unwrap().digest(), before);
    }

    #[test]
    fn missing_dependency_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("state.redb"), Default::default()).unwrap();
        assert!(matches!(db.hash_tree(&dir.path().join("nope"), &NullReporter), Err(StateError::Missing { .. })));
    }

    #[test]
    fn memo_computes_only_new_items() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(WorkStats::default());
        let db = StateDb::open(&dir.path().join("state.redb"), stats.clone()).unwrap();
        let memo = db.memo();
        let op = Digest::of_bytes(b"uppercase v1");
        let contents: Vec<String> = (0..100).map(|i| format!("item {i}")).collect();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let upper = |c: &[String], i: usize| -> Result<Vec<u8>, ()> {
            calls.fetch_add(1, Ordering::Relaxed);
            Ok(c[i].to_uppercase().into_bytes())
        };
        let items: Vec<Digest> = contents.iter().map(|c| Digest::of_bytes(c.as_bytes())).collect();
        let first = memo.map(&items, &op, |i| upper(&contents, i)).unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 100);
        assert_eq!(first[7].as_ref().unwrap(), b"ITEM 7");

        let mut more = contents.clone();
        more.extend((100..110).map(|i| format!("item {i}")));
        let items: Vec<Digest> = more.iter().map(|c| Digest::of_bytes(c.as_bytes())).collect();
        let second = memo.map(&items, &op, |i| upper(&more, i)).unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 110, "adding 10 items costs 10 computations");
        assert_eq!(second[105].as_ref().unwrap(), b"ITEM 105");
        assert_eq!(stats.memo_hits.load(Ordering::Relaxed), 100);

        let other_op = Digest::of_bytes(b"uppercase v2");
        memo.map(&items[..5], &other_op, |i| upper(&more, i)).unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 115, "a new op digest is a new memo key");
        assert_eq!(memo.clear().unwrap(), 115);
    }
}
