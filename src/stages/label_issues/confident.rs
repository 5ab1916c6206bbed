//! Confident learning: which given labels are probably wrong, judged from out-of-fold
//! predicted probabilities (Northcutt, Jiang & Chuang, "Confident Learning: Estimating
//! Uncertainty in Dataset Labels", JAIR 70, 2021). Pure: no I/O.
//!
//! It flags the items that cleanlab 2.x's `cleanlab.filter.find_label_issues(labels,
//! pred_probs)` flags with its defaults (`filter_by = "prune_by_noise_rate"`, `frac_noise = 1`,
//! `min_examples_per_class = 1`), ranked as `return_indices_ranked_by = "self_confidence"` ranks
//! them. `tests/fixtures/cleanlab/label_issues.json` (made by `bench/cleanlab_fixture.py`)
//! holds cleanlab's answers, and the tests below check them.
//!
//! 1. **Per-class thresholds.** t_k is the mean probability of class k over the items given k.
//!    Models are sure of some classes and timid about others, so "confidently k" is measured
//!    against what the model usually says for k rather than a fixed 0.5.
//! 2. **Confident joint.** An item counts in cell (given, j) when p_j ≥ t_j (less 1e-6); when
//!    several classes pass, the argmax wins. Items that pass no threshold are left out: the
//!    model knows nothing about them, and counting them would smear noise over every cell.
//!    Each diagonal cell is at least 1, so no class looks entirely mislabelled.
//! 3. **Calibration.** Each row is scaled to the number of items given that class, the whole to
//!    n, and rows are rounded keeping their totals. The counted items are a biased (confident)
//!    subset; the scaled matrix estimates the joint of given and true labels over all items.
//! 4. **Prune by noise rate.** Off-diagonal cell (given k, true j) estimates how many items given
//!    k are really j, and that many items given k are picked: those with the largest margin
//!    p_j − p_k, the ones most plausibly j. A class keeps at least one item: one with a single
//!    item is never pruned, and a diagonal estimated at 0 is raised to 1 by taking evenly from
//!    its row's other cells.
//! 5. **Argmax filter.** A picked item whose argmax is its given label (1e-6 in the label's
//!    favour) is spared: the counts say how many are wrong, not that the model doubts this one.
//!
//! Suspects are ranked by self-confidence (the probability of the given label), lowest first.
//!
//! Matching cleanlab bit for bit needs its arithmetic: f64 throughout, numpy's pairwise
//! summation for every float sum, rounding half to even (`np.round`), argmax taking the first
//! maximum, and the truncation cleanlab applies to the prune counts. Exact ties are the one
//! thing that cannot be matched: numpy's `argsort` is not stable, and on SIMD builds its order
//! among equal keys differs between CPUs, so where a tie decides (equal counts in one row of the
//! joint are common) cleanlab's own answer changes when the rows or classes are merely
//! reordered. Here ties go by index, as a stable sort would order them.

use std::cmp::Ordering;

/// cleanlab's slack in probability comparisons (`FLOATING_POINT_COMPARISON`).
const SLACK: f64 = 1e-6;
/// The threshold of a class nobody was given: no probability reaches it (cleanlab's `BIG_VALUE`).
const UNREACHABLE: f64 = 2.0;
/// The lowest threshold, above `SLACK`, so that a probability of 0 is never confident.
const MIN_THRESHOLD: f64 = 2.0 * SLACK;
/// Keeps a total of zero from dividing by zero (cleanlab's `TINY_VALUE`).
const TINY: f64 = 1e-100;
/// Items every class keeps (cleanlab's `min_examples_per_class`).
const MIN_PER_CLASS: usize = 1;

/// One suspect: `index` into the rows given, its given label, the class the model believes
/// (argmax of its probabilities), and its self-confidence (the probability of the given label).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LabelIssue {
    pub index: usize,
    pub given: usize,
    pub suggested: usize,
    pub self_confidence: f64,
}

/// What was estimated on the way (for the report).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Estimate {
    /// Per-class threshold: mean self-confidence of the items given that class (2.0, which no
    /// probability reaches, for a class no item was given).
    pub thresholds: Vec<f64>,
    /// Calibrated confident joint, rows = given label, columns = estimated true label (counts, f64).
    /// Whole numbers: like cleanlab, the calibrated counts are rounded keeping row totals.
    pub confident_joint: Vec<Vec<f64>>,
    /// How many items of each (given, true) cell were pruned: the number prune-by-noise-rate set
    /// out to remove (diagonal 0). An item picked for two cells is one suspect, and the argmax
    /// filter spares some, so the suspects can be fewer than the sum.
    pub pruned: Vec<Vec<usize>>,
}

