//! `kind = "convert"`: a labelled, preprocessed dataset → train/val/test tensor shards.
//!
//! ```toml
//! [stages.convert]
//! kind = "convert"
//! inputs = ["label"]
//! split = { train = 0.8, val = 0.1, test = 0.1 }   # or { from_items = true, val = 0.1 }
//! encoding = "index"          # "one_hot", "multi_hot" (labels joined by `|`)
//! dtype = "u8"                # or "f32" (normalised with the preprocess stage's mean/std)
//! shard_mb = 256
//! ```
//!
//! Splits are seeded, stratified by class (multi-hot items by iterative stratification over
//! all their classes, see [`stratify`]) and group-aware: all copies in one duplicate
//! group (from clean) land in the same split, so nothing leaks from train into test. With
//! `from_items = true` the splits the sources gave (`train`/`test` folders, IDX files)
//! are kept, validation is carved out of train, and any group found on both sides is
//! reported as leakage.
//!
//! Output: `shards/<split>-NNNNN.safetensors` with `images` (N×C×H×W) and `labels`,
//! `manifest.json` (shapes, dtype, normalisation, classes, split sizes, item ids, sources,
//! duplicate groups and whether a person reviewed the label, per row),
//! `class_to_index.json` and `convert_report.json`. Reading a shard from Python:
//!
//! ```python
//! import json, numpy as np
//! from safetensors.numpy import load_file
//! shard = load_file("outputs/digits/convert/shards/train-00000.safetensors")
//! images, labels = shard["images"], shard["labels"]      # (N, C, H, W) uint8, (N,) int64
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::de::DeValue;

mod stratify;

use super::{ParseContext, Stage, StageContext, StageError, StageKind, io, parse_config, upstream};
use crate::diagnostic::{Bounds, Checker, Issue, ValueSpans};
use crate::digest::Digest;
use crate::formats::dataset::{Item, MULTI};
use crate::formats::preprocess::{AugmentWhere, Normalize, Spec};
use crate::formats::shards::{Dtype, Encoding, ShardInfo, ShardManifest, SplitInfo};
use crate::imaging::transform::{ColorMode, pixels};
use crate::imaging::{self, DecodeLimits};
use crate::rng::Rng;

pub struct ConvertKind;

/// Bounds of `shard_mb` and `copies` (see the README's validation notes).
const MAX_SHARD_MB: u64 = 16 * 1024;
const MAX_COPIES: u64 = 1000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct SplitConfig {
    train: f64,
    val: f64,
    test: f64,
    /// Keep the splits the sources assigned; carve `val` out of train.
    from_items: bool,
}

impl SplitConfig {
    /// Whether a class of `n` items (each its own duplicate group) gets at least one item
    /// in every split that is not empty, as `ConvertStage::assign_splits` deals them.
    fn fits(&self, n: u64) -> bool {
        let f = n as f64;
        let (want_test, want_val) = if self.from_items {
            (0, (f * self.val).round() as u64)
        } else {
            ((f * self.test).round() as u64, (f * self.val).round() as u64)
        };
        let test = want_test.min(n);
        let val = want_val.min(n - test);
        let train = n - test - val;
        let test_ok = self.from_items || self.test == 0.0 || test >= 1;
        let val_ok = self.val == 0.0 || val >= 1;
        let train_ok = (!self.from_items && self.train == 0.0) || train >= 1;
        test_ok && val_ok && train_ok
    }
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig { train: 0.8, val: 0.1, test: 0.1, from_items: false }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    split: SplitConfig,
    #[serde(default)]
    encoding: Encoding,
    #[serde(default)]
    dtype: Dtype,
    #[serde(default = "default_shard_mb")]
    shard_mb: u64,
    /// Augmented copies per training image when augmentation is offline.
    #[serde(default = "default_copies")]
    copies: u32,
}

fn default_shard_mb() -> u64 {
    256
}
fn default_copies() -> u32 {
    1
}

#[derive(Debug)]
pub struct ConvertStage {
    config: Config,
}

