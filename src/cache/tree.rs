//! Trees: the listing of files that makes up a dependency or an artifact.
//!
//! A tree's digest is a Merkle hash over its directory structure: a directory's digest
//! covers its children's names, kinds and digests, a file's digest is the blake3 of its
//! bytes. Changing one file therefore rehashes that file (the rest come from the
//! file-state index) and recombines digests up the path, never rereads the siblings.
//!
//! On disk (`cache/trees/ab/cdef…`) a tree is a small text file, one line per file:
//! `<digest> <size> <f|x> <path>`, sorted by path, with `%`, newlines and bytes that are
//! not UTF-8 percent-escaped so that any Unix file name round-trips.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};

use crate::digest::Digest;

const MAGIC: &str = "kiln-tree 1";
const DIR_DOMAIN: &[u8] = b"kiln-dir-v1\0";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    /// Path relative to the tree's root, `/`-separated, escaped (see [`escape_os`]).
    /// Empty when the tree is a single file.
    pub path: String,
    pub digest: Digest,
    pub size: u64,
    pub executable: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Tree {
    entries: Vec<TreeEntry>,
    /// The Merkle digest, computed once: status and run ask for it several times.
    digest: std::sync::OnceLock<Digest>,
}

impl PartialEq for Tree {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl Eq for Tree {}

/// What changed between two trees, by path.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TreeDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub modified: Vec<String>,
}

impl TreeDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.modified.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("malformed tree object at line {line}: {why}")]
pub struct TreeParseError {
    line: usize,
    why: &'static str,
}

impl Tree {
    pub fn new(mut entries: Vec<TreeEntry>) -> Self {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        entries.dedup_by(|a, b| a.path == b.path);
        Tree { entries, digest: Default::default() }
    }

    pub fn entries(&self) -> &[TreeEntry] {
        &self.entries
    }

    pub fn total_size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// The Merkle digest. A single unnamed file is its content digest.
    pub fn digest(&self) -> Digest {
        *self.digest.get_or_init(|| self.compute_digest())
    }

    fn compute_digest(&self) -> Digest {
        if let [only] = self.entries.as_slice()
            && only.path.is_empty()
        {
            return only.digest;
        }
        let mut root = Node::default();
        for e in &self.entries {
            root.insert(e.path.split('/'), e);
        }
        root.digest()
    }

    /// The entries below `prefix`, re-rooted at it.
    pub fn subtree(&self, prefix: &str) -> Tree {
        let entries = self
            .entries
            .iter()
            .filter_map(|e| {
                if e.path == prefix {
                    Some(TreeEntry { path: String::new(), ..e.clone() })
                } else {
                    e.path
                        .strip_prefix(prefix)
                        .and_then(|rest| rest.strip_prefix('/'))
                        .map(|rest| TreeEntry { path: rest.to_string(), ..e.clone() })
                }
            })
            .collect();
        Tree { entries, digest: Default::default() }
    }

    /// This tree placed under `prefix` (the inverse of [`Tree::subtree`]).
    pub fn prefixed(&self, prefix: &str) -> Vec<TreeEntry> {
        self.entries
            .iter()
            .map(|e| TreeEntry { path: if e.path.is_empty() { prefix.to_string() } else { format!("{prefix}/{}", e.path) }, ..e.clone() })
            .collect()
    }

    pub fn diff(old: &Tree, new: &Tree) -> TreeDiff {
        let mut diff = TreeDiff::default();
        let (mut i, mut j) = (0, 0);
        let (a, b) = (&old.entries, &new.entries);
        while i < a.len() || j < b.len() {
            match (a.get(i), b.get(j)) {
                (Some(x), Some(y)) if x.path == y.path => {
                    if x.digest != y.digest || x.executable != y.executable {
                        diff.modified.push(y.path.clone());
                    }
                    i += 1;
                    j += 1;
                }
                (Some(x), Some(y)) if x.path < y.path => {
                    diff.removed.push(x.path.clone());
                    i += 1;
                }
                (Some(_), Some(y)) => {
                    diff.added.push(y.path.clone());
                    j += 1;
                }
                (Some(x), None) => {
                    diff.removed.push(x.path.clone());
                    i += 1;
                }
                (None, Some(y)) => {
                    diff.added.push(y.path.clone());
                    j += 1;
                }
                (None, None) => break,
            }
        }
        diff
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = String::with_capacity(self.entries.len() * 96 + 16);
        out.push_str(MAGIC);
        out.push('\n');
        for e in &self.entries {
            out.push_str(&e.digest.to_hex());
            out.push(' ');
            out.push_str(&e.size.to_string());
            out.push(' ');
            out.push(if e.executable { 'x' } else { 'f' });
            out.push(' ');
            out.push_str(&e.path);
            out.push('\n');
        }
        out.into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<Tree, TreeParseError> {
        let text = std::str::from_utf8(bytes).map_err(|_| TreeParseError { line: 0, why: "not UTF-8" })?;
        let mut lines = text.lines();
        if lines.next() != Some(MAGIC) {
            return Err(TreeParseError { line: 1, why: "missing header" });
        }
        let mut entries = Vec::new();
        for (n, line) in lines.enumerate() {
            let err = |why| TreeParseError { line: n + 2, why };
            let mut parts = line.splitn(4, ' ');
            let digest = parts.next().and_then(|d| d.parse().ok()).ok_or_else(|| err("bad digest"))?;
            let size = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| err("bad size"))?;
            let executable = match parts.next() {
                Some("x") => true,
                Some("f") => false,
                _ => return Err(err("bad file kind")),
            };
            let path = parts.next().ok_or_else(|| err("missing path"))?.to_string();
            // Restores and views join entry paths onto a destination: a damaged or forged
            // tree must not be able to lead them out of it.
            if !path.is_empty() && path.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
                return Err(err("unsafe path"));
            }
            entries.push(TreeEntry { path, digest, size, executable });
        }
        Ok(Tree { entries, digest: Default::default() })
    }
}

