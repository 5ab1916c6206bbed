//! Training-time augmentation, covering Keras' `ImageDataGenerator` plus colour jitter and
//! random resized crop.
//!
//! A spec ([`Augment`]) is drawn into concrete [`Params`] from kiln's seeded RNG, then
//! applied. The geometric part is one affine map about the image centre (zoom, shear,
//! rotation, then shift), sampled bilinearly; points falling outside the image take their
//! value from the fill mode:
//!
//! | `fill_mode` | outside `a b c d` |
//! |---|---|
//! | `constant` | `k k k k \| a b c d \| k k k k` (k = `cval`) |
//! | `nearest`  | `a a a a \| a b c d \| d d d d` |
//! | `reflect`  | `d c b a \| a b c d \| d c b a` |
//! | `wrap`     | `a b c d \| a b c d \| a b c d` |

use image::DynamicImage;
use serde::{Deserialize, Serialize};

use super::transform::{ColorMode, Interpolation, into_pixels, resize_buffer, to_image};
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FillMode {
    #[default]
    Nearest,
    Constant,
    Reflect,
    Wrap,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizedCrop {
    /// Share of the image area kept, drawn uniformly from this range.
    pub scale: [f64; 2],
    /// Aspect ratio of the crop, drawn log-uniformly from this range.
    pub ratio: [f64; 2],
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Augment {
    /// Degrees; the angle is drawn from [-r, r].
    pub rotation_range: f64,
    /// Fraction of the width; the shift is drawn from [-s, s].
    pub width_shift_range: f64,
    pub height_shift_range: f64,
    /// Shear angle in degrees, drawn from [-s, s].
    pub shear_range: f64,
    /// Zoom factors drawn from [1 - z, 1 + z] for each axis.
    pub zoom_range: f64,
    pub horizontal_flip: bool,
    pub vertical_flip: bool,
    pub fill_mode: FillMode,
    pub cval: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub brightness_range: Option<[f64; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contrast_range: Option<[f64; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saturation_range: Option<[f64; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub random_resized_crop: Option<ResizedCrop>,
}

/// A value of an [`Augment`] spec that means nothing (a NaN, a rotation of 1e308
/// degrees, a range whose low end is above its high end).
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    /// The key as written under `augment` (`rotation_range`, `brightness_range[1]`,
    /// `random_resized_crop.scale`).
    pub field: String,
    /// The value, as shown to people.
    pub value: String,
    /// What it must be (`in [0, 360] (degrees; …)`).
    pub expected: String,
}

/// Valid ranges, documented in the README: rotation 0–360 degrees, shifts 0–1 of the side,
/// shear 0–60 degrees, zoom [0, 1); brightness and contrast factors in (0, 10] and
/// saturation in [0, 10], low ≤ high; crop scale in (0, 1] and ratio in [0.01, 100], low ≤
/// high.
const ROTATION: (f64, f64) = (0.0, 360.0);
const SHEAR: (f64, f64) = (0.0, 60.0);
const FACTOR_MAX: f64 = 10.0;
const RATIO: (f64, f64) = (0.01, 100.0);

fn shown(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && a.is_finite() && !(1e-4..1e9).contains(&a) { format!("{v:e}") } else { format!("{v}") }
}

impl Augment {
    /// Every value outside its range (see the constants above); empty when the spec is
    /// usable.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut out = Vec::new();
        // `lo_open`: the low end itself is excluded.
        let mut within = |field: &str, v: f64, lo: f64, lo_open: bool, hi: f64, hi_open: bool, what: &str| {
            let ok = v.is_finite() && (if lo_open { v > lo } else { v >= lo }) && (if hi_open { v < hi } else { v <= hi });
            if !ok {
                out.push(Invalid {
                    field: field.to_string(),
                    value: shown(v),
                    expected: format!(
                        "in {}{}, {}{} ({what})",
                        if lo_open { '(' } else { '[' },
                        shown(lo),
                        shown(hi),
                        if hi_open { ')' } else { ']' }
                    ),
                });
            }
            ok
        };
        within("rotation_range", self.rotation_range, ROTATION.0, false, ROTATION.1, false, "degrees; the angle is drawn from [-r, r]");
        within("width_shift_range", self.width_shift_range, 0.0, false, 1.0, false, "a fraction of the width");
        within("height_shift_range", self.height_shift_range, 0.0, false, 1.0, false, "a fraction of the height");
        within("shear_range", self.shear_range, SHEAR.0, false, SHEAR.1, false, "degrees");
        within("zoom_range", self.zoom_range, 0.0, false, 1.0, true, "zoom factors are drawn from [1 - z, 1 + z]");
        let mut pairs: Vec<(String, [f64; 2])> = Vec::new();
        for (name, range, lo_open) in [
            ("brightness_range", self.brightness_range, true),
            ("contrast_range", self.contrast_range, true),
            ("saturation_range", self.saturation_range, false),
        ] {
            let Some(r) = range else { continue };
            let what =
                if lo_open { "a factor; 1 leaves the image as it is" } else { "a factor; 0 is grayscale, 1 leaves the image as it is" };
            let ok = within(&format!("{name}[0]"), r[0], 0.0, lo_open, FACTOR_MAX, false, what)
                & within(&format!("{name}[1]"), r[1], 0.0, lo_open, FACTOR_MAX, false, what);
            if ok {
                pairs.push((name.to_string(), r));
            }
        }
        if let Some(c) = &self.random_resized_crop {
            let ok = within("random_resized_crop.scale[0]", c.scale[0], 0.0, true, 1.0, false, "a share of the image area")
                & within("random_resized_crop.scale[1]", c.scale[1], 0.0, true, 1.0, false, "a share of the image area");
            if ok {
                pairs.push(("random_resized_crop.scale".into(), c.scale));
            }
            let ok = within("random_resized_crop.ratio[0]", c.ratio[0], RATIO.0, false, RATIO.1, false, "width over height")
                & within("random_resized_crop.ratio[1]", c.ratio[1], RATIO.0, false, RATIO.1, false, "width over height");
            if ok {
                pairs.push(("random_resized_crop.ratio".into(), c.ratio));
            }
        }
        for (field, [lo, hi]) in pairs {
            if lo > hi {
                out.push(Invalid {
                    field,
                    value: format!("[{}, {}]", shown(lo), shown(hi)),
                    expected: "a range [low, high] with low ≤ high".into(),
                });
            }
        }
        out
    }
}

/// One concrete draw of an [`Augment`] spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub rotation_deg: f64,
    /// Shift in pixels (+x right, +y down).
    pub shift: (f64, f64),
    pub shear_deg: f64,
    pub zoom: (f64, f64),
    pub hflip: bool,
    pub vflip: bool,
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    /// (left, top, width, height) in source pixels.
    pub crop: Option<(f64, f64, f64, f64)>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            rotation_deg: 0.0,
            shift: (0.0, 0.0),
            shear_deg: 0.0,
            zoom: (1.0, 1.0),
            hflip: false,
            vflip: false,
            brightness: 1.0,
            contrast: 1.0,
            saturation: 1.0,
            crop: None,
        }
    }
}

