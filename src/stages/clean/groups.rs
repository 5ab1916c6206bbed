//! Finding the groups of near duplicates, and which copy of each to keep.
//!
//! Three steps, from cheap to exact: a perceptual-hash scan proposes each image's closest
//! few look-alikes; their 8×8 chroma must agree; then [`near::difference`] confirms or
//! rejects each pair, and a same-size pair with a JPEG side is asked whether one is a
//! recompression of the other ([`recompress::misses`]): that confirms JPEG copies pixels
//! alone cannot, and says which image was made from which. Groups form by leader clustering
//! over the confirmed pairs, so they cannot chain from one image to a different one through
//! a series of small steps.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};

use rayon::prelude::*;

use crate::digest::Digest;
use crate::formats::dataset::Item;
use crate::imaging::near::{self, Larger, Sketch, View};
use crate::imaging::recompress;
use crate::imaging::{self, DecodeLimits, Probe};
use crate::stages::{StageContext, StageError};

/// How many hash neighbours of each image are confirmed: a copy is among its original's
/// closest few, and a cap keeps the exact comparisons linear in the set's size on sets where
/// many distinct images hash alike.
const NEIGHBOURS: usize = 8;
/// Hash distance within which every pair is confirmed (up to [`MAX_CLOSE`] per image).
const CLOSE_DISTANCE: u32 = 4;
const MAX_CLOSE: usize = 64;
/// How many nearest neighbours by thumbnail shape are confirmed.
const SHAPE_NEIGHBOURS: usize = 6;
/// How many images nearest in shape to each image's middle are confirmed as its cropped
/// copies.
const CROP_NEIGHBOURS: usize = 4;
/// Pairs further apart than this many times the limit are not asked the recompression
/// question: every JPEG copy the benchmark plants (quality 30 and up) lies within 2.5 times,
/// and the question costs up to four decodes.
const RECOMPRESSION_REACH: f32 = 4.0;

/// An 8×8 RGB thumbnail's luma, standardised (zero mean, unit spread as 32 levels): its
/// shape, whatever its brightness and contrast.
fn shape(rgb: &[u8]) -> [i8; 64] {
    let mut out = [0i8; 64];
    if rgb.len() != 64 * 3 {
        return out;
    }
    let luma: Vec<f32> = rgb.chunks_exact(3).map(|p| 0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2])).collect();
    let mean = luma.iter().sum::<f32>() / 64.0;
    let spread = (luma.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 64.0).sqrt().max(1.0);
    for (o, v) in out.iter_mut().zip(&luma) {
        *o = ((v - mean) / spread * 32.0).round().clamp(-127.0, 127.0) as i8;
    }
    out
}

/// The `n` shapes nearest to `query` (sum of absolute differences), other than image `own`,
/// kept sorted as the scan goes, so it allocates nothing per image pair.
fn nearest_shapes(query: &[i8; 64], shapes: &[[i8; 64]], own: usize, n: usize) -> Vec<(u32, usize)> {
    let mut nearest: Vec<(u32, usize)> = Vec::with_capacity(n + 1);
    for (b, sb) in shapes.iter().enumerate().filter(|&(b, _)| b != own) {
        let hit = (query.iter().zip(sb).map(|(&x, &y)| u32::from(x.abs_diff(y))).sum::<u32>(), b);
        if nearest.len() < n || nearest.last().is_some_and(|&worst| hit < worst) {
            let at = nearest.partition_point(|&kept| kept < hit);
            nearest.insert(at, hit);
            nearest.truncate(n);
        }
    }
    nearest
}

pub(super) struct Thresholds {
    pub(super) max_distance: u32,
    pub(super) max_colour_difference: f64,
    pub(super) max_difference: f64,
}

/// One group: the copy kept, and the others with how they were matched to the image that led
/// the group.
pub(super) struct NearGroup {
    pub(super) kept: usize,
    pub(super) copies: Vec<(usize, Match)>,
    /// Members carry different labels: a label conflict for a person to review, not copies
    /// to remove.
    pub(super) cross_class: bool,
}

