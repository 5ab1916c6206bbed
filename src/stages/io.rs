//! Reading and writing the artifact formats ([`crate::formats`]) from a running stage: the
//! one dataset a stage reads, its items and metadata, the shards of a convert stage, and the
//! JSON reports every kind writes next to its output.

use std::collections::BTreeSet;
use std::io::Write;

use serde::Serialize;

use super::{Artifact, StageContext, StageError};
use crate::formats::dataset::{ITEMS_FILE, Item, META_FILE, Meta, image_path, read_file};
use crate::formats::shards::{Dtype, Encoding, Pixels, ShardManifest, Split};

/// Writes `items.jsonl` into a stage's output directory and attaches the item images.
pub fn write(cx: &StageContext<'_>, items: &mut [Item]) -> Result<(), StageError> {
    items.sort_by(|a, b| a.id.cmp(&b.id));
    let path = cx.out_dir.join(ITEMS_FILE);
    let fail = |e: std::io::Error| StageError::io("write", &path)(e);
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
    let path =
        cx.input_file(artifact, ITEMS_FILE)?.ok_or_else(|| StageError::data(input, format!("not a dataset (it has no {ITEMS_FILE})")))?;
    read_file(&path).map_err(|e| StageError::data(input, e))
}

/// The metadata of an upstream dataset (empty when it has none).
pub fn read_meta(cx: &StageContext<'_>, input: &str, artifact: &Artifact) -> Result<Meta, StageError> {
    let Some(path) = cx.input_file(artifact, META_FILE)? else { return Ok(Meta::default()) };
    let text = std::fs::read_to_string(&path).map_err(|e| StageError::data(input, format!("cannot read {META_FILE}: {e}")))?;
    serde_json::from_str(&text).map_err(|e| StageError::data(input, format!("{META_FILE}: {e}")))
}

pub fn write_meta(cx: &StageContext<'_>, meta: &Meta) -> Result<(), StageError> {
    if *meta == Meta::default() { Ok(()) } else { write_json(cx, META_FILE, meta) }
}

/// The one upstream dataset of a stage that takes exactly one.
pub fn single_input<'a>(cx: &'a StageContext<'_>) -> Result<(&'a str, &'a Artifact), StageError> {
    let mut inputs = cx.inputs.iter();
    match (inputs.next(), inputs.next()) {
        (Some((name, a)), None) => Ok((name.as_str(), a)),
        _ => Err(StageError::Config(format!("stage `{}` needs exactly one input stage (a dataset), got {}", cx.stage, cx.inputs.len()))),
    }
}

/// Writes a JSON report next to the items, pretty and with stable key order.
pub fn write_json(cx: &StageContext<'_>, name: &str, value: &impl Serialize) -> Result<(), StageError> {
    let path = cx.out_dir.join(name);
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| StageError::Failed(format!("cannot encode {name}: {e}")))?;
    bytes.push(b'\n');
    std::fs::write(&path, bytes).map_err(StageError::io("write", &path))
}

impl ShardManifest {
    /// The manifest of an upstream convert artifact.
    pub fn read(cx: &StageContext<'_>, input: &str, artifact: &Artifact) -> Result<ShardManifest, StageError> {
        let path = cx
            .input_file(artifact, "manifest.json")?
            .ok_or_else(|| StageError::data(input, "it has no manifest.json: is it a convert stage?"))?;
        let bytes = std::fs::read(&path).map_err(StageError::io("read", &path))?;
        serde_json::from_slice(&bytes).map_err(|e| StageError::data(input, format!("manifest.json: {e}")))
    }
}

impl Split {
    /// Split `split` of the shards of input `input`, as its manifest `m` describes them
    /// (empty when the manifest has no such split).
    pub fn load(cx: &StageContext<'_>, input: &str, artifact: &Artifact, m: &ShardManifest, split: &str) -> Result<Split, StageError> {
        let fail = |what: String| StageError::data(input, what);
        let shape = [m.channels, m.height as usize, m.width as usize];
        let row: usize = shape.iter().product();
        let mut out = Split {
            pixels: match m.dtype {
                Dtype::U8 => Pixels::U8(Vec::new()),
                Dtype::F32 => Pixels::F32(Vec::new()),
            },
            labels: Vec::new(),
            multi: Vec::new(),
            ids: Vec::new(),
            sources: Vec::new(),
            shape,
        };
        let Some(info) = m.splits.get(split) else { return Ok(out) };
        if m.classes.is_empty() && m.encoding != Encoding::Index {
            return Err(fail(format!("{:?} labels with no classes in manifest.json", m.encoding)));
        }
        for shard in &info.shards {
            let path = cx.input_file(artifact, &shard.file)?.ok_or_else(|| fail(format!("shard `{}` is missing", shard.file)))?;
            let bytes = std::fs::read(&path).map_err(|e| fail(format!("cannot read shard `{}`: {e}", shard.file)))?;
            let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| fail(format!("shard `{}`: {e}", shard.file)))?;
            let images = st.tensor("images").map_err(|e| fail(format!("shard `{}`: {e}", shard.file)))?;
            let labels = st.tensor("labels").map_err(|e| fail(format!("shard `{}`: {e}", shard.file)))?;
            if images.shape().get(1..) != Some(&shape[..]) || images.shape()[0] != shard.rows {
                return Err(fail(format!(
                    "shard `{}` has shape {:?}, the manifest says {} rows of {shape:?}",
                    shard.file,
                    images.shape(),
                    shard.rows
                )));
            }
            match &mut out.pixels {
                Pixels::U8(v) => v.extend_from_slice(images.data()),
                Pixels::F32(v) => v.extend(images.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))),
            }
            match m.encoding {
                Encoding::Index => {
                    out.labels.extend(labels.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as u32))
                }
                Encoding::OneHot => {
                    let k = m.classes.len();
                    let vals: Vec<f32> =
                        labels.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
                    out.labels.extend(vals.chunks_exact(k).map(|r| r.iter().position(|v| *v > 0.5).unwrap_or(0) as u32));
                }
                Encoding::MultiHot => {
                    let k = m.classes.len();
                    let vals: Vec<f32> =
                        labels.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
                    if vals.len() != shard.rows * k {
                        return Err(fail(format!(
                            "shard `{}` has {} label values for {} rows of {k} classes",
                            shard.file,
                            vals.len(),
                            shard.rows
                        )));
                    }
                    out.labels.extend(vals.chunks_exact(k).map(|r| r.iter().position(|v| *v > 0.5).unwrap_or(0) as u32));
                    out.multi.extend(vals.iter().map(|&v| if v > 0.5 { 1.0 } else { 0.0 }));
                }
            }
            if shard.ids.len() != shard.rows {
                return Err(fail(format!(
                    "shard `{}` has {} rows but manifest.json lists {} ids",
                    shard.file,
                    shard.rows,
                    shard.ids.len()
                )));
            }
            out.ids.extend(shard.ids.iter().cloned());
            out.sources.extend((0..shard.rows).map(|r| shard.sources.get(r).cloned().unwrap_or_default()));
        }
        if out.labels.len() * row
            != match &out.pixels {
                Pixels::U8(v) => v.len(),
                Pixels::F32(v) => v.len(),
            }
        {
            return Err(fail(format!("split `{split}`: labels and images disagree in length")));
        }
        Ok(out)
    }
}
