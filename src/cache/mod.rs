//! The content-addressed cache.
//!
//! ```text
//! cache/
//!   blobs/ab/cdef…        file contents by blake3 digest, shared by every artifact (read-only)
//!   trees/ab/cdef…        tree listings (see [`tree`]): dependency snapshots and artifacts
//!   stages/<key>.json     one [`StageEntry`] per stage key: the key and its output digests
//!   state.redb            file-state index and item memo store ([`state`])
//!   tmp/                  staging area; anything here is unfinished work
//!   run.lock              held by the one `kiln run` using this cache ([`guard`])
//! ```
//!
//! **Commit order** makes a crash at any point harmless: blobs are written to `tmp/` and
//! renamed into place, then the tree, then the stage entry, each by atomic rename. An entry
//! therefore exists only once everything it refers to does; a crash leaves at most
//! orphaned blobs (removed by `kiln gc`) and files in `tmp/` (removed by the next run).

mod claim;
pub mod gc;
pub mod guard;
pub mod index;
pub mod key;
pub mod lockfile;
pub mod memo;
pub mod remote;
pub mod state;
pub mod tree;
mod views;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use claim::{CACHE_TAG, claim_dir, foreign_contents};
pub use index::Scan;
pub use key::{CacheKey, KEY_FORMAT};
pub use memo::MemoStore;
pub use state::{StateDb, StateError};
pub use tree::{Tree, TreeDiff, TreeEntry};

use crate::digest::Digest;
use crate::stats::WorkStats;

/// A stored blob's (digest, size), or why one item's work failed.
pub type BlobResult = Result<(Digest, u64), String>;

/// What the cache remembers of one successful stage execution.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageEntry {
    pub key: CacheKey,
    /// Tree digest of everything the stage produced.
    pub artifact: Digest,
    /// For stages with declared workspace outputs: each output path's digest.
    #[serde(default)]
    pub outs: BTreeMap<String, Digest>,
    pub duration_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot {action} `{path}`: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("corrupt cache object `{path}`: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("blob {digest} is missing from the cache")]
    MissingBlob { digest: Digest },
    #[error("blob {digest} in the cache is corrupt (its content hashes to {actual}); it was removed, so the stage that made it runs again")]
    CorruptBlob { digest: Digest, actual: Digest },
    #[error("`{}` is not a kiln cache: it holds {found} and no `{CACHE_TAG}`", path.display())]
    NotACache { path: PathBuf, found: String },
    #[error("tree {digest} is missing from the cache")]
    MissingTree { digest: Digest },
    #[error(transparent)]
    State(#[from] StateError),
}

impl CacheError {
    pub fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CacheError {
        let path = path.to_path_buf();
        move |source| CacheError::Io { action, path, source }
    }
}

/// Hashes the blob file at `path`: `Ok(())` when it holds `digest`.
fn check_blob_file(path: &Path, digest: &Digest) -> Result<(), CacheError> {
    match Digest::of_file(path) {
        Ok((actual, _)) if actual == *digest => Ok(()),
        Ok((actual, _)) => Err(corrupt(path, digest, actual)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(CacheError::MissingBlob { digest: *digest }),
        Err(e) => Err(CacheError::io("read", path)(e)),
    }
}

/// A blob whose content hashes to `actual`: removed on the spot, so that nothing reads it
/// again and the stage that made it is recomputed.
fn corrupt(path: &Path, digest: &Digest, actual: Digest) -> CacheError {
    let _ = std::fs::remove_file(path);
    tracing::warn!("cache blob {} is corrupt (content hashes to {}); removed", digest.short(), actual.short());
    CacheError::CorruptBlob { digest: *digest, actual }
}

/// Reads a blob whole and checks it against its digest.
fn read_blob_file(path: &Path, digest: &Digest) -> Result<Vec<u8>, CacheError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(CacheError::MissingBlob { digest: *digest }),
        Err(e) => return Err(CacheError::io("read", path)(e)),
    };
    let actual = Digest::of_bytes(&bytes);
    if actual != *digest {
        return Err(corrupt(path, digest, actual));
    }
    Ok(bytes)
}

/// How a file gets into the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingest {
    /// The file stays where it is (a workspace output): copy it, by reflink when possible.
    Copy,
    /// The file was staged by kiln inside the cache: move it.
    Move,
}

