//! Deterministic preprocessing: colour mode, resize (exact, shorter side + centre crop,
//! letterbox) with a chosen interpolation. Resizing uses `fast_image_resize` (SIMD).

use std::borrow::Cow;

use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer, images::Image, images::ImageRef};
use image::{DynamicImage, GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColorMode {
    #[default]
    Rgb,
    Grayscale,
}

impl ColorMode {
    pub fn channels(self) -> usize {
        match self {
            ColorMode::Rgb => 3,
            ColorMode::Grayscale => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Stretch to the target size.
    Exact,
    /// Scale so the image covers the target, then cut the centre (torchvision's
    /// `Resize(shorter) + CenterCrop`).
    #[default]
    Crop,
    /// Scale so the image fits inside the target, pad the rest with `pad`.
    Letterbox,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    Nearest,
    #[default]
    Bilinear,
    Bicubic,
    Lanczos,
}

impl Interpolation {
    fn algorithm(self) -> ResizeAlg {
        match self {
            Interpolation::Nearest => ResizeAlg::Nearest,
            Interpolation::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
            Interpolation::Bicubic => ResizeAlg::Convolution(FilterType::CatmullRom),
            Interpolation::Lanczos => ResizeAlg::Convolution(FilterType::Lanczos3),
        }
    }
}

/// The deterministic part of preprocessing, applied once per image and memoised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transform {
    pub color: ColorMode,
    pub width: u32,
    pub height: u32,
    pub resize: ResizeMode,
    pub interpolation: Interpolation,
    /// Fill for letterbox padding.
    pub pad: u8,
    /// With `resize = "crop"`: the centre crop's share of the resized shorter side
    /// (timm's `crop_pct`; 0.875 = resize to 256, crop 224). 1 crops nothing extra.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub crop_pct: f64,
}

fn one() -> f64 {
    1.0
}

fn is_one(v: &f64) -> bool {
    *v == 1.0
}

/// 8-bit pixels of the output colour mode, borrowed when the image already has it.
pub fn pixels(img: &DynamicImage, color: ColorMode) -> (Cow<'_, [u8]>, PixelType) {
    match (color, img) {
        (ColorMode::Rgb, DynamicImage::ImageRgb8(b)) => (Cow::Borrowed(b.as_raw().as_slice()), PixelType::U8x3),
        (ColorMode::Rgb, other) => (Cow::Owned(other.to_rgb8().into_raw()), PixelType::U8x3),
        (ColorMode::Grayscale, DynamicImage::ImageLuma8(b)) => (Cow::Borrowed(b.as_raw().as_slice()), PixelType::U8),
        (ColorMode::Grayscale, other) => (Cow::Owned(other.to_luma8().into_raw()), PixelType::U8),
    }
}

/// Like [`pixels`], taking the image: no copy when it already has the colour mode.
pub fn into_pixels(img: DynamicImage, color: ColorMode) -> (Vec<u8>, PixelType) {
    match (color, img) {
        (ColorMode::Rgb, DynamicImage::ImageRgb8(b)) => (b.into_raw(), PixelType::U8x3),
        (ColorMode::Rgb, other) => (other.to_rgb8().into_raw(), PixelType::U8x3),
        (ColorMode::Grayscale, DynamicImage::ImageLuma8(b)) => (b.into_raw(), PixelType::U8),
        (ColorMode::Grayscale, other) => (other.to_luma8().into_raw(), PixelType::U8),
    }
}

pub fn to_image(buf: Vec<u8>, w: u32, h: u32, color: ColorMode) -> DynamicImage {
    match color {
        ColorMode::Rgb => DynamicImage::ImageRgb8(RgbImage::from_raw(w, h, buf).expect("buffer matches its size")),
        ColorMode::Grayscale => DynamicImage::ImageLuma8(GrayImage::from_raw(w, h, buf).expect("buffer matches its size")),
    }
}

/// Resizes a packed buffer of `(w, h)` pixels (of `fast_image_resize` type `pt`) to
/// `(ow, oh)`, optionally from a crop box of the source.
pub fn resize_buffer(
    src: &[u8],
    (w, h): (u32, u32),
    pt: PixelType,
    (ow, oh): (u32, u32),
    interpolation: Interpolation,
    crop: Option<(f64, f64, f64, f64)>,
) -> Vec<u8> {
    if (w, h) == (ow, oh) && crop.is_none() {
        return src.to_vec();
    }
    let source = ImageRef::new(w, h, src, pt).expect("buffer matches its size");
    let mut dest = Image::new(ow, oh, pt);
    let mut options = ResizeOptions::new().resize_alg(interpolation.algorithm());
    if let Some((l, t, cw, ch)) = crop {
        options = options.crop(l, t, cw, ch);
    }
    Resizer::new().resize(&source, &mut dest, &options).expect("pixel types match");
    dest.into_vec()
}

impl Transform {
    pub fn apply(&self, img: &DynamicImage) -> DynamicImage {
        let (w, h) = (img.width(), img.height());
        let (buf, pt) = pixels(img, self.color);
        let (tw, th) = (self.width, self.height);
        let out = match self.resize {
            ResizeMode::Exact => resize_buffer(&buf, (w, h), pt, (tw, th), self.interpolation, None),
            ResizeMode::Crop if self.crop_pct < 1.0 => {
                // torchvision's Resize(shorter) then CenterCrop: resize the whole image,
                // then cut whole pixels, so results match PyTorch preprocessing exactly.
                let scale = (f64::from(tw) / f64::from(w)).max(f64::from(th) / f64::from(h)) / self.crop_pct.max(0.05);
                let (rw, rh) = (((f64::from(w) * scale).round() as u32).max(tw), ((f64::from(h) * scale).round() as u32).max(th));
                let resized = resize_buffer(&buf, (w, h), pt, (rw, rh), self.interpolation, None);
                let c = self.color.channels();
                let (ox, oy) = ((f64::from(rw - tw) / 2.0).round() as usize, (f64::from(rh - th) / 2.0).round() as usize);
                let mut out = Vec::with_capacity((tw * th) as usize * c);
                for y in 0..th as usize {
                    let start = ((oy + y) * rw as usize + ox) * c;
                    out.extend_from_slice(&resized[start..start + tw as usize * c]);
                }
                out
            }
            ResizeMode::Crop => {
                let scale = (f64::from(tw) / f64::from(w)).max(f64::from(th) / f64::from(h));
                let (cw, ch) = (f64::from(tw) / scale, f64::from(th) / scale);
                let crop = ((f64::from(w) - cw) / 2.0, (f64::from(h) - ch) / 2.0, cw, ch);
                resize_buffer(&buf, (w, h), pt, (tw, th), self.interpolation, Some(crop))
            }
            ResizeMode::Letterbox => {
                let scale = (f64::from(tw) / f64::from(w)).min(f64::from(th) / f64::from(h));
                let (nw, nh) = (((f64::from(w) * scale).round() as u32).clamp(1, tw), ((f64::from(h) * scale).round() as u32).clamp(1, th));
                let inner = resize_buffer(&buf, (w, h), pt, (nw, nh), self.interpolation, None);
                let c = self.color.channels();
                let mut canvas = vec![self.pad; (tw * th) as usize * c];
                let (ox, oy) = (((tw - nw) / 2) as usize, ((th - nh) / 2) as usize);
                for y in 0..nh as usize {
                    let dst = ((oy + y) * tw as usize + ox) * c;
                    canvas[dst..dst + nw as usize * c].copy_from_slice(&inner[y * nw as usize * c..(y + 1) * nw as usize * c]);
                }
                canvas
            }
        };
        to_image(out, tw, th, self.color)
    }
}

/// 8-bit pixels (HWC) → f32 CHW in [0, 1], then `(x − mean) / std` per channel: what a
/// network sees. One code path for convert, train and predict.
pub fn normalize_chw(hwc: &[u8], channels: usize, mean: &[f32], std: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(hwc.len());
    for c in 0..channels {
        let s = std.get(c).copied().unwrap_or(1.0);
        let (scale, shift) = (1.0 / (255.0 * s), mean.get(c).copied().unwrap_or(0.0) / s);
        // One plane at a time: sequential writes, no zero-filling first.
        out.extend(hwc[c..].iter().step_by(channels).map(|&v| f32::from(v) * scale - shift));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_moves_channels_to_planes() {
        // Two RGB pixels: (0, 255, 51) and (255, 0, 102).
        let out = super::normalize_chw(&[0, 255, 51, 255, 0, 102], 3, &[0.0, 0.5, 0.0], &[1.0, 0.5, 0.2]);
        let want = [0.0, 1.0, 1.0, -1.0, 1.0, 2.0];
        assert!(out.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{out:?}");
    }

    fn gradient(w: u32, h: u32) -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 255 / w.max(1)) as u8, (y * 255 / h.max(1)) as u8, 128])))
    }

    fn t(resize: ResizeMode, w: u32, h: u32) -> Transform {
        Transform { color: ColorMode::Rgb, width: w, height: h, resize, interpolation: Interpolation::Bilinear, pad: 7, crop_pct: 1.0 }
    }

    #[test]
    fn every_mode_yields_the_target_size() {
        for mode in [ResizeMode::Exact, ResizeMode::Crop, ResizeMode::Letterbox] {
            let out = t(mode, 32, 24).apply(&gradient(100, 40));
            assert_eq!((out.width(), out.height()), (32, 24), "{mode:?}");
        }
    }

    #[test]
    fn letterbox_pads_and_crop_does_not() {
        let wide = gradient(100, 20);
        let boxed = t(ResizeMode::Letterbox, 50, 50).apply(&wide).to_rgb8();
        assert_eq!(boxed.get_pixel(25, 0).0, [7, 7, 7], "rows above the image are padding");
        assert_ne!(boxed.get_pixel(25, 25).0, [7, 7, 7]);
        let cropped = t(ResizeMode::Crop, 50, 50).apply(&wide).to_rgb8();
        // The centre crop of a horizontal gradient keeps only its middle: no dark left edge.
        assert!(cropped.get_pixel(0, 25).0[0] > 80, "{:?}", cropped.get_pixel(0, 25));
    }

    #[test]
    fn grayscale_has_one_channel() {
        let out = Transform { color: ColorMode::Grayscale, ..t(ResizeMode::Exact, 8, 8) }.apply(&gradient(16, 16));
        assert_eq!(out.color(), image::ColorType::L8);
    }

    #[test]
    fn nearest_exact_downscale_by_two_picks_pixels() {
        let img = DynamicImage::ImageLuma8(GrayImage::from_fn(4, 4, |x, y| image::Luma([(y * 4 + x) as u8])));
        let tr = Transform { color: ColorMode::Grayscale, interpolation: Interpolation::Nearest, ..t(ResizeMode::Exact, 2, 2) };
        let out = tr.apply(&img).to_luma8().into_raw();
        assert_eq!(out.len(), 4);
        assert!(out.iter().all(|v| (0..16).contains(v)));
    }
}
