//! The `idx` source: MNIST-family IDX files (images and optional labels), gzipped or not,
//! read directly.

use std::path::Path;

use image::GrayImage;

use super::{IdxSource, files, store};
use crate::formats::dataset::Item;
use crate::paths::dep_path;
use crate::stages::{StageContext, StageError};

/// The largest IDX file read, compressed or not (EMNIST's largest is about 550 MB).
const IDX_MAX_BYTES: u64 = 4 << 30;

/// Reads an IDX file (the MNIST family's format), gzipped or not: (dimensions, bytes).
fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>), String> {
    let mut data = files::read_maybe_gzip(path, IDX_MAX_BYTES)?;
    if data.len() < 4 || data[0] != 0 || data[1] != 0 || data[2] != 0x08 {
        return Err(format!("`{}` is not an unsigned-byte IDX file", path.display()));
    }
    let ndim = data[3] as usize;
    let header = 4 + 4 * ndim;
    if data.len() < header {
        return Err(format!("`{}`: truncated IDX header", path.display()));
    }
    let dims: Vec<usize> =
        (0..ndim).map(|i| u32::from_be_bytes(data[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize).collect();
    let expected = dims.iter().try_fold(1usize, |n, d| n.checked_mul(*d));
    if expected != Some(data.len() - header) {
        let promised = expected.map_or_else(|| format!("{dims:?} (too many)"), |n| n.to_string());
        return Err(format!("`{}`: IDX header promises {promised} values, file has {}", path.display(), data.len() - header));
    }
    // Drop the header in place: the data may be gigabytes.
    let values = data.len() - header;
    data.copy_within(header.., 0);
    data.truncate(values);
    Ok((dims, data))
}

pub(super) fn collect(cx: &StageContext<'_>, source: &IdxSource, label: &str, items: &mut Vec<Item>) -> Result<(), StageError> {
    let IdxSource { images, labels, split, classes, .. } = source;
    let fail = |e: String| StageError::Failed(format!("source `{label}`: {e}"));
    let (dims, pixels) = read_idx(&dep_path(cx.root, images)).map_err(fail)?;
    let [n, rows, cols] = dims[..] else {
        return Err(fail(format!("`{images}` holds {}-dimensional data, expected images (3)", dims.len())));
    };
    let names = match labels {
        Some(l) => {
            let (ldims, values) = read_idx(&dep_path(cx.root, l)).map_err(fail)?;
            if ldims != [n] {
                return Err(fail(format!("`{l}` holds {ldims:?} labels for {n} images")));
            }
            Some(values)
        }
        None => None,
    };
    let stored = store::gray(cx, n, |i| {
        GrayImage::from_raw(cols as u32, rows as u32, pixels[i * rows * cols..(i + 1) * rows * cols].to_vec()).expect("exact size")
    })?;
    for (i, (digest, bytes)) in stored.into_iter().enumerate() {
        let mut item = Item::new(format!("{label}/{i:05}"), format!("{images}#{i}"), digest, bytes);
        (item.format, item.width, item.height) = (Some("png".into()), Some(cols as u32), Some(rows as u32));
        item.split = split.clone();
        item.label = names.as_ref().map(|v| {
            let k = v[i] as usize;
            classes.get(k).cloned().unwrap_or_else(|| k.to_string())
        });
        items.push(item);
    }
    Ok(())
}