impl Augment {
    pub fn is_identity(&self) -> bool {
        *self == Augment { fill_mode: self.fill_mode, cval: self.cval, ..Augment::default() }
    }

    pub fn draw(&self, rng: &mut Rng, w: u32, h: u32) -> Params {
        let sym = |rng: &mut Rng, r: f64| if r > 0.0 { rng.range(-r, r) } else { 0.0 };
        let within = |rng: &mut Rng, r: Option<[f64; 2]>| r.map_or(1.0, |[lo, hi]| if hi > lo { rng.range(lo, hi) } else { lo });
        let zoom = |rng: &mut Rng| if self.zoom_range > 0.0 { rng.range(1.0 - self.zoom_range, 1.0 + self.zoom_range) } else { 1.0 };
        let crop = self.random_resized_crop.as_ref().map(|c| resized_crop_box(rng, c, w, h));
        Params {
            rotation_deg: sym(rng, self.rotation_range),
            shift: (sym(rng, self.width_shift_range) * f64::from(w), sym(rng, self.height_shift_range) * f64::from(h)),
            shear_deg: sym(rng, self.shear_range),
            zoom: (zoom(rng), zoom(rng)),
            hflip: self.horizontal_flip && rng.unit() < 0.5,
            vflip: self.vertical_flip && rng.unit() < 0.5,
            brightness: within(rng, self.brightness_range),
            contrast: within(rng, self.contrast_range),
            saturation: within(rng, self.saturation_range),
            crop,
        }
    }

