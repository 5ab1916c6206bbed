//! The file-state index: (absolute path) → (size, mtime, inode, digest), like git's index
//! and DVC's state db: checking an unchanged tree stats its files and reads no contents.
//! An entry is only trusted when the file's mtime is older than [`RACY_WINDOW`] at the
//! moment it was stat'ed, because file systems stamp mtimes with a coarse clock: a file
//! rewritten within the same tick with the same size would otherwise look unchanged
//! (git's "racily clean" problem).
//!
//! It lives in `cache/state.redb` beside the memo store; [`StateDb`] opens both.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use redb::ReadableDatabase;

use super::state::{FILE_STATE, StateDb, StateError};
use super::tree::{Tree, TreeEntry, escape_os};
use crate::digest::Digest;
use crate::report::Reporter;
use crate::stats::WorkStats;

/// Entries whose mtime is this close to "now" are hashed but not remembered.
pub const RACY_WINDOW: Duration = Duration::from_millis(50);

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

impl StateDb {
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
    use crate::cache::state::test_support::backdate;
    use crate::report::NullReporter;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

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
}
