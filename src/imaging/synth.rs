//! The `synthetic` source: labelled shapes kiln draws itself, so a pipeline can run with no
//! data to download. Each image is fully determined by (seed, index): a shape of random
//! colour, size, position and rotation over a noisy background of another colour.

use image::{DynamicImage, Rgb, RgbImage};

use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
}

pub const SHAPES: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star];

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
        }
    }

    pub fn parse(name: &str) -> Option<Shape> {
        SHAPES.into_iter().find(|s| s.name() == name)
    }
}

/// Item `index` of a synthetic set: its shape cycles through `shapes`, everything else is
/// drawn from the item's own random stream.
pub fn item(seed: u64, index: u64, size: u32, shapes: &[Shape], noise: f64) -> (Shape, DynamicImage) {
    let shape = shapes[(index % shapes.len() as u64) as usize];
    let mut rng = Rng::for_item(seed, "synthetic", index);
    (shape, render(shape, size, &mut rng, noise))
}

/// One image of `shape` from a plain seed (tests and examples).
pub fn draw(shape: Shape, size: u32, seed: u64) -> DynamicImage {
    render(shape, size, &mut Rng::new(seed), 12.0)
}

fn render(shape: Shape, size: u32, rng: &mut Rng, noise: f64) -> DynamicImage {
    let s = f64::from(size);
    let bg = [rng.range(0.0, 255.0), rng.range(0.0, 255.0), rng.range(0.0, 255.0)];
    let luma = |c: &[f64; 3]| 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2];
    // Redraw the shape colour until it stands out from the background.
    let mut fg = bg;
    while (luma(&fg) - luma(&bg)).abs() < 60.0 {
        fg = [rng.range(0.0, 255.0), rng.range(0.0, 255.0), rng.range(0.0, 255.0)];
    }
    let radius = rng.range(0.2, 0.34) * s;
    let (cx, cy) = (
        rng.range(0.5 * s - (0.45 * s - radius), 0.5 * s + (0.45 * s - radius)),
        rng.range(0.5 * s - (0.45 * s - radius), 0.5 * s + (0.45 * s - radius)),
    );
    let turn = rng.range(0.0, std::f64::consts::TAU);
    let polygon: Vec<(f64, f64)> = match shape {
        Shape::Circle => Vec::new(),
        Shape::Square => {
            (0..4).map(|k| polar(cx, cy, radius, turn + f64::from(k) * std::f64::consts::FRAC_PI_2 + std::f64::consts::FRAC_PI_4)).collect()
        }
        Shape::Triangle => (0..3).map(|k| polar(cx, cy, radius, turn + f64::from(k) * std::f64::consts::TAU / 3.0)).collect(),
        Shape::Star => (0..10)
            .map(|k| polar(cx, cy, if k % 2 == 0 { radius } else { radius * 0.45 }, turn + f64::from(k) * std::f64::consts::PI / 5.0))
            .collect(),
    };
    let inside = |x: f64, y: f64| match shape {
        Shape::Circle => (x - cx).powi(2) + (y - cy).powi(2) <= radius * radius,
        _ => point_in_polygon(x, y, &polygon),
    };
    let mut img = RgbImage::new(size, size);
    for (px, py, pixel) in img.enumerate_pixels_mut() {
        // 2×2 supersampling gives anti-aliased edges, as a camera would.
        let mut cover = 0.0;
        for (dx, dy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
            if inside(f64::from(px) + dx, f64::from(py) + dy) {
                cover += 0.25;
            }
        }
        let grain = rng.range(-noise, noise);
        *pixel = Rgb(std::array::from_fn(|c| (fg[c] * cover + bg[c] * (1.0 - cover) + grain).clamp(0.0, 255.0) as u8));
    }
    DynamicImage::ImageRgb8(img)
}

fn polar(cx: f64, cy: f64, r: f64, angle: f64) -> (f64, f64) {
    (cx + r * angle.cos(), cy + r * angle.sin())
}

/// Even-odd rule.
fn point_in_polygon(x: f64, y: f64, poly: &[(f64, f64)]) -> bool {
    let mut inside = false;
    let mut j = poly.len() - 1;
    for i in 0..poly.len() {
        let ((xi, yi), (xj, yj)) = (poly[i], poly[j]);
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_pixels_different_index_different_image() {
        let (s1, a) = item(3, 10, 32, &SHAPES, 10.0);
        let (_, b) = item(3, 10, 32, &SHAPES, 10.0);
        let (_, c) = item(3, 11, 32, &SHAPES, 10.0);
        assert_eq!(s1, Shape::Triangle);
        assert_eq!(a.as_bytes(), b.as_bytes());
        assert_ne!(a.as_bytes(), c.as_bytes());
    }

    #[test]
    fn shapes_cover_a_plausible_area() {
        for shape in SHAPES {
            let img = draw(shape, 64, 1).to_rgb8();
            let corner = *img.get_pixel(0, 0);
            let differing = img.pixels().filter(|p| p.0.iter().zip(corner.0).any(|(a, b)| a.abs_diff(b) > 40)).count();
            let share = differing as f64 / (64.0 * 64.0);
            assert!((0.03..0.6).contains(&share), "{}: {share}", shape.name());
        }
    }
}
