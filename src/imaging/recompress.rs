//! Is this JPEG a recompression of that image?
//!
//! A JPEG copy of a small image can differ from its original as much as two distinct images
//! do: at 8×8 a quality-30 copy of a digit is 15 % off, while two writers' digits start at 7 %.
//! No pixel threshold separates them, but the JPEG file says how it was made: its luma
//! quantisation table. Compressing the candidate original with that very table predicts the
//! copy's luma to within rounding, block by block; a distinct image, however alike, lands
//! in other quantisation bins and misses many pixels by far more. Measured at qualities 30 to
//! 95 on all 1 797 real digits and 3 000 Fashion-MNIST items, each against its own JPEG and
//! its five nearest distinct images: copies miss at most 3.1 % of pixels by more than
//! [`TOLERANCE`] levels, look-alikes at least 14 % (at quality 95; 50 % at quality 30), and
//! no look-alike fell under [`MAX_MISSES`]. The digits half of this is a test
//! (`tests/it/data_stages.rs`). A copy's misses are also spread thinly: no block may miss more
//! than [`MAX_BLOCK_MISSES`], so a changed word or logo is not a recompression however small
//! a share of the picture it covers.
//!
//! Only what JPEG fixes is used: the 8×8 block grid from the top-left corner, the orthonormal
//! DCT the standard defines, and the file's own table. The encoder's arithmetic (integer or
//! float DCT, colour conversion, chroma filter) differs by a level or two, which the
//! tolerance absorbs, and can round a coefficient that lies within [`AMBIGUITY`] of a
//! boundary either way, which the stored block decides. Partial blocks at the right and bottom edges are skipped: how an encoder
//! pads them is its own choice.

use image::DynamicImage;

/// Bump when [`misses`] changes its numbers: the clean stage memoises pair verdicts.
pub const VERSION: u32 = 3;

/// Levels a predicted pixel may miss by and still count as a match.
const TOLERANCE: f32 = 3.0;
/// How close, in coefficient units, a coefficient may lie to a rounding boundary and still
/// have been rounded either way by an encoder: integer DCTs and rounded colour conversion
/// move coefficients by about one unit.
const AMBIGUITY: f32 = 2.0;
/// The share of pixels that may miss: above it the JPEG was made from something else.
pub const MAX_MISSES: f32 = 0.10;
/// The share of one block's pixels that may miss. Measured on Fashion-MNIST at q30–95:
/// copies at most 8 % in their worst block, the nearest distinct items at least 45 %.
pub const MAX_BLOCK_MISSES: f32 = 0.25;
/// Blocks judged per pair, about at most, on a grid over the image: a 12-megapixel photo has
/// 187 500 blocks, and a copy matches everywhere or nowhere.
const MAX_BLOCKS: usize = 4096;

