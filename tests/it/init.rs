//! `kiln init`: a starter manifest for an ImageFolder of real PNG files (or a listing) that
//! `kiln run` completes, refusing to overwrite, and a clear error for a folder without
//! images.

use std::path::Path;
use std::process::Command;

use image::{DynamicImage, GrayImage, Luma};

use crate::support::{kiln_plain, plain_ok, png, read_json, shared, text, unwrap_diagnostic, which, write};

const CLASSES: [&str; 3] = ["checks", "hstripes", "vstripes"];

/// A 20x20 grayscale picture of `class`: stripes or a checkerboard, shifted by `i`, with a
/// little noise so that no two images are equal.
fn picture(class: &str, i: u32) -> DynamicImage {
    let mut state = 0x9E37_79B9u32.wrapping_mul(i + 1);
    DynamicImage::ImageLuma8(GrayImage::from_fn(20, 20, |x, y| {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let noise = (state >> 24) % 24;
        let on = match class {
            "hstripes" => ((y + i) / 2).is_multiple_of(2),
            "vstripes" => ((x + i) / 2).is_multiple_of(2),
            _ => ((x + i) / 4 + (y + i) / 4).is_multiple_of(2),
        };
        Luma([if on { 210 + noise as u8 } else { 20 + noise as u8 }])
    }))
}

/// `dir/<class>/<n>.png`, `per_class` images of each class (under `dir/<split>/` when a
/// split is given).
fn image_folder(dir: &Path, split: Option<&str>, per_class: u32) {
    for class in CLASSES {
        for i in 0..per_class {
            let folder = match split {
                Some(s) => dir.join(s).join(class),
                None => dir.join(class),
            };
            write(&folder.join(format!("{i:02}.png")), &png(&picture(class, i)));
        }
    }
}

