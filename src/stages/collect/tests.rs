//! The manifest form of the sources: what parses and the params JSON it gives (which goes
//! into every collect stage's cache key).

use serde_json::json;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::CollectKind;
use crate::stages::{ParseContext, StageKind};

/// A collect stage's table (without `kind`) parsed as the manifest does: its params, or
/// the messages of its issues.
fn params(text: &str) -> Result<serde_json::Value, Vec<String>> {
    let table = DeTable::parse(text).expect("valid TOML");
    let value = Spanned::new(table.span(), DeValue::Table(table.into_inner()));
    let manifest_params = serde_json::Value::Null;
    match CollectKind.parse(value, &ParseContext { params: &manifest_params }) {
        Ok(stage) => Ok(stage.params()),
        Err(issues) => Err(issues.into_iter().map(|i| i.message).collect()),
    }
}

#[test]
fn params_of_every_source_type_with_defaults() {
    let got = params(
        r#"
        [[sources]]
        type = "dir"
        path = "data/raw"
        [[sources]]
        type = "listing"
        path = "data/list.csv"
        [[sources]]
        type = "idx"
        images = "mnist/train-images.gz"
        [[sources]]
        type = "pixels"
        path = "digits/digits.csv"
        width = 8
        height = 8
        [[sources]]
        type = "http"
        listing = "urls/list.csv"
        [[sources]]
        type = "synthetic"
        count = 10
        "#,
    )
    .unwrap();
    let want = json!({"sources": [
        {"type": "dir", "path": "data/raw", "layout": "class", "follow_links": false, "max_bytes": 268435456},
        {"type": "listing", "path": "data/list.csv", "path_field": "path", "max_bytes": 268435456},
        {"type": "idx", "images": "mnist/train-images.gz"},
        {"type": "pixels", "path": "digits/digits.csv", "width": 8, "height": 8, "label_column": -1, "max_value": 255.0},
        {"type": "http", "listing": "urls/list.csv", "url_field": "url", "concurrency": 8, "timeout_secs": 30.0, "retries": 3,
         "max_bytes": 52428800, "content_types": ["image/"]},
        {"type": "synthetic", "count": 10, "size": 64, "noise": 12.0},
    ]});
    assert_eq!(got, want);
}

#[test]
fn params_keep_every_option_given() {
    let got = params(
        r#"
        [[sources]]
        type = "dir"
        path = "data/raw"
        name = "raw"
        layout = "split/class"
        extensions = ["png"]
        include = ["a/**"]
        exclude = ["**/thumbs/**"]
        follow_links = true
        max_bytes = 1000
        [[sources]]
        type = "idx"
        images = "mnist/train-images.gz"
        labels = "mnist/train-labels.gz"
        name = "mnist"
        split = "train"
        classes = ["zero", "one"]
        [[sources]]
        type = "synthetic"
        count = 4
        size = 16
        name = "shapes"
        shapes = ["circle", "star"]
        noise = 0.5
        "#,
    )
    .unwrap();
    let want = json!({"sources": [
        {"type": "dir", "path": "data/raw", "name": "raw", "layout": "split/class", "extensions": ["png"], "include": ["a/**"],
         "exclude": ["**/thumbs/**"], "follow_links": true, "max_bytes": 1000},
        {"type": "idx", "images": "mnist/train-images.gz", "labels": "mnist/train-labels.gz", "name": "mnist", "split": "train",
         "classes": ["zero", "one"]},
        {"type": "synthetic", "count": 4, "size": 16, "name": "shapes", "shapes": ["circle", "star"], "noise": 0.5},
    ]});
    assert_eq!(got, want);
}

#[test]
fn unknown_fields_and_types_are_refused() {
    let issues = params("[[sources]]\ntype = \"synthetic\"\ncount = 3\ncolour = \"red\"\n").unwrap_err();
    assert!(
        issues.iter().any(|m| m.contains("unknown field `colour`, expected one of `count`, `size`, `name`, `shapes`, `noise`")),
        "{issues:?}"
    );
    let issues = params("[[sources]]\ntype = \"ftp\"\npath = \"data/raw\"\n").unwrap_err();
    assert!(issues.iter().any(|m| m.contains("unknown variant `ftp`")), "{issues:?}");
    let issues = params("[[sources]]\npath = \"data/raw\"\n").unwrap_err();
    assert!(issues.iter().any(|m| m.contains("missing field `type`")), "{issues:?}");
}