impl StageKind for ConvertKind {
    fn name(&self) -> &'static str {
        "convert"
    }

    fn version(&self) -> u32 {
        // 4: the manifest records each row's duplicate group.
        // 5: multi-hot items are split by iterative stratification over all their classes,
        //    not by their first.
        5
    }

    fn parse(&self, table: Spanned<DeValue<'_>>, _cx: &ParseContext<'_>) -> Result<Arc<dyn Stage>, Vec<Issue>> {
        let spans = ValueSpans::of(&table);
        let config: Config = parse_config(table)?;
        let s = &config.split;
        let mut ck = Checker::new(&spans);
        if s.from_items {
            // The sources decide train and test; only `val` is carved out of train.
            ck.float("split.val", s.val, Bounds::below(0.0, 1.0), "the share of each class's training items kept for validation");
            for name in ["train", "test"] {
                if spans.has(&format!("split.{name}")) {
                    ck.fail(
                        &format!("split.{name}"),
                        format!("`split.{name}` means nothing with `from_items = true`: the sources decide train and test"),
                        "remove it; `val` is the share of training items kept for validation",
                    );
                }
            }
        } else {
            let mut ok = true;
            for (name, r) in [("train", s.train), ("val", s.val), ("test", s.test)] {
                ok &= ck.float(&format!("split.{name}"), r, Bounds::closed(0.0, 1.0), "a share of each class's items");
            }
            if ok && (s.train + s.val + s.test - 1.0).abs() > 1e-6 {
                ck.fail(
                    "split",
                    format!("split ratios add up to {}, not 1", s.train + s.val + s.test),
                    "e.g. split = { train = 0.8, val = 0.1, test = 0.1 }",
                );
            }
        }
        ck.int("shard_mb", config.shard_mb, 1, MAX_SHARD_MB, "MiB of images per shard file");
        ck.int("copies", u64::from(config.copies), 1, MAX_COPIES, "augmented copies of each training image when augmentation is offline");
        let issues = ck.into_issues();
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(Arc::new(ConvertStage { config }))
    }
}

#[derive(Debug, Serialize)]
struct Report {
    per_class: BTreeMap<String, BTreeMap<String, usize>>,
    /// Duplicate groups whose copies sit in different splits (only possible with
    /// `from_items`, where the sources decide).
    leakage: Vec<String>,
}

const SPLITS: [&str; 3] = ["train", "val", "test"];

impl Stage for ConvertStage {
    fn params(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("convert config serialises")
    }

    /// A synthetic source's `count` must give every class an item in each split that is
    /// not empty (convert assigns per class: test first, then val, the rest to train).
    fn plan_issues(&self, plan: &dyn super::PlanView) -> Vec<Issue> {
        let mut issues: Vec<Issue> = super::one_input_issue(plan).into_iter().collect();
        let this = plan.this();
        let chain = upstream::dataset_chain(plan, &this);
        let Some(known) = upstream::synthetic_labels(&chain) else { return issues };
        let s = &self.config.split;
        // The smallest class decides; a class nothing draws is the label stage's problem.
        let Some((class, n)) = known.counts.iter().filter(|(_, n)| **n > 0).min_by_key(|(_, n)| **n) else { return issues };
        if s.fits(*n) {
            return issues;
        }
        let shares = if s.from_items {
            format!("{{ from_items = true, val = {} }}", s.val)
        } else {
            format!("{{ train = {}, val = {}, test = {} }}", s.train, s.val, s.test)
        };
        let need = (1..=10_000_000u64).find(|&m| s.fits(m));
        let help = match need {
            Some(m) => format!(
                "every class needs an item in each non-empty split, so at least {m} items here: raise `count` (a synthetic source deals its items to its shapes in turn), or change the split shares"
            ),
            None => "a share this small gives no class an item: raise it, or set it to 0".to_string(),
        };
        issues.push(
            Issue::new(
                known.count_span.clone(),
                format!(
                    "class `{class}` gets at most {n} items from the synthetic source of stage `{}`, too few for split = {shares}",
                    known.collect
                ),
            )
            .help(help),
        );
        issues
    }

