//! K-fold training for out-of-fold probabilities: the rows judged, gathered into one pool;
//! the pool dealt into folds (stratified by given label, seeded, copies of one image in one
//! fold); and one model per fold, trained on the other folds in memory (no checkpoint, no
//! artifact) with the train stage's own steps, that predicts the rows of its fold. So every
//! row's probabilities come from a model that never saw its label.

use std::collections::BTreeMap;

use super::SPLITS;
use crate::formats::preprocess::Normalize;
use crate::formats::shards::{Dtype, Pixels, ShardManifest, Split};
use crate::rng::Rng;
use crate::stages::training::{At, Batches, Data, Model, Prepared, Trainer, candle};
use crate::stages::{Artifact, StageContext, StageError};

/// What is known of each row of the pool besides its pixels.
pub(super) struct Rows {
    pub(super) ids: Vec<String>,
    pub(super) sources: Vec<String>,
    /// The class index each row is labelled with.
    pub(super) labels: Vec<u32>,
    /// The split each row comes from.
    pub(super) split_of: Vec<&'static str>,
    /// Rows that share a group are copies of one image (clean's duplicates, the offline
    /// augmented copies of an item): they go into one fold.
    pub(super) groups: Vec<String>,
    /// Rows whose label a person reviewed (a corrections row): never suggested again.
    pub(super) reviewed: Vec<bool>,
    /// The rows judged: every row that is an item, not an augmented copy, in order.
    pub(super) judged: Vec<usize>,
}

/// The rows of the splits judged, one split after another (train, val, test).
pub(super) struct Pool {
    pub(super) split: Split,
    pub(super) rows: Rows,
}

impl Pool {
    pub(super) fn load(
        cx: &StageContext<'_>,
        input: &str,
        artifact: &Artifact,
        manifest: &ShardManifest,
        splits: &[String],
    ) -> Result<Pool, StageError> {
        let mut split = empty(manifest);
        let mut split_of = Vec::new();
        let mut groups = Vec::new();
        let mut reviewed = Vec::new();
        for name in SPLITS {
            if !splits.iter().any(|x| x.as_str() == name) {
                continue;
            }
            let part = Split::load(cx, input, artifact, manifest, name)?;
            // Each row's recorded group and review mark, in the order Split::load reads the rows.
            let recorded: Vec<(String, bool)> = manifest
                .splits
                .get(name)
                .map(|info| {
                    info.shards
                        .iter()
                        .flat_map(|s| {
                            (0..s.rows)
                                .map(move |r| (s.groups.get(r).cloned().unwrap_or_default(), s.reviewed.get(r).copied().unwrap_or(false)))
                        })
                        .collect()
                })
                .unwrap_or_default();
            for (r, id) in part.ids.iter().enumerate() {
                let (group, marked) = recorded.get(r).cloned().unwrap_or_default();
                groups.push(if group.is_empty() { item_id(id).to_string() } else { group });
                reviewed.push(marked);
                split_of.push(name);
            }
            append(&mut split, part).map_err(|why| StageError::data(input, why))?;
        }
        let judged = (0..split.len()).filter(|&r| !is_copy(&split.ids[r])).collect();
        let rows = Rows {
            ids: split.ids.clone(),
            sources: split.sources.clone(),
            labels: split.labels.clone(),
            split_of,
            groups,
            reviewed,
            judged,
        };
        Ok(Pool { split, rows })
    }
}

/// A split with no rows, in the manifest's pixel type and shape.
fn empty(manifest: &ShardManifest) -> Split {
    Split {
        pixels: match manifest.dtype {
            Dtype::U8 => Pixels::U8(Vec::new()),
            Dtype::F32 => Pixels::F32(Vec::new()),
        },
        labels: Vec::new(),
        multi: Vec::new(),
        ids: Vec::new(),
        sources: Vec::new(),
        shape: [manifest.channels, manifest.height as usize, manifest.width as usize],
    }
}

/// Appends the rows of `part` to `into` (both read from one manifest).
fn append(into: &mut Split, part: Split) -> Result<(), String> {
    match (&mut into.pixels, part.pixels) {
        (Pixels::U8(a), Pixels::U8(b)) => a.extend(b),
        (Pixels::F32(a), Pixels::F32(b)) => a.extend(b),
        _ => return Err("its splits hold pixels of different types".to_string()),
    }
    into.labels.extend(part.labels);
    into.multi.extend(part.multi);
    into.ids.extend(part.ids);
    into.sources.extend(part.sources);
    Ok(())
}

