//! Bounded reads of regular files, and the walk that tells what in a `dir` source may be
//! collected.
//!
//! Collect reads nothing but regular files, and never more than a limit. The kind of file
//! is checked after following links and again on the open handle (opened non-blocking, so
//! a path swapped for a FIFO in between cannot make the open wait for a writer), and the
//! read itself stops one byte past the limit: a FIFO would block forever, `/dev/zero`
//! would fill memory, and a file that grows or lies about its size stays bounded.
//! Tables (listings, pixel tables) are read within [`TABLE_MAX_BYTES`], and a gzipped file
//! is decompressed within the same limit it was read with ([`read_maybe_gzip`]).

use std::collections::HashSet;
use std::fs::{FileType, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::cache::tree::escape_os;

/// What a file is, in words.
fn kind_name(kind: &FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_symlink() {
        "a symlink"
    } else {
        "an unknown kind of file"
    }
}

/// Why a file that is not a regular file is not read.
pub fn not_regular(kind: &FileType) -> String {
    format!("not a regular file: {}", kind_name(kind))
}

fn check(meta: &Metadata, limit: u64, limit_name: &str) -> Result<(), String> {
    if !meta.is_file() {
        return Err(not_regular(&meta.file_type()));
    }
    if meta.len() > limit {
        return Err(format!("{} bytes, over the {limit}-byte limit ({limit_name})", meta.len()));
    }
    Ok(())
}

/// The bytes of a regular file (links followed) of at most `limit` bytes; otherwise why
/// not. `limit_name` says in messages which limit applied (e.g. "`max_bytes`").
pub fn read_regular(path: &Path, limit: u64, limit_name: &str) -> Result<Vec<u8>, String> {
    let cannot = |e: std::io::Error| format!("cannot read: {e}");
    // Checked before opening: opening a FIFO waits for a writer, and opening a device
    // can have effects of its own.
    check(&std::fs::metadata(path).map_err(cannot)?, limit, limit_name)?;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path).map_err(cannot)?;
    // Checked again on the handle: the path may have been replaced since.
    let meta = file.metadata().map_err(cannot)?;
    check(&meta, limit, limit_name)?;
    let mut bytes = Vec::with_capacity(meta.len().min(limit) as usize);
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(cannot)?;
    if bytes.len() as u64 > limit {
        return Err(format!("more than the {limit}-byte limit ({limit_name}): the file grew while it was read"));
    }
    Ok(bytes)
}

/// The largest listing (CSV/JSONL of paths or URLs) or pixel table read, decompressed.
pub const TABLE_MAX_BYTES: u64 = 1 << 30;

/// A regular file's bytes, gunzipped when they start with the gzip magic number; at most
/// `limit` bytes read, and at most `limit` once decompressed.
pub fn read_maybe_gzip(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let raw = read_regular(path, limit, "kiln's limit for such files").map_err(|e| format!("`{}`: {e}", path.display()))?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(raw.as_slice())
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| format!("`{}`: bad gzip: {e}", path.display()))?;
    if out.len() as u64 > limit {
        return Err(format!("`{}` decompresses to more than {limit} bytes, kiln's limit for such files", path.display()));
    }
    Ok(out)
}

/// An entry of a `dir` source that cannot be collected.
#[derive(Debug, Clone)]
pub struct Refused {
    /// Relative to the source folder, `/`-separated and escaped as in a scan's tree.
    pub rel: String,
    pub reason: String,
    /// Reported whatever its name: a loop or a linked folder stands for a whole subtree.
    pub always: bool,
}

/// What a `dir` source may collect, found without reading or `stat`ing regular files.
#[derive(Debug, Default)]
pub struct Walk {
    /// The regular files that may be collected (relative paths, as in a scan's tree).
    pub files: HashSet<String>,
    /// Symlink loops, links out of the folder (unless followed), FIFOs, sockets, devices,
    /// and entries that could not be listed or followed.
    pub refused: Vec<Refused>,
}

fn relative(root: &Path, path: &Path) -> String {
    match path.strip_prefix(root) {
        Ok(rel) => rel.iter().map(escape_os).collect::<Vec<_>>().join("/"),
        Err(_) => path.display().to_string(),
    }
}

/// Walks a `dir` source following symlinks, as the engine's scan does, but refusing what
/// must not be collected: a symlink loop is one refused entry (walkdir finds it by
/// comparing each linked folder with its ancestors, the folders above the root
/// included), a link that resolves outside the folder is refused unless `follow_links`
/// (a linked folder is then not entered), and anything but a regular file or a folder
/// is refused with its kind.
pub fn walk(root: &Path, follow_links: bool) -> Result<Walk, String> {
    let canonical_root = std::fs::canonicalize(root).map_err(|e| format!("cannot resolve `{}`: {e}", root.display()))?;
    let mut out = Walk::default();
    let mut entries = walkdir::WalkDir::new(root).follow_links(true).into_iter();
    while let Some(next) = entries.next() {
        let entry = match next {
            Ok(entry) => entry,
            Err(e) => {
                let rel = e.path().map(|p| relative(root, p)).unwrap_or_default();
                if let Some(ancestor) = e.loop_ancestor() {
                    let back_to = if ancestor == root {
                        "the source folder".to_string()
                    } else if ancestor.starts_with(root) {
                        format!("`{}`", relative(root, ancestor))
                    } else {
                        format!("`{}`, above the source folder", ancestor.display())
                    };
                    out.refused.push(Refused { rel, reason: format!("symlink loop: leads back to {back_to}"), always: true });
                } else {
                    let reason = match e.io_error() {
                        Some(io) if io.kind() == std::io::ErrorKind::NotFound => "broken symlink".to_string(),
                        Some(io) => format!("cannot read: {io}"),
                        None => e.to_string(),
                    };
                    out.refused.push(Refused { rel, reason, always: false });
                }
                continue;
            }
        };
        let rel = relative(root, entry.path());
        let kind = entry.file_type();
        if entry.depth() > 0 && entry.path_is_symlink() {
            let refused = match std::fs::canonicalize(entry.path()) {
                Ok(target) if !follow_links && !target.starts_with(&canonical_root) => {
                    Some(format!("symlink to outside the source: {}", target.display()))
                }
                Ok(_) => None,
                Err(e) => Some(format!("cannot follow symlink: {e}")),
            };
            if let Some(reason) = refused {
                if kind.is_dir() {
                    // walkdir has opened the linked folder: do not go in.
                    entries.skip_current_dir();
                }
                out.refused.push(Refused { rel, reason, always: kind.is_dir() });
                continue;
            }
        }
        if kind.is_file() {
            out.files.insert(rel);
        } else if !kind.is_dir() {
            out.refused.push(Refused { rel, reason: not_regular(&kind), always: false });
        }
    }
    Ok(out)
}