    fn run(&self, cx: &StageContext<'_>) -> Result<(), StageError> {
        let (input, artifact) = io::single_input(cx)?;
        let items = io::read(cx, input, artifact)?;
        let meta = io::read_meta(cx, input, artifact)?;
        if items.is_empty() {
            return Err(StageError::data(input, "it has no items"));
        }
        let labels_of =
            |item: &Item| -> Vec<String> { item.label.as_deref().map(|l| l.split(MULTI).map(String::from).collect()).unwrap_or_default() };
        let classes: Vec<String> = match &meta.classes {
            Some(c) => c.clone(),
            None => {
                let mut all: Vec<String> = items.iter().flat_map(labels_of).collect();
                all.sort();
                all.dedup();
                all
            }
        };
        let index: HashMap<&str, usize> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
        for item in &items {
            let ls = labels_of(item);
            if ls.is_empty() {
                return Err(StageError::data(input, format!("item `{}` has no label: run a label stage before convert", item.id)));
            }
            if let Some(bad) = ls.iter().find(|l| !index.contains_key(l.as_str())) {
                return Err(StageError::data(input, format!("item `{}` has label `{bad}`, which is not among the classes", item.id)));
            }
            if ls.len() > 1 && self.config.encoding != Encoding::MultiHot {
                return Err(StageError::data(input, format!("item `{}` has several labels; use encoding = \"multi_hot\"", item.id)));
            }
        }

        // Stratified by class; multi-hot items by iterative stratification over their classes.
        let classes_of = |i: &Item| -> Vec<usize> { labels_of(i).iter().map(|l| index[l.as_str()]).collect() };
        let (assign, leakage) = self.assign_splits(cx.seed, &items, &classes_of, classes.len());
        let spec = meta.preprocess.clone();
        let (color, width, height) = match &spec {
            Some(s) => (s.transform.color, s.transform.width, s.transform.height),
            None => (ColorMode::Rgb, items[0].width.unwrap_or(0), items[0].height.unwrap_or(0)),
        };
        if let Some(odd) = items.iter().find(|i| i.width != Some(width) || i.height != Some(height)) {
            return Err(StageError::data(
                input,
                format!(
                    "item `{}` is {:?}x{:?}, others {width}x{height}: add a preprocess stage to give every image one size",
                    odd.id, odd.width, odd.height
                ),
            ));
        }
        let offline = spec.as_ref().filter(|s| s.augmentation == AugmentWhere::Offline && !s.augment.is_identity());

        let channels = color.channels();
        let layout = ShardLayout {
            dtype: self.config.dtype,
            encoding: self.config.encoding,
            index: &index,
            labels_of: &labels_of,
            dims: (channels, height as usize, width as usize),
            normalize: spec.as_ref().and_then(|s| s.normalize.clone()),
        };
        let row_bytes = channels * (width * height) as usize * if self.config.dtype == Dtype::F32 { 4 } else { 1 };
        let rows_per_shard = ((self.config.shard_mb << 20) as usize / row_bytes.max(1)).max(1);
        let shards_dir = cx.out_dir.join("shards");
        std::fs::create_dir_all(&shards_dir).map_err(StageError::io("create", &shards_dir))?;
        let mut splits = BTreeMap::new();
        let mut per_class: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for split in SPLITS {
            let mut members: Vec<&Item> = items.iter().zip(&assign).filter(|(_, s)| **s == split).map(|(i, _)| i).collect();
            members.sort_by(|a, b| a.id.cmp(&b.id));
            for item in &members {
                for l in labels_of(item) {
                    *per_class.entry(split.to_string()).or_default().entry(l).or_default() += 1;
                }
            }
            // Rows: each item, then (offline, train only) its augmented copies.
            let mut rows: Vec<(&Item, Option<u32>)> = Vec::new();
            for item in &members {
                rows.push((item, None));
                if split == "train" && offline.is_some() {
                    rows.extend((0..self.config.copies).map(|k| (*item, Some(k))));
                }
            }
            let augmented = self.augmented_copies(cx, &rows, offline, color)?;
            let mut shards = Vec::new();
            for (n, chunk) in rows.chunks(rows_per_shard).enumerate() {
                let file = format!("shards/{split}-{n:05}.safetensors");
                let pixels: Vec<Vec<u8>> = chunk
                    .par_iter()
                    .map(|(item, copy)| match copy {
                        Some(k) => Ok(augmented[&(item.digest, *k)].clone()),
                        None => load_chw(cx, &item.digest, color),
                    })
                    .collect::<Result<_, StageError>>()?;
                layout.write(cx, &file, chunk, &pixels)?;
                let ids = chunk.iter().map(|(i, k)| k.map_or_else(|| i.id.clone(), |k| format!("{}#aug{k}", i.id))).collect();
                let sources = chunk.iter().map(|(i, _)| i.source.clone()).collect();
                let groups = if chunk.iter().any(|(i, _)| i.group.is_some()) {
                    chunk.iter().map(|(i, _)| i.group.clone().unwrap_or_default()).collect()
                } else {
                    Vec::new()
                };
                let reviewed =
                    if chunk.iter().any(|(i, _)| i.reviewed) { chunk.iter().map(|(i, _)| i.reviewed).collect() } else { Vec::new() };
                shards.push(ShardInfo { file, rows: chunk.len(), ids, sources, groups, reviewed });
            }
            splits.insert(split.to_string(), SplitInfo { rows: rows.len(), items: members.len(), shards });
        }

        let manifest = ShardManifest {
            format: "kiln-shards/1".into(),
            layout: "NCHW".into(),
            transform: spec.as_ref().map(|s| s.transform.clone()),
            dtype: self.config.dtype,
            channels,
            height,
            width,
            encoding: self.config.encoding,
            classes: classes.clone(),
            normalization: spec.as_ref().and_then(|s| s.normalize.clone()),
            normalization_applied: self.config.dtype == Dtype::F32 && spec.as_ref().is_some_and(|s| s.normalize.is_some()),
            augmentation: spec.as_ref().filter(|s| !s.augment.is_identity()).map(|s| serde_json::json!({ "mode": s.augmentation, "spec": s.augment, "copies": if offline.is_some() { self.config.copies } else { 0 } })),
            splits,
        };
        let summary: Vec<String> = SPLITS.iter().map(|s| format!("{s}: {} rows", manifest.splits[*s].rows)).collect();
        cx.reporter.summary(cx.stage, &[summary.join(", ")]);
        if !leakage.is_empty() {
            cx.reporter.warn(&format!(
                "stage `{}`: {} duplicate groups straddle splits (see convert_report.json)",
                cx.stage,
                leakage.len()
            ));
        }
        let class_to_index: BTreeMap<&str, usize> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
        io::write_json(cx, "manifest.json", &manifest)?;
        io::write_json(cx, "class_to_index.json", &class_to_index)?;
        io::write_json(cx, "convert_report.json", &Report { per_class, leakage })
    }
}