/// Why the inputs cannot be judged.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Invalid {
    #[error("need at least 2 classes, got {classes}")]
    TooFewClasses { classes: usize },
    #[error("{values} probabilities for {rows} rows of {classes} classes")]
    Shape { rows: usize, classes: usize, values: usize },
    #[error("row {row}: label {label} is not below the class count {classes}")]
    Label { row: usize, label: usize, classes: usize },
    /// Outside [0, 1] by more than cleanlab's slack of 1e-6, or not a number.
    #[error("row {row}: probability {value} of class {class} is not in [0, 1]")]
    Probability { row: usize, class: usize, value: f32 },
}

/// `labels[i] < classes`; `probs` is row-major, `labels.len() * classes` values, rows summing to ~1.
/// Returns suspects ranked by self-confidence, lowest first (ties by index), and the estimate.
pub fn find_label_issues(labels: &[usize], probs: &[f32], classes: usize) -> Result<(Vec<LabelIssue>, Estimate), Invalid> {
    validate(labels, probs, classes)?;
    let wide: Vec<f64> = probs.iter().map(|&p| f64::from(p)).collect();
    let rows: Vec<&[f64]> = wide.chunks_exact(classes).collect();
    let mut members = vec![Vec::new(); classes];
    for (i, &label) in labels.iter().enumerate() {
        members[label].push(i);
    }

    let thresholds: Vec<f64> = members
        .iter()
        .enumerate()
        .map(|(class, items)| {
            if items.is_empty() {
                return UNREACHABLE;
            }
            let own: Vec<f64> = items.iter().map(|&i| rows[i][class]).collect();
            (pairwise_sum(&own) / own.len() as f64).max(MIN_THRESHOLD)
        })
        .collect();

    let mut counted = vec![vec![0usize; classes]; classes];
    for (row, &given) in rows.iter().zip(labels) {
        let mut confident = row.iter().zip(&thresholds).enumerate().filter(|(_, (p, t))| **p >= **t - SLACK).map(|(j, _)| j);
        let Some(first) = confident.next() else { continue };
        // cleanlab takes the argmax over all classes here, confident or not.
        let guess = if confident.next().is_some() { argmax(row) } else { first };
        counted[given][guess] += 1;
    }
    for (class, row) in counted.iter_mut().enumerate() {
        row[class] = row[class].max(1);
    }

    let mut scaled: Vec<Vec<f64>> = counted
        .iter()
        .zip(&members)
        .map(|(row, items)| {
            let total = row.iter().sum::<usize>() as f64; // at least 1: the diagonal is
            row.iter().map(|&c| c as f64 / total * items.len() as f64).collect()
        })
        .collect();
    let flat: Vec<f64> = scaled.iter().flatten().copied().collect();
    let total = pairwise_sum(&flat).max(TINY);
    scaled.iter_mut().flatten().for_each(|x| *x = *x / total * labels.len() as f64);
    let confident_joint: Vec<Vec<f64>> = scaled.iter().map(Vec::as_slice).map(round_preserving_sum).collect();

    let pruned: Vec<Vec<usize>> = confident_joint
        .iter()
        .enumerate()
        .map(|(given, row)| {
            let kept = row[given].max(MIN_PER_CLASS as f64);
            // cleanlab counts the nonzero cells of the row, diagonal included, less one.
            let nonzero = row.iter().filter(|&&x| x != 0.0).count() as f64 - 1.0;
            let take = (kept - row[given]) / nonzero.max(1.0);
            // `as usize` truncates, as cleanlab's `astype(int)` does.
            row.iter().enumerate().map(|(truth, &x)| if truth == given { 0 } else { (x - take).max(0.0) as usize }).collect()
        })
        .collect();

    let mut picked = vec![false; labels.len()];
    for (given, items) in members.iter().enumerate().filter(|(_, items)| items.len() > MIN_PER_CLASS) {
        for (truth, &count) in pruned[given].iter().enumerate().filter(|&(_, &count)| count > 0) {
            let margin = |i: usize| rows[i][truth] - rows[i][given];
            let mut order = items.clone();
            order.sort_by(|&a, &b| compare(margin(b), margin(a)));
            order.iter().take(count).for_each(|&i| picked[i] = true);
        }
    }

    let mut issues: Vec<LabelIssue> = picked
        .iter()
        .enumerate()
        .filter(|&(_, &p)| p)
        .filter_map(|(index, _)| {
            let (row, given) = (rows[index], labels[index]);
            let mut favoured = row.to_vec();
            favoured[given] += SLACK;
            (argmax(&favoured) != given).then(|| LabelIssue { index, given, suggested: argmax(row), self_confidence: row[given] })
        })
        .collect();
    issues.sort_by(|a, b| compare(a.self_confidence, b.self_confidence).then(a.index.cmp(&b.index)));
    Ok((issues, Estimate { thresholds, confident_joint, pruned }))
}

