//! Dataset artifacts: what collect, clean, label and preprocess produce.
//!
//! A dataset artifact holds `items.jsonl` (one [`Item`] per line, sorted by id) and the
//! image blobs the items refer to, as hidden `.images/<digest>` tree entries. The images
//! are never copied between stages: every stage's tree points at the same blobs, and gc,
//! verify and views treat them like any other file. Reading and writing one from a running
//! stage is [`crate::stages::io`]'s.

use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

pub const ITEMS_FILE: &str = "items.jsonl";
/// What a dataset carries forward besides its items: the preprocessing applied to its
/// images and the class list, once stages have decided them.
pub const META_FILE: &str = "dataset.json";
pub const IMAGES_DIR: &str = ".images";

/// Separates the classes of an item that has several (`cat|dog`) in [`Item::label`].
pub const MULTI: &str = "|";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    /// Unique and stable across runs: the source name and the path inside the source.
    pub id: String,
    /// Where the bytes came from, for people (a path relative to the workspace, a URL, …).
    pub source: String,
    pub digest: Digest,
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The split a source assigned (`train`/`test` folders, IDX files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// Items in one duplicate group share it (the id of the copy that was kept), so later
    /// stages never put copies of one image on both sides of a split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The digest of the image as collected, once preprocessing replaced it (label
    /// mappings keyed by digest refer to the original).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Digest>,
    /// Copies removed by clean, kept here so the label stage can see their labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub duplicates: Vec<DuplicateRef>,
    /// A person confirmed or set this label (a row of a label stage's corrections file), so
    /// label_issues does not suggest it again.
    #[serde(default, skip_serializing_if = "is_false")]
    pub reviewed: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DuplicateRef {
    pub id: String,
    pub source: String,
    pub digest: Digest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

impl Item {
    pub fn new(id: String, source: String, digest: Digest, bytes: u64) -> Self {
        Item {
            id,
            source,
            digest,
            bytes,
            format: None,
            width: None,
            height: None,
            label: None,
            split: None,
            group: None,
            origin: None,
            duplicates: Vec::new(),
            reviewed: false,
        }
    }

    /// The file name part of the source, for label regexes and reports.
    pub fn file_name(&self) -> &str {
        self.source.rsplit(['/', '\\']).next().unwrap_or(&self.source)
    }
}

pub fn image_path(digest: &Digest) -> String {
    format!("{IMAGES_DIR}/{}", digest.to_hex())
}

/// The items of an `items.jsonl` file.
pub fn read_file(path: &Path) -> Result<Vec<Item>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    std::io::BufReader::new(file)
        .lines()
        .enumerate()
        .filter(|(_, l)| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(|(n, line)| {
            let line = line.map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
            serde_json::from_str(&line).map_err(|e| format!("`{}` line {}: {e}", path.display(), n + 1))
        })
        .collect()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<super::preprocess::Spec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
}