/// How a copy was matched to its group's leader.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Match {
    /// Hash distance.
    pub(super) distance: u32,
    /// What is left once copying is undone ([`near::difference`]).
    pub(super) difference: f32,
    /// One of the pair is a JPEG recompression of the other (asked of same-size pairs with a
    /// lossy side within [`RECOMPRESSION_REACH`] times the limit).
    pub(super) recompressed: bool,
}

/// Which of a pair is a JPEG recompression of the other, if either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Derived {
    Neither = 0,
    SecondFromFirst = 1,
    FirstFromSecond = 2,
}

/// `candidates` are item indices (one per distinct digest, decodable).
pub(super) fn find(
    cx: &StageContext<'_>,
    items: &[Item],
    probes: &[Result<Probe, imaging::Defect>],
    candidates: &[usize],
    t: &Thresholds,
    limits: &DecodeLimits,
) -> Result<Vec<NearGroup>, StageError> {
    let probe = |k: usize| probes[candidates[k]].as_ref().expect("candidates are decodable");
    let hashes: Vec<u64> = (0..candidates.len()).map(|k| probe(k).phash).collect();
    let thumbs: Vec<Vec<u8>> = (0..candidates.len()).map(|k| hex::decode(&probe(k).thumb).unwrap_or_default()).collect();
    let started = std::time::Instant::now();
    let shapes: Vec<[i8; 64]> = thumbs.iter().map(|t| shape(t)).collect();
    let inner_shapes: Vec<[i8; 64]> = (0..candidates.len()).map(|k| shape(&hex::decode(&probe(k).inner).unwrap_or_default())).collect();
    // Three proposals per image: its nearest few by hash within the distance, its nearest
    // few by the shape of its 8×8 thumbnail, and the nearest few to the shape of its middle.
    // A crop of a few per cent moves a hash by up to 16 bits on small images, where
    // look-alikes crowd the hash neighbourhood, but it barely changes the coarse shape, and
    // less still that of the middle the crop kept. All are plain scans the compiler keeps
    // tight.
    let nearest: Vec<Vec<(usize, u32)>> = (0..hashes.len())
        .into_par_iter()
        .map(|a| {
            let ha = hashes[a];
            let mut by_hash: Vec<(u32, usize)> = Vec::new();
            for (b, &hb) in hashes.iter().enumerate() {
                let d = (ha ^ hb).count_ones();
                if d <= t.max_distance && b != a {
                    by_hash.push((d, b));
                }
            }
            by_hash.sort_unstable();
            by_hash.retain(|&(_, b)| near::chroma_difference(&thumbs[a], &thumbs[b]) <= t.max_colour_difference);
            // Where many images hash alike (dark sky, plain backgrounds) a copy can fall
            // behind its look-alikes: every pair this close is confirmed, up to a bound.
            let close = by_hash.iter().take_while(|&&(d, _)| d <= CLOSE_DISTANCE).count();
            by_hash.truncate(NEIGHBOURS.max(close.min(MAX_CLOSE)));
            // By shape: the images that look like this one, and those that look like its
            // middle (a copy cropped by a few per cent).
            let mut by_shape = nearest_shapes(&shapes[a], &shapes, a, SHAPE_NEIGHBOURS);
            by_shape.extend(nearest_shapes(&inner_shapes[a], &shapes, a, CROP_NEIGHBOURS));
            by_shape.retain(|&(_, b)| near::chroma_difference(&thumbs[a], &thumbs[b]) <= t.max_colour_difference);
            let mut hits: Vec<(usize, u32)> = by_hash.into_iter().map(|(d, b)| (b, d)).collect();
            hits.extend(by_shape.into_iter().map(|(_, b)| (b, (ha ^ hashes[b]).count_ones())));
            hits.sort_unstable();
            hits.dedup();
            hits
        })
        .collect();
    let pairs: BTreeSet<(usize, usize, u32)> =
        nearest.iter().enumerate().flat_map(|(a, hits)| hits.iter().map(move |&(b, d)| (a.min(b), a.max(b), d))).collect();
    let proposed = started.elapsed();
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    let involved: Vec<usize> = pairs.iter().flat_map(|&(a, b, _)| [a, b]).collect::<BTreeSet<_>>().into_iter().collect();
    let sketches = sketch_all(cx, items, &involved.iter().map(|&k| candidates[k]).collect::<Vec<_>>(), limits)?;
    let mut views: Vec<Option<View>> = (0..candidates.len()).map(|_| None).collect();
    let mut sketch_of: Vec<Option<Sketch>> = vec![None; candidates.len()];
    for (&k, s) in involved.iter().zip(sketches) {
        views[k] = s.as_ref().and_then(View::of);
        sketch_of[k] = s;
    }
    let mut sizes: HashMap<(u32, u32), usize> = HashMap::new();
    for p in probes.iter().flatten() {
        *sizes.entry((p.width, p.height)).or_default() += 1;
    }
    let limit = t.max_difference as f32;
    let pairs_len = pairs.len();
    // Each pair's verdict is memoised by the two images' digests, so a rerun after images
    // were added compares only the pairs that are new.
    let pairs: Vec<(usize, usize, u32)> = pairs.into_iter().collect();
    let pair_keys: Vec<Digest> = pairs
        .iter()
        .map(|&(a, b, _)| {
            let (da, db) = (items[candidates[a]].digest, items[candidates[b]].digest);
            let (lo, hi) = if da.0 <= db.0 { (da, db) } else { (db, da) };
            Digest::of_bytes(&[lo.0, hi.0].concat())
        })
        .collect();
    let op = Digest::of_bytes(
        format!(
            "clean-near-pair v{} sketch v{} limit {limit} recompression v{} reach {RECOMPRESSION_REACH} misses {} {}",
            near::DIFFERENCE_VERSION,
            near::SKETCH_VERSION,
            recompress::VERSION,
            recompress::MAX_MISSES,
            recompress::MAX_BLOCK_MISSES,
        )
        .as_bytes(),
    );
    // A verdict is the difference (f32, little-endian) and which side, if any, is a
    // recompression of the other (one byte, [`Derived`], in the order of the pair's
    // candidate indices, which is the order of their digests, as in the memo key); empty
    // when the pair cannot be judged. Confirmed pairs are asked too, so that the source of a
    // recompression stays whatever the file sizes.
    let verdicts = cx
        .cache
        .state()
        .memo()
        .map(&pair_keys, &op, |k| {
            let (a, b, _) = pairs[k];
            let Some(diff) = (match (&views[a], &views[b]) {
                (Some(va), Some(vb)) => near::difference(va, vb, limit),
                _ => None,
            }) else {
                return Ok::<_, String>(Vec::new());
            };
            let (ia, ib) = (&items[candidates[a]], &items[candidates[b]]);
            debug_assert!(ia.digest.0 <= ib.digest.0, "candidates are in digest order");
            let derived = if diff <= limit * RECOMPRESSION_REACH {
                recompression(cx, (ia, sketch_of[a].as_ref()), (ib, sketch_of[b].as_ref()), limits)?
            } else {
                Derived::Neither
            };
            let mut verdict = diff.to_le_bytes().to_vec();
            verdict.push(derived as u8);
            Ok(verdict)
        })
        .map_err(|e| StageError::Failed(e.to_string()))?;
    let mut confirmed: Vec<(usize, usize, Match)> = Vec::new();
    // (copy, source) for every pair where one is a recompression of the other.
    let mut derived_from: BTreeSet<(usize, usize)> = BTreeSet::new();
    for (&(a, b, distance), verdict) in pairs.iter().zip(verdicts) {
        let bytes = verdict.map_err(StageError::Failed)?;
        let Some((raw, derived)) = bytes.split_first_chunk::<4>() else { continue };
        let difference = f32::from_le_bytes(*raw);
        let (copy_source, recompressed) = match derived.first() {
            Some(1) => (Some((b, a)), true),
            Some(2) => (Some((a, b)), true),
            _ => (None, false),
        };
        derived_from.extend(copy_source);
        if difference <= limit || recompressed {
            confirmed.push((a, b, Match { distance, difference, recompressed }));
        }
    }

    tracing::debug!(
        candidates = candidates.len(),
        pairs = pairs_len,
        confirmed = confirmed.len(),
        "near duplicates: pairs proposed in {:.1} s, sketched and confirmed in {:.1} s",
        proposed.as_secs_f64(),
        (started.elapsed() - proposed).as_secs_f64()
    );
    let mut neighbours: Vec<Vec<(usize, Match)>> = vec![Vec::new(); candidates.len()];
    for &(a, b, m) in &confirmed {
        neighbours[a].push((b, m));
        neighbours[b].push((a, m));
    }
    // Leaders in order of a cheap quality guess (lossless, pixels, bytes, first id); which
    // copy is kept is then decided within the group, where the upscale test can run.
    let rank = |k: usize| {
        let i = candidates[k];
        let lossless = sketch_of[k].as_ref().is_some_and(|s| s.lossless);
        let p = probe(k);
        (lossless, u64::from(p.width) * u64::from(p.height), items[i].bytes, std::cmp::Reverse(items[i].id.clone()))
    };
    let resolve = Resolve { cx, items, candidates, sketches: &sketch_of, limits, sizes: &sizes };
    let mut order: Vec<usize> = (0..candidates.len()).filter(|&k| !neighbours[k].is_empty()).collect();
    order.sort_by_cached_key(|&k| std::cmp::Reverse(rank(k)));
    let mut taken = vec![false; candidates.len()];
    let mut groups = Vec::new();
    for &leader in &order {
        if taken[leader] {
            continue;
        }
        taken[leader] = true;
        let mut members = Vec::new();
        for &(m, found) in &neighbours[leader] {
            if !taken[m] {
                taken[m] = true;
                members.push((m, found));
            }
        }
        if members.is_empty() {
            continue;
        }
        members.sort_unstable_by_key(|&(m, _)| m);
        let all: Vec<usize> = std::iter::once(leader).chain(members.iter().map(|&(m, _)| m)).collect();
        let labels: BTreeSet<&str> = all.iter().filter_map(|&k| items[candidates[k]].label.as_deref()).collect();
        // A recompression of another member is never the one kept; among the rest `better`
        // decides. (Inside `better` the relation would not be transitive, and which copy
        // `reduce` kept would depend on the members' order.)
        let sources: Vec<usize> = all.iter().copied().filter(|&k| !all.iter().any(|&m| derived_from.contains(&(k, m)))).collect();
        let pool = if sources.is_empty() { &all } else { &sources };
        let kept = pool.iter().copied().reduce(|best, k| if better(&resolve, k, best) { k } else { best });
        let kept = kept.expect("a group has members");
        // The leader was matched to every member; when another is kept, the leader's own
        // match to that one is what its finding reports.
        let leader_match = members.iter().find(|&&(m, _)| m == kept).map_or_else(Match::default, |&(_, found)| found);
        let copies = std::iter::once((leader, leader_match))
            .chain(members)
            .filter(|&(k, _)| k != kept)
            .map(|(k, found)| (candidates[k], found))
            .collect();
        groups.push(NearGroup { kept: candidates[kept], copies, cross_class: labels.len() > 1 });
    }
    Ok(groups)
}

