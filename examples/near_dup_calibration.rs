//! How the near-duplicate thresholds of the clean stage were chosen.
//!
//! `cargo run --release --example near_dup_calibration [PHOTOS_DIR]`
//!
//! For true copies (resized, re-encoded as JPEG q40, cropped by 4% and 6%) and for unrelated
//! images whose pHash collides, it prints the pHash distance and the colour difference of
//! 8×8 thumbnails. Clean's defaults (`max_distance = 14`, `max_colour_difference = 12`)
//! sit between the two populations.
use image::DynamicImage;
use kiln::imaging::{DecodeLimits, Probe, encode_png, probe, synth};

fn measure(img: &DynamicImage) -> Probe {
    probe(&encode_png(img), &DecodeLimits::default()).expect("encodable image")
}

fn main() {
    let photos_dir = std::env::args().nth(1).unwrap_or_else(|| "../shared/datasets/photos".into());
    let mut sets: Vec<(&str, Vec<DynamicImage>)> =
        vec![("synthetic shapes", (0..400).map(|i| synth::item(7, i, 48, &synth::SHAPES, 12.0).1).collect())];
    match std::fs::read_dir(&photos_dir) {
        Ok(dir) => {
            let photos: Vec<DynamicImage> = dir.flatten().filter_map(|e| image::open(e.path()).ok()).collect();
            // Four disjoint quarters of each photo: related content, but no copies.
            let quarters = photos.iter().flat_map(|p| {
                (0..4).map(move |k| p.crop_imm((k % 2) * p.width() / 2, (k / 2) * p.height() / 2, p.width() / 2, p.height() / 2))
            });
            sets.push(("photo quarters", quarters.collect()));
        }
        Err(_) => eprintln!("no photos at {photos_dir}: synthetic set only"),
    }
    for (name, set) in &sets {
        let probes: Vec<Probe> = set.iter().map(measure).collect();
        for gate in [8, 12, 16, 20] {
            let (mut collisions, mut closest) = (0, f64::INFINITY);
            for a in 0..probes.len() {
                for b in a + 1..probes.len() {
                    if (probes[a].phash ^ probes[b].phash).count_ones() <= gate {
                        collisions += 1;
                        closest = closest.min(probes[a].colour_difference(&probes[b]));
                    }
                }
            }
            println!(
                "{name}: {collisions} unrelated pairs within pHash distance {gate}; smallest colour difference among them {closest:.1}"
            );
        }
        let mut far_hash = [0u32; 4];
        let mut far_colour = [0.0f64; 4];
        for (img, p) in set.iter().zip(&probes).take(40) {
            let (w, h) = (img.width(), img.height());
            let mut jpeg = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 40).encode_image(img).expect("encodes");
            let copies = [
                img.resize_exact(w * 3 / 2, h * 3 / 2, image::imageops::FilterType::Lanczos3),
                image::load_from_memory(&jpeg).expect("decodes"),
                img.crop_imm(w / 50, h / 50, w - w / 25, h - h / 25),
                img.crop_imm(w / 32, h / 32, w - w / 16, h - h / 16),
            ];
            for (k, c) in copies.iter().map(measure).enumerate() {
                far_hash[k] = far_hash[k].max((p.phash ^ c.phash).count_ones());
                far_colour[k] = far_colour[k].max(p.colour_difference(&c));
            }
        }
        for (k, what) in ["resized 1.5x", "JPEG q40", "cropped 4%", "cropped 6%"].iter().enumerate() {
            println!("{name}: {what}: largest pHash distance {}, largest colour difference {:.1}", far_hash[k], far_colour[k]);
        }
    }
}
