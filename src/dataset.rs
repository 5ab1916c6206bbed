//! Dataset artifacts: what collect, clean and label produce.
//!
//! A dataset artifact holds `items.jsonl` (one [`Item`] per line, sorted by id) and the
//! image blobs the items refer to, as hidden `.images/<digest>` tree entries. The images
//! are never copied between stages: every stage's tree points at the same blobs, and gc,
//! verify and views treat them like any other file.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::stages::{Artifact, StageContext, StageError};

pub const ITEMS_FILE: &str = "items.jsonl";
/// What a dataset carries forward besides its items: the preprocessing applied to its
/// images and the class list, once stages have decided them.
pub const META_FILE: &str = "dataset.json";
pub const IMAGES_DIR: &str = ".images";

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

/// Writes `items.jsonl` into a stage's output directory and attaches the item images.
pub fn write(cx: &StageContext<'_>, items: &mut [Item]) -> Result<(), StageError> {
    items.sort_by(|a, b| a.id.cmp(&b.id));
    let path = cx.out_dir.join(ITEMS_FILE);
    let fail = |e: std::io::Error| StageError::Failed(format!("cannot write `{}`: {e}", path.display()));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).map_err(fail)?);
    let mut attached = BTreeSet::new();
    for item in items.iter() {
        serde_json::to_writer(&mut out, item).map_err(|e| fail(e.into()))?;
        out.write_all(b"\n").map_err(fail)?;
        if attached.insert(item.digest) {
            cx.attach_blob(&image_path(&item.digest), item.digest, item.bytes);
        }
    }
    out.flush().map_err(fail)
}

/// The items of an upstream dataset artifact.
pub fn read(cx: &StageContext<'_>, input: &str, artifact: &Artifact) -> Result<Vec<Item>, StageError> {
    let path = cx
        .input_file(artifact, ITEMS_FILE)?
        .ok_or_else(|| StageError::Failed(format!("input `{input}` is not a dataset (it has no {ITEMS_FILE})")))?;
    read_file(&path).map_err(|e| StageError::Failed(format!("input `{input}`: {e}")))
}

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
    pub preprocess: Option<crate::stages::preprocess::Spec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
}

/// The metadata of an upstream dataset (empty when it has none).
pub fn read_meta(cx: &StageContext<'_>, input: &str, artifact: &Artifact) -> Result<Meta, StageError> {
    let Some(path) = cx.input_file(artifact, META_FILE)? else { return Ok(Meta::default()) };
    let text = std::fs::read_to_string(&path).map_err(|e| StageError::Failed(format!("input `{input}`: cannot read {META_FILE}: {e}")))?;
    serde_json::from_str(&text).map_err(|e| StageError::Failed(format!("input `{input}`: {META_FILE}: {e}")))
}

pub fn write_meta(cx: &StageContext<'_>, meta: &Meta) -> Result<(), StageError> {
    if *meta == Meta::default() { Ok(()) } else { write_json(cx, META_FILE, meta) }
}

/// The one upstream dataset of a stage that takes exactly one.
pub fn single_input<'a>(cx: &'a StageContext<'_>) -> Result<(&'a str, &'a Artifact), StageError> {
    let mut inputs = cx.inputs.iter();
    match (inputs.next(), inputs.next()) {
        (Some((name, a)), None) => Ok((name.as_str(), a)),
        _ => Err(StageError::Failed(format!("stage `{}` needs exactly one input stage (a dataset), got {}", cx.stage, cx.inputs.len()))),
    }
}

/// Writes a JSON report next to the items, pretty and with stable key order.
pub fn write_json(cx: &StageContext<'_>, name: &str, value: &impl Serialize) -> Result<(), StageError> {
    let path = cx.out_dir.join(name);
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| StageError::Failed(format!("cannot encode {name}: {e}")))?;
    bytes.push(b'\n');
    std::fs::write(&path, bytes).map_err(|e| StageError::Failed(format!("cannot write `{}`: {e}", path.display())))
}
