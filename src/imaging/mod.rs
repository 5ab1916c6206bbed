//! Image decoding with limits, and the measurements the clean stage judges images by.
//!
//! [`probe`] decodes one image once and returns everything the checks need (size, format,
//! brightness, contrast, sharpness, colourfulness, perceptual hash). Its result is small
//! and depends only on the image bytes and the decode limits, so the clean stage memoises
//! it per item; changing a threshold never decodes anything again.

pub mod augment;
pub mod near;
pub mod recompress;
pub mod synth;
pub mod transform;

use std::io::Cursor;

use image::{DynamicImage, GrayImage, ImageFormat, ImageReader};
use serde::{Deserialize, Serialize};

/// Bump when [`probe`] changes what it measures: it is part of the memo key.
pub const PROBE_VERSION: u32 = 3;

/// Images larger than this are shrunk before the sharpness and colour measures, which
/// are then comparable across resolutions and cheap on large photos.
const MEASURE_SIDE: u32 = 512;

/// The largest image, in pixels (width × height), that kiln decodes unless told otherwise:
/// the default of the clean stage's `max_pixels` and of `kiln serve --max-pixels`, and the
/// limit of `kiln predict` and of preprocess and convert. A larger image is refused from its
/// header alone, before anything is decoded (64 M pixels are 256 MB as RGBA).
pub const DEFAULT_MAX_PIXELS: u64 = 64_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecodeLimits {
    /// Width × height above which an image is rejected from its header alone.
    pub max_pixels: u64,
    pub max_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits { max_pixels: DEFAULT_MAX_PIXELS, max_bytes: 256 << 20 }
    }
}

/// Why an image could not be used at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "defect", rename_all = "snake_case")]
pub enum Defect {
    #[error("zero-byte file")]
    Empty,
    #[error("file of {bytes} bytes exceeds the {limit}-byte limit")]
    TooManyBytes { bytes: u64, limit: u64 },
    #[error("not an image (no known format signature)")]
    NotAnImage,
    #[error("{width}x{height} exceeds the {limit}-pixel limit (decompression bomb?)")]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("truncated: {message}")]
    Truncated { message: String },
    #[error("corrupt {format}: {message}")]
    Corrupt { format: String, message: String },
}

/// What one decode learned about an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub format: String,
    pub width: u32,
    pub height: u32,
    /// Mean luma, 0–255.
    pub brightness: f32,
    /// Standard deviation of luma, 0–255: near 0 means a near-constant image.
    pub contrast: f32,
    /// Variance of the Laplacian of luma: low means blurry.
    pub sharpness: f32,
    /// Share of pixels whose channels differ by more than 12 levels: 0 for grayscale.
    pub colourful: f32,
    /// 64-bit perceptual hash (pHash) of luma, for near-duplicate search.
    pub phash: u64,
    /// 8×8 RGB thumbnail (hex): near-duplicate candidates must also match in colour,
    /// which pHash (luma structure only) cannot see.
    pub thumb: String,
    /// 8×8 RGB thumbnail (hex) of the window [`INNER_TRIM`] in from each side: what a copy
    /// cropped by a few per cent looks like, so such a copy can be proposed as its
    /// original's look-alike even where whole-image look-alikes crowd it out.
    pub inner: String,
}

/// The share of each side left out of [`Probe::inner`]: the middle of the crops the
/// near-duplicate search aligns (up to 10 % a side; copies are usually cut by less).
pub const INNER_TRIM: f32 = 0.04;

/// Format name from the leading bytes, if they are an image kiln can decode.
pub fn sniff(bytes: &[u8]) -> Option<ImageFormat> {
    image::guess_format(bytes).ok().filter(|f| f.reading_enabled())
}

pub fn format_name(f: ImageFormat) -> String {
    f.extensions_str().first().copied().unwrap_or("unknown").to_string()
}

/// Whether a file extension fits a format (`jpg` and `jpeg` both fit JPEG).
pub fn extension_fits(ext: &str, format: ImageFormat) -> bool {
    let ext = ext.to_ascii_lowercase();
    format.extensions_str().iter().any(|e| *e == ext)
}