    /// Draws and applies: the output has the input's size and colour mode.
    pub fn apply(&self, img: DynamicImage, rng: &mut Rng) -> DynamicImage {
        let p = self.draw(rng, img.width(), img.height());
        apply(img, &p, self.fill_mode, self.cval)
    }
}

/// torchvision's RandomResizedCrop box: up to ten tries for a crop that fits, else the
/// largest centred crop with a ratio in range.
fn resized_crop_box(rng: &mut Rng, c: &ResizedCrop, w: u32, h: u32) -> (f64, f64, f64, f64) {
    let (fw, fh) = (f64::from(w), f64::from(h));
    let area = fw * fh;
    let (lr0, lr1) = (c.ratio[0].ln(), c.ratio[1].ln());
    for _ in 0..10 {
        let target = area * rng.range(c.scale[0], c.scale[1].max(c.scale[0] + f64::EPSILON));
        let ratio = rng.range(lr0, lr1.max(lr0 + f64::EPSILON)).exp();
        let (cw, ch) = ((target * ratio).sqrt(), (target / ratio).sqrt());
        if cw <= fw && ch <= fh {
            return (rng.range(0.0, fw - cw + f64::EPSILON), rng.range(0.0, fh - ch + f64::EPSILON), cw, ch);
        }
    }
    let ratio = (fw / fh).clamp(c.ratio[0], c.ratio[1]);
    let (cw, ch) = if fw / fh > ratio { (fh * ratio, fh) } else { (fw, fw / ratio) };
    ((fw - cw) / 2.0, (fh - ch) / 2.0, cw, ch)
}

/// Applies concrete parameters: crop, affine warp, flips, colour jitter, in that order.
pub fn apply(img: DynamicImage, p: &Params, fill: FillMode, cval: u8) -> DynamicImage {
    let (w, h) = (img.width(), img.height());
    let color = if img.color().has_color() { ColorMode::Rgb } else { ColorMode::Grayscale };
    let c = color.channels();
    let (mut buf, pt) = into_pixels(img, color);
    if let Some(crop) = p.crop {
        buf = resize_buffer(&buf, (w, h), pt, (w, h), Interpolation::Bilinear, Some(crop));
    }
    let geometric = p.rotation_deg != 0.0 || p.shift != (0.0, 0.0) || p.shear_deg != 0.0 || p.zoom != (1.0, 1.0);
    if geometric {
        buf = warp(&buf, w as usize, h as usize, c, p, fill, cval);
    }
    if p.hflip {
        for row in buf.chunks_exact_mut(w as usize * c) {
            match c {
                3 => row.as_chunks_mut::<3>().0.reverse(),
                _ => row.reverse(),
            }
        }
    }
    if p.vflip {
        let stride = w as usize * c;
        for y in 0..h as usize / 2 {
            let (top, bottom) = buf.split_at_mut((h as usize - 1 - y) * stride);
            top[y * stride..(y + 1) * stride].swap_with_slice(&mut bottom[..stride]);
        }
    }
    if (p.brightness, p.contrast, p.saturation) != (1.0, 1.0, 1.0) {
        jitter(&mut buf, c, p.brightness, p.contrast, p.saturation);
    }
    to_image(buf, w, h, color)
}

/// Index along one axis of length `n` under a fill mode; `None` means the constant.
fn fill_index(i: i64, n: i64, fill: FillMode) -> Option<usize> {
    if (0..n).contains(&i) {
        return Some(i as usize);
    }
    Some(match fill {
        FillMode::Constant => return None,
        FillMode::Nearest => i.clamp(0, n - 1) as usize,
        FillMode::Wrap => i.rem_euclid(n) as usize,
        FillMode::Reflect => {
            // Half-sample symmetric: d c b a | a b c d | d c b a.
            let m = i.rem_euclid(2 * n);
            (if m < n { m } else { 2 * n - 1 - m }) as usize
        }
    })
}

