//! `kind = "clean"`: find the images a model should not learn from, and say why.
//!
//! ```toml
//! [stages.clean]
//! kind = "clean"
//! inputs = ["collect"]
//! max_pixels = 64_000_000                      # the default; larger headers are rejected undecoded
//! [stages.clean.checks]
//! near_duplicates = { policy = "quarantine", max_difference = 0.06 }   # see near.rs
//! blurry = { policy = "keep", min_sharpness = 10.0 }   # keep = report only
//! ```
//!
//! Each image is decoded once and measured ([`imaging::probe`]); the measures are
//! memoised per image, so changing a threshold decodes nothing. Every check has a policy:
//! `off`, `keep` (report only), `quarantine` (removed, and shown under
//! `outputs/<pipeline>/<stage>/quarantine/<check>/` for review) or `drop` (removed).
//! `clean_report.json` lists every finding with its reason and score, and for each group
//! of duplicates which copy was kept.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::de::DeValue;

use super::{ParseContext, Stage, StageContext, StageError, StageKind, io, parse_config};
use crate::diagnostic::{Bounds, Checker, Issue, ValueSpans};
use crate::digest::Digest;
use crate::formats::dataset::{DuplicateRef, Item};
use crate::imaging::{self, DecodeLimits, Defect, Probe};
use report::{CheckCount, ClassCount, CrossClassMember, DuplicateGroup, Finding, GroupCopy, Report, class_of};

mod groups;
mod report;

pub struct CleanKind;

/// Bounds of `max_pixels` (a gigapixel, 4 GB decoded) and `max_bytes` (4 GiB).
const MAX_PIXELS: u64 = 1_000_000_000;
const MAX_BYTES: u64 = 4 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    Off,
    Keep,
    Quarantine,
    Drop,
}

macro_rules! check {
    ($name:ident, $policy:expr $(, $field:ident : $ty:ty = $default:expr)*) => {
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        struct $name {
            policy: Policy,
            $($field: $ty,)*
        }
        impl Default for $name {
            fn default() -> Self {
                $name { policy: $policy, $($field: $default,)* }
            }
        }
    };
}

check!(DecodeCheck, Policy::Quarantine);
check!(ExtensionCheck, Policy::Keep);
check!(ExactCheck, Policy::Drop);
check!(NearCheck, Policy::Quarantine, max_distance: u32 = 14, max_colour_difference: f64 = 12.0, max_difference: f64 = 0.06);
check!(SmallCheck, Policy::Quarantine, min_side: u32 = 8);
check!(AspectCheck, Policy::Quarantine, max_ratio: f64 = 5.0);
check!(FlatCheck, Policy::Quarantine, min_contrast: f64 = 2.0);
check!(DarkCheck, Policy::Keep, below: f64 = 16.0);
check!(BrightCheck, Policy::Keep, above: f64 = 240.0);
check!(BlurCheck, Policy::Keep, min_sharpness: f64 = 10.0);
check!(GrayCheck, Policy::Keep);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Checks {
    decode: DecodeCheck,
    wrong_extension: ExtensionCheck,
    exact_duplicates: ExactCheck,
    near_duplicates: NearCheck,
    too_small: SmallCheck,
    aspect_ratio: AspectCheck,
    low_information: FlatCheck,
    too_dark: DarkCheck,
    too_bright: BrightCheck,
    blurry: BlurCheck,
    grayscale: GrayCheck,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_max_pixels")]
    max_pixels: u64,
    #[serde(default = "default_max_bytes")]
    max_bytes: u64,
    #[serde(default)]
    checks: Checks,
    /// The share of a class that may be removed before the run warns. A warning changes no
    /// result, so it is not a parameter: not in the key.
    #[serde(default = "default_max_class_loss", skip_serializing)]
    max_class_loss: f64,
}

fn default_max_class_loss() -> f64 {
    0.05
}

fn default_max_pixels() -> u64 {
    imaging::DEFAULT_MAX_PIXELS
}
fn default_max_bytes() -> u64 {
    DecodeLimits::default().max_bytes
}

#[derive(Debug)]
pub struct CleanStage {
    config: Config,
}