/// Reads only the header: format and dimensions. Cheap, and safe on hostile files.
pub fn header(bytes: &[u8]) -> Result<(ImageFormat, u32, u32), Defect> {
    if bytes.is_empty() {
        return Err(Defect::Empty);
    }
    let format = sniff(bytes).ok_or(Defect::NotAnImage)?;
    let reader = ImageReader::with_format(Cursor::new(bytes), format);
    let (w, h) = reader.into_dimensions().map_err(|e| classify(format, e))?;
    Ok((format, w, h))
}

/// Decodes under `limits`: the header is checked before any pixel memory is reserved.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<(ImageFormat, DynamicImage), Defect> {
    if bytes.len() as u64 > limits.max_bytes {
        return Err(Defect::TooManyBytes { bytes: bytes.len() as u64, limit: limits.max_bytes });
    }
    let (format, w, h) = header(bytes)?;
    if u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err(Defect::TooManyPixels { width: w, height: h, limit: limits.max_pixels });
    }
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(Defect::Truncated { message: "no JPEG end-of-image marker".into() });
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut l = image::Limits::default();
    l.max_image_width = Some(w);
    l.max_image_height = Some(h);
    // Room for the widest pixel type (RGBA f32) plus the decoder's own buffers.
    l.max_alloc = Some(u64::from(w) * u64::from(h) * 16 + (64 << 20));
    reader.limits(l);
    let img = reader.decode().map_err(|e| classify(format, e))?;
    Ok((format, img))
}

/// JPEG decoders fill a truncated scan with grey rather than fail; the end-of-image
/// marker (after any trailing padding) is the reliable sign of a complete file.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let trimmed = bytes.iter().rposition(|&b| b != 0 && b != b'\n' && b != b'\r' && b != b' ').map_or(&bytes[..0], |i| &bytes[..=i]);
    trimmed.ends_with(&[0xFF, 0xD9])
}

fn classify(format: ImageFormat, e: image::ImageError) -> Defect {
    let message = e.to_string();
    let lower = message.to_ascii_lowercase();
    if lower.contains("eof")
        || lower.contains("end of file")
        || lower.contains("unexpected end")
        || lower.contains("truncat")
        || lower.contains("not enough data")
    {
        Defect::Truncated { message }
    } else {
        Defect::Corrupt { format: format_name(format), message }
    }
}

/// Decodes and measures one image.
///
/// Every measure works on raw 8-bit buffers in single integer passes, and the hash and
/// thumbnail inputs come from area-averaging downscales: on 500×375 photos this made
/// the probe 3× faster than going through generic pixel access and filtered resizes.
pub fn probe(bytes: &[u8], limits: &DecodeLimits) -> Result<Probe, Defect> {
    let (format, img) = decode(bytes, limits)?;
    let (width, height) = (img.width(), img.height());
    let rgb: std::borrow::Cow<'_, image::RgbImage> = match &img {
        DynamicImage::ImageRgb8(b) => std::borrow::Cow::Borrowed(b),
        other => std::borrow::Cow::Owned(other.to_rgb8()),
    };
    let (w, h) = (width as usize, height as usize);
    // Large images are measured at about MEASURE_SIDE, so measures compare across sizes.
    let scale = w.max(h).div_ceil(MEASURE_SIDE as usize).max(1);
    let (sw, sh) = (w.div_ceil(scale), h.div_ceil(scale));
    let small: std::borrow::Cow<'_, [u8]> = if scale == 1 {
        std::borrow::Cow::Borrowed(rgb.as_raw())
    } else {
        std::borrow::Cow::Owned(box_downscale(rgb.as_raw(), w, h, 3, sw, sh))
    };
    let (luma, coloured) = luma_and_colour(&small);
    let (brightness, contrast) = mean_std(&luma);
    // One cheap integer-factor reduction feeds both the hash and the thumbnail.
    let k = (sw.max(sh) / 128).max(1);
    let (rw, rh) = (sw.div_ceil(k), sh.div_ceil(k));
    let reduced_rgb = if k == 1 { small.to_vec() } else { reduce_rgb(&small, sw, sh, k) };
    let (reduced_luma, _) = luma_and_colour(&reduced_rgb);
    Ok(Probe {
        format: format_name(format),
        width,
        height,
        brightness,
        contrast,
        sharpness: laplacian_variance(&luma, sw, sh),
        colourful: coloured as f32 / luma.len().max(1) as f32,
        phash: phash_of(&smooth_32(reduced_luma, rw, rh)),
        thumb: hex::encode(box_downscale(&reduced_rgb, rw, rh, 3, 8, 8)),
        inner: hex::encode(inner_thumb(&reduced_rgb, rw, rh)),
    })
}