#[derive(Default)]
struct Node<'a> {
    file: Option<&'a TreeEntry>,
    children: BTreeMap<&'a str, Node<'a>>,
}

impl<'a> Node<'a> {
    fn insert(&mut self, mut parts: std::str::Split<'a, char>, entry: &'a TreeEntry) {
        match parts.next() {
            None => self.file = Some(entry),
            Some(name) => self.children.entry(name).or_default().insert(parts, entry),
        }
    }

    fn digest(&self) -> Digest {
        if let Some(file) = self.file {
            return file.digest;
        }
        let mut h = blake3::Hasher::new();
        h.update(DIR_DOMAIN);
        // Children sorted by raw name: BTreeMap over &str orders by bytes.
        for (name, child) in &self.children {
            let kind = match child.file {
                Some(f) if f.executable => b'x',
                Some(_) => b'f',
                None => b'd',
            };
            h.update(&[kind]);
            h.update(&(name.len() as u32).to_le_bytes());
            h.update(name.as_bytes());
            h.update(&child.digest().0);
        }
        Digest(*h.finalize().as_bytes())
    }
}

/// Escapes a file name for a tree line: `%`, control characters and bytes that are not
/// UTF-8 become `%XX`, so the text form is lossless and one line per entry.
pub fn escape_os(name: &OsStr) -> String {
    use std::os::unix::ffi::OsStrExt;
    let bytes = name.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                push_escaped(&mut out, s);
                break;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                push_escaped(&mut out, std::str::from_utf8(valid).unwrap_or_default());
                let bad = e.error_len().unwrap_or(after.len());
                for b in &after[..bad] {
                    out.push_str(&format!("%{b:02X}"));
                }
                rest = &after[bad..];
            }
        }
    }
    out
}

fn push_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        if c == '%' || c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
}

/// The inverse of [`escape_os`].
pub fn unescape_os(s: &str) -> OsString {
    use std::os::unix::ffi::OsStringExt;
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, content: &[u8]) -> TreeEntry {
        TreeEntry { path: path.into(), digest: Digest::of_bytes(content), size: content.len() as u64, executable: false }
    }

    #[test]
    fn digest_is_order_independent_and_content_sensitive() {
        let a = Tree::new(vec![entry("x/a", b"1"), entry("b", b"2")]);
        let b = Tree::new(vec![entry("b", b"2"), entry("x/a", b"1")]);
        assert_eq!(a.digest(), b.digest());
        let c = Tree::new(vec![entry("b", b"2"), entry("x/a", b"3")]);
        assert_ne!(a.digest(), c.digest());
        let renamed = Tree::new(vec![entry("b", b"2"), entry("y/a", b"1")]);
        assert_ne!(a.digest(), renamed.digest());
    }

    #[test]
    fn decode_refuses_paths_that_climb_out() {
        let good = Tree::new(vec![entry("a/b", b"1")]).encode();
        assert!(Tree::decode(&good).is_ok());
        let d = Digest::of_bytes(b"1").to_hex();
        for bad in ["../x", "a/../../x", "/etc/passwd", "a//b", "./a"] {
            let text = format!("{MAGIC}\n{d} 1 f {bad}\n");
            assert!(Tree::decode(text.as_bytes()).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn subtree_digest_equals_digest_of_that_directory() {
        let whole = Tree::new(vec![entry("d/a", b"1"), entry("d/sub/b", b"2"), entry("e", b"3")]);
        let alone = Tree::new(vec![entry("a", b"1"), entry("sub/b", b"2")]);
        assert_eq!(whole.subtree("d").digest(), alone.digest());
        assert_eq!(whole.subtree("e").digest(), Digest::of_bytes(b"3"));
    }

    #[test]
    fn encode_decode_round_trip() {
        let t = Tree::new(vec![entry("a b/c%d", b"1"), entry("z", b"")]);
        assert_eq!(Tree::decode(&t.encode()).unwrap(), t);
        assert!(Tree::decode(b"nope").is_err());
    }

    #[test]
    fn diff_reports_added_removed_modified() {
        let old = Tree::new(vec![entry("a", b"1"), entry("b", b"2"), entry("c", b"3")]);
        let new = Tree::new(vec![entry("a", b"1"), entry("b", b"X"), entry("d", b"4")]);
        let d = Tree::diff(&old, &new);
        assert_eq!(d.added, ["d"]);
        assert_eq!(d.removed, ["c"]);
        assert_eq!(d.modified, ["b"]);
    }

    #[test]
    fn escaping_round_trips_any_unix_name() {
        use std::os::unix::ffi::OsStrExt;
        let raw = OsStr::from_bytes(b"caf\xe9 100%\nx");
        let escaped = escape_os(raw);
        assert!(!escaped.contains('\n'));
        assert_eq!(unescape_os(&escaped), raw);
    }
}
