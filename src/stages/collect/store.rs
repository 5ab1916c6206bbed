//! Storing images in the cache, shared by the sources: PNG blobs of generated images,
//! memoised, and each collected image's format and size, probed once per content digest.

use image::{DynamicImage, GrayImage};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::formats::dataset::Item;
use crate::imaging;
use crate::stages::{StageContext, StageError};

#[derive(Serialize, Deserialize)]
struct Header {
    format: Option<String>,
    width: Option<u32>,
    height: Option<u32>,
}

/// Encodes generated grayscale images as PNG blobs, memoised by their raw pixels.
pub(super) fn gray(cx: &StageContext<'_>, n: usize, image: impl Fn(usize) -> GrayImage + Sync) -> Result<Vec<(Digest, u64)>, StageError> {
    let keys: Vec<Digest> = (0..n).into_par_iter().map(|i| Digest::of_bytes(image(i).as_raw())).collect();
    memoised(cx, "gray-png-v1", &keys, |i| DynamicImage::ImageLuma8(image(i)))
}

/// For each key, the (digest, size) of a PNG blob: from the memo store when the blob is
/// still in the cache, else drawn, encoded and stored.
pub(super) fn memoised(
    cx: &StageContext<'_>,
    op: &str,
    keys: &[Digest],
    image: impl Fn(usize) -> DynamicImage + Sync,
) -> Result<Vec<(Digest, u64)>, StageError> {
    let make = |i: usize| -> Result<(Digest, u64), String> {
        let png = imaging::encode_png(&image(i));
        Ok((cx.cache.put_blob_bytes(&png).map_err(|e| e.to_string())?, png.len() as u64))
    };
    let results = cx.cache.memo_blobs(keys, &Digest::of_bytes(op.as_bytes()), make).map_err(|e| StageError::Failed(e.to_string()))?;
    results.into_iter().map(|r| r.map_err(StageError::Failed)).collect()
}

/// Format and size from each image's header, memoised per content digest.
pub(super) fn probe_headers(cx: &StageContext<'_>, items: &mut [Item]) -> Result<(), StageError> {
    let todo: Vec<usize> = (0..items.len()).filter(|&i| items[i].format.is_none()).collect();
    let digests: Vec<Digest> = todo.iter().map(|&i| items[i].digest).collect();
    let op = Digest::of_bytes(b"collect-header-v1");
    let results = cx
        .cache
        .state()
        .memo()
        .map(&digests, &op, |k| {
            let bytes = cx.cache.read_blob(&digests[k]).map_err(|e| e.to_string())?;
            let header = match imaging::header(&bytes) {
                Ok((f, w, h)) => Header { format: Some(imaging::format_name(f)), width: Some(w), height: Some(h) },
                Err(_) => Header { format: None, width: None, height: None },
            };
            serde_json::to_vec(&header).map_err(|e| e.to_string())
        })
        .map_err(|e| StageError::Failed(e.to_string()))?;
    for (&i, r) in todo.iter().zip(results) {
        let bytes = r.map_err(StageError::Failed)?;
        let h: Header = serde_json::from_slice(&bytes).map_err(|e| StageError::Failed(e.to_string()))?;
        (items[i].format, items[i].width, items[i].height) = (h.format, h.width, h.height);
    }
    Ok(())
}