/// The share of the pixels of the JPEG `jpeg_bytes` (in whole 8×8 blocks) that compressing
/// `original` with the JPEG's own luma table fails to predict, or `None` when the question
/// does not apply: not an 8-bit Huffman-coded JPEG (baseline, extended or progressive), sizes
/// differ, or smaller than one block. The JPEG's luma plane is read as stored, before any colour conversion, so
/// chroma and its subsampling play no part.
pub fn misses(original: &DynamicImage, jpeg_bytes: &[u8]) -> Option<Misses> {
    let table = luma_table(jpeg_bytes)?;
    let (w, h) = (original.width() as usize, original.height() as usize);
    let (b, (jw, jh)) = stored_luma(jpeg_bytes)?;
    if (jw, jh) != (w, h) || w < 8 || h < 8 {
        return None;
    }
    let a = luma(original);
    let (bw, bh) = (w / 8, h / 8);
    // One block in `stride` along each axis: a grid over the whole picture.
    let stride = ((bw * bh) as f64 / MAX_BLOCKS as f64).sqrt().ceil().max(1.0) as usize;
    let transform = Dct::new();
    let (mut missed, mut judged, mut worst) = (0usize, 0usize, 0usize);
    let blocks = (0..bh).step_by(stride).flat_map(|by| (0..bw).step_by(stride).map(move |bx| (bx * 8, by * 8)));
    for (x0, y0) in blocks {
        let at = |i: usize| (y0 + i / 8) * w + x0 + i % 8;
        let ours = transform.dct(&std::array::from_fn(|i| a[at(i)] - 128.0));
        let stored: [f32; 64] = std::array::from_fn(|i| f32::from(b[at(i)]) - 128.0);
        let mut steps: [f32; 64] = std::array::from_fn(|i| (ours[i] / table[i]).round());
        let mut predicted = transform.idct(&std::array::from_fn(|i| steps[i] * table[i]));
        // A coefficient within the encoder's arithmetic of a rounding boundary may have gone
        // either way: take the way that fits the stored block better. Every other
        // coefficient is fixed by the original, so a different image cannot borrow more
        // than these one-step choices.
        let misfit = |p: &[f32; 64]| -> f32 { p.iter().zip(&stored).map(|(&p, &y)| (p.clamp(-128.0, 127.0) - y).powi(2)).sum() };
        let ambiguous: Vec<usize> = (0..64).filter(|&i| ((ours[i] / table[i]).fract().abs() - 0.5).abs() * table[i] < AMBIGUITY).collect();
        for _pass in 0..2 {
            for &i in &ambiguous {
                let q = ours[i] / table[i];
                let other = if steps[i] == q.floor() { q.ceil() } else { q.floor() };
                let shift = (other - steps[i]) * table[i];
                let (v, u) = (i / 8, i % 8);
                let moved: [f32; 64] =
                    std::array::from_fn(|j| predicted[j] + shift * transform.forward[v][j / 8] * transform.forward[u][j % 8]);
                if misfit(&moved) < misfit(&predicted) {
                    predicted = moved;
                    steps[i] = other;
                }
            }
        }
        let here = predicted
            .iter()
            .zip(&stored)
            .filter(|&(&p, &y)| ((p + 128.0).round().clamp(0.0, 255.0) - (y + 128.0)).abs() > TOLERANCE)
            .count();
        missed += here;
        worst = worst.max(here);
        judged += 64;
    }
    Some(Misses { share: missed as f32 / judged as f32, worst_block: worst as f32 / 64.0 })
}

/// How badly compressing a candidate original predicts a JPEG.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Misses {
    /// The share of pixels missed.
    pub share: f32,
    /// The largest share missed in one block.
    pub worst_block: f32,
}

impl Misses {
    /// The JPEG was made from the candidate: few pixels missed, spread thinly. A difference
    /// in content (a word, a logo) misses whole blocks, however small a share of the
    /// picture it is.
    pub fn is_recompression(&self) -> bool {
        self.share <= MAX_MISSES && self.worst_block <= MAX_BLOCK_MISSES
    }
}

/// Whether `bytes` are a JPEG the recompression test can judge (its markers parse): a cheap
/// check before decoding anything.
pub fn applies(bytes: &[u8]) -> bool {
    luma_table(bytes).is_some()
}

/// The luma plane exactly as the file stores it (for colour JPEGs, the Y of YCbCr) and its
/// size.
fn stored_luma(bytes: &[u8]) -> Option<(Vec<u8>, (usize, usize))> {
    let options = zune_core::options::DecoderOptions::default().jpeg_set_out_colorspace(zune_core::colorspace::ColorSpace::Luma);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(zune_core::bytestream::ZCursor::new(bytes), options);
    let plane = decoder.decode().ok()?;
    let (w, h) = decoder.dimensions()?;
    (plane.len() == w * h).then_some((plane, (w, h)))
}

/// Luma as JPEG defines it (ITU-R BT.601 weights), unrounded.
fn luma(img: &DynamicImage) -> Vec<f32> {
    match img {
        DynamicImage::ImageLuma8(g) => g.as_raw().iter().map(|&v| f32::from(v)).collect(),
        _ => img
            .to_rgb8()
            .as_raw()
            .chunks_exact(3)
            .map(|p| 0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2]))
            .collect(),
    }
}

/// JPEG's 8×8 transform, both ways.
struct Dct {
    /// `forward[u][x]`: the orthonormal 8-point DCT-II, JPEG's forward transform per axis.
    forward: [[f32; 8]; 8],
    /// Its transpose, which inverts it.
    inverse: [[f32; 8]; 8],
}