/// The item a row shows: convert writes the offline augmented copies of item `ID` as
/// `ID#augN`.
pub(super) fn item_id(row_id: &str) -> &str {
    match row_id.rsplit_once("#aug") {
        Some((item, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => item,
        _ => row_id,
    }
}

pub(super) fn is_copy(row_id: &str) -> bool {
    item_id(row_id).len() != row_id.len()
}

/// Which fold each row of the pool is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Folds {
    pub(super) count: usize,
    /// Per row, its fold (`0..count`).
    pub(super) of: Vec<usize>,
}

/// Deals the groups of rows into `folds` folds, stratified by label: the groups of each
/// class, in a seeded order, each to the fold with the fewest rows of that class so far
/// (then the fewest rows, then the lowest number). Every row of a group lands in one fold;
/// a group's class is its first row's. Every fold gets a group when there are at least
/// `folds` groups; with fewer the result is an error.
pub(super) fn assign(labels: &[u32], groups: &[String], folds: usize, seed: u64) -> Result<Folds, String> {
    let mut members: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (r, g) in groups.iter().enumerate() {
        members.entry(g.as_str()).or_default().push(r);
    }
    if members.len() < folds {
        return Err(format!(
            "it has {} distinct images to judge, fewer than the {folds} folds: lower `folds` or judge more `splits`",
            members.len()
        ));
    }
    let mut by_class: BTreeMap<u32, Vec<&Vec<usize>>> = BTreeMap::new();
    for rows in members.values() {
        by_class.entry(labels[rows[0]]).or_default().push(rows);
    }
    let mut fold_of = vec![0; labels.len()];
    let mut sizes = vec![0usize; folds];
    for (class, mut class_groups) in by_class {
        Rng::for_item(seed, "label-issues-folds", u64::from(class)).shuffle(&mut class_groups);
        let mut class_sizes = vec![0usize; folds];
        for rows in class_groups {
            let k = (0..folds).min_by_key(|&k| (class_sizes[k], sizes[k], k)).unwrap_or(0);
            for &r in rows {
                fold_of[r] = k;
            }
            class_sizes[k] += rows.len();
            sizes[k] += rows.len();
        }
    }
    Ok(Folds { count: folds, of: fold_of })
}

/// What the fold models said.
pub(super) struct OutOfFold {
    /// The class probabilities of every judged row, in [`Rows::judged`] order, row-major.
    pub(super) probs: Vec<f32>,
    /// What the models trained on (the pool's images, or its backbone features).
    pub(super) data: Data,
    /// Lines for the stage's summary: the model, the backbone features.
    pub(super) summary: Vec<String>,
}

/// The seed of fold `k`'s model: its initial weights, batch order, dropout and augmentation.
fn fold_seed(seed: u64, k: usize) -> u64 {
    Rng::for_item(seed, "label-issues-fold", k as u64).next_u64()
}

/// Trains one model per fold on the rows of the other folds, for `model.config.epochs`
/// epochs with the train stage's steps, and predicts the judged rows of its fold.
pub(super) fn out_of_fold(
    cx: &StageContext<'_>,
    model: &Model,
    manifest: &ShardManifest,
    norm: Normalize,
    (split, rows): (Split, &Rows),
    folds: &Folds,
) -> Result<OutOfFold, StageError> {
    let (fold_of, folds) = (folds.of.as_slice(), folds.count);
    let cfg = &model.config;
    let classes = manifest.classes.len();
    let shape = split.shape;
    let n = split.len();
    let device = cfg.device.open().map_err(candle("open device"))?;
    let width = model.outputs(&manifest.classes).map_err(StageError::Config)?.width(classes);
    let build = |k: usize| model.build(cx, &device, fold_seed(cx.seed, k), shape, width);
    // The first fold's network also computes the backbone features (head fine-tuning): the
    // backbone is the pretrained one in every fold, so one pass serves them all.
    let (ps, net, mut summary) = build(0)?;
    let none = empty(manifest);
    let Prepared { data, features_line, .. } = model.prepare(cx, net.as_ref(), manifest, norm, &device, (split, none))?;
    summary.extend(features_line);
    let mut first = Some((ps, net));

    let mut pool_probs = vec![0f32; n * classes];
    let bar = cx.reporter.progress(&format!("{}: {folds} fold models", cx.stage), (folds * cfg.epochs) as u64, "epochs");
    for k in 0..folds {
        let (ps, net) = match first.take() {
            Some(built) => built,
            None => {
                let (ps, net, _) = build(k)?;
                (ps, net)
            }
        };
        let seed = fold_seed(cx.seed, k);
        let train_rows: Vec<usize> = (0..n).filter(|&r| fold_of[r] != k).collect();
        let held: Vec<usize> = rows.judged.iter().copied().filter(|&r| fold_of[r] == k).collect();
        let labels: Vec<u32> = train_rows.iter().map(|&r| rows.labels[r]).collect();
        let objective = model.objective(&labels, &[], &manifest.classes)?;
        let opt = model.optimizer(&ps);
        let mut trainer = Trainer { device: device.clone(), ps, net, opt, schedule: model.schedule(), objective };
        let batches = Batches::new(train_rows.len(), cfg.batch_size);
        let in_fold = |e: StageError| StageError::Failed(format!("fold {} of {folds}: {e}", k + 1));
        let mut step = 0u64;
        for epoch in 0..cfg.epochs {
            let mut order = train_rows.clone();
            Rng::for_item(seed, "shuffle", epoch as u64).shuffle(&mut order);
            for b in 0..batches.per_epoch {
                let batch = batches.rows_of(&order, b);
                let lr = trainer.schedule.lr(step, batches.per_epoch, cfg.epochs);
                trainer.step(&data, cfg, seed, At { epoch, batch: b, step }, batch, lr).map_err(in_fold)?;
                step += 1;
            }
            bar.inc(1);
        }
        let probs = trainer.probabilities(&data, &held, cfg.batch_size.max(64)).map_err(in_fold)?;
        for (i, &r) in held.iter().enumerate() {
            pool_probs[r * classes..(r + 1) * classes].copy_from_slice(&probs[i * classes..(i + 1) * classes]);
        }
    }
    bar.finish();
    let probs = rows.judged.iter().flat_map(|&r| pool_probs[r * classes..(r + 1) * classes].iter().copied()).collect();
    Ok(OutOfFold { probs, data, summary })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("item{i:03}")).collect()
    }

    #[test]
    fn folds_are_stratified_and_seeded() {
        // 3 classes of 20, 11 and 5 items.
        let labels: Vec<u32> = (0..36)
            .map(|i| {
                if i < 20 {
                    0
                } else if i < 31 {
                    1
                } else {
                    2
                }
            })
            .collect();
        let groups = ids(labels.len());
        let a = assign(&labels, &groups, 5, 7).unwrap();
        assert_eq!(a, assign(&labels, &groups, 5, 7).unwrap(), "same seed, same folds");
        assert_ne!(a, assign(&labels, &groups, 5, 8).unwrap(), "another seed, other folds");
        let a = a.of;
        for class in 0..3 {
            let per_fold: Vec<usize> = (0..5).map(|k| (0..labels.len()).filter(|&r| labels[r] == class && a[r] == k).count()).collect();
            let (lo, hi) = (per_fold.iter().min().unwrap(), per_fold.iter().max().unwrap());
            assert!(hi - lo <= 1, "class {class} spread over the folds as {per_fold:?}");
        }
        let sizes: Vec<usize> = (0..5).map(|k| a.iter().filter(|&&f| f == k).count()).collect();
        assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "fold sizes {sizes:?}");
    }

    #[test]
    fn copies_of_one_image_share_a_fold() {
        let labels = vec![0u32; 12];
        let mut groups = ids(12);
        // Rows 0, 5 and 9 are one duplicate group; rows 3 and 4 another.
        for r in [5, 9] {
            groups[r] = groups[0].clone();
        }
        groups[4] = groups[3].clone();
        for seed in 0..20 {
            let a = assign(&labels, &groups, 3, seed).unwrap().of;
            assert!(a[0] == a[5] && a[5] == a[9] && a[3] == a[4], "seed {seed}: {a:?}");
            assert!((0..3).all(|k| a.contains(&k)), "every fold is used: {a:?}");
        }
        // Fewer distinct images than folds cannot be dealt.
        let e = assign(&labels[..2], &groups[..2], 3, 1).unwrap_err();
        assert!(e.contains("fewer than the 3 folds"), "{e}");
    }

    #[test]
    fn augmented_copies_are_rows_of_their_item() {
        assert_eq!(item_id("digits/00012#aug3"), "digits/00012");
        assert_eq!(item_id("photos/cat#august.png"), "photos/cat#august.png");
        assert_eq!(item_id("a#aug"), "a#aug");
        assert!(is_copy("x#aug0") && !is_copy("x"));
    }
}
