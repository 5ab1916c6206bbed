//! Why two images are, or are not, near duplicates to the clean stage.
//!
//! `cargo run --release --example near_dup_explain A B [MAX_DIFFERENCE]`
//!
//! Prints each step of the decision with its default threshold: the perceptual-hash distance
//! (candidates), the chroma difference, the difference once aligned and tone-matched (the
//! verdict), for a JPEG whether it is a recompression of the other (the verdict where pixels
//! alone fall short), and which of the two the stage would keep.
use kiln::imaging::near::{self, View};
use kiln::imaging::recompress;
use kiln::imaging::{DecodeLimits, probe};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [a, b] = [0, 1].map(|i| args.get(i).cloned().unwrap_or_else(|| panic!("usage: near_dup_explain A B [MAX_DIFFERENCE]")));
    let limit: f32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(0.06);
    let limits = DecodeLimits::default();
    let read = |p: &str| std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let (ba, bb) = (read(&a), read(&b));
    let (pa, pb) = (probe(&ba, &limits).expect("A decodes"), probe(&bb, &limits).expect("B decodes"));
    let (sa, sb) = (near::sketch(&ba, &limits).expect("A decodes"), near::sketch(&bb, &limits).expect("B decodes"));
    println!(
        "A {a}: {}x{} {}, {} levels from {} to {}",
        sa.width,
        sa.height,
        if sa.lossless { "lossless" } else { "lossy" },
        sa.levels,
        sa.black,
        sa.white
    );
    println!(
        "B {b}: {}x{} {}, {} levels from {} to {}",
        sb.width,
        sb.height,
        if sb.lossless { "lossless" } else { "lossy" },
        sb.levels,
        sb.black,
        sb.white
    );
    println!("pHash distance: {} (candidates within 14)", (pa.phash ^ pb.phash).count_ones());
    let chroma = near::chroma_difference(&hex::decode(&pa.thumb).unwrap_or_default(), &hex::decode(&pb.thumb).unwrap_or_default());
    println!("chroma difference: {chroma:.1} (at most 12)");
    match near::difference(&View::of(&sa).expect("view"), &View::of(&sb).expect("view"), limit) {
        Some(d) => println!("difference once aligned and tone-matched: {:.2} % (a copy at most {:.1} %)", 100.0 * d, 100.0 * limit),
        None => println!("too small to compare (under 8 pixels on a side)"),
    }
    let (ia, ib) = (image::load_from_memory(&ba).expect("A decodes"), image::load_from_memory(&bb).expect("B decodes"));
    for (copy, bytes, original, from) in [("B", &bb, &ia, "A"), ("A", &ba, &ib, "B")] {
        if let Some(m) = recompress::misses(original, bytes) {
            println!(
                "{copy} as a JPEG recompression of {from}: {:.1} % of its luma mispredicted, {:.0} % in the worst block (a copy at most {:.0} % and {:.0} %): {}",
                100.0 * m.share,
                100.0 * m.worst_block,
                100.0 * recompress::MAX_MISSES,
                100.0 * recompress::MAX_BLOCK_MISSES,
                if m.is_recompression() { "a recompression" } else { "not one" }
            );
        }
    }
    let (large, small, which) = if u64::from(ia.width()) * u64::from(ia.height()) >= u64::from(ib.width()) * u64::from(ib.height()) {
        (&ia, &ib, "A")
    } else {
        (&ib, &ia, "B")
    };
    println!("the larger, {which}, is: {:?} (Upscale: the smaller stays)", near::larger_copy(large, small));
}