/// The 8×8 thumbnail of packed RGB without [`INNER_TRIM`] of each side (the whole image
/// when that is less than a pixel).
fn inner_thumb(rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
    let (tx, ty) = ((w as f32 * INNER_TRIM).round() as usize, (h as f32 * INNER_TRIM).round() as usize);
    let (iw, ih) = (w - 2 * tx, h - 2 * ty);
    if (tx == 0 && ty == 0) || iw == 0 || ih == 0 {
        return box_downscale(rgb, w, h, 3, 8, 8);
    }
    let window: Vec<u8> = (ty..ty + ih).flat_map(|y| &rgb[(y * w + tx) * 3..(y * w + tx + iw) * 3]).copied().collect();
    box_downscale(&window, iw, ih, 3, 8, 8)
}

/// BT.601 luma of packed RGB, and how many pixels have channels more than 12 levels apart.
fn luma_and_colour(rgb: &[u8]) -> (Vec<u8>, usize) {
    let mut coloured = 0;
    let luma = rgb
        .chunks_exact(3)
        .map(|p| {
            let (r, g, b) = (p[0], p[1], p[2]);
            coloured += usize::from(r.abs_diff(g).max(g.abs_diff(b)).max(r.abs_diff(b)) > 12);
            ((77 * u32::from(r) + 150 * u32::from(g) + 29 * u32::from(b) + 128) >> 8) as u8
        })
        .collect();
    (luma, coloured)
}

/// Averages k×k blocks of packed RGB (edge blocks may be smaller).
fn reduce_rgb(src: &[u8], w: usize, h: usize, k: usize) -> Vec<u8> {
    let (rw, rh) = (w.div_ceil(k), h.div_ceil(k));
    let mut out = Vec::with_capacity(rw * rh * 3);
    let mut acc = vec![0u32; rw * 3];
    for by in 0..rh {
        acc.iter_mut().for_each(|a| *a = 0);
        let rows = (by * k)..((by + 1) * k).min(h);
        let nrows = rows.len();
        for y in rows {
            let row = &src[y * w * 3..(y + 1) * w * 3];
            for (bx, block) in row.chunks(k * 3).enumerate() {
                let a = &mut acc[bx * 3..bx * 3 + 3];
                for px in block.chunks_exact(3) {
                    a[0] += u32::from(px[0]);
                    a[1] += u32::from(px[1]);
                    a[2] += u32::from(px[2]);
                }
            }
        }
        for bx in 0..rw {
            let n = (nrows * (((bx + 1) * k).min(w) - bx * k)) as u32;
            out.extend(acc[bx * 3..bx * 3 + 3].iter().map(|s| ((s + n / 2) / n) as u8));
        }
    }
    out
}

/// Area-averaging downscale (nearest neighbour where the target is larger) of a packed
/// 8-bit buffer with `c` channels.
pub fn box_downscale(src: &[u8], w: usize, h: usize, c: usize, ow: usize, oh: usize) -> Vec<u8> {
    let span = |o: usize, n: usize, on: usize| {
        let a = o * n / on;
        (a.min(n - 1), ((o + 1) * n / on).max(a + 1).min(n))
    };
    let mut out = Vec::with_capacity(ow * oh * c);
    for oy in 0..oh {
        let (y0, y1) = span(oy, h, oh);
        for ox in 0..ow {
            let (x0, x1) = span(ox, w, ow);
            let mut sum = [0u32; 4];
            for y in y0..y1 {
                let row = &src[(y * w + x0) * c..(y * w + x1) * c];
                for px in row.chunks_exact(c) {
                    for (s, v) in sum.iter_mut().zip(px) {
                        *s += u32::from(*v);
                    }
                }
            }
            let n = ((y1 - y0) * (x1 - x0)) as u32;
            out.extend(sum[..c].iter().map(|s| ((s + n / 2) / n) as u8));
        }
    }
    out
}