impl StageKind for CleanKind {
    fn name(&self) -> &'static str {
        "clean"
    }

    fn version(&self) -> u32 {
        // 2: near-duplicate groups by leader clustering instead of transitive pairs.
        // 3: hash pairs confirmed by aligned, tone-matched comparison; chroma instead of
        //    colour; the original kept over upscaled and re-encoded copies; undecodable
        //    files never grouped as exact duplicates; groups across classes only reported.
        // 4: a JPEG that is a recompression of another image is its copy, however far
        //    apart their pixels.
        4
    }

    fn parse(&self, table: Spanned<DeValue<'_>>, _cx: &ParseContext<'_>) -> Result<Arc<dyn Stage>, Vec<Issue>> {
        let spans = ValueSpans::of(&table);
        let config: Config = parse_config(table)?;
        let mut ck = Checker::new(&spans);
        let c = &config.checks;
        ck.int("max_pixels", config.max_pixels, 1, MAX_PIXELS, "pixels an image may have; larger headers are rejected undecoded");
        ck.int("max_bytes", config.max_bytes, 1, MAX_BYTES, "bytes an image file may have (4 GiB at most)");
        ck.int(
            "checks.near_duplicates.max_distance",
            u64::from(c.near_duplicates.max_distance),
            0,
            32,
            "bits of a 64-bit perceptual hash within which pairs are compared exactly; typical values are 10 to 18",
        );
        let level = Bounds::closed(0.0, 255.0);
        ck.float(
            "checks.near_duplicates.max_colour_difference",
            c.near_duplicates.max_colour_difference,
            level,
            "mean difference of 8x8 chroma thumbnails (red and blue against green), on the 0-255 scale",
        );
        ck.float(
            "checks.near_duplicates.max_difference",
            c.near_duplicates.max_difference,
            Bounds::closed(0.0, 1.0),
            "share of the range of levels that 99 % of an aligned, tone-matched copy stays within (0.06 = 6 %)",
        );
        ck.int("checks.too_small.min_side", u64::from(c.too_small.min_side), 1, 65_535, "pixels on the shorter side");
        ck.float("checks.aspect_ratio.max_ratio", c.aspect_ratio.max_ratio, Bounds::closed(1.0, 1000.0), "longer side over shorter side");
        ck.float("checks.low_information.min_contrast", c.low_information.min_contrast, level, "standard deviation of brightness, 0-255");
        let dark = ck.float("checks.too_dark.below", c.too_dark.below, level, "mean brightness, 0-255");
        let bright = ck.float("checks.too_bright.above", c.too_bright.above, level, "mean brightness, 0-255");
        if dark
            && bright
            && c.too_dark.policy != Policy::Off
            && c.too_bright.policy != Policy::Off
            && c.too_dark.below >= c.too_bright.above
        {
            ck.fail(
                "checks.too_dark.below",
                format!(
                    "`too_dark.below` = {} is not under `too_bright.above` = {}: almost every image would count as too dark or too bright",
                    c.too_dark.below, c.too_bright.above
                ),
                "keep below < above, e.g. the defaults 16 and 240",
            );
        }
        ck.float("checks.blurry.min_sharpness", c.blurry.min_sharpness, Bounds::closed(0.0, 1e9), "variance of the Laplacian");
        ck.float(
            "max_class_loss",
            config.max_class_loss,
            Bounds::closed(0.0, 1.0),
            "the share of a class that may be removed before the run warns (0.05 = 5 %)",
        );
        let issues = ck.into_issues();
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(Arc::new(CleanStage { config }))
    }
}

impl Stage for CleanStage {
    fn params(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("clean config serialises")
    }

    fn plan_issues(&self, plan: &dyn super::PlanView) -> Vec<Issue> {
        super::one_input_issue(plan).into_iter().collect()
    }

    fn run(&self, cx: &StageContext<'_>) -> Result<(), StageError> {
        let (input, artifact) = io::single_input(cx)?;
        let items = io::read(cx, input, artifact)?;
        let meta = io::read_meta(cx, input, artifact)?;
        let probes = probe_all(cx, &items, &DecodeLimits { max_pixels: self.config.max_pixels, max_bytes: self.config.max_bytes })?;
        let c = &self.config.checks;
        let mut findings: Vec<Vec<Finding>> = vec![Vec::new(); items.len()];
        let mut add = |i: usize, check: &'static str, policy: Policy, reason: String, score: Option<f64>| {
            if policy != Policy::Off {
                findings[i].push(Finding { id: items[i].id.clone(), source: items[i].source.clone(), check, reason, score, policy });
            }
        };