impl ConvertStage {
    /// Split per item, and the duplicate groups found on more than one side.
    fn assign_splits(
        &self,
        seed: u64,
        items: &[Item],
        classes_of: &dyn Fn(&Item) -> Vec<usize>,
        classes: usize,
    ) -> (Vec<&'static str>, Vec<String>) {
        let class_of = |i: &Item| classes_of(i)[0];
        let s = &self.config.split;
        let group_of = |i: &Item| i.group.clone().unwrap_or_else(|| i.id.clone());
        let mut assign: Vec<&'static str> = vec!["train"; items.len()];
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (k, item) in items.iter().enumerate() {
            groups.entry(group_of(item)).or_default().push(k);
        }
        let mut leakage = Vec::new();
        // Which groups are free to place, by class, and how many items each split wants.
        let mut free: BTreeMap<usize, Vec<&Vec<usize>>> = BTreeMap::new();
        if s.from_items {
            for (k, item) in items.iter().enumerate() {
                assign[k] = match item.split.as_deref() {
                    Some("test") => "test",
                    Some("val" | "valid" | "validation") => "val",
                    _ => "train",
                };
            }
            for (name, members) in &groups {
                let sides: std::collections::BTreeSet<&str> = members.iter().map(|&k| assign[k]).collect();
                if sides.len() > 1 {
                    leakage.push(name.clone());
                } else if sides.contains("train") && s.val > 0.0 {
                    free.entry(class_of(&items[members[0]])).or_default().push(members);
                }
            }
        } else {
            for members in groups.values() {
                free.entry(class_of(&items[members[0]])).or_default().push(members);
            }
        }
        if self.config.encoding == Encoding::MultiHot {
            // Every free group at once, each labelled with all its items' classes.
            let free: Vec<&Vec<usize>> = free.into_values().flatten().collect();
            let units: Vec<stratify::Group> = free
                .iter()
                .map(|members| {
                    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
                    for &k in members.iter() {
                        for c in classes_of(&items[k]) {
                            *counts.entry(c).or_default() += 1;
                        }
                    }
                    stratify::Group { items: members.len(), labels: counts.into_iter().collect() }
                })
                .collect();
            let shares = if s.from_items { [0.0, s.val, 1.0 - s.val] } else { [s.test, s.val, s.train] };
            let sides = ["test", "val", "train"];
            if shares.iter().any(|v| *v > 0.0) {
                for (members, j) in free.iter().zip(stratify::iterative(&units, classes, &shares, seed)) {
                    for &k in members.iter() {
                        assign[k] = sides[j];
                    }
                }
            }
            return (assign, leakage);
        }
        for (class, mut class_groups) in free {
            let mut rng = Rng::for_item(seed, "convert-split", class as u64);
            rng.shuffle(&mut class_groups);
            let total: usize = class_groups.iter().map(|g| g.len()).sum();
            // Wanted item counts: test and val first, the rest is train.
            let (want_test, want_val) = if s.from_items {
                (0, (total as f64 * s.val).round() as usize)
            } else {
                ((total as f64 * s.test).round() as usize, (total as f64 * s.val).round() as usize)
            };
            let (mut test, mut val) = (0, 0);
            for g in class_groups {
                let side = if test < want_test {
                    test += g.len();
                    "test"
                } else if val < want_val {
                    val += g.len();
                    "val"
                } else {
                    "train"
                };
                for &k in g {
                    assign[k] = side;
                }
            }
        }
        (assign, leakage)
    }