fn mean_std(luma: &[u8]) -> (f32, f32) {
    let n = luma.len().max(1) as f64;
    let (sum, sq) = luma.iter().fold((0u64, 0u64), |(s, q), &v| (s + u64::from(v), q + u64::from(v) * u64::from(v)));
    let mean = sum as f64 / n;
    let var = (sq as f64 / n - mean * mean).max(0.0);
    (mean as f32, var.sqrt() as f32)
}

/// Variance of the 4-neighbour Laplacian over the interior pixels.
pub fn laplacian_variance(luma: &[u8], w: usize, h: usize) -> f32 {
    if w < 3 || h < 3 {
        return 0.0;
    }
    let (mut sum, mut sq) = (0i64, 0i64);
    for y in 1..h - 1 {
        let (up, row, down) = (&luma[(y - 1) * w..y * w], &luma[y * w..(y + 1) * w], &luma[(y + 1) * w..(y + 2) * w]);
        for x in 1..w - 1 {
            let v = i64::from(row[x - 1]) + i64::from(row[x + 1]) + i64::from(up[x]) + i64::from(down[x]) - 4 * i64::from(row[x]);
            sum += v;
            sq += v * v;
        }
    }
    let n = ((w - 2) * (h - 2)) as f64;
    let mean = sum as f64 / n;
    (sq as f64 / n - mean * mean).max(0.0) as f32
}

/// pHash: the 8×8 lowest frequencies of the 2-D DCT of a 32×32 thumbnail, one bit each
/// (above or below their median). Low frequencies survive resizing, re-encoding and light
/// crops far better than pixel differences do.
pub fn phash(luma: &GrayImage) -> u64 {
    phash_of(&smooth_32(luma.as_raw().clone(), luma.width() as usize, luma.height() as usize))
}

/// The 32×32 thumbnail pHash reads, with a triangle filter: it keeps the hash stable
/// under crops (a box filter straight to 32×32 aliases, and moved it 26 bits for a 4%
/// crop). Callers reduce large images first by an integer factor, which is cheap.
fn smooth_32(luma: Vec<u8>, w: usize, h: usize) -> Vec<u8> {
    let img = GrayImage::from_raw(w as u32, h as u32, luma).expect("exact size");
    image::imageops::resize(&img, 32, 32, image::imageops::FilterType::Triangle).into_raw()
}

/// pHash of a 32×32 luma thumbnail.
fn phash_of(thumb: &[u8]) -> u64 {
    const N: usize = 32;
    let px: Vec<f64> = thumb.iter().map(|&v| f64::from(v)).collect();
    let cos: Vec<f64> =
        (0..8 * N).map(|i| ((2 * (i % N) + 1) as f64 * (i / N) as f64 * std::f64::consts::PI / (2 * N) as f64).cos()).collect();
    // Separable DCT-II, keeping only the 8 lowest frequencies in each direction.
    let mut rows = [[0.0f64; 8]; N];
    for (y, row) in rows.iter_mut().enumerate() {
        for (u, out) in row.iter_mut().enumerate() {
            *out = (0..N).map(|x| px[y * N + x] * cos[u * N + x]).sum();
        }
    }
    let mut coef = [0.0f64; 64];
    for v in 0..8 {
        for u in 0..8 {
            coef[v * 8 + u] = (0..N).map(|y| rows[y][u] * cos[v * N + y]).sum();
        }
    }
    // The DC term measures brightness, not structure: leave it out of the median.
    let mut sorted = coef[1..].to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    coef.iter().fold(0u64, |bits, &c| (bits << 1) | u64::from(c > median))
}

/// Encodes 8-bit pixels as PNG with the fastest compression: for intermediate images
/// that kiln itself writes and reads back, speed matters more than size.
pub fn encode_png_fast(img: &DynamicImage) -> Vec<u8> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    let encoder = image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    );
    encoder.write_image(img.as_bytes(), img.width(), img.height(), img.color().into()).expect("PNG encoding into memory cannot fail");
    out
}