        let colourful_set = {
            let ok: Vec<&Probe> = probes.iter().filter_map(|p| p.as_ref().ok()).collect();
            ok.iter().filter(|p| p.colourful > 0.01).count() * 2 > ok.len()
        };
        for (i, (item, probe)) in items.iter().zip(&probes).enumerate() {
            let p = match probe {
                Err(defect) => {
                    add(i, "decode", c.decode.policy, defect.to_string(), None);
                    continue;
                }
                Ok(p) => p,
            };
            if let Some(ext) = extension(&item.source)
                && let Some(format) = image::ImageFormat::from_extension(&ext)
                && imaging::format_name(format) != p.format
                && !image::ImageFormat::from_extension(&p.format).is_some_and(|f| imaging::extension_fits(&ext, f))
            {
                add(i, "wrong_extension", c.wrong_extension.policy, format!("named .{ext} but is {}", p.format), None);
            }
            let (short, long) = (p.width.min(p.height), p.width.max(p.height));
            if short < c.too_small.min_side {
                add(
                    i,
                    "too_small",
                    c.too_small.policy,
                    format!("{}x{} is under {} pixels on a side", p.width, p.height, c.too_small.min_side),
                    Some(f64::from(short)),
                );
            }
            let ratio = f64::from(long) / f64::from(short.max(1));
            if ratio > c.aspect_ratio.max_ratio {
                add(
                    i,
                    "aspect_ratio",
                    c.aspect_ratio.policy,
                    format!("aspect ratio {ratio:.1} exceeds {}", c.aspect_ratio.max_ratio),
                    Some(ratio),
                );
            }
            if f64::from(p.contrast) < c.low_information.min_contrast {
                add(
                    i,
                    "low_information",
                    c.low_information.policy,
                    format!("nearly constant (luma std {:.2})", p.contrast),
                    Some(f64::from(p.contrast)),
                );
            } else if f64::from(p.sharpness) < c.blurry.min_sharpness {
                add(
                    i,
                    "blurry",
                    c.blurry.policy,
                    format!("Laplacian variance {:.1} is under {}", p.sharpness, c.blurry.min_sharpness),
                    Some(f64::from(p.sharpness)),
                );
            }
            if f64::from(p.brightness) < c.too_dark.below {
                add(
                    i,
                    "too_dark",
                    c.too_dark.policy,
                    format!("mean brightness {:.1} is under {}", p.brightness, c.too_dark.below),
                    Some(f64::from(p.brightness)),
                );
            }
            if f64::from(p.brightness) > c.too_bright.above {
                add(
                    i,
                    "too_bright",
                    c.too_bright.policy,
                    format!("mean brightness {:.1} is over {}", p.brightness, c.too_bright.above),
                    Some(f64::from(p.brightness)),
                );
            }
            if colourful_set && p.colourful <= 0.01 {
                add(i, "grayscale", c.grayscale.policy, "grayscale image in a colour set".into(), Some(f64::from(p.colourful)));
            }
        }

        // Exact duplicates: the first by id stays, so the choice is stable across runs.
        let mut groups: Vec<DuplicateGroup> = Vec::new();
        let mut group_of: HashMap<usize, usize> = HashMap::new();
        let mut by_digest: BTreeMap<Digest, Vec<usize>> = BTreeMap::new();
        // Only decodable images: identical broken files are each reported (and quarantined)
        // as broken, not dropped as copies of one another.
        for (i, item) in items.iter().enumerate().filter(|&(i, _)| probes[i].is_ok()) {
            by_digest.entry(item.digest).or_default().push(i);
        }
        for members in by_digest.values().filter(|m| m.len() > 1) {
            let mut members = members.clone();
            members.sort_by(|&a, &b| items[a].id.cmp(&items[b].id));
            let kept = members[0];
            for &copy in &members[1..] {
                add(copy, "exact_duplicates", c.exact_duplicates.policy, format!("same bytes as `{}`", items[kept].id), None);
            }
            group_of.extend(members.iter().map(|&m| (m, groups.len())));
            groups.push(DuplicateGroup {
                kept: items[kept].id.clone(),
                copies: members[1..]
                    .iter()
                    .map(|&m| GroupCopy { id: items[m].id.clone(), kind: "exact", distance: None, removed: false })
                    .collect(),
            });
        }