/// What deciding which copy to keep needs to see.
struct Resolve<'a> {
    cx: &'a StageContext<'a>,
    items: &'a [Item],
    candidates: &'a [usize],
    sketches: &'a [Option<Sketch>],
    limits: &'a DecodeLimits,
    /// How many images of the set have each size.
    sizes: &'a HashMap<(u32, u32), usize>,
}

/// Whether copy `a` is a better one to keep than `b`: the original over what was made of it.
/// Native resolution first: of two sizes, the larger unless it is only an upscale of the
/// smaller (an upscaled PNG of a JPEG is no original). At one size, lossless over lossy, then
/// more distinct levels and a darkest or brightest level at the end of the range (a tone
/// shift clips levels away or moves off the end), then more bytes (a higher quality); then
/// the first id.
fn better(r: &Resolve<'_>, a: usize, b: usize) -> bool {
    let Resolve { cx, items, candidates, sketches, limits, sizes } = *r;
    let (Some(sa), Some(sb)) = (&sketches[a], &sketches[b]) else {
        return sketches[a].is_some();
    };
    let (ia, ib) = (&items[candidates[a]], &items[candidates[b]]);
    let (pa, pb) = (u64::from(sa.width) * u64::from(sa.height), u64::from(sb.width) * u64::from(sb.height));
    // Sizes within 2 % are one size: a one-pixel crop is not a better original.
    if pa.abs_diff(pb) * 50 > pa.max(pb) {
        let (large, small) = if pa > pb { (ia, ib) } else { (ib, ia) };
        let larger = match (decode(cx, &large.digest, limits), decode(cx, &small.digest, limits)) {
            (Some(l), Some(s)) => near::larger_copy(&l, &s),
            _ => Larger::Original,
        };
        let larger_stays = match larger {
            Larger::Original => true,
            Larger::Upscale => false,
            // Too smooth to tell: the size most of the set shares is the likelier original
            // (a set is collected at a few native sizes; copies are made one by one).
            Larger::Unclear => {
                let count = |s: &Sketch| sizes.get(&(s.width, s.height)).copied().unwrap_or(0);
                let (cl, cs) = if pa > pb { (count(sa), count(sb)) } else { (count(sb), count(sa)) };
                let (ll, ls) = if pa > pb { (sa.lossless, sb.lossless) } else { (sb.lossless, sa.lossless) };
                if cl != cs {
                    cl > cs
                } else if ll != ls {
                    ll
                } else {
                    true
                }
            }
        };
        return (pa > pb) == larger_stays;
    }
    if sa.lossless != sb.lossless {
        return sa.lossless;
    }
    // A tone shift clips levels away at one end, or moves the darkest or brightest level off
    // the end of the range it reached.
    let anchored = |s: &Sketch| std::cmp::Reverse(u32::from(s.black) + u32::from(255 - s.white));
    let quality = |s: &Sketch, item: &Item| if s.lossless { (s.levels, anchored(s), item.bytes) } else { (0, anchored(s), item.bytes) };
    match quality(sa, ia).cmp(&quality(sb, ib)) {
        Ordering::Equal => ia.id < ib.id,
        o => o == Ordering::Greater,
    }
}