/// Encodes 8-bit pixels as PNG, deterministically (same pixels, same bytes).
pub fn encode_png(img: &DynamicImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).expect("PNG encoding into memory cannot fail");
    out.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    fn photo(w: u32, h: u32) -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| Rgb([(x * 7 % 256) as u8, (y * 3 % 256) as u8, ((x * y) % 256) as u8])))
    }

    fn jpeg(img: &DynamicImage, quality: u8) -> Vec<u8> {
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).encode_image(img).unwrap();
        out
    }

    #[test]
    fn the_inner_thumbnail_is_the_thumbnail_of_the_middle() {
        let limits = DecodeLimits::default();
        // 4 % of 50 is 2 pixels a side: the crop is exactly the window `inner` sees.
        let whole = photo(50, 50);
        let middle = whole.crop_imm(2, 2, 46, 46);
        let (a, b) = (probe(&encode_png(&whole), &limits).unwrap(), probe(&encode_png(&middle), &limits).unwrap());
        assert_eq!(a.inner, b.thumb);
        assert_ne!(a.inner, a.thumb);
        // Under 13 pixels a side nothing is trimmed.
        let tiny = probe(&encode_png(&photo(8, 8)), &limits).unwrap();
        assert_eq!(tiny.inner, tiny.thumb);
    }

    #[test]
    fn every_kind_of_bad_file_is_named() {
        let limits = DecodeLimits::default();
        assert_eq!(probe(b"", &limits), Err(Defect::Empty));
        assert_eq!(probe(b"just some text, not an image", &limits), Err(Defect::NotAnImage));
        let good = jpeg(&photo(64, 48), 90);
        assert!(probe(&good, &limits).is_ok());
        assert!(matches!(probe(&good[..good.len() / 2], &limits), Err(Defect::Truncated { .. })));
        let png = encode_png(&photo(64, 48));
        assert!(matches!(probe(&png[..png.len() - 30], &limits), Err(Defect::Truncated { .. } | Defect::Corrupt { .. })));
        let tight = DecodeLimits { max_pixels: 1000, ..limits };
        assert!(matches!(probe(&png, &tight), Err(Defect::TooManyPixels { width: 64, height: 48, .. })));
    }

    #[test]
    fn a_bomb_header_is_rejected_without_decoding() {
        // A PNG whose header claims 100 000 × 100 000 pixels, with no pixel data behind it.
        let mut png = encode_png(&photo(1, 1));
        png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(probe(&png, &DecodeLimits::default()), Err(Defect::TooManyPixels { width: 100_000, .. })));
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn measures_tell_flat_blurry_and_grey_images_apart() {
        let limits = DecodeLimits::default();
        let flat = encode_png(&DynamicImage::ImageRgb8(RgbImage::from_pixel(40, 40, Rgb([200, 10, 10]))));
        let p = probe(&flat, &limits).unwrap();
        assert!(p.contrast < 0.5 && p.sharpness < 0.5 && p.colourful > 0.9, "{p:?}");
        let grey = encode_png(&DynamicImage::ImageLuma8(GrayImage::from_fn(40, 40, |x, y| image::Luma([((x ^ y) * 8) as u8]))));
        let p = probe(&grey, &limits).unwrap();
        assert_eq!(p.colourful, 0.0);
        assert!(p.sharpness > 100.0, "{p:?}");
        let sharp = photo(128, 96);
        let blurred = sharp.blur(3.0);
        let (ps, pb) = (probe(&encode_png(&sharp), &limits).unwrap(), probe(&encode_png(&blurred), &limits).unwrap());
        assert!(pb.sharpness < ps.sharpness / 10.0, "{} vs {}", pb.sharpness, ps.sharpness);
    }

    #[test]
    fn phash_survives_resize_reencode_and_light_crop() {
        for seed in 0..8 {
            let img = synth::draw(synth::SHAPES[seed as usize % 4], 96, seed);
            let h = |i: &DynamicImage| phash(&i.to_luma8());
            let a = h(&img);
            let resized = img.resize_exact(150, 150, image::imageops::FilterType::Lanczos3);
            let reencoded = image::load_from_memory(&jpeg(&img, 40)).unwrap();
            let cropped = img.crop_imm(3, 3, 90, 90);
            let d = |b: &DynamicImage| (a ^ h(b)).count_ones();
            eprintln!("seed {seed}: resized {} reencoded {} cropped {}", d(&resized), d(&reencoded), d(&cropped));
            assert!(d(&resized) <= 6 && d(&reencoded) <= 6 && d(&cropped) <= 10, "seed {seed}");
            let other = synth::draw(synth::SHAPES[(seed as usize + 1) % 4], 96, seed + 100);
            assert!(d(&other) > 12, "seed {seed}: unrelated images differ, got {}", d(&other));
        }
    }
}
