//! Image decoding with limits, and the measurements the clean stage judges images by.
//!
//! [`probe`] decodes one image once and returns everything the checks need (size, format,
//! brightness, contrast, sharpness, colourfulness, perceptual hash). Its result is small
//! and depends only on the image bytes and the decode limits, so the clean stage memoises
//! it per item; changing a threshold never decodes anything again.

pub mod synth;

use std::io::Cursor;

use image::{DynamicImage, GrayImage, ImageFormat, ImageReader};
use serde::{Deserialize, Serialize};

/// Bump when [`probe`] changes what it measures: it is part of the memo key.
pub const PROBE_VERSION: u32 = 1;

/// Images larger than this are shrunk before the sharpness and colour measures, which
/// are then comparable across resolutions and cheap on large photos.
const MEASURE_SIDE: u32 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecodeLimits {
    /// Width × height above which an image is rejected from its header alone.
    pub max_pixels: u64,
    pub max_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits { max_pixels: 64_000_000, max_bytes: 256 << 20 }
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
}

impl Probe {
    /// Mean absolute difference of two thumbnails, 0–255 per channel.
    pub fn colour_difference(&self, other: &Probe) -> f64 {
        thumb_difference(&hex::decode(&self.thumb).unwrap_or_default(), &hex::decode(&other.thumb).unwrap_or_default())
    }
}

/// Mean absolute difference of two decoded thumbnails; infinite when they do not compare.
pub fn thumb_difference(a: &[u8], b: &[u8]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return f64::INFINITY;
    }
    a.iter().zip(b).map(|(x, y)| u32::from(x.abs_diff(*y))).sum::<u32>() as f64 / a.len() as f64
}

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
pub fn probe(bytes: &[u8], limits: &DecodeLimits) -> Result<Probe, Defect> {
    let (format, img) = decode(bytes, limits)?;
    let (width, height) = (img.width(), img.height());
    let small = if width.max(height) > MEASURE_SIDE { img.thumbnail(MEASURE_SIDE, MEASURE_SIDE) } else { img };
    let luma = small.to_luma8();
    let (brightness, contrast) = mean_std(&luma);
    Ok(Probe {
        format: format_name(format),
        width,
        height,
        brightness,
        contrast,
        sharpness: laplacian_variance(&luma),
        colourful: colourful_share(&small),
        phash: phash(&luma),
        thumb: hex::encode(image::imageops::resize(&small.to_rgb8(), 8, 8, image::imageops::FilterType::Triangle).as_raw()),
    })
}

fn mean_std(luma: &GrayImage) -> (f32, f32) {
    let n = luma.len().max(1) as f64;
    let sum: f64 = luma.iter().map(|&v| f64::from(v)).sum();
    let mean = sum / n;
    let var = luma.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, var.sqrt() as f32)
}

/// Variance of the 4-neighbour Laplacian over the interior pixels.
pub fn laplacian_variance(luma: &GrayImage) -> f32 {
    let (w, h) = luma.dimensions();
    if w < 3 || h < 3 {
        return 0.0;
    }
    let px = |x: u32, y: u32| f64::from(luma.get_pixel(x, y)[0]);
    let mut values = Vec::with_capacity(((w - 2) * (h - 2)) as usize);
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            values.push(px(x - 1, y) + px(x + 1, y) + px(x, y - 1) + px(x, y + 1) - 4.0 * px(x, y));
        }
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n) as f32
}

fn colourful_share(img: &DynamicImage) -> f32 {
    if !img.color().has_color() {
        return 0.0;
    }
    let rgb = img.to_rgb8();
    let coloured = rgb
        .pixels()
        .filter(|p| {
            let [r, g, b] = p.0.map(i16::from);
            (r - g).abs().max((g - b).abs()).max((r - b).abs()) > 12
        })
        .count();
    coloured as f32 / (u64::from(rgb.width()) * u64::from(rgb.height())).max(1) as f32
}

/// pHash: the 8×8 lowest frequencies of the 2-D DCT of a 32×32 thumbnail, one bit each
/// (above or below their median). Low frequencies survive resizing, re-encoding and light
/// crops far better than pixel differences do.
pub fn phash(luma: &GrayImage) -> u64 {
    const N: usize = 32;
    let small = image::imageops::resize(luma, N as u32, N as u32, image::imageops::FilterType::Triangle);
    let px: Vec<f64> = small.iter().map(|&v| f64::from(v)).collect();
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