        // Near duplicates among distinct decodable images (see groups.rs and imaging/near.rs).
        let mut cross_class = Vec::new();
        if c.near_duplicates.policy != Policy::Off {
            let candidates: Vec<usize> =
                by_digest.values().map(|m| *m.iter().min_by(|&&a, &&b| items[a].id.cmp(&items[b].id)).expect("non-empty")).collect();
            let thresholds = groups::Thresholds {
                max_distance: c.near_duplicates.max_distance,
                max_colour_difference: c.near_duplicates.max_colour_difference,
                max_difference: c.near_duplicates.max_difference,
            };
            let limits = DecodeLimits { max_pixels: self.config.max_pixels, max_bytes: self.config.max_bytes };
            for group in groups::find(cx, &items, &probes, &candidates, &thresholds, &limits)? {
                let kept = group.kept;
                if group.cross_class {
                    let mut members: Vec<CrossClassMember> = std::iter::once(kept)
                        .chain(group.copies.iter().map(|&(i, _)| i))
                        .map(|i| CrossClassMember { id: items[i].id.clone(), label: class_of(&items[i]) })
                        .collect();
                    members.sort_by(|a, b| a.id.cmp(&b.id));
                    for &(i, found) in &group.copies {
                        add(
                            i,
                            "cross_class_duplicates",
                            Policy::Keep,
                            format!(
                                "looks like `{}` labelled `{}` ({}): a label conflict to review",
                                items[kept].id,
                                class_of(&items[kept]),
                                how_alike(found)
                            ),
                            Some(f64::from(found.difference)),
                        );
                    }
                    cross_class.push(members);
                    continue;
                }
                let mut copies = Vec::new();
                for &(i, found) in &group.copies {
                    add(
                        i,
                        "near_duplicates",
                        c.near_duplicates.policy,
                        format!("a copy of `{}` ({}; pHash distance {})", items[kept].id, how_alike(found), found.distance),
                        Some(f64::from(found.difference)),
                    );
                    copies.push(GroupCopy { id: items[i].id.clone(), kind: "near", distance: Some(found.distance), removed: false });
                }
                // Merge with an exact-duplicate group the kept image already leads.
                let g = match group_of.get(&kept) {
                    Some(&g) => g,
                    None => {
                        groups.push(DuplicateGroup { kept: items[kept].id.clone(), copies: Vec::new() });
                        groups.len() - 1
                    }
                };
                for i in group.copies.iter().map(|&(i, _)| i).chain([kept]) {
                    for &j in &by_digest[&items[i].digest] {
                        group_of.insert(j, g);
                    }
                }
                groups[g].copies.extend(copies);
            }
        }

        // The verdict: the strictest policy among an item's findings.
        let action: Vec<Policy> = findings.iter().map(|f| f.iter().map(|x| x.policy).max().unwrap_or(Policy::Off)).collect();
        let removed = |i: usize| matches!(action[i], Policy::Drop | Policy::Quarantine);
        let index_of: HashMap<&str, usize> = items.iter().enumerate().map(|(i, it)| (it.id.as_str(), i)).collect();
        for g in &mut groups {
            for copy in &mut g.copies {
                copy.removed = removed(index_of[copy.id.as_str()]);
            }
        }
        let mut counts: BTreeMap<&'static str, CheckCount> = BTreeMap::new();
        for (i, f) in findings.iter().enumerate() {
            for x in f {
                let n = counts.entry(x.check).or_default();
                n.found += 1;
                n.removed += usize::from(removed(i) && x.policy == action[i]);
            }
        }

