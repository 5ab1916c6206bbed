//! The `pixels` source: a CSV of pixel values per row and a label column, gzipped or not,
//! as scikit-learn's digits. A row of the wrong length or with a field that is not a
//! number is reported, not fatal.

use image::GrayImage;

use super::{PixelsSource, Problem, files, store};
use crate::formats::dataset::Item;
use crate::paths::dep_path;
use crate::stages::{StageContext, StageError};

pub(super) fn collect(
    cx: &StageContext<'_>,
    source: &PixelsSource,
    label: &str,
    items: &mut Vec<Item>,
    problems: &mut Vec<Problem>,
) -> Result<(), StageError> {
    let PixelsSource { path, width, height, label_column, max_value, .. } = source;
    let file = dep_path(cx.root, path);
    let bytes = files::read_maybe_gzip(&file, files::TABLE_MAX_BYTES).map_err(StageError::Failed)?;
    let text = String::from_utf8(bytes).map_err(|_| StageError::Failed(format!("`{path}` is not text")))?;
    let want = (*width * *height) as usize;
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let column = if *label_column < 0 { fields.len() as i64 + label_column } else { *label_column };
        let parsed: Result<Vec<f64>, _> =
            fields.iter().enumerate().filter(|(i, _)| *i as i64 != column).map(|(_, f)| f.parse::<f64>()).collect();
        match parsed {
            Ok(values) if values.len() == want && (0..fields.len() as i64).contains(&column) => {
                let pixels: Vec<u8> = values.iter().map(|v| (v / max_value * 255.0).round().clamp(0.0, 255.0) as u8).collect();
                rows.push((n, pixels, fields[column as usize].to_string()));
            }
            Ok(values) => problems.push(Problem {
                source: label.to_string(),
                path: format!("{path}:{}", n + 1),
                reason: format!("{} pixel values, expected {want}", values.len()),
            }),
            Err(e) => problems.push(Problem {
                source: label.to_string(),
                path: format!("{path}:{}", n + 1),
                reason: format!("not a number: {e}"),
            }),
        }
    }
    let stored = store::gray(cx, rows.len(), |i| GrayImage::from_raw(*width, *height, rows[i].1.clone()).expect("exact size"))?;
    for ((n, _, class), (digest, bytes)) in rows.iter().zip(stored) {
        let mut item = Item::new(format!("{label}/{n:05}"), format!("{path}:{}", n + 1), digest, bytes);
        (item.format, item.width, item.height) = (Some("png".into()), Some(*width), Some(*height));
        item.label = Some(class.clone());
        items.push(item);
    }
    Ok(())
}