impl Dct {
    fn new() -> Dct {
        let forward: [[f32; 8]; 8] = std::array::from_fn(|u| {
            let c = if u == 0 { (0.125f32).sqrt() } else { 0.5 };
            std::array::from_fn(|x| c * (((2 * x + 1) as f32 * u as f32 * std::f32::consts::PI) / 16.0).cos())
        });
        Dct { forward, inverse: std::array::from_fn(|x| std::array::from_fn(|u| forward[u][x])) }
    }

    /// Row-major 8×8 block to its coefficients (`[v * 8 + u]`, v vertical frequency).
    fn dct(&self, block: &[f32; 64]) -> [f32; 64] {
        separable(block, &self.forward)
    }

    fn idct(&self, coefficients: &[f32; 64]) -> [f32; 64] {
        separable(coefficients, &self.inverse)
    }
}

/// `m · block · mᵀ` for a row-major 8×8 block: one pass along rows, one along columns.
fn separable(block: &[f32; 64], m: &[[f32; 8]; 8]) -> [f32; 64] {
    let mut rows = [0f32; 64];
    for y in 0..8 {
        for u in 0..8 {
            rows[y * 8 + u] = (0..8).map(|x| m[u][x] * block[y * 8 + x]).sum();
        }
    }
    std::array::from_fn(|i| {
        let (v, u) = (i / 8, i % 8);
        (0..8).map(|y| m[v][y] * rows[y * 8 + u]).sum()
    })
}

/// JPEG's zig-zag order: the `k`-th stored entry of a table belongs at `ZIGZAG[k]`.
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56,
    57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