#[test]
fn init_writes_a_manifest_that_kiln_runs() {
    let ws = tempfile::tempdir().unwrap();
    image_folder(&ws.path().join("data"), None, 12);
    let out = plain_ok(ws.path(), &["init", "data"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("3 classes, 36 images") && stdout.contains("kiln run kiln.toml"), "{}", text(&out));
    assert!(stdout.contains("20x20") && stdout.contains("grayscale"), "{}", text(&out));
    let manifest = std::fs::read_to_string(ws.path().join("kiln.toml")).unwrap();
    for class in CLASSES {
        assert!(manifest.contains(&format!("\"{class}\",")), "{class} is not a class:\n{manifest}");
    }
    assert!(manifest.contains("# 12 images"), "per-class counts are written:\n{manifest}");
    for line in ["path = \"data\"", "layout = \"class\"", "color = \"grayscale\"", "size = [20, 20]", "split = \"test\""] {
        assert!(manifest.contains(line), "`{line}` is missing:\n{manifest}");
    }
    let stages: Vec<&str> = manifest.lines().filter_map(|l| l.strip_prefix("[stages.")?.strip_suffix(']')).collect();
    assert_eq!(stages, ["collect", "clean", "clean.checks", "preprocess", "label", "convert", "train", "eval"]);

    // Two epochs keep the test fast; what init wrote is otherwise run as it is.
    let run = plain_ok(ws.path(), &["run", "kiln.toml", "--set", "train.epochs=2"]);
    let metrics = read_json(ws.path().join("outputs/data/eval/metrics.json"));
    let accuracy = metrics["accuracy"].as_f64().unwrap_or_else(|| panic!("no accuracy: {metrics}\n{}", text(&run)));
    assert!((0.0..=1.0).contains(&accuracy), "{metrics}");
    let classes = read_json(ws.path().join("outputs/data/label/classes.json"));
    assert_eq!(classes, serde_json::json!(CLASSES), "{}", text(&run));
}

#[test]
fn init_refuses_to_overwrite_without_force() {
    let ws = tempfile::tempdir().unwrap();
    image_folder(&ws.path().join("data"), None, 4);
    write(&ws.path().join("kiln.toml"), b"# mine\n");
    let out = kiln_plain(ws.path(), &["init", "data"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(unwrap_diagnostic(&String::from_utf8_lossy(&out.stderr)).contains("pass --force"), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(ws.path().join("kiln.toml")).unwrap(), "# mine\n", "the file is left alone");

    plain_ok(ws.path(), &["init", "data", "--force"]);
    assert!(std::fs::read_to_string(ws.path().join("kiln.toml")).unwrap().contains("[stages.train]"));
    // --output chooses the file; its folder is the workspace root, so paths follow it.
    plain_ok(ws.path(), &["init", "data", "--output", "pipelines/shapes.toml"]);
    let other = std::fs::read_to_string(ws.path().join("pipelines/shapes.toml")).unwrap();
    assert!(other.contains("path = \"../data\""), "{other}");
    plain_ok(ws.path(), &["run", "--dry-run", "pipelines/shapes.toml"]);
}

#[test]
fn init_without_images_is_a_usage_error() {
    let ws = tempfile::tempdir().unwrap();
    write(&ws.path().join("empty/notes.txt"), b"no pictures here\n");
    let out = kiln_plain(ws.path(), &["init", "empty"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(unwrap_diagnostic(&String::from_utf8_lossy(&out.stderr)).contains("no images in `empty`"), "{}", text(&out));
    assert!(!ws.path().join("kiln.toml").exists(), "nothing is written");

    let out = kiln_plain(ws.path(), &["init", "missing"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn init_keeps_a_train_test_split_and_reads_listings() {
    let ws = tempfile::tempdir().unwrap();
    image_folder(&ws.path().join("sets/split"), Some("train"), 8);
    image_folder(&ws.path().join("sets/split"), Some("test"), 3);
    plain_ok(ws.path(), &["init", "sets/split", "-o", "split.toml"]);
    let manifest = std::fs::read_to_string(ws.path().join("split.toml")).unwrap();
    assert!(manifest.contains("layout = \"split/class\"") && manifest.contains("from_items = true"), "{manifest}");
    plain_ok(ws.path(), &["run", "--dry-run", "split.toml"]);

    // A listing: paths relative to it in one column, labels in another.
    let mut csv = String::from("file,kind,note\n");
    for (i, class) in CLASSES.iter().cycle().take(12).enumerate() {
        write(&ws.path().join(format!("sets/listed/img/{i:02}.png")), &png(&picture(class, i as u32)));
        csv.push_str(&format!("img/{i:02}.png,{class},n{i}\n"));
    }
    write(&ws.path().join("sets/listed/labels.csv"), csv.as_bytes());
    plain_ok(ws.path(), &["init", "sets/listed", "-o", "listed.toml"]);
    let manifest = std::fs::read_to_string(ws.path().join("listed.toml")).unwrap();
    for line in ["type = \"listing\"", "path = \"sets/listed/labels.csv\"", "path_field = \"file\"", "label_field = \"kind\""] {
        assert!(manifest.contains(line), "`{line}` is missing:\n{manifest}");
    }
    plain_ok(ws.path(), &["run", "--dry-run", "listed.toml"]);
}

/// The acceptance check: an ImageFolder written by
/// `../shared/datasets/make_imagefolder.py` (the digits: `all/<digit>/<n>.png`, 8x8).
#[test]
fn init_on_make_imagefolder_digits_runs() {
    let Some(script) = shared("datasets/make_imagefolder.py") else { return };
    let Some(python) = which("python3") else {
        eprintln!("skipping: python3 is not on PATH");
        return;
    };
    let ws = tempfile::tempdir().unwrap();
    let made = Command::new(python).arg(&script).args(["digits"]).arg(ws.path().join("digits")).output().unwrap();
    assert!(made.status.success(), "{}", text(&made));
    plain_ok(ws.path(), &["init", "digits"]);
    let manifest = std::fs::read_to_string(ws.path().join("kiln.toml")).unwrap();
    assert!(manifest.contains("layout = \"split/class\"") && manifest.contains("size = [8, 8]"), "{manifest}");
    plain_ok(ws.path(), &["run", "kiln.toml", "--set", "train.epochs=2"]);
    let metrics = read_json(ws.path().join("outputs/digits/eval/metrics.json"));
    assert!(metrics["accuracy"].as_f64().is_some(), "{metrics}");
}