fn decode(cx: &StageContext<'_>, digest: &Digest, limits: &DecodeLimits) -> Option<image::DynamicImage> {
    let bytes = cx.cache.read_blob(digest).ok()?;
    imaging::decode(&bytes, limits).ok().map(|(_, img)| img)
}

/// Whether one of two same-size images is a JPEG recompression of the other (see
/// [`recompress`]). A lossy image is the only side that can be the copy. A blob that cannot
/// be read is an error, not a verdict: verdicts are memoised.
fn recompression(
    cx: &StageContext<'_>,
    first: (&Item, Option<&Sketch>),
    second: (&Item, Option<&Sketch>),
    limits: &DecodeLimits,
) -> Result<Derived, String> {
    let ((ia, Some(sa)), (ib, Some(sb))) = (first, second) else { return Ok(Derived::Neither) };
    if (sa.width, sa.height) != (sb.width, sb.height) || (sa.lossless && sb.lossless) {
        return Ok(Derived::Neither);
    }
    let load = |item: &Item| cx.cache.read_blob(&item.digest).map_err(|e| format!("reading `{}`: {e}", item.id));
    let (bytes_a, bytes_b) = (load(ia)?, load(ib)?);
    let made_from = |original: &[u8], copy: &[u8]| {
        recompress::applies(copy)
            && imaging::decode(original, limits)
                .ok()
                .and_then(|(_, img)| recompress::misses(&img, copy))
                .is_some_and(|m| m.is_recompression())
    };
    Ok(if !sb.lossless && made_from(&bytes_a, &bytes_b) {
        Derived::SecondFromFirst
    } else if !sa.lossless && made_from(&bytes_b, &bytes_a) {
        Derived::FirstFromSecond
    } else {
        Derived::Neither
    })
}

/// Sketches of the given items, memoised like the probes.
fn sketch_all(cx: &StageContext<'_>, items: &[Item], which: &[usize], limits: &DecodeLimits) -> Result<Vec<Option<Sketch>>, StageError> {
    super::memoised(cx, items, which, "clean-sketch", near::SKETCH_VERSION, limits, |bytes| near::sketch(bytes, limits).ok())
}