fn validate(labels: &[usize], probs: &[f32], classes: usize) -> Result<(), Invalid> {
    if classes < 2 {
        return Err(Invalid::TooFewClasses { classes });
    }
    if labels.len().checked_mul(classes) != Some(probs.len()) {
        return Err(Invalid::Shape { rows: labels.len(), classes, values: probs.len() });
    }
    if let Some((row, &label)) = labels.iter().enumerate().find(|&(_, &label)| label >= classes) {
        return Err(Invalid::Label { row, label, classes });
    }
    // cleanlab's own check: within [0, 1] give or take its slack (NaN fails `contains`).
    match probs.iter().position(|&p| !(-SLACK..=1.0 + SLACK).contains(&f64::from(p))) {
        Some(at) => Err(Invalid::Probability { row: at / classes, class: at % classes, value: probs[at] }),
        None => Ok(()),
    }
}

/// Inputs are validated finite, so every pair compares.
fn compare(a: f64, b: f64) -> Ordering {
    a.partial_cmp(&b).unwrap_or(Ordering::Equal)
}

/// The first maximum, as `np.argmax`.
fn argmax(row: &[f64]) -> usize {
    row.iter().enumerate().fold(0, |best, (j, &p)| if p > row[best] { j } else { best })
}

/// numpy's pairwise summation (`np.sum`, `np.mean` of float64): the same additions in the same
/// order, so thresholds and totals equal cleanlab's to the last bit and no comparison flips.
fn pairwise_sum(xs: &[f64]) -> f64 {
    if xs.len() < 8 {
        xs.iter().fold(-0.0, |sum, &x| sum + x)
    } else if xs.len() <= 128 {
        let whole = xs.len() - xs.len() % 8;
        let mut acc = [0.0; 8];
        acc.copy_from_slice(&xs[..8]);
        for block in xs[8..whole].chunks_exact(8) {
            acc.iter_mut().zip(block).for_each(|(a, &x)| *a += x);
        }
        let head = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        xs[whole..].iter().fold(head, |sum, &x| sum + x)
    } else {
        let half = xs.len() / 2;
        let half = half - half % 8;
        pairwise_sum(&xs[..half]) + pairwise_sum(&xs[half..])
    }
}