        let mut kept_items = Vec::new();
        let mut quarantined = 0;
        let mut dropped = 0;
        let mut by_id: HashMap<&str, usize> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            match action[i] {
                Policy::Drop => dropped += 1,
                Policy::Quarantine => {
                    quarantined += 1;
                    let check = findings[i].iter().find(|f| f.policy == Policy::Quarantine).map_or("other", |f| f.check);
                    let name = format!("quarantine/{check}/{}", item.id.replace('/', "__"));
                    cx.attach_blob(&name, item.digest, item.bytes);
                }
                Policy::Off | Policy::Keep => {
                    let mut kept = item.clone();
                    if let Ok(p) = &probes[i] {
                        (kept.format, kept.width, kept.height) = (Some(p.format.clone()), Some(p.width), Some(p.height));
                    }
                    if let Some(&g) = group_of.get(&i) {
                        kept.group = Some(groups[g].kept.clone());
                    }
                    by_id.insert(item.id.as_str(), kept_items.len());
                    kept_items.push(kept);
                }
            }
        }
        // Removed copies travel with the copy that stayed, for the label stage.
        for g in &groups {
            if let Some(&k) = by_id.get(g.kept.as_str()) {
                for copy in g.copies.iter().filter(|c| c.removed) {
                    let src = &items[index_of[copy.id.as_str()]];
                    kept_items[k].duplicates.push(DuplicateRef {
                        id: src.id.clone(),
                        source: src.source.clone(),
                        digest: src.digest,
                        label: src.label.clone(),
                    });
                }
            }
        }

        let summary: Vec<String> = counts.iter().map(|(check, n)| format!("{check}: {} found, {} removed", n.found, n.removed)).collect();
        if !summary.is_empty() {
            cx.reporter.summary(cx.stage, &summary);
        }
        let mut per_class: BTreeMap<String, ClassCount> = BTreeMap::new();
        for (i, item) in items.iter().enumerate() {
            let class = per_class.entry(class_of(item)).or_default();
            class.items_in += 1;
            if removed(i) {
                class.removed += 1;
                let check = findings[i].iter().find(|f| f.policy == action[i]).map_or("other", |f| f.check);
                *class.by_check.entry(check).or_default() += 1;
            }
        }
        for (class, n) in &per_class {
            let share = n.removed as f64 / n.items_in.max(1) as f64;
            if n.removed > 0 && share > self.config.max_class_loss {
                let why: Vec<String> = n.by_check.iter().map(|(check, k)| format!("{k} {check}")).collect();
                cx.reporter.warn(&format!(
                    "clean `{}` removed {} of {} `{class}` images ({:.0} %: {}), above max_class_loss = {:.0} %; review outputs/{}/{}/quarantine/ \
                     (`kiln report {}`) before training on what is left",
                    cx.stage,
                    n.removed,
                    n.items_in,
                    100.0 * share,
                    why.join(", "),
                    100.0 * self.config.max_class_loss,
                    cx.pipeline,
                    cx.stage,
                    cx.stage
                ));
            }
        }
        let report = Report {
            items_in: items.len(),
            items_kept: kept_items.len(),
            dropped,
            quarantined,
            per_class,
            checks: counts,
            duplicate_groups: groups,
            cross_class_groups: cross_class,
            findings: findings.into_iter().flatten().collect(),
        };
        io::write(cx, &mut kept_items)?;
        io::write_meta(cx, &meta)?;
        io::write_json(cx, "clean_report.json", &report)
    }
}

/// How a near copy matched, in a reason's words.
fn how_alike(found: groups::Match) -> String {
    if found.recompressed {
        format!(
            "one is a JPEG recompression of the other, predicted by its own quantisation table; {:.1} % apart once aligned",
            100.0 * found.difference
        )
    } else {
        format!("differs by {:.1} % once aligned", 100.0 * found.difference)
    }
}

fn extension(source: &str) -> Option<String> {
    let name = source.rsplit('/').next()?;
    name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).filter(|e| !e.is_empty() && e.len() <= 5)
}

/// Probes every item, memoised per (image digest, probe version and limits).
fn probe_all(cx: &StageContext<'_>, items: &[Item], limits: &DecodeLimits) -> Result<Vec<Result<Probe, Defect>>, StageError> {
    let progress = cx.reporter.progress(&format!("{}: checking images", cx.stage), items.len() as u64, "items");
    let all: Vec<usize> = (0..items.len()).collect();
    let probes = memoised(cx, items, &all, "clean-probe", imaging::PROBE_VERSION, limits, |bytes| {
        let verdict = imaging::probe(bytes, limits);
        progress.inc(1);
        verdict
    })?;
    progress.finish();
    Ok(probes)
}

/// `measure` of the bytes of each item in `which`, memoised per (image digest, `what`,
/// its version and the decode limits): a rerun with other thresholds decodes nothing.
fn memoised<T: Serialize + serde::de::DeserializeOwned>(
    cx: &StageContext<'_>,
    items: &[Item],
    which: &[usize],
    what: &str,
    version: u32,
    limits: &DecodeLimits,
    measure: impl Fn(&[u8]) -> T + Sync,
) -> Result<Vec<T>, StageError> {
    let op = Digest::of_bytes(format!("{what} v{version} {}", serde_json::to_string(limits).expect("limits serialise")).as_bytes());
    let digests: Vec<Digest> = which.iter().map(|&i| items[i].digest).collect();
    let results = cx
        .cache
        .state()
        .memo()
        .map(&digests, &op, |k| {
            let bytes = cx.cache.read_blob(&digests[k]).map_err(|e| format!("cannot read image of `{}`: {e}", items[which[k]].id))?;
            serde_json::to_vec(&measure(&bytes)).map_err(|e| e.to_string())
        })
        .map_err(|e| StageError::Failed(e.to_string()))?;
    results
        .into_iter()
        .map(|r| {
            let bytes = r.map_err(StageError::Failed)?;
            serde_json::from_slice(&bytes).map_err(|e| StageError::Failed(format!("memo entry: {e}")))
        })
        .collect()
}