/// The quantisation table of the first component (luma, or the only one), in row-major
/// order, read from the markers before the first scan. `None` for anything that is not an
/// 8-bit baseline or progressive JPEG with one or three components, or whose markers do not
/// parse: the caller then simply has no recompression test.
fn luma_table(bytes: &[u8]) -> Option<[f32; 64]> {
    if bytes.get(..2)? != [0xFF, 0xD8] {
        return None;
    }
    let mut tables: [Option<[f32; 64]>; 4] = [None; 4];
    let mut luma_slot = None;
    let mut at = 2;
    loop {
        // Markers may be padded with any number of 0xFF bytes.
        while *bytes.get(at)? == 0xFF && *bytes.get(at + 1)? == 0xFF {
            at += 1;
        }
        if *bytes.get(at)? != 0xFF {
            return None;
        }
        let marker = *bytes.get(at + 1)?;
        let length = usize::from(u16::from_be_bytes([*bytes.get(at + 2)?, *bytes.get(at + 3)?]));
        let body = bytes.get(at + 4..(at + 2).checked_add(length)?)?;
        match marker {
            0xDB => {
                let mut rest = body;
                while let Some((&head, tail)) = rest.split_first() {
                    let (precision, slot) = (head >> 4, usize::from(head & 0x0F));
                    let size = if precision == 0 { 64 } else { 128 };
                    let entries = tail.get(..size)?;
                    let mut table = [0f32; 64];
                    for (k, &z) in ZIGZAG.iter().enumerate() {
                        let q =
                            if precision == 0 { u16::from(entries[k]) } else { u16::from_be_bytes([entries[2 * k], entries[2 * k + 1]]) };
                        if q == 0 {
                            return None;
                        }
                        table[z] = f32::from(q);
                    }
                    *tables.get_mut(slot)? = Some(table);
                    rest = &tail[size..];
                }
            }
            // Baseline, extended and progressive Huffman frames; lossless and arithmetic
            // coding are left alone.
            0xC0..=0xC2 => {
                let (&precision, components) = (body.first()?, *body.get(5)?);
                if precision != 8 || !matches!(components, 1 | 3) {
                    return None;
                }
                luma_slot = Some(usize::from(*body.get(8)?));
            }
            0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return None,
            // The first scan: every table it needs is defined by now.
            0xDA => return *tables.get(luma_slot?)?,
            _ => {}
        }
        at += 2 + length;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::codecs::jpeg::JpegEncoder;
    use image::{GrayImage, RgbImage};

    fn jpeg(img: &DynamicImage, quality: u8) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_with_encoder(JpegEncoder::new_with_quality(&mut out, quality)).unwrap();
        out
    }

    /// A textured picture: a gradient with a disc and a stripe pattern that `seed` moves.
    fn picture(w: u32, h: u32, seed: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let (fx, fy) = (x as f32 + seed as f32 * 3.7, y as f32 + seed as f32 * 1.3);
            let disc = if (fx - 20.0).powi(2) + (fy - 18.0).powi(2) < 120.0 { 90.0 } else { 0.0 };
            let stripes = 40.0 * ((fx * 0.7).sin() * (fy * 0.4).cos());
            let v = |k: f32| (60.0 + k * x as f32 + disc + stripes).clamp(0.0, 255.0) as u8;
            image::Rgb([v(2.0), v(1.5), v(1.0)])
        })
    }

    #[test]
    fn the_dct_pair_is_orthonormal_and_inverts() {
        let b = Dct::new();
        let block: [f32; 64] = std::array::from_fn(|i| (i as f32 * 7.3).sin() * 100.0);
        let back = b.idct(&b.dct(&block));
        assert!(block.iter().zip(&back).all(|(x, y)| (x - y).abs() < 1e-3));
        // A flat block of 8 carries 8 * 8 = 64 in DC under JPEG's scaling.
        let flat = b.dct(&[8.0; 64]);
        assert!((flat[0] - 64.0).abs() < 1e-3 && flat[1..].iter().all(|c| c.abs() < 1e-3));
    }

    #[test]
    fn a_jpeg_of_an_image_is_recognised_at_every_quality_and_a_lookalike_is_not() {
        // 520×520 has 4 225 blocks: judged on a grid of every other block.
        for (w, h) in [(8, 8), (28, 28), (96, 64), (520, 520)] {
            let original = DynamicImage::ImageRgb8(picture(w, h, 0));
            let other = DynamicImage::ImageRgb8(picture(w, h, 1));
            for quality in [30, 60, 90] {
                let bytes = jpeg(&original, quality);
                let own = misses(&original, &bytes).unwrap();
                assert!(own.is_recompression(), "{w}x{h} q{quality}: {own:?}");
                // Measured: copies miss at most 4 % here; the other picture over 90 %, but
                // for 520×520, mostly saturated white in both, 27 % (and 98 % of a block).
                let foreign = misses(&other, &bytes).unwrap();
                assert!(foreign.share > MAX_MISSES && !foreign.is_recompression(), "{w}x{h} q{quality}: {foreign:?}");
            }
        }
        let grey = DynamicImage::ImageLuma8(GrayImage::from_fn(16, 16, |x, y| image::Luma([(x * 13 + y * 7) as u8])));
        let bytes = jpeg(&grey, 40);
        assert!(misses(&grey, &bytes).unwrap().is_recompression());
    }

    #[test]
    fn a_small_change_of_content_is_not_a_recompression() {
        // The same picture with a 6×6 patch painted over: 1 % of the pixels, all in one
        // block, like a word changed on a page.
        let original = picture(64, 64, 0);
        let mut edited = original.clone();
        for y in 19..25 {
            for x in 35..41 {
                edited.put_pixel(x, y, image::Rgb([250, 250, 250]));
            }
        }
        let bytes = jpeg(&DynamicImage::ImageRgb8(edited), 75);
        let m = misses(&DynamicImage::ImageRgb8(original), &bytes).unwrap();
        assert!(m.share <= MAX_MISSES, "a small share of the picture: {m:?}");
        assert!(!m.is_recompression(), "{m:?}");
    }

    #[test]
    fn the_test_declines_what_it_cannot_judge() {
        let original = DynamicImage::ImageRgb8(picture(32, 32, 0));
        let bytes = jpeg(&original, 50);
        // Not a JPEG, a truncated header, another size, less than a block.
        assert_eq!(misses(&original, &crate::imaging::encode_png(&original)), None);
        assert_eq!(misses(&original, &bytes[..40]), None);
        let smaller = DynamicImage::ImageRgb8(picture(24, 32, 0));
        assert_eq!(misses(&smaller, &bytes), None);
        let tiny = DynamicImage::ImageRgb8(picture(7, 7, 0));
        assert_eq!(misses(&tiny, &jpeg(&tiny, 50)), None);
        // Every prefix of a real file parses without a panic.
        for cut in 0..bytes.len().min(700) {
            let _ = luma_table(&bytes[..cut]);
        }
    }
}
