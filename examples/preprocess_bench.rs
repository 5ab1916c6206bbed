//! Decode + resize to 224×224 (shorter side + centre crop, bilinear) + horizontal flip +
//! normalise to f32 CHW, over every JPEG under a directory, on all cores: kiln's own
//! code path for preprocessing and training-time loading. `bench/preprocess.py` runs it
//! beside the same work in Pillow.
//!
//! `cargo run --release --example preprocess_bench -- DIR [REPEAT]`
use std::time::Instant;

use kiln::imaging::augment::{FillMode, Params, apply};
use kiln::imaging::transform::{ColorMode, Interpolation, ResizeMode, Transform, normalize_chw, pixels};
use kiln::imaging::{DecodeLimits, decode};
use rayon::prelude::*;

// The same allocator as the kiln binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let dir = std::env::args().nth(1).expect("usage: preprocess_bench DIR [REPEAT]");
    let repeat: usize = std::env::args().nth(2).and_then(|r| r.parse().ok()).unwrap_or(3);
    let files: Vec<std::path::PathBuf> = walkdir::WalkDir::new(&dir)
        .into_iter()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "jpg"))
        .map(|e| e.into_path())
        .collect();
    let t = Transform {
        color: ColorMode::Rgb,
        width: 224,
        height: 224,
        resize: ResizeMode::Crop,
        interpolation: Interpolation::Bilinear,
        pad: 0,
        crop_pct: 1.0,
    };
    let (mean, std) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
    let flip = Params { hflip: true, ..Params::default() };
    let mut best = f64::INFINITY;
    let mut checksum = 0.0;
    for _ in 0..repeat {
        let start = Instant::now();
        checksum = files
            .par_iter()
            .map(|f| {
                let bytes = std::fs::read(f).expect("readable");
                let (_, img) = decode(&bytes, &DecodeLimits::default()).expect("decodable");
                let flipped = apply(t.apply(&img), &flip, FillMode::Nearest, 0);
                let (hwc, _) = pixels(&flipped, ColorMode::Rgb);
                let x = normalize_chw(&hwc, 3, &mean, &std);
                f64::from(x[x.len() / 2])
            })
            .sum::<f64>();
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!(
        "{} images {best:.3} s {:.0} img/s threads {} checksum {checksum:.3}",
        files.len(),
        files.len() as f64 / best,
        rayon::current_num_threads()
    );
}