pub struct Cache {
    dir: PathBuf,
    state: StateDb,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// `DIR/KIND/ab/cdef…`: where a blob or tree with this digest lives.
fn object_path(dir: &Path, kind: &str, digest: &Digest) -> PathBuf {
    let hex = digest.to_hex();
    dir.join(kind).join(&hex[..2]).join(&hex[2..])
}

/// Reads files of committed artifacts without opening the cache for writing (no run guard,
/// no state database): trees and blobs are immutable once committed, so a reader can run
/// beside a `kiln run`.
pub struct ArtifactReader {
    dir: PathBuf,
}

impl ArtifactReader {
    pub fn new(cache_dir: &Path) -> Self {
        ArtifactReader { dir: cache_dir.to_path_buf() }
    }

    /// The entry of `path` inside the artifact `tree`, with where its blob would be; `None`
    /// when the tree or the file is not in this cache.
    fn locate(&self, tree: &Digest, path: &str) -> Result<Option<(Digest, PathBuf)>, CacheError> {
        let tree_file = object_path(&self.dir, "trees", tree);
        let bytes = match std::fs::read(&tree_file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheError::io("read", &tree_file)(e)),
        };
        let tree = Tree::decode(&bytes).map_err(|e| CacheError::Corrupt { path: tree_file.clone(), why: e.to_string() })?;
        Ok(tree.entries().iter().find(|e| e.path == path).map(|e| (e.digest, object_path(&self.dir, "blobs", &e.digest))))
    }

    /// Where the blob of `path` inside the artifact `tree` is, its content checked; `None`
    /// when the tree, the file or its blob is not in this cache.
    pub fn file_path(&self, tree: &Digest, path: &str) -> Result<Option<PathBuf>, CacheError> {
        let Some((digest, blob)) = self.locate(tree, path)? else { return Ok(None) };
        missing_is_none(check_blob_file(&blob, &digest).map(|()| blob))
    }

    /// The bytes of `path` inside the artifact `tree`, checked; `None` when the tree or the
    /// file is not in this cache.
    pub fn file(&self, tree: &Digest, path: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let Some((digest, blob)) = self.locate(tree, path)? else { return Ok(None) };
        missing_is_none(read_blob_file(&blob, &digest))
    }
}