    /// Offline augmentation: each (training image, copy) drawn from its own seeded stream
    /// and memoised by (image digest, augmentation spec and copy number).
    fn augmented_copies(
        &self,
        cx: &StageContext<'_>,
        rows: &[(&Item, Option<u32>)],
        spec: Option<&Spec>,
        color: ColorMode,
    ) -> Result<HashMap<(Digest, u32), Vec<u8>>, StageError> {
        let Some(spec) = spec else { return Ok(HashMap::new()) };
        let wanted: Vec<(Digest, u32)> = rows.iter().filter_map(|(i, k)| k.map(|k| (i.digest, k))).collect();
        let augment = serde_json::to_string(&spec.augment).expect("augment spec serialises");
        let mut out = HashMap::new();
        // One memo operation per copy number: the key of each entry is the image digest.
        for k in 0..self.config.copies {
            let digests: Vec<Digest> = wanted.iter().filter(|(_, c)| *c == k).map(|(d, _)| *d).collect();
            let op = Digest::of_bytes(format!("augment v1 seed={} copy={k} {augment}", cx.seed).as_bytes());
            let results = cx
                .cache
                .state()
                .memo()
                .map(&digests, &op, |n| {
                    let bytes = cx.cache.read_blob(&digests[n]).map_err(|e| e.to_string())?;
                    let (_, img) = imaging::decode(&bytes, &DecodeLimits::default()).map_err(|e| e.to_string())?;
                    let mut rng = Rng::for_item(cx.seed, &format!("augment-{}", digests[n]), u64::from(k));
                    Ok::<_, String>(to_chw(&spec.augment.apply(img, &mut rng), color))
                })
                .map_err(|e| StageError::Failed(e.to_string()))?;
            for (d, r) in digests.into_iter().zip(results) {
                out.insert((d, k), r.map_err(StageError::Failed)?);
            }
        }
        Ok(out)
    }
}