fn warp(src: &[u8], w: usize, h: usize, c: usize, p: &Params, fill: FillMode, cval: u8) -> Vec<u8> {
    // Forward map about the centre: out = R·S·Z·(in − centre) + centre + shift.
    // Each output pixel samples the source at the inverse of that map.
    let (cx, cy) = ((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0);
    let (sin, cos) = p.rotation_deg.to_radians().sin_cos();
    let shear = p.shear_deg.to_radians().tan();
    // M = R · Sh · Z, with Sh = [[1, shear], [0, 1]], Z = diag(zx, zy).
    let (zx, zy) = p.zoom;
    let m = [[cos * zx, (cos * shear - sin) * zy], [sin * zx, (sin * shear + cos) * zy]];
    let det = m[0][0] * m[1][1] - m[0][1] * m[1][0];
    let inv = [[m[1][1] / det, -m[0][1] / det], [-m[1][0] / det, m[0][0] / det]];
    let mut out = vec![0u8; w * h * c];
    let sample = |x: i64, y: i64, k: usize| -> f64 {
        match (fill_index(x, w as i64, fill), fill_index(y, h as i64, fill)) {
            (Some(xi), Some(yi)) => f64::from(src[(yi * w + xi) * c + k]),
            _ => f64::from(cval),
        }
    };
    for oy in 0..h {
        for ox in 0..w {
            let (dx, dy) = (ox as f64 - cx - p.shift.0, oy as f64 - cy - p.shift.1);
            let (sx, sy) = (inv[0][0] * dx + inv[0][1] * dy + cx, inv[1][0] * dx + inv[1][1] * dy + cy);
            // Snap values within rounding noise of a pixel centre, so exact maps stay exact.
            let snap = |v: f64| if (v - v.round()).abs() < 1e-9 { v.round() } else { v };
            let (sx, sy) = (snap(sx), snap(sy));
            let (x0, y0) = (sx.floor() as i64, sy.floor() as i64);
            let (fx, fy) = (sx - x0 as f64, sy - y0 as f64);
            for k in 0..c {
                let v = sample(x0, y0, k) * (1.0 - fx) * (1.0 - fy)
                    + sample(x0 + 1, y0, k) * fx * (1.0 - fy)
                    + sample(x0, y0 + 1, k) * (1.0 - fx) * fy
                    + sample(x0 + 1, y0 + 1, k) * fx * fy;
                out[(oy * w + ox) * c + k] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// Brightness scales, contrast stretches about the mean grey level, saturation blends
/// with each pixel's grey (torchvision's ColorJitter definitions).
fn jitter(buf: &mut [u8], c: usize, brightness: f64, contrast: f64, saturation: f64) {
    let grey =
        |px: &[u8]| if c == 3 { 0.299 * f64::from(px[0]) + 0.587 * f64::from(px[1]) + 0.114 * f64::from(px[2]) } else { f64::from(px[0]) };
    for px in buf.chunks_exact_mut(c) {
        for v in px.iter_mut() {
            *v = (f64::from(*v) * brightness).round().clamp(0.0, 255.0) as u8;
        }
    }
    if contrast != 1.0 {
        let mean = buf.chunks_exact(c).map(grey).sum::<f64>() / (buf.len() / c).max(1) as f64;
        for v in buf.iter_mut() {
            *v = ((f64::from(*v) - mean) * contrast + mean).round().clamp(0.0, 255.0) as u8;
        }
    }
    if saturation != 1.0 && c == 3 {
        for px in buf.chunks_exact_mut(3) {
            let g = grey(px);
            for v in px.iter_mut() {
                *v = ((f64::from(*v) - g) * saturation + g).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma};

    /// The 4×4 image 0 1 2 3 / 4 5 6 7 / 8 9 10 11 / 12 13 14 15.
    fn grid() -> DynamicImage {
        DynamicImage::ImageLuma8(GrayImage::from_fn(4, 4, |x, y| Luma([(y * 4 + x) as u8])))
    }

    fn run(p: Params, fill: FillMode) -> Vec<u8> {
        apply(grid(), &p, fill, 99).to_luma8().into_raw()
    }

    #[test]
    fn flips() {
        assert_eq!(
            run(Params { hflip: true, ..Default::default() }, FillMode::Nearest),
            [3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8, 15, 14, 13, 12]
        );
        assert_eq!(
            run(Params { vflip: true, ..Default::default() }, FillMode::Nearest),
            [12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3]
        );
    }

    #[test]
    fn rotation_by_90_degrees_moves_every_pixel_exactly() {
        // +90° turns +x towards +y (clockwise on screen, y pointing down): the top row
        // 0 1 2 3 becomes the right column.
        assert_eq!(
            run(Params { rotation_deg: 90.0, ..Default::default() }, FillMode::Nearest),
            [12, 8, 4, 0, 13, 9, 5, 1, 14, 10, 6, 2, 15, 11, 7, 3]
        );
    }

    #[test]
    fn shift_right_by_two_with_each_fill_mode() {
        let shifted = |fill| run(Params { shift: (2.0, 0.0), ..Default::default() }, fill);
        assert_eq!(&shifted(FillMode::Constant)[..4], [99, 99, 0, 1]);
        assert_eq!(&shifted(FillMode::Nearest)[..4], [0, 0, 0, 1]);
        assert_eq!(&shifted(FillMode::Reflect)[..4], [1, 0, 0, 1]);
        assert_eq!(&shifted(FillMode::Wrap)[..4], [2, 3, 0, 1]);
        assert_eq!(&shifted(FillMode::Wrap)[12..], [14, 15, 12, 13], "every row shifts alike");
    }

    #[test]
    fn shear_shifts_each_row_by_its_distance_from_the_centre() {
        // tan(shear) = 2: row y moves right by 2·(y − 1.5) = −3, −1, +1, +3 pixels, so
        // output (x, y) reads source (x − 2y + 3, y); outside the image is the constant.
        let sheared = run(Params { shear_deg: 2f64.atan().to_degrees(), ..Default::default() }, FillMode::Constant);
        assert_eq!(sheared, [3, 99, 99, 99, 5, 6, 7, 99, 99, 8, 9, 10, 99, 99, 99, 12]);
    }

    #[test]
    fn shift_down_and_zoom_out() {
        let down = run(Params { shift: (0.0, 1.0), ..Default::default() }, FillMode::Constant);
        assert_eq!(down, [99, 99, 99, 99, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        // Zoom 2× about the centre (1.5, 1.5): output p samples source (p − 1.5) / 2 + 1.5.
        let zoomed = apply(grid(), &Params { zoom: (2.0, 2.0), ..Default::default() }, FillMode::Nearest, 0).to_luma8();
        // Output (1, 1) samples source (1.25, 1.25): 0.5625·5 + 0.1875·6 + 0.1875·9 + 0.0625·10 = 6.25.
        assert_eq!(zoomed.get_pixel(1, 1)[0], 6);
        // Output (0, 0) samples (0.75, 0.75): 0.0625·0 + 0.1875·1 + 0.1875·4 + 0.5625·5 = 3.75.
        assert_eq!(zoomed.get_pixel(0, 0)[0], 4);
    }

    #[test]
    fn colour_jitter() {
        let img =
            DynamicImage::ImageRgb8(image::RgbImage::from_fn(2, 1, |x, _| image::Rgb(if x == 0 { [100, 50, 0] } else { [200, 200, 200] })));
        let bright = apply(img.clone(), &Params { brightness: 1.5, ..Default::default() }, FillMode::Nearest, 0).to_rgb8();
        assert_eq!(bright.get_pixel(0, 0).0, [150, 75, 0]);
        assert_eq!(bright.get_pixel(1, 0).0, [255, 255, 255], "clamped");
        let grey = apply(img, &Params { saturation: 0.0, ..Default::default() }, FillMode::Nearest, 0).to_rgb8();
        let p = grey.get_pixel(0, 0).0;
        assert!(p[0] == p[1] && p[1] == p[2], "no saturation is grey: {p:?}");
    }

    #[test]
    fn draws_are_seeded_and_bounded() {
        let spec = Augment {
            rotation_range: 20.0,
            width_shift_range: 0.1,
            zoom_range: 0.2,
            horizontal_flip: true,
            brightness_range: Some([0.8, 1.2]),
            ..Default::default()
        };
        let a = spec.draw(&mut Rng::new(5), 100, 50);
        assert_eq!(a, spec.draw(&mut Rng::new(5), 100, 50));
        assert!(a.rotation_deg.abs() <= 20.0 && a.shift.0.abs() <= 10.0 && (0.8..=1.2).contains(&a.zoom.0));
        assert!(!spec.is_identity() && Augment::default().is_identity());
        let crop = Augment { random_resized_crop: Some(ResizedCrop { scale: [0.5, 0.5], ratio: [1.0, 1.0] }), ..Default::default() }
            .draw(&mut Rng::new(1), 100, 100)
            .crop
            .unwrap();
        assert!((crop.2 * crop.3 - 5000.0).abs() < 1.0 && crop.0 + crop.2 <= 100.0);
    }
}