/// A blob that is not there is no file, not an error; a corrupt one is.
fn missing_is_none<T>(r: Result<T, CacheError>) -> Result<Option<T>, CacheError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(CacheError::MissingBlob { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

impl Cache {
    /// Opens (creating if needed) the cache at `dir`. Callers that write must hold the
    /// run guard ([`guard::RunGuard`]).
    pub fn open(dir: &Path, stats: Arc<WorkStats>) -> Result<Cache, CacheError> {
        Self::open_with_state(dir, &dir.join("state.redb"), stats)
    }

    /// Opens the cache with its file-state index and memo store at `state`. A Slurm job
    /// uses a private one: the scheduling kiln holds the cache's own for the whole run, and
    /// blobs, trees and entries are committed by atomic rename, so both can write.
    pub fn open_with_state(dir: &Path, state: &Path, stats: Arc<WorkStats>) -> Result<Cache, CacheError> {
        claim_dir(dir)?;
        for sub in ["blobs", "trees", "stages", "tmp"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(CacheError::io("create cache directory", &dir.join(sub)))?;
        }
        let state = StateDb::open(state, stats)?;
        Ok(Cache { dir: dir.to_path_buf(), state })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn state(&self) -> &StateDb {
        &self.state
    }

    /// Removes leftovers of interrupted runs. Only call while holding the run guard.
    pub fn clean_tmp(&self) -> Result<usize, CacheError> {
        let tmp = self.dir.join("tmp");
        let mut n = 0;
        for entry in std::fs::read_dir(&tmp).map_err(CacheError::io("list", &tmp))? {
            let entry = entry.map_err(CacheError::io("list", &tmp))?;
            let path = entry.path();
            let r = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                make_writable(&path);
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            r.map_err(CacheError::io("remove", &path))?;
            n += 1;
        }
        Ok(n)
    }

    /// A fresh, empty directory under `tmp/` for a stage to write into.
    pub fn staging_dir(&self, label: &str) -> Result<PathBuf, CacheError> {
        let path = self.dir.join("tmp").join(format!("{label}-{}", unique_suffix()));
        std::fs::create_dir_all(&path).map_err(CacheError::io("create staging directory", &path))?;
        Ok(path)
    }

    /// The resumable working directory of one stage key (`scratch/<key>/`; a stage that
    /// wants one creates it). Unlike `tmp/`, it survives an interrupted run so the next
    /// run can resume.
    pub fn scratch_dir(&self, key: &Digest) -> PathBuf {
        self.dir.join("scratch").join(key.to_hex())
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        object_path(&self.dir, "blobs", digest)
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// The bytes of a blob, checked against its digest. A corrupt blob is removed and
    /// reported as [`CacheError::CorruptBlob`].
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, CacheError> {
        read_blob_file(&self.blob_path(digest), digest)
    }

    /// The path of a blob whose content was just checked against its digest, for readers
    /// that open the file themselves (memory-mapped weights and shards).
    pub fn verified_blob_path(&self, digest: &Digest) -> Result<PathBuf, CacheError> {
        let path = self.blob_path(digest);
        check_blob_file(&path, digest)?;
        Ok(path)
    }

    fn tree_path(&self, digest: &Digest) -> PathBuf {
        object_path(&self.dir, "trees", digest)
    }

    pub fn entry_path(&self, key: &Digest) -> PathBuf {
        self.dir.join("stages").join(format!("{}.json", key.to_hex()))
    }

    /// Stores every file of `tree` (found under `base`) as blobs, then the tree itself.
    pub fn ingest(&self, base: &Path, tree: &Tree, how: Ingest) -> Result<Digest, CacheError> {
        tree.entries().par_iter().try_for_each(|e| {
            let src = if e.path.is_empty() { base.to_path_buf() } else { base.join(tree::unescape_os(&e.path)) };
            self.put_blob(&src, &e.digest, how)
        })?;
        self.put_tree(tree)
    }

    /// Stores bytes as a blob (if not already there) and returns their digest.
    pub fn put_blob_bytes(&self, bytes: &[u8]) -> Result<Digest, CacheError> {
        let digest = Digest::of_bytes(bytes);
        self.commit_blob(&digest, |staged| std::fs::write(staged, bytes).map_err(CacheError::io("write", staged)))?;
        Ok(digest)
    }

    /// Copies a file whose digest is known into the blob store (if not already there).
    pub fn put_blob_copy(&self, src: &Path, digest: &Digest) -> Result<(), CacheError> {
        self.put_blob(src, digest, Ingest::Copy)
    }

    fn put_blob(&self, src: &Path, digest: &Digest, how: Ingest) -> Result<(), CacheError> {
        self.commit_blob(digest, |staged| match how {
            Ingest::Move => std::fs::rename(src, staged).map_err(CacheError::io("move into cache", src)),
            Ingest::Copy => reflink_copy::reflink_or_copy(src, staged).map(|_| ()).map_err(CacheError::io("copy into cache", src)),
        })
    }

    /// The one way a blob enters the store: `fill` writes it under `tmp/`, then it is made
    /// read-only and renamed into place. A blob already present is left alone.
    fn commit_blob(&self, digest: &Digest, fill: impl FnOnce(&Path) -> Result<(), CacheError>) -> Result<(), CacheError> {
        let dest = self.blob_path(digest);
        if dest.is_file() {
            return Ok(());
        }
        let parent = dest.parent().expect("blob paths have a parent");
        std::fs::create_dir_all(parent).map_err(CacheError::io("create", parent))?;
        let staged = self.dir.join("tmp").join(format!("blob-{}", unique_suffix()));
        fill(&staged)?;
        let _ = std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o444));
        std::fs::rename(&staged, &dest).map_err(CacheError::io("commit blob", &dest))
    }

    /// Per-item work whose result is a blob (an encoded or transformed image): for each
    /// key, the (digest, size) that `make(index)` stored, memoised under `op`. A memo entry
    /// whose blob is gone (gc) is made again rather than trusted.
    pub fn memo_blobs<F>(&self, keys: &[Digest], op: &Digest, make: F) -> Result<Vec<BlobResult>, StateError>
    where
        F: Fn(usize) -> BlobResult + Sync,
    {
        let encode = |(digest, size): (Digest, u64)| [digest.0.as_slice(), &size.to_le_bytes()].concat();
        let decode = |v: &[u8]| -> Option<(Digest, u64)> {
            Some((Digest(v.get(..32)?.try_into().ok()?), u64::from_le_bytes(v.get(32..40)?.try_into().ok()?)))
        };
        let results = self.state.memo().map(keys, op, |i| make(i).map(encode))?;
        Ok(results
            .into_par_iter()
            .enumerate()
            .map(|(i, r)| match r.map(|v| decode(&v)) {
                Ok(Some(found)) if self.has_blob(&found.0) => Ok(found),
                Ok(_) => make(i),
                Err(e) => Err(e),
            })
            .collect())
    }

    pub fn put_tree(&self, tree: &Tree) -> Result<Digest, CacheError> {
        let digest = tree.digest();
        let path = self.tree_path(&digest);
        if !path.is_file() {
            write_atomic(&self.dir, &path, &tree.encode())?;
        }
        Ok(digest)
    }

    pub fn get_tree(&self, digest: &Digest) -> Result<Option<Tree>, CacheError> {
        let path = self.tree_path(digest);
        match std::fs::read(&path) {
            Ok(bytes) => Tree::decode(&bytes).map(Some).map_err(|e| CacheError::Corrupt { path, why: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CacheError::io("read", &path)(e)),
        }
    }

    pub fn get_entry(&self, key: &Digest) -> Result<Option<StageEntry>, CacheError> {
        let path = self.entry_path(key);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| CacheError::Corrupt { path, why: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CacheError::io("read", &path)(e)),
        }
    }

    /// Commits a stage result. Its blobs and trees must already be stored.
    pub fn put_entry(&self, entry: &StageEntry) -> Result<Digest, CacheError> {
        let key = entry.key.digest();
        let bytes = serde_json::to_vec_pretty(entry).expect("entries serialise");
        write_atomic(&self.dir, &self.entry_path(&key), &bytes)?;
        Ok(key)
    }

    pub fn remove_entry(&self, key: &Digest) -> Result<(), CacheError> {
        let path = self.entry_path(key);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CacheError::io("remove", &path)(e)),
            _ => Ok(()),
        }
    }

    /// Whether the entry's artifact tree is present. Its blobs were committed before the
    /// tree and the entry (see the module doc), so only outside damage can remove them:
    /// that is `kiln verify`'s job, not a cost every cached run should pay (checking
    /// 70 000 image blobs took most of a no-op Fashion-MNIST run).
    pub fn entry_is_complete(&self, entry: &StageEntry) -> Result<bool, CacheError> {
        Ok(self.tree_path(&entry.artifact).is_file())
    }

    /// All stage entries, for gc and verify.
    pub fn entries(&self) -> Result<Vec<(Digest, PathBuf)>, CacheError> {
        let dir = self.dir.join("stages");
        let mut out = Vec::new();
        for item in std::fs::read_dir(&dir).map_err(CacheError::io("list", &dir))? {
            let item = item.map_err(CacheError::io("list", &dir))?;
            let name = item.file_name().to_string_lossy().into_owned();
            if let Some(Ok(d)) = name.strip_suffix(".json").map(str::parse::<Digest>) {
                out.push((d, item.path()));
            }
        }
        Ok(out)
    }
}