/// What every shard of one convert run shares.
struct ShardLayout<'a> {
    dtype: Dtype,
    encoding: Encoding,
    index: &'a HashMap<&'a str, usize>,
    labels_of: &'a dyn Fn(&Item) -> Vec<String>,
    /// (channels, height, width)
    dims: (usize, usize, usize),
    normalize: Option<Normalize>,
}

impl ShardLayout<'_> {
    fn write(&self, cx: &StageContext<'_>, file: &str, rows: &[(&Item, Option<u32>)], pixels: &[Vec<u8>]) -> Result<(), StageError> {
        let (c, h, w) = self.dims;
        let (index, labels_of) = (self.index, self.labels_of);
        let n = rows.len();
        let fail = |e: String| StageError::Failed(format!("shard `{file}`: {e}"));
        let images: Vec<u8> = match self.dtype {
            Dtype::U8 => pixels.concat(),
            Dtype::F32 => {
                let (mean, std) = self.normalize.as_ref().map_or((vec![0.0; c], vec![1.0; c]), |n| (n.mean.clone(), n.std.clone()));
                // Rows are stored CHW already; normalise each plane with its channel's values.
                pixels
                    .iter()
                    .flat_map(|chw| {
                        let hwc = chw_to_hwc(chw, c);
                        crate::imaging::transform::normalize_chw(&hwc, c, &mean, &std)
                    })
                    .flat_map(f32::to_le_bytes)
                    .collect()
            }
        };
        let k = index.len();
        let (labels, label_shape, label_dtype): (Vec<u8>, Vec<usize>, safetensors::Dtype) = match self.encoding {
            Encoding::Index => (
                rows.iter().flat_map(|(i, _)| (index[labels_of(i)[0].as_str()] as i64).to_le_bytes()).collect(),
                vec![n],
                safetensors::Dtype::I64,
            ),
            Encoding::OneHot | Encoding::MultiHot => {
                let mut m = vec![0f32; n * k];
                for (r, (i, _)) in rows.iter().enumerate() {
                    for l in labels_of(i) {
                        m[r * k + index[l.as_str()]] = 1.0;
                    }
                }
                (m.iter().flat_map(|v| v.to_le_bytes()).collect(), vec![n, k], safetensors::Dtype::F32)
            }
        };
        let image_dtype = if self.dtype == Dtype::F32 { safetensors::Dtype::F32 } else { safetensors::Dtype::U8 };
        let tensors = [
            ("images", safetensors::tensor::TensorView::new(image_dtype, vec![n, c, h, w], &images).map_err(|e| fail(e.to_string()))?),
            ("labels", safetensors::tensor::TensorView::new(label_dtype, label_shape, &labels).map_err(|e| fail(e.to_string()))?),
        ];
        let bytes = safetensors::serialize(tensors, None).map_err(|e| fail(e.to_string()))?;
        let path = cx.out_dir.join(file);
        std::fs::write(&path, bytes).map_err(StageError::io("write", &path))
    }
}

/// An image's pixels in CHW order (one plane per channel).
fn to_chw(img: &image::DynamicImage, color: ColorMode) -> Vec<u8> {
    let (hwc, _) = pixels(img, color);
    let c = color.channels();
    if c == 1 {
        return hwc.into_owned();
    }
    let plane = hwc.len() / c;
    let mut chw = vec![0u8; hwc.len()];
    for (p, px) in hwc.chunks_exact(c).enumerate() {
        for (ch, v) in px.iter().enumerate() {
            chw[ch * plane + p] = *v;
        }
    }
    chw
}

fn chw_to_hwc(chw: &[u8], c: usize) -> Vec<u8> {
    let plane = chw.len() / c.max(1);
    (0..plane).flat_map(|p| (0..c).map(move |ch| chw[ch * plane + p])).collect()
}

fn load_chw(cx: &StageContext<'_>, digest: &Digest, color: ColorMode) -> Result<Vec<u8>, StageError> {
    let bytes = cx.cache.read_blob(digest)?;
    let (_, img) =
        imaging::decode(&bytes, &DecodeLimits::default()).map_err(|e| StageError::Failed(format!("image {}: {e}", digest.short())))?;
    Ok(to_chw(&img, color))
}
