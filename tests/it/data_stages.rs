//! collect → clean → label through the CLI, on real images (`../shared/datasets`, skipped
//! when absent) and on images the tests write themselves.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use image::{DynamicImage, RgbImage};

use crate::support::{backdate, crc32, kiln_plain, plain_command, plain_ok, png, read_json, shared, text, unwrap_diagnostic, write};

/// The items of a JSON-lines file.
fn items(path: PathBuf) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn jpeg(img: &DynamicImage, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).encode_image(&img.to_rgb8()).unwrap();
    out
}

const PIPELINE: &str = r#"
[pipeline]
name = "dirty"

[stages.collect]
kind = "collect"
[[stages.collect.sources]]
type = "dir"
path = "photos"

[stages.clean]
kind = "clean"
inputs = ["collect"]
[stages.clean.checks]
wrong_extension = { policy = "keep" }
blurry = { policy = "off" }

[stages.label]
kind = "label"
inputs = ["clean"]
from = "folder"
aliases = { Cats = "chelsea" }
conflicts = "drop"
"#;

/// A real image set (quarters of the five shared photos, one class per photo) with every
/// kind of fault planted: each must be found, for the right reason, and nothing else lost.
#[test]
fn every_planted_fault_is_found_and_nothing_else_is_dropped() {
    let Some(photos) = shared("datasets/photos") else { return };
    let ws = tempfile::tempdir().unwrap();
    let root = ws.path().join("photos");
    let mut clean_tiles = BTreeSet::new();
    let mut tiles: BTreeMap<(String, usize), DynamicImage> = BTreeMap::new();
    for entry in std::fs::read_dir(&photos).unwrap().flatten() {
        let class = entry.path().file_stem().unwrap().to_string_lossy().into_owned();
        let img = image::open(entry.path()).unwrap();
        let (w, h) = (img.width() / 2, img.height() / 2);
        for k in 0..4 {
            let tile = img.crop_imm((k as u32 % 2) * w, (k as u32 / 2) * h, w, h);
            // One tile of the cat photo lives in a folder with an alias name.
            let folder = if class == "chelsea" && k == 3 { "Cats".to_string() } else { class.clone() };
            write(&root.join(&folder).join(format!("t{k}.jpg")), &jpeg(&tile, 92));
            clean_tiles.insert(format!("photos/{folder}/t{k}.jpg"));
            tiles.insert((class.clone(), k), tile);
        }
    }
    assert_eq!(clean_tiles.len(), 20, "five photos, four tiles each");
    let t = |class: &str, k: usize| &tiles[&(class.to_string(), k)];

    let mut planted: BTreeMap<String, &str> = BTreeMap::new();
    let mut plant = |rel: &str, bytes: Vec<u8>, check: &'static str| {
        write(&root.join(rel), &bytes);
        planted.insert(format!("photos/{rel}"), check);
    };
    plant("astronaut/t0_copy.jpg", std::fs::read(root.join("astronaut/t0.jpg")).unwrap(), "exact_duplicates");
    let small =
        t("coffee", 1).resize_exact(t("coffee", 1).width() * 3 / 5, t("coffee", 1).height() * 3 / 5, image::imageops::FilterType::Lanczos3);
    plant("coffee/t1_small.jpg", jpeg(&small, 92), "near_duplicates");
    plant("retina/t2_reencoded.jpg", jpeg(t("retina", 2), 40), "near_duplicates");
    let (w, h) = (t("hubble_deep_field", 3).width(), t("hubble_deep_field", 3).height());
    plant(
        "hubble_deep_field/t3_crop.jpg",
        jpeg(&t("hubble_deep_field", 3).crop_imm(w / 50, h / 50, w - w / 25, h - h / 25), 92),
        "near_duplicates",
    );
    // Brighter by 20 levels, and enlarged 1.5× into a lossless PNG: copies all the same, and
    // the JPEG original stays over the PNG (native resolution before lossless).
    plant("astronaut/t1_brighter.jpg", jpeg(&t("astronaut", 1).brighten(20), 92), "near_duplicates");
    let big = t("coffee", 2).resize_exact(
        t("coffee", 2).width() * 3 / 2,
        t("coffee", 2).height() * 3 / 2,
        image::imageops::FilterType::CatmullRom,
    );
    plant("coffee/t2_upscaled.png", png(&big), "near_duplicates");
    let whole = std::fs::read(root.join("chelsea/t0.jpg")).unwrap();
    plant("chelsea/t0_truncated.jpg", whole[..whole.len() / 2].to_vec(), "decode:truncated");
    plant("chelsea/empty.jpg", Vec::new(), "decode:zero-byte");
    // Identical broken files are each broken, not copies of one another.
    plant("coffee/empty.jpg", Vec::new(), "decode:zero-byte");
    plant("coffee/notes.jpg", b"shopping list: beans, milk, filters".to_vec(), "decode:not an image");
    let mut bomb = png(&DynamicImage::ImageRgb8(RgbImage::new(1, 1)));
    bomb[16..24].copy_from_slice(&[0, 1, 0x86, 0xA0, 0, 1, 0x86, 0xA0]); // 100 000 x 100 000
    let crc = crc32(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    plant("astronaut/bomb.png", bomb, "decode:exceeds");
    // A PNG that claims to be a JPEG: reported, kept (policy "keep").
    write(&root.join("astronaut/wrong_ext.jpg"), &png(&kiln::imaging::synth::draw(kiln::imaging::synth::Shape::Star, 64, 5)));
    // The same retina tile filed under the cat class: an exact duplicate whose labels
    // conflict, so the label stage drops the group.
    write(&root.join("chelsea/retina_copy.jpg"), &std::fs::read(root.join("retina/t0.jpg")).unwrap());
    // A re-encoded copy filed under another class: a label conflict to review, not removed.
    write(&root.join("hubble_deep_field/retina_t1.jpg"), &jpeg(t("retina", 1), 60));
    std::fs::write(ws.path().join("kiln.toml"), PIPELINE).unwrap();

    let out = plain_ok(ws.path(), &["run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("exact_duplicates: 2 found, 2 removed"), "{stderr}");

    let report = read_json(ws.path().join("outputs/dirty/clean/clean_report.json"));
    let findings: Vec<(String, String, String)> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (f["id"].as_str().unwrap().to_string(), f["check"].as_str().unwrap().to_string(), f["reason"].as_str().unwrap().to_string())
        })
        .collect();
    for (id, expected) in &planted {
        let (check, reason) = expected.split_once(':').unwrap_or((expected, ""));
        let found =
            findings.iter().find(|(fid, _, _)| fid == id).unwrap_or_else(|| panic!("planted fault {id} not found in {findings:#?}"));
        assert_eq!(found.1, check, "{id}: {found:?}");
        assert!(found.2.contains(reason), "{id}: reason {:?} should mention {reason:?}", found.2);
    }
    let wrong_ext = findings.iter().find(|(id, _, _)| id == "photos/astronaut/wrong_ext.jpg").expect("wrong extension reported");
    assert_eq!(wrong_ext.1, "wrong_extension");

    let kept: BTreeSet<String> =
        items(ws.path().join("outputs/dirty/clean/items.jsonl")).iter().map(|i| i["id"].as_str().unwrap().to_string()).collect();
    // The retina tile and its copy are one exact-duplicate group: the first id stays.
    let mut expected_kept = clean_tiles.clone();
    expected_kept.remove("photos/retina/t0.jpg");
    expected_kept.insert("photos/chelsea/retina_copy.jpg".into());
    expected_kept.insert("photos/astronaut/wrong_ext.jpg".into());
    expected_kept.insert("photos/hubble_deep_field/retina_t1.jpg".into());
    assert_eq!(kept, expected_kept, "exactly the planted faults are removed");
    let cross = report["cross_class_groups"].to_string();
    assert!(cross.contains("photos/hubble_deep_field/retina_t1.jpg") && cross.contains("photos/retina/t1.jpg"), "{cross}");
    for id in
        planted.keys().filter(|id| !id.contains("bomb") && !id.contains("notes") && !id.contains("empty") && !id.contains("truncated"))
    {
        assert!(report["duplicate_groups"].to_string().contains(id.as_str()), "{id} is listed in a duplicate group");
    }
    let quarantined = std::fs::read_dir(ws.path().join("outputs/dirty/clean/quarantine/near_duplicates")).unwrap().count();
    assert_eq!(quarantined, 5, "quarantined images are there to look at");

    let labels = read_json(ws.path().join("outputs/dirty/label/label_report.json"));
    assert_eq!(labels["conflicts"].as_array().unwrap().len(), 1, "{labels:#}");
    assert_eq!(labels["conflicts"][0]["id"], "photos/chelsea/retina_copy.jpg");
    assert!(labels["aliases_applied"].as_u64().unwrap() >= 1);
    let labelled = items(ws.path().join("outputs/dirty/label/items.jsonl"));
    let cats = labelled.iter().find(|i| i["id"] == "photos/Cats/t3.jpg").expect("alias item kept");
    assert_eq!(cats["label"], "chelsea", "the alias folder maps to the canonical class");
    let classes = read_json(ws.path().join("outputs/dirty/label/classes.json"));
    assert_eq!(classes, serde_json::json!(["astronaut", "chelsea", "coffee", "hubble_deep_field", "retina"]));
    assert_eq!(labelled.len(), 21, "22 kept images minus the conflicting retina copy");

    // `kiln report` lists the offending files with reason and score.
    let out = plain_ok(ws.path(), &["report", "clean"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("photos/chelsea/t0_truncated.jpg") && listing.contains("truncated"), "{listing}");
}

/// Deterministic, distinct 16×16 images without depending on any dataset.
fn noise_png(seed: u64) -> Vec<u8> {
    let mut rng = kiln::rng::Rng::new(seed);
    let img = RgbImage::from_fn(16, 16, |_, _| image::Rgb([rng.below(256) as u8, rng.below(256) as u8, rng.below(256) as u8]));
    png(&DynamicImage::ImageRgb8(img))
}

#[test]
fn clean_counts_removals_per_class_and_warns_when_a_class_loses_a_share() {
    // Class `a`: one image six times over and four others (five exact copies dropped, half
    // the class); class `b`: ten distinct images. The total loss is 25 %; the skew is what
    // matters, and it is said per class.
    let ws = tempfile::tempdir().unwrap();
    for k in 0..10u64 {
        let seed = if k < 6 { 1 } else { k };
        write(&ws.path().join(format!("data/a/{k}.png")), &noise_png(seed));
        write(&ws.path().join(format!("data/b/{k}.png")), &noise_png(100 + k));
    }
    std::fs::write(
        ws.path().join("kiln.toml"),
        "[stages.collect]\nkind = \"collect\"\n[[stages.collect.sources]]\ntype = \"dir\"\npath = \"data\"\n\n[stages.clean]\nkind = \"clean\"\ninputs = [\"collect\"]\n",
    )
    .unwrap();
    let out = plain_ok(ws.path(), &["run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("removed 5 of 10 `a` images (50 %: 5 exact_duplicates), above max_class_loss = 5 %"), "{stderr}");
    assert!(!stderr.contains("`b` images"), "{stderr}");
    let report = read_json(ws.path().join("outputs/kiln/clean/clean_report.json"));
    assert_eq!(report["per_class"]["a"]["removed"], 5);
    assert_eq!(report["per_class"]["a"]["by_check"]["exact_duplicates"], 5);
    assert_eq!(report["per_class"]["b"]["removed"], 0);
    let shown = plain_ok(ws.path(), &["report", "kiln.toml", "clean"]);
    let stdout = String::from_utf8_lossy(&shown.stdout);
    assert!(stdout.contains("class a") && stdout.contains("5 of 10 removed (50.0 %: 5 exact_duplicates)"), "{stdout}");

    // The threshold is validated, and raising it silences the warning without rerunning
    // anything: a warning is not a result.
    let manifest = std::fs::read_to_string(ws.path().join("kiln.toml")).unwrap();
    std::fs::write(
        ws.path().join("kiln.toml"),
        manifest.replace("inputs = [\"collect\"]\n", "inputs = [\"collect\"]\nmax_class_loss = 1.5\n"),
    )
    .unwrap();
    let bad = kiln_plain(ws.path(), &["run"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    std::fs::write(
        ws.path().join("kiln.toml"),
        manifest.replace("inputs = [\"collect\"]\n", "inputs = [\"collect\"]\nmax_class_loss = 0.6\n"),
    )
    .unwrap();
    let again = plain_ok(ws.path(), &["run"]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("clean                    cached"), "{}", text(&again));
}

#[test]
fn adding_ten_images_to_ten_thousand_does_ten_images_of_work() {
    let ws = tempfile::tempdir().unwrap();
    for i in 0..10_000u64 {
        let p = ws.path().join(format!("data/c{}/img{i:05}.png", i % 4));
        write(&p, &noise_png(i));
        backdate(&p);
    }
    std::fs::write(
        ws.path().join("kiln.toml"),
        "[stages.collect]\nkind = \"collect\"\n[[stages.collect.sources]]\ntype = \"dir\"\npath = \"data\"\n\n[stages.clean]\nkind = \"clean\"\ninputs = [\"collect\"]\n[stages.clean.checks]\nnear_duplicates = { policy = \"off\" }\n\n[stages.label]\nkind = \"label\"\ninputs = [\"clean\"]\n",
    )
    .unwrap();
    let stats = ws.path().join("stats.json");
    plain_ok(ws.path(), &["--work-stats", stats.to_str().unwrap(), "run"]);
    let first = read_json(stats.clone());
    assert_eq!(first["memo_misses"], 20_000, "the first run probes every image twice (header, full decode): {first}");

    for i in 10_000..10_010u64 {
        let p = ws.path().join(format!("data/c{}/img{i:05}.png", i % 4));
        write(&p, &noise_png(i));
        backdate(&p);
    }
    let out = plain_ok(ws.path(), &["--work-stats", stats.to_str().unwrap(), "run"]);
    let second = read_json(stats.clone());
    assert_eq!(second["files_hashed"], 10, "only the new files are read: {second}");
    assert_eq!(second["memo_misses"], 20, "only the new images are probed and decoded: {second}");
    assert_eq!(second["memo_hits"], 20_000);
    assert!(String::from_utf8_lossy(&out.stdout).contains("collect                  ran"), "{}", text(&out));
    assert_eq!(items(ws.path().join("outputs/kiln/label/items.jsonl")).len(), 10_010);
}

#[test]
fn sources_idx_listing_and_pixels_with_broken_entries_and_odd_names() {
    use std::io::Write;
    let ws = tempfile::tempdir().unwrap();
    // IDX: three 2x2 images and their labels, gzipped like the MNIST files.
    let mut idx = vec![0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 2];
    idx.extend([0, 50, 100, 150, 200, 250, 0, 10, 20, 30, 40, 50]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&idx).unwrap();
    write(&ws.path().join("idx/images.gz"), &gz.finish().unwrap());
    write(&ws.path().join("idx/labels"), &[0, 0, 8, 1, 0, 0, 0, 3, 1, 0, 1]);
    // A listing with labels, one missing file.
    write(&ws.path().join("list/a.png"), &noise_png(1));
    write(&ws.path().join("list/b.png"), &noise_png(2));
    std::fs::write(ws.path().join("list/files.csv"), "path,label\na.png,yes\nb.png,no\nmissing.png,no\n").unwrap();
    // A folder with a non-UTF-8 file name and a broken symlink.
    use std::os::unix::ffi::OsStrExt;
    let odd = ws.path().join("dir/x").join(std::ffi::OsStr::from_bytes(b"caf\xe9.png"));
    write(&odd, &noise_png(3));
    std::os::unix::fs::symlink(ws.path().join("nowhere.png"), ws.path().join("dir/x/dangling.png")).unwrap();
    std::fs::write(ws.path().join("pixels.csv"), "0,1,2,3,cat\n4,5,6,7,dog\n1,2,3,oops\n").unwrap();
    std::fs::write(
        ws.path().join("kiln.toml"),
        r#"
[stages.collect]
kind = "collect"
[[stages.collect.sources]]
type = "idx"
name = "mnistish"
images = "idx/images.gz"
labels = "idx/labels"
classes = ["zero", "one"]
split = "train"
[[stages.collect.sources]]
type = "listing"
path = "list/files.csv"
label_field = "label"
[[stages.collect.sources]]
type = "dir"
path = "dir"
[[stages.collect.sources]]
type = "pixels"
path = "pixels.csv"
width = 2
height = 2
max_value = 7
"#,
    )
    .unwrap();
    let out = plain_ok(ws.path(), &["run"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("could not be collected"), "{}", text(&out));
    let collected = items(ws.path().join("outputs/kiln/collect/items.jsonl"));
    let by_id: BTreeMap<&str, &serde_json::Value> = collected.iter().map(|i| (i["id"].as_str().unwrap(), i)).collect();
    assert_eq!(
        by_id.keys().copied().collect::<Vec<_>>(),
        [
            "dir/x/caf%E9.png",
            "files/a.png",
            "files/b.png",
            "mnistish/00000",
            "mnistish/00001",
            "mnistish/00002",
            "pixels/00000",
            "pixels/00001"
        ]
    );
    assert_eq!(by_id["mnistish/00001"]["label"], "zero");
    assert_eq!(by_id["mnistish/00002"]["label"], "one");
    assert_eq!(by_id["mnistish/00000"]["split"], "train");
    assert_eq!(by_id["files/a.png"]["label"], "yes");
    assert_eq!(by_id["pixels/00001"]["label"], "dog");
    assert_eq!(by_id["dir/x/caf%E9.png"]["width"], 16);
    let report = read_json(ws.path().join("outputs/kiln/collect/collect_report.json"));
    let problems = report["problems"].to_string();
    assert!(problems.contains("broken symlink") && problems.contains("dangling.png"), "{problems}");
    assert!(problems.contains("missing.png") && problems.contains("pixels.csv:3"), "{problems}");
}

#[test]
fn label_sources_and_policies() {
    let ws = tempfile::tempdir().unwrap();
    for (i, name) in ["cat_01.png", "cat_02.png", "dog_01.png", "Doggo_02.png", "bird_01.png"].iter().enumerate() {
        write(&ws.path().join("flat").join(name), &noise_png(10 + i as u64));
    }
    let manifest = |unknown: &str| {
        format!(
            "[stages.collect]\nkind = \"collect\"\n[[stages.collect.sources]]\ntype = \"dir\"\npath = \"flat\"\nlayout = \"flat\"\n\n[stages.label]\nkind = \"label\"\ninputs = [\"collect\"]\nfrom = \"pattern\"\npattern = '^(?P<label>[A-Za-z]+)_'\nclasses = [\"dog\", \"cat\"]\naliases = {{ Doggo = \"dog\" }}\nunknown = \"{unknown}\"\n"
        )
    };
    std::fs::write(ws.path().join("kiln.toml"), manifest("error")).unwrap();
    let out = kiln_plain(ws.path(), &["run"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 items have labels not in `classes`: `bird`"), "{}", text(&out));

    std::fs::write(ws.path().join("kiln.toml"), manifest("drop")).unwrap();
    plain_ok(ws.path(), &["run"]);
    assert_eq!(
        read_json(ws.path().join("outputs/kiln/label/classes.json")),
        serde_json::json!(["dog", "cat"]),
        "the order of `classes` is kept"
    );
    let report = read_json(ws.path().join("outputs/kiln/label/label_report.json"));
    assert_eq!(report["classes"], serde_json::json!([{"class": "dog", "count": 2}, {"class": "cat", "count": 2}]));
    assert_eq!(report["dropped"][0]["reason"], "label `bird` is not in `classes`");
}

#[test]
fn labels_from_a_mapping_by_digest_majority_conflicts_and_imbalance_warning() {
    let ws = tempfile::tempdir().unwrap();
    let images: Vec<Vec<u8>> = (0..4).map(|i| noise_png(100 + i)).collect();
    // Image 0 appears three times (exact duplicates), image 1..3 once each.
    for (name, img) in [("a.png", 0), ("x_copy.png", 0), ("y_copy.png", 0), ("b.png", 1), ("c.png", 2), ("d.png", 3)] {
        write(&ws.path().join("imgs").join(name), &images[img]);
    }
    let digest = |b: &[u8]| kiln::Digest::of_bytes(b).to_hex();
    // A mapping keyed by content digest gives all copies of image 0 the same label.
    std::fs::write(
        ws.path().join("labels.csv"),
        format!(
            "sha,class\n{},cat\n{},cat\n{},cat\n{},dog\n",
            digest(&images[0]),
            digest(&images[1]),
            digest(&images[2]),
            digest(&images[3])
        ),
    )
    .unwrap();
    // File-name labels for the second variant: two copies of image 0 say `cat`, one `dog`.
    std::fs::write(
        ws.path().join("kiln.toml"),
        r#"
[stages.collect]
kind = "collect"
[[stages.collect.sources]]
type = "dir"
path = "imgs"
layout = "flat"

[stages.clean]
kind = "clean"
inputs = ["collect"]
[stages.clean.checks]
near_duplicates = { policy = "off" }

[stages.by_digest]
kind = "label"
inputs = ["clean"]
from = "mapping"
mapping = { path = "labels.csv", key = "digest", key_field = "sha", label_field = "class" }
imbalance_warning = 2.0

[stages.by_name]
kind = "label"
inputs = ["clean"]
from = "pattern"
pattern = '^(?P<label>[a-z])'
aliases = { a = "cat", b = "cat", c = "cat", d = "dog", x = "cat", y = "dog" }
conflicts = "majority"
"#,
    )
    .unwrap();
    let out = plain_ok(ws.path(), &["run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("classes are imbalanced: the largest has 3 items, the smallest 1"), "{stderr}");
    let report = read_json(ws.path().join("outputs/kiln/by_digest/label_report.json"));
    assert_eq!(report["classes"], serde_json::json!([{"class": "cat", "count": 3}, {"class": "dog", "count": 1}]), "{report:#}");
    // The copies disagree 2 to 1: the majority labels the kept image.
    let report = read_json(ws.path().join("outputs/kiln/by_name/label_report.json"));
    assert_eq!(report["conflicts"].as_array().unwrap().len(), 1, "{report:#}");
    assert_eq!(report["conflicts"][0]["resolution"], "labelled `cat`");
    assert_eq!(report["items_labelled"], 4);
}

/// Runs kiln like [`kiln_plain`], but a run that takes longer than `secs` is killed and fails
/// the test: a collect that hangs on a FIFO must not stall the suite. Output goes to files,
/// so a chatty run cannot block on a full pipe.
fn kiln_within(dir: &Path, args: &[&str], secs: u64) -> Output {
    let logs = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let mut child = plain_command(dir)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "kiln {args:?} did not finish within {secs} s\n--- stdout\n{}--- stderr\n{}",
                String::from_utf8_lossy(&std::fs::read(&out_path).unwrap_or_default()),
                String::from_utf8_lossy(&std::fs::read(&err_path).unwrap_or_default())
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    Output { status, stdout: std::fs::read(&out_path).unwrap(), stderr: std::fs::read(&err_path).unwrap() }
}

fn mkfifo(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

/// The ids collect wrote, sorted.
fn collected_ids(ws: &Path) -> Vec<String> {
    let mut ids: Vec<String> =
        items(ws.join("outputs/kiln/collect/items.jsonl")).iter().map(|i| i["id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    ids
}

/// (path, reason) of every entry in `collect_report.json`, sorted.
fn collect_problems(ws: &Path) -> Vec<(String, String)> {
    let report = read_json(ws.join("outputs/kiln/collect/collect_report.json"));
    let mut problems: Vec<(String, String)> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["path"].as_str().unwrap().to_string(), p["reason"].as_str().unwrap().to_string()))
        .collect();
    problems.sort();
    problems
}

fn reason_for<'a>(problems: &'a [(String, String)], path: &str) -> &'a str {
    problems
        .iter()
        .find(|(p, _)| p == path)
        .map(|(_, r)| r.as_str())
        .unwrap_or_else(|| panic!("no problem reported for {path}: {problems:#?}"))
}

const DIR_DATA: &str = "[stages.collect]\nkind = \"collect\"\n[[stages.collect.sources]]\ntype = \"dir\"\npath = \"data\"\n";

#[test]
fn collect_a_symlink_loop_is_one_uncollectable_entry_and_the_rest_is_collected() {
    let ws = tempfile::tempdir().unwrap();
    write(&ws.path().join("data/cat/a.png"), &noise_png(201));
    write(&ws.path().join("data/dog/b.png"), &noise_png(202));
    // Back to the source folder, and back to the workspace above it.
    std::os::unix::fs::symlink("..", ws.path().join("data/cat/loop")).unwrap();
    std::os::unix::fs::symlink("../..", ws.path().join("data/dog/up")).unwrap();
    std::fs::write(ws.path().join("kiln.toml"), DIR_DATA).unwrap();
    let out = kiln_within(ws.path(), &["run"], 60);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(collected_ids(ws.path()), ["data/cat/a.png", "data/dog/b.png"]);
    let problems = collect_problems(ws.path());
    assert_eq!(problems.len(), 2, "one entry per loop: {problems:#?}");
    assert!(reason_for(&problems, "data/cat/loop").contains("symlink loop"), "{problems:#?}");
    assert!(reason_for(&problems, "data/dog/up").contains("symlink loop"), "{problems:#?}");
}

#[test]
fn collect_dir_reports_fifos_sockets_devices_and_links_out_of_the_folder() {
    let ws = tempfile::tempdir().unwrap();
    let secret = noise_png(210);
    write(&ws.path().join("secret.png"), &secret);
    write(&ws.path().join("elsewhere/c.png"), &noise_png(211));
    write(&ws.path().join("data/cat/a.png"), &noise_png(212));
    write(&ws.path().join("data/dog/b.png"), &noise_png(213));
    mkfifo(&ws.path().join("data/cat/pipe.png"));
    let _socket = std::os::unix::net::UnixListener::bind(ws.path().join("data/cat/sock.png")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", ws.path().join("data/cat/zero.png")).unwrap();
    std::os::unix::fs::symlink("../../secret.png", ws.path().join("data/cat/leak.png")).unwrap();
    std::os::unix::fs::symlink("a.png", ws.path().join("data/cat/alias.png")).unwrap();
    std::os::unix::fs::symlink("../elsewhere", ws.path().join("data/ext")).unwrap();
    std::fs::write(ws.path().join("kiln.toml"), DIR_DATA).unwrap();
    let secret_hex = kiln::Digest::of_bytes(&secret).to_hex();
    let secret_blob = ws.path().join(format!("cache/blobs/{}/{}", &secret_hex[..2], &secret_hex[2..]));

    let out = kiln_within(ws.path(), &["run"], 60);
    assert!(out.status.success(), "{}", text(&out));
    // A link that stays inside the folder is followed as before.
    assert_eq!(collected_ids(ws.path()), ["data/cat/a.png", "data/cat/alias.png", "data/dog/b.png"]);
    let problems = collect_problems(ws.path());
    assert_eq!(problems.len(), 5, "{problems:#?}");
    assert!(reason_for(&problems, "data/cat/pipe.png").contains("FIFO"), "{problems:#?}");
    assert!(reason_for(&problems, "data/cat/sock.png").contains("socket"), "{problems:#?}");
    for link in ["data/cat/zero.png", "data/cat/leak.png", "data/ext"] {
        assert!(reason_for(&problems, link).contains("symlink to outside the source"), "{link}: {problems:#?}");
    }
    assert!(reason_for(&problems, "data/cat/leak.png").contains("secret.png"), "the reason names the target: {problems:#?}");
    assert!(!secret_blob.exists(), "a file outside the source must not reach the cache");

    // `follow_links = true` follows links out of the folder; a device is still not read.
    std::fs::write(ws.path().join("kiln.toml"), format!("{DIR_DATA}follow_links = true\n")).unwrap();
    let out = kiln_within(ws.path(), &["run"], 60);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(collected_ids(ws.path()), ["data/cat/a.png", "data/cat/alias.png", "data/cat/leak.png", "data/dog/b.png", "data/ext/c.png"]);
    let problems = collect_problems(ws.path());
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(reason_for(&problems, "data/cat/pipe.png").contains("FIFO"), "{problems:#?}");
    assert!(reason_for(&problems, "data/cat/sock.png").contains("socket"), "{problems:#?}");
    assert!(reason_for(&problems, "data/cat/zero.png").contains("character device"), "{problems:#?}");
    assert!(secret_blob.exists(), "followed on request");
}

#[test]
fn collect_listing_reads_only_regular_files_within_max_bytes() {
    let ws = tempfile::tempdir().unwrap();
    write(&ws.path().join("list/a.png"), &noise_png(220));
    write(&ws.path().join("list/big.png"), &[7u8; 20_000]);
    mkfifo(&ws.path().join("list/pipe.png"));
    std::fs::create_dir_all(ws.path().join("list/sub")).unwrap();
    // The FIFO comes before /dev/zero: a collect without the checks hangs on it (and the
    // test times out) rather than reading /dev/zero until memory runs out.
    std::fs::write(ws.path().join("list/files.csv"), "path,label\na.png,x\nbig.png,x\npipe.png,x\nsub,x\n/dev/zero,x\n").unwrap();
    std::fs::write(
        ws.path().join("kiln.toml"),
        "[stages.collect]\nkind = \"collect\"\n[[stages.collect.sources]]\ntype = \"listing\"\npath = \"list/files.csv\"\nlabel_field = \"label\"\nmax_bytes = 10000\n",
    )
    .unwrap();
    let out = kiln_within(ws.path(), &["run"], 60);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(collected_ids(ws.path()), ["files/a.png"]);
    let problems = collect_problems(ws.path());
    assert_eq!(problems.len(), 4, "{problems:#?}");
    let big = reason_for(&problems, "big.png");
    assert!(big.contains("20000 bytes") && big.contains("max_bytes"), "{problems:#?}");
    assert!(reason_for(&problems, "pipe.png").contains("FIFO"), "{problems:#?}");
    assert!(reason_for(&problems, "sub").contains("directory"), "{problems:#?}");
    assert!(reason_for(&problems, "/dev/zero").contains("character device"), "{problems:#?}");

    // A listing that is itself a FIFO is a clear stage error, not a hang.
    let ws = tempfile::tempdir().unwrap();
    mkfifo(&ws.path().join("list/files.csv"));
    std::fs::write(
        ws.path().join("kiln.toml"),
        "[stages.collect]\nkind = \"collect\"\n[[stages.collect.sources]]\ntype = \"listing\"\npath = \"list/files.csv\"\n",
    )
    .unwrap();
    let out = kiln_within(ws.path(), &["run"], 60);
    assert!(!out.status.success(), "{}", text(&out));
    // Undo any line wrapping of the message.
    let all = unwrap_diagnostic(&text(&out));
    assert!(all.contains("list/files.csv") && all.contains("not a regular file") && all.contains("FIFO"), "{all}");
}

#[test]
fn collect_numeric_options_are_range_checked_when_the_manifest_loads() {
    let manifest = r#"[stages.collect]
kind = "collect"
[[stages.collect.sources]]
type = "synthetic"
count = 10
size = 100000
[[stages.collect.sources]]
type = "synthetic"
count = -5
noise = nan
[[stages.collect.sources]]
type = "http"
listing = "urls/list.csv"
concurrency = 0
timeout_secs = inf
retries = 1000
[[stages.collect.sources]]
type = "pixels"
path = "px/digits.csv"
width = 8
height = 0
max_value = -1.0
[[stages.collect.sources]]
type = "dir"
path = "data"
max_bytes = 0
[[stages.collect.sources]]
type = "pixels"
path = "px/digits.csv"
width = 8
height = 8
label_column = 100
"#;
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("kiln.toml"), manifest).unwrap();
    // Not run: before the check, `size = 100000` tried to allocate 30 GB and aborted.
    let out = kiln_within(ws.path(), &["run"], 60);
    // Undo the diagnostic's line wrapping.
    let err = unwrap_diagnostic(&String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    for (location, message) in [
        ("kiln.toml:6:8", "`size` must be between 8 and 4096 pixels, got 100000"),
        ("kiln.toml:9:9", "`count` must be between 1 and 10000000, got -5"),
        ("kiln.toml:10:9", "`noise` must be between 0 and 255, got nan"),
        ("kiln.toml:14:15", "`concurrency` must be between 1 and 256, got 0"),
        ("kiln.toml:15:16", "`timeout_secs` must be more than 0 and at most 86400 seconds (a day), got inf"),
        ("kiln.toml:16:11", "`retries` must be between 0 and 20, got 1000"),
        ("kiln.toml:21:10", "`height` must be between 1 and 4096 pixels, got 0"),
        ("kiln.toml:22:13", "`max_value` must be a positive, finite number, got -1.0"),
        ("kiln.toml:26:13", "`max_bytes` must be between 1 and 4294967296 (4 GiB), got 0"),
        ("kiln.toml:32:16", "`label_column` must be between -65 and 64 for 8x8 images"),
    ] {
        assert!(err.contains(location), "expected {location} in\n{err}");
        assert!(err.contains(message), "expected {message:?} in\n{err}");
    }
    assert!(!ws.path().join("cache").exists(), "an invalid manifest touches nothing");

    // The limits themselves are accepted.
    std::fs::write(
        ws.path().join("kiln.toml"),
        "[stages.collect]\nkind = \"collect\"\n[[stages.collect.sources]]\ntype = \"synthetic\"\ncount = 10000000\nsize = 4096\nnoise = 0.0\n",
    )
    .unwrap();
    let out = kiln_within(ws.path(), &["status"], 60);
    assert_ne!(out.status.code(), Some(2), "{}", text(&out));
    assert!(!text(&out).contains("must be"), "{}", text(&out));
}

/// Real 8×8 digits as PNGs, with quality-30 JPEG copies of some of them. At that size a
/// JPEG copy is as far from its original as two writers' digits are from each other, so
/// pixels alone cannot confirm it: the copy's own quantisation table must, and the PNG it
/// was made from stays. No distinct digit goes with them.
#[test]
fn low_quality_jpeg_copies_of_tiny_images_are_found_by_their_quantisation() {
    use std::io::Read;
    let Some(gz) = shared("datasets/digits.csv.gz") else { return };
    let mut csv = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(gz).unwrap()).read_to_string(&mut csv).unwrap();
    let ws = tempfile::tempdir().unwrap();
    let mut originals = Vec::new();
    let mut copies = BTreeMap::new();
    for (r, line) in csv.lines().take(400).enumerate() {
        let v: Vec<u32> = line.split(',').map(|x| x.parse().unwrap()).collect();
        let img =
            DynamicImage::ImageLuma8(image::GrayImage::from_fn(8, 8, |x, y| image::Luma([(v[(y * 8 + x) as usize] * 16).min(255) as u8])));
        let rel = format!("data/{}/{r:04}.png", v[64]);
        write(&ws.path().join(&rel), &png(&img));
        originals.push(rel.clone());
        if r % 40 == 7 {
            let mut bytes = Vec::new();
            img.write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 30)).unwrap();
            let copy = format!("data/{}/{r:04}_copy.jpg", v[64]);
            write(&ws.path().join(&copy), &bytes);
            copies.insert(copy, rel);
        }
    }
    // A JPEG original (q40) and a copy saved from it at q95: the copy is larger, so file
    // size alone would keep it; the source of a recompression stays.
    let line = csv.lines().nth(401).unwrap();
    let v: Vec<u32> = line.split(',').map(|x| x.parse().unwrap()).collect();
    let digit =
        DynamicImage::ImageLuma8(image::GrayImage::from_fn(8, 8, |x, y| image::Luma([(v[(y * 8 + x) as usize] * 16).min(255) as u8])));
    let encode = |img: &DynamicImage, quality: u8| {
        let mut bytes = Vec::new();
        img.write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality)).unwrap();
        bytes
    };
    let low = encode(&digit, 40);
    let high = encode(&image::load_from_memory(&low).unwrap(), 95);
    assert!(high.len() > low.len());
    let (source, resaved) = (format!("data/{}/0401.jpg", v[64]), format!("data/{}/0401_resaved.jpg", v[64]));
    write(&ws.path().join(&source), &low);
    write(&ws.path().join(&resaved), &high);
    originals.push(source.clone());
    copies.insert(resaved, source);
    std::fs::write(
        ws.path().join("kiln.toml"),
        "[pipeline]\nname = \"digits\"\n[stages.collect]\nkind = \"collect\"\n[[stages.collect.sources]]\ntype = \"dir\"\npath = \"data\"\n\n\
         [stages.clean]\nkind = \"clean\"\ninputs = [\"collect\"]\n",
    )
    .unwrap();
    plain_ok(ws.path(), &["run"]);
    let report = read_json(ws.path().join("outputs/digits/clean/clean_report.json"));
    let findings: BTreeMap<String, String> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["check"] == "near_duplicates")
        .map(|f| (f["id"].as_str().unwrap().to_string(), f["reason"].as_str().unwrap().to_string()))
        .collect();
    let mut by_quantisation = 0;
    for (copy, original) in &copies {
        let reason = findings.get(copy).unwrap_or_else(|| panic!("{copy} not found: {findings:#?}"));
        assert!(reason.contains(&format!("`{original}`")), "{copy}: {reason}");
        by_quantisation += usize::from(reason.contains("JPEG recompression"));
    }
    assert!(by_quantisation > 0, "some copies are too far for pixels alone: {findings:#?}");
    let lost: Vec<&String> = originals.iter().filter(|o| findings.contains_key(*o)).collect();
    assert!(lost.is_empty(), "no original digit is removed: {lost:?} {findings:#?}");
}

/// Every real digit against its JPEG copies and its five nearest distinct digits: the
/// recompression test takes each copy for one and never a look-alike, at any quality.
#[test]
fn the_recompression_test_never_takes_a_lookalike_for_a_copy() {
    use kiln::imaging::recompress::{MAX_MISSES, misses};
    use std::io::Read;
    let Some(gz) = shared("datasets/digits.csv.gz") else { return };
    let mut csv = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(gz).unwrap()).read_to_string(&mut csv).unwrap();
    let digits: Vec<image::GrayImage> = csv
        .lines()
        .map(|line| {
            let v: Vec<u32> = line.split(',').map(|x| x.parse().unwrap()).collect();
            image::GrayImage::from_fn(8, 8, |x, y| image::Luma([(v[(y * 8 + x) as usize] * 16).min(255) as u8]))
        })
        .collect();
    let nearest: Vec<Vec<usize>> = digits
        .iter()
        .enumerate()
        .map(|(k, a)| {
            let mut by: Vec<(u64, usize)> = digits
                .iter()
                .enumerate()
                .map(|(j, b)| (a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| u64::from(x.abs_diff(y)).pow(2)).sum(), j))
                .filter(|&(d, j)| j != k && d > 0)
                .collect();
            by.sort_unstable();
            by.iter().take(5).map(|&(_, j)| j).collect()
        })
        .collect();
    for quality in [30, 60, 90, 95] {
        let (mut worst_copy, mut closest_other) = (0f32, 1f32);
        for (k, digit) in digits.iter().enumerate() {
            let img = DynamicImage::ImageLuma8(digit.clone());
            let mut bytes = Vec::new();
            img.write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality)).unwrap();
            let own = misses(&img, &bytes).unwrap();
            assert!(own.is_recompression(), "digit {k} at q{quality}: {own:?}");
            worst_copy = worst_copy.max(own.share);
            for &j in &nearest[k] {
                let other = misses(&DynamicImage::ImageLuma8(digits[j].clone()), &bytes).unwrap();
                assert!(!other.is_recompression(), "digit {j} taken for a copy of {k} at q{quality}: {other:?}");
                closest_other = closest_other.min(other.share);
            }
        }
        eprintln!("q{quality}: copies miss at most {worst_copy:.3}, look-alikes at least {closest_other:.3}");
        assert!(worst_copy <= MAX_MISSES && closest_other > MAX_MISSES, "q{quality}: {worst_copy} {closest_other}");
    }
}
