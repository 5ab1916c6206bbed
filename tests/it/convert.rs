//! preprocess → label → convert through the CLI, on images kiln draws itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::support::{plain_ok, read_json, workspace_with};

const SHAPES: &str = r#"
[pipeline]
name = "shapes"
seed = 11

[stages.collect]
kind = "collect"
[[stages.collect.sources]]
type = "synthetic"
count = 200
size = 32

[stages.clean]
kind = "clean"
inputs = ["collect"]

[stages.preprocess]
kind = "preprocess"
inputs = ["clean"]
size = [16, 16]
normalize = { mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25] }

[stages.label]
kind = "label"
inputs = ["preprocess"]

[stages.convert]
kind = "convert"
inputs = ["label"]
split = { train = 0.7, val = 0.15, test = 0.15 }
"#;

/// Split → row ids, from the manifest.
fn rows(ws: &Path, pipeline: &str) -> BTreeMap<String, Vec<String>> {
    let m = read_json(ws.join(format!("outputs/{pipeline}/convert/manifest.json")));
    m["splits"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(split, info)| {
            (
                split.clone(),
                info["shards"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|s| s["ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()))
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn splits_are_disjoint_stratified_and_reproducible() {
    let a = workspace_with("kiln.toml", SHAPES);
    plain_ok(a.path(), &["run"]);
    let splits = rows(a.path(), "shapes");
    let all: Vec<&String> = splits.values().flatten().collect();
    let unique: BTreeSet<&String> = all.iter().copied().collect();
    assert_eq!(all.len(), 200);
    assert_eq!(unique.len(), 200, "no item in two splits");

    // 50 items per shape: 15% is 7.5, so 7 or 8 per class in val and test.
    let report = read_json(a.path().join("outputs/shapes/convert/convert_report.json"));
    for split in ["val", "test"] {
        for (class, n) in report["per_class"][split].as_object().unwrap() {
            let n = n.as_u64().unwrap();
            assert!((7..=8).contains(&n), "{split}/{class}: {n} items, want 7.5 ± 1");
        }
    }

    // The shard holds what the manifest says, in NCHW, labels as class indices.
    let bytes = std::fs::read(a.path().join("outputs/shapes/convert/shards/train-00000.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let images = st.tensor("images").unwrap();
    assert_eq!(images.shape(), [splits["train"].len(), 3, 16, 16]);
    assert_eq!(images.dtype(), safetensors::Dtype::U8);
    let labels = st.tensor("labels").unwrap();
    assert_eq!(labels.dtype(), safetensors::Dtype::I64);
    let classes = read_json(a.path().join("outputs/shapes/convert/class_to_index.json"));
    assert_eq!(classes, serde_json::json!({"circle": 0, "square": 1, "star": 2, "triangle": 3}));

    // Same manifest and seed in another place: the same bytes.
    let b = workspace_with("kiln.toml", SHAPES);
    plain_ok(b.path(), &["run"]);
    let digest = |ws: &Path| {
        let lock: toml::Table = toml::from_str(&std::fs::read_to_string(ws.join("kiln.lock")).unwrap()).unwrap();
        lock["stages"]["convert"]["artifact"].as_str().unwrap().to_string()
    };
    assert_eq!(digest(a.path()), digest(b.path()), "deterministic output digests for a fixed seed");

    // Another seed, another split.
    std::fs::write(b.path().join("kiln.toml"), SHAPES.replace("seed = 11", "seed = 12")).unwrap();
    plain_ok(b.path(), &["run"]);
    assert_ne!(rows(b.path(), "shapes")["test"], splits["test"]);
}

#[test]
fn f32_shards_are_normalised_and_one_hot() {
    let ws = workspace_with("kiln.toml", &SHAPES.replace("split = {", "dtype = \"f32\"\nencoding = \"one_hot\"\nsplit = {"));
    plain_ok(ws.path(), &["run"]);
    let bytes = std::fs::read(ws.path().join("outputs/shapes/convert/shards/val-00000.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let images = st.tensor("images").unwrap();
    let values: Vec<f32> = images.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    // (x/255 − 0.5) / 0.25 lies in [−2, 2].
    assert!(values.iter().all(|v| (-2.0..=2.0).contains(v)));
    assert!(values.iter().any(|v| *v < -1.0) && values.iter().any(|v| *v > 1.0));
    let labels = st.tensor("labels").unwrap();
    assert_eq!(labels.shape()[1], 4);
    let onehot: Vec<f32> = labels.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert!(onehot.chunks(4).all(|row| row.iter().sum::<f32>() == 1.0));
    assert_eq!(read_json(ws.path().join("outputs/shapes/convert/manifest.json"))["normalization_applied"], true);
}

fn png(seed: u64) -> Vec<u8> {
    let img = kiln::imaging::synth::item(seed, seed, 24, &kiln::imaging::synth::SHAPES, 10.0).1;
    kiln::imaging::encode_png(&img)
}

#[test]
fn duplicate_groups_stay_together_and_folder_splits_report_leakage() {
    let ws = tempfile::tempdir().unwrap();
    for i in 0..60u64 {
        let class = ["a", "b"][(i % 2) as usize];
        let split = if i % 5 == 0 { "test" } else { "train" };
        std::fs::create_dir_all(ws.path().join(format!("data/{split}/{class}"))).unwrap();
        std::fs::write(ws.path().join(format!("data/{split}/{class}/{i}.png")), png(i)).unwrap();
    }
    // Copies of train images: one more in train (a group), one planted in test (leakage).
    std::fs::copy(ws.path().join("data/train/b/1.png"), ws.path().join("data/train/b/1_copy.png")).unwrap();
    std::fs::copy(ws.path().join("data/train/b/3.png"), ws.path().join("data/test/b/3_leaked.png")).unwrap();
    let manifest = |split: &str| {
        format!(
            "[stages.collect]\nkind = \"collect\"\n[[stages.collect.sources]]\ntype = \"dir\"\npath = \"data\"\nlayout = \"split/class\"\n\n[stages.clean]\nkind = \"clean\"\ninputs = [\"collect\"]\n[stages.clean.checks]\nexact_duplicates = {{ policy = \"keep\" }}\n\n[stages.label]\nkind = \"label\"\ninputs = [\"clean\"]\n\n[stages.convert]\nkind = \"convert\"\ninputs = [\"label\"]\nsplit = {split}\n"
        )
    };
    std::fs::write(ws.path().join("kiln.toml"), manifest("{ train = 0.5, val = 0.0, test = 0.5 }")).unwrap();
    plain_ok(ws.path(), &["run"]);
    let side = |rows: &BTreeMap<String, Vec<String>>, id: &str| {
        rows.iter().find(|(_, ids)| ids.iter().any(|i| i == id)).map(|(s, _)| s.clone()).unwrap()
    };
    let r = rows(ws.path(), "kiln");
    assert_eq!(side(&r, "data/train/b/1.png"), side(&r, "data/train/b/1_copy.png"), "a duplicate group is never split");
    assert_eq!(side(&r, "data/train/b/3.png"), side(&r, "data/test/b/3_leaked.png"));

    std::fs::write(ws.path().join("kiln.toml"), manifest("{ from_items = true, val = 0.1 }")).unwrap();
    let out = plain_ok(ws.path(), &["run"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 duplicate groups straddle splits"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = read_json(ws.path().join("outputs/kiln/convert/convert_report.json"));
    assert_eq!(report["leakage"], serde_json::json!(["data/test/b/3_leaked.png"]));
    let r = rows(ws.path(), "kiln");
    assert_eq!(r["test"].len(), 13, "folder splits are kept: 12 test images and the leaked copy");
    assert!(!r["val"].is_empty() && r["val"].iter().all(|id| id.starts_with("data/train/")), "val is carved out of train");
}

#[test]
fn changing_augmentation_redoes_only_augmentation_for_the_training_split() {
    let ws = tempfile::tempdir().unwrap();
    let manifest = |rotation: f64| {
        SHAPES.replace("normalize = {", &format!("augmentation = \"offline\"\naugment = {{ rotation_range = {rotation:.1}, horizontal_flip = true, fill_mode = \"reflect\" }}\nnormalize = {{")).replace(
            "split = { train = 0.7, val = 0.15, test = 0.15 }",
            "split = { train = 0.7, val = 0.15, test = 0.15 }\ncopies = 2",
        )
    };
    std::fs::write(ws.path().join("kiln.toml"), manifest(10.0)).unwrap();
    plain_ok(ws.path(), &["run"]);
    let r = rows(ws.path(), "shapes");
    let train_items = r["train"].iter().filter(|id| !id.contains("#aug")).count();
    assert_eq!(r["train"].len(), train_items * 3, "each training image plus two augmented copies");
    assert!(r["test"].iter().chain(&r["val"]).all(|id| !id.contains("#aug")), "never augment val or test");

    std::fs::write(ws.path().join("kiln.toml"), manifest(20.0)).unwrap();
    let stats = ws.path().join("stats.json");
    plain_ok(ws.path(), &["--work-stats", stats.to_str().unwrap(), "run"]);
    let s = read_json(&stats);
    assert_eq!(
        s["memo_misses"].as_u64().unwrap(),
        2 * train_items as u64,
        "only the training split's augmented copies are made again: {s}"
    );
    assert_eq!(s["memo_hits"].as_u64().unwrap(), 200, "every deterministic resize is a memo hit: {s}");
}

#[test]
fn several_labels_per_item_encode_multi_hot() {
    let ws = tempfile::tempdir().unwrap();
    let labels = ["cat", "dog", "cat|dog", "Dog|cat", "dog", "cat"];
    let mut listing = String::from("path,tags\n");
    std::fs::create_dir(ws.path().join("data")).unwrap();
    for (i, l) in labels.iter().enumerate() {
        std::fs::write(ws.path().join(format!("data/{i}.png")), png(100 + i as u64)).unwrap();
        listing.push_str(&format!("{i}.png,{l}\n"));
    }
    std::fs::write(ws.path().join("data/list.csv"), listing).unwrap();
    std::fs::write(
        ws.path().join("kiln.toml"),
        "[stages.collect]\nkind = \"collect\"\n[[stages.collect.sources]]\ntype = \"listing\"\npath = \"data/list.csv\"\nlabel_field = \"tags\"\n\n[stages.label]\nkind = \"label\"\ninputs = [\"collect\"]\nclasses = [\"cat\", \"dog\"]\naliases = { Dog = \"dog\" }\n\n[stages.convert]\nkind = \"convert\"\ninputs = [\"label\"]\nencoding = \"multi_hot\"\nsplit = { train = 1.0, val = 0.0, test = 0.0 }\n",
    )
    .unwrap();
    plain_ok(ws.path(), &["run"]);
    let report = read_json(ws.path().join("outputs/kiln/label/label_report.json"));
    assert_eq!(report["classes"], serde_json::json!([{"class": "cat", "count": 4}, {"class": "dog", "count": 4}]));
    let bytes = std::fs::read(ws.path().join("outputs/kiln/convert/shards/train-00000.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let labels = st.tensor("labels").unwrap();
    assert_eq!(labels.shape(), [6, 2]);
    let rows: Vec<f32> = labels.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let both = rows.chunks(2).filter(|r| r == &[1.0, 1.0]).count();
    assert_eq!(both, 2, "`cat|dog` and `Dog|cat` (an alias) carry both classes: {rows:?}");
}