/// Writes `bytes` to `dest` through a temporary file in the cache and an atomic rename.
pub fn write_atomic(cache_dir: &Path, dest: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(CacheError::io("create", parent))?;
    }
    let tmp = cache_dir.join("tmp").join(format!("obj-{}", unique_suffix()));
    std::fs::write(&tmp, bytes).map_err(CacheError::io("write", &tmp))?;
    std::fs::rename(&tmp, dest).map_err(CacheError::io("commit", dest))
}

/// Removes a file or directory tree if it exists.
pub fn remove_path(path: &Path) -> Result<(), CacheError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            make_writable(path);
            std::fs::remove_dir_all(path).map_err(CacheError::io("remove", path))
        }
        Ok(_) => std::fs::remove_file(path).map_err(CacheError::io("remove", path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CacheError::io("inspect", path)(e)),
    }
}

/// Directories made read-only by a stage would stop their own removal.
fn make_writable(dir: &Path) {
    for entry in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if entry.file_type().is_dir() {
            let _ = std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o755));
        }
    }
}

fn unique_suffix() -> String {
    format!("{}-{}", std::process::id(), TMP_COUNTER.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::NullReporter;

    #[test]
    fn ingest_restore_round_trip_shares_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("cache"), Default::default()).unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("a")).unwrap();
        std::fs::write(src.join("a/one"), "same").unwrap();
        std::fs::write(src.join("two"), "same").unwrap();
        let tree = cache.state().hash_tree(&src, &NullReporter).unwrap();
        let digest = cache.ingest(&src, &tree, Ingest::Copy).unwrap();
        assert_eq!(digest, tree.digest());
        let blobs = walkdir::WalkDir::new(dir.path().join("cache/blobs")).into_iter().flatten().filter(|e| e.file_type().is_file()).count();
        assert_eq!(blobs, 1, "identical contents are stored once");

        let out = dir.path().join("restored");
        cache.restore(&cache.get_tree(&digest).unwrap().unwrap(), &out).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("a/one")).unwrap(), "same");
        std::fs::write(out.join("two"), "edited").unwrap();
        assert_eq!(
            std::fs::read_to_string(cache.blob_path(&tree.entries()[0].digest)).unwrap(),
            "same",
            "editing a restored file leaves the cache alone"
        );

        let view = dir.path().join("view/stage");
        cache.link_view(&tree, &view).unwrap();
        cache.link_view(&tree, &view).unwrap();
        assert_eq!(std::fs::read_to_string(view.join("a/one")).unwrap(), "same");
    }
}