/// cleanlab's `round_preserving_sum`: round each value half to even, then move the values with
/// the largest rounding loss (or gain) by one until the total is the rounded original total.
/// A calibrated row must still sum to the number of items given that class.
fn round_preserving_sum(row: &[f64]) -> Vec<f64> {
    let mut ints: Vec<f64> = row.iter().map(|x| x.round_ties_even()).collect();
    let target = pairwise_sum(row).round_ties_even();
    loop {
        let total = pairwise_sum(&ints).round_ties_even();
        if (total - target).abs() <= SLACK {
            return ints;
        }
        let diff = (target - total).round_ties_even();
        let step = if diff < 0.0 { -1.0 } else { 1.0 };
        // cleanlab: `argsort(row - ints)`, reversed when rounding up.
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| compare(row[a] - ints[a], row[b] - ints[b]));
        if step > 0.0 {
            order.reverse();
        }
        for &i in order.iter().take(diff.abs() as usize) {
            ints[i] += step;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows that favour `class` with probability `p`, the rest shared evenly.
    fn sure(classes: usize, class: usize, p: f32) -> Vec<f32> {
        (0..classes).map(|j| if j == class { p } else { (1.0 - p) / (classes - 1) as f32 }).collect()
    }

    #[test]
    fn separable_set_flags_nothing() {
        let labels = [0, 0, 0, 1, 1, 1, 2, 2, 2];
        let probs: Vec<f32> = labels.iter().flat_map(|&c| sure(3, c, 0.8)).collect();
        let (issues, estimate) = find_label_issues(&labels, &probs, 3).expect("valid");
        assert!(issues.is_empty());
        assert_eq!(estimate.confident_joint, vec![vec![3.0, 0.0, 0.0], vec![0.0, 3.0, 0.0], vec![0.0, 0.0, 3.0]]);
        assert_eq!(estimate.pruned, vec![vec![0; 3]; 3]);
    }

    #[test]
    fn obvious_flip_is_flagged_with_its_class() {
        let mut labels = vec![0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2];
        let mut probs: Vec<f32> = labels.iter().flat_map(|&c| sure(3, c, 0.8)).collect();
        labels.push(0);
        probs.extend([0.05, 0.9, 0.05]);
        let (issues, estimate) = find_label_issues(&labels, &probs, 3).expect("valid");
        assert_eq!(issues, vec![LabelIssue { index: 12, given: 0, suggested: 1, self_confidence: f64::from(0.05f32) }]);
        assert_eq!(estimate.confident_joint[0], vec![4.0, 1.0, 0.0]);
        assert_eq!(estimate.pruned[0], vec![0, 1, 0]);
    }

    #[test]
    fn a_class_keeps_its_only_item() {
        // Class 2's one item looks like class 0; with a second such item, one of them goes.
        let labels = [0, 0, 0, 0, 1, 1, 1, 1, 2];
        let mut probs: Vec<f32> = labels[..8].iter().flat_map(|&c| sure(3, c, 0.8)).collect();
        probs.extend([0.9, 0.05, 0.05]);
        let (issues, _) = find_label_issues(&labels, &probs, 3).expect("valid");
        assert!(issues.is_empty());

        let labels = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2];
        probs.extend([0.85, 0.1, 0.05]);
        let (issues, _) = find_label_issues(&labels, &probs, 3).expect("valid");
        let flagged: Vec<usize> = issues.iter().map(|issue| issue.index).collect();
        assert_eq!(flagged, vec![8]);
    }

    #[test]
    fn invalid_inputs_are_refused() {
        let two = [0.5, 0.5, 0.5, 0.5];
        assert_eq!(find_label_issues(&[0, 0], &[1.0, 1.0], 1), Err(Invalid::TooFewClasses { classes: 1 }));
        assert_eq!(find_label_issues(&[0, 1], &two[..3], 2), Err(Invalid::Shape { rows: 2, classes: 2, values: 3 }));
        assert_eq!(find_label_issues(&[0, 2], &two, 2), Err(Invalid::Label { row: 1, label: 2, classes: 2 }));
        for bad in [f32::NAN, f32::INFINITY, -0.5, 1.5] {
            let probs = [0.5, 0.5, 0.5, bad];
            let refused = find_label_issues(&[0, 1], &probs, 2).expect_err("refused");
            assert!(matches!(refused, Invalid::Probability { row: 1, class: 1, .. }), "{bad}: {refused}");
        }
        assert!(find_label_issues(&[], &[], 2).expect("nothing to judge").0.is_empty());
    }

    #[test]
    fn pairwise_sum_is_numpys() {
        // np.sum(np.arange(1, 21) / 7) and np.sum(np.arange(1, 201) / 10); running sums give 30.0 and 2010.0000000000002.
        let sevenths: Vec<f64> = (1_u32..=20).map(|i| f64::from(i) / 7.0).collect();
        assert_eq!(pairwise_sum(&sevenths), 30.000000000000004);
        let tenths: Vec<f64> = (1_u32..=200).map(|i| f64::from(i) / 10.0).collect();
        assert_eq!(pairwise_sum(&tenths), 2009.9999999999998);
    }

    #[test]
    fn matches_cleanlab_fixture() {
        let text = include_str!("../../../tests/fixtures/cleanlab/label_issues.json");
        let fixture: serde_json::Value = serde_json::from_str(text).expect("fixture is JSON");
        let cases = fixture["cases"].as_array().expect("cases");
        assert!(cases.len() >= 4);
        for case in cases {
            let name = case["name"].as_str().expect("name");
            let numbers = |key: &str| -> Vec<f64> {
                let flat = case[key].as_array().expect(key).iter().flat_map(|v| v.as_array().cloned().unwrap_or_else(|| vec![v.clone()]));
                flat.map(|v| v.as_f64().expect("number")).collect()
            };
            let classes = case["classes"].as_u64().expect("classes") as usize;
            let labels: Vec<usize> = numbers("labels").iter().map(|&l| l as usize).collect();
            let probs: Vec<f32> = numbers("probs").iter().map(|&p| p as f32).collect();
            let (issues, estimate) = find_label_issues(&labels, &probs, classes).expect("valid");
            let flagged: Vec<usize> = issues.iter().map(|issue| issue.index).collect();
            let expected: Vec<usize> = numbers("issues").iter().map(|&i| i as usize).collect();
            assert_eq!(flagged, expected, "{name}: flagged items");
            assert_eq!(estimate.thresholds, numbers("thresholds"), "{name}: thresholds");
            assert_eq!(estimate.confident_joint.concat(), numbers("confident_joint"), "{name}: confident joint");
            let pruned: Vec<f64> = estimate.pruned.concat().iter().map(|&c| c as f64).collect();
            assert_eq!(pruned, numbers("pruned"), "{name}: pruned");
            assert!(issues.iter().all(|issue| issue.suggested != issue.given), "{name}");
        }
    }
}
