//! Classification metrics from predicted probabilities, with scikit-learn's definitions
//! (`classification_report`, `confusion_matrix`, `balanced_accuracy_score`, `log_loss`,
//! `top_k_accuracy_score`, `roc_auc_score`, `average_precision_score`).

pub mod multi_label;

use std::collections::BTreeMap;

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassMetrics {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Averages {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// Everything `metrics.json` holds. Field order is the file's key order.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub samples: usize,
    pub accuracy: f64,
    pub balanced_accuracy: f64,
    pub macro_avg: Averages,
    pub weighted_avg: Averages,
    pub log_loss: f64,
    /// Top-k accuracy for k = 2, 3, 5 where k < classes.
    pub top_k_accuracy: BTreeMap<String, f64>,
    /// Expected calibration error over 15 equal-width confidence bins.
    pub ece: f64,
    /// Two classes only: ROC-AUC and average precision (PR-AUC) of the second class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roc_auc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pr_auc: Option<f64>,
    pub per_class: BTreeMap<String, ClassMetrics>,
    /// Rows are true classes, columns predicted, in class order.
    pub confusion_matrix: Vec<Vec<usize>>,
    pub classes: Vec<String>,
    /// A binary model's figures: its decisions (the confusion matrix, the per-class figures
    /// and accuracy above) are taken at this threshold, not at the most probable class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binary: Option<BinaryMetrics>,
}

/// A binary model at its threshold, and its curves over every threshold.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BinaryMetrics {
    pub positive: String,
    pub threshold: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roc_auc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pr_auc: Option<f64>,
    /// (false positive rate, true positive rate) at each distinct score from the highest,
    /// without the points that lie on a straight run (scikit-learn's `roc_curve` with
    /// `drop_intermediate`), from (0, 0).
    pub roc_curve: Vec<[f64; 2]>,
    /// (recall, precision) at each distinct score from the highest.
    pub pr_curve: Vec<[f64; 2]>,
}

/// How a binary model decides: class `positive` from probability `threshold` on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub positive: usize,
    pub threshold: f64,
}

impl Decision {
    pub fn decide(&self, p: &[f32]) -> usize {
        if f64::from(p[self.positive]) >= self.threshold { self.positive } else { 1 - self.positive }
    }
}

pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

pub fn argmax(p: &[f32]) -> usize {
    p.iter().enumerate().fold(0, |best, (i, v)| if *v > p[best] { i } else { best })
}

/// `probs[i]` is the probability row of sample `i`, `labels[i]` its true class; the
/// predicted class is the most probable one, or a binary model's `decision`.
pub fn report(probs: &[Vec<f32>], labels: &[u32], classes: &[String], decision: Option<Decision>) -> Report {
    let k = classes.len();
    let n = labels.len();
    let mut cm = vec![vec![0usize; k]; k];
    let preds: Vec<usize> = probs.iter().map(|p| decision.filter(|_| k == 2).map_or_else(|| argmax(p), |d| d.decide(p))).collect();
    for (&l, &p) in labels.iter().zip(&preds) {
        cm[l as usize][p] += 1;
    }
    let mut per_class = BTreeMap::new();
    let (mut macro_p, mut macro_r, mut macro_f, mut w_p, mut w_r, mut w_f) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    let mut recalls = Vec::new();
    for c in 0..k {
        let tp = cm[c][c] as f64;
        let support: usize = cm[c].iter().sum();
        let predicted: usize = cm.iter().map(|row| row[c]).sum();
        let precision = ratio(tp, predicted as f64);
        let recall = ratio(tp, support as f64);
        let f1 = ratio(2.0 * precision * recall, precision + recall);
        if support > 0 {
            recalls.push(recall);
        }
        macro_p += precision;
        macro_r += recall;
        macro_f += f1;
        let w = support as f64;
        w_p += w * precision;
        w_r += w * recall;
        w_f += w * f1;
        per_class.insert(classes[c].clone(), ClassMetrics { precision, recall, f1, support });
    }
    let correct: usize = (0..k).map(|c| cm[c][c]).sum();
    let eps = 1e-15f64;
    let log_loss =
        probs.iter().zip(labels).map(|(p, &l)| -(f64::from(p[l as usize]).clamp(eps, 1.0 - eps)).ln()).sum::<f64>() / n.max(1) as f64;
    let mut top_k = BTreeMap::new();
    for t in [2usize, 3, 5] {
        if t < k {
            let hits = probs
                .iter()
                .zip(labels)
                .filter(|(p, l)| {
                    let target = p[**l as usize];
                    // Rank of the true class: how many classes score strictly higher.
                    p.iter().filter(|v| **v > target).count() < t
                })
                .count();
            top_k.insert(format!("top_{t}"), ratio(hits as f64, n as f64));
        }
    }
    // Of the positive class: a binary model's, else the second.
    let positive = decision.map_or(1, |d| d.positive);
    let scores: Vec<(f64, bool)> = if k == 2 {
        probs.iter().zip(labels).map(|(p, &l)| (f64::from(p[positive]), l as usize == positive)).collect()
    } else {
        Vec::new()
    };
    let (roc_auc, pr_auc) = if k == 2 { (roc_auc(&scores), average_precision(&scores)) } else { (None, None) };
    let binary = decision.filter(|_| k == 2).map(|d| {
        let m = &per_class[&classes[d.positive]];
        let (roc_curve, pr_curve) = curves(&scores);
        BinaryMetrics {
            positive: classes[d.positive].clone(),
            threshold: d.threshold,
            precision: m.precision,
            recall: m.recall,
            f1: m.f1,
            roc_auc,
            pr_auc,
            roc_curve,
            pr_curve,
        }
    });
    Report {
        samples: n,
        accuracy: ratio(correct as f64, n as f64),
        balanced_accuracy: ratio(recalls.iter().sum(), recalls.len() as f64),
        macro_avg: Averages { precision: macro_p / k as f64, recall: macro_r / k as f64, f1: macro_f / k as f64 },
        weighted_avg: Averages { precision: ratio(w_p, n as f64), recall: ratio(w_r, n as f64), f1: ratio(w_f, n as f64) },
        log_loss,
        top_k_accuracy: top_k,
        ece: ece(probs, labels, 15),
        roc_auc,
        pr_auc,
        per_class,
        confusion_matrix: cm,
        classes: classes.to_vec(),
        binary,
    }
}

/// The ROC curve and the precision–recall curve over (score, is positive) pairs, one point
/// per distinct score from the highest. The ROC curve starts at (0, 0) and drops a point
/// when the counts change by the same steps on both sides of it (scikit-learn's
/// `drop_intermediate`: the point lies on a straight run).
fn curves(scores: &[(f64, bool)]) -> (Vec<[f64; 2]>, Vec<[f64; 2]>) {
    let ranked = ranked_counts(scores);
    let pos = ranked.last().map_or(0, |r| r.1);
    let neg = scores.len() - pos;
    // (false positives, true positives) called from each distinct score on.
    let counts: Vec<[i64; 2]> = ranked.iter().map(|&(_, tp, fp)| [fp as i64, tp as i64]).collect();
    let pr = counts.iter().map(|&[fp, tp]| [ratio(tp as f64, pos as f64), ratio(tp as f64, (tp + fp) as f64)]).collect();
    let mut roc = vec![[0.0, 0.0]];
    for (i, c) in counts.iter().enumerate() {
        let straight = i > 0 && i + 1 < counts.len() && (0..2).all(|a| counts[i + 1][a] - c[a] == c[a] - counts[i - 1][a]);
        if !straight {
            roc.push([ratio(c[0] as f64, neg as f64), ratio(c[1] as f64, pos as f64)]);
        }
    }
    (roc, pr)
}

fn ece(probs: &[Vec<f32>], labels: &[u32], bins: usize) -> f64 {
    let mut conf = vec![0f64; bins];
    let mut acc = vec![0f64; bins];
    let mut count = vec![0usize; bins];
    for (p, &l) in probs.iter().zip(labels) {
        let pred = argmax(p);
        let c = f64::from(p[pred]);
        let b = ((c * bins as f64).ceil() as usize).clamp(1, bins) - 1;
        conf[b] += c;
        acc[b] += f64::from(u8::from(pred == l as usize));
        count[b] += 1;
    }
    let n = labels.len().max(1) as f64;
    (0..bins).filter(|&b| count[b] > 0).map(|b| (count[b] as f64 / n) * (acc[b] / count[b] as f64 - conf[b] / count[b] as f64).abs()).sum()
}

/// Area under the ROC curve, ties counted half (the Mann–Whitney statistic), over (score,
/// is positive) pairs; `None` without both classes.
pub fn roc_auc(scores: &[(f64, bool)]) -> Option<f64> {
    let mut s = scores.to_vec();
    s.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (pos, neg) = (s.iter().filter(|x| x.1).count(), s.iter().filter(|x| !x.1).count());
    if pos == 0 || neg == 0 {
        return None;
    }
    // Average ranks over ties.
    let mut rank_sum = 0f64;
    let mut i = 0;
    while i < s.len() {
        let mut j = i;
        while j + 1 < s.len() && s[j + 1].0 == s[i].0 {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += s[i..=j].iter().filter(|x| x.1).count() as f64 * avg;
        i = j + 1;
    }
    Some((rank_sum - (pos * (pos + 1)) as f64 / 2.0) / (pos * neg) as f64)
}

/// Average precision: Σ (R_n − R_{n−1}) · P_n over descending score thresholds.
pub fn average_precision(scores: &[(f64, bool)]) -> Option<f64> {
    let ranked = ranked_counts(scores);
    let pos = ranked.last().map_or(0, |r| r.1);
    if pos == 0 {
        return None;
    }
    let (mut ap, mut prev_recall) = (0f64, 0f64);
    for (_, tp, fp) in ranked {
        let recall = tp as f64 / pos as f64;
        ap += (recall - prev_recall) * tp as f64 / (tp + fp) as f64;
        prev_recall = recall;
    }
    Some(ap)
}

/// The threshold with the best F1 when samples scoring at least it are called positive,
/// and that F1, over (score, is positive) pairs; `None` without a positive. Each distinct
/// score is a candidate (scikit-learn's `precision_recall_curve` thresholds); of equal F1s
/// the highest threshold wins, so the choice does not depend on the order of the pairs.
pub fn best_f1_threshold(scores: &[(f64, bool)]) -> Option<(f64, f64)> {
    let ranked = ranked_counts(scores);
    let pos = ranked.last().map_or(0, |r| r.1);
    if pos == 0 {
        return None;
    }
    let mut best: Option<(f64, f64)> = None;
    for (score, tp, fp) in ranked {
        // F1 = 2TP / (2TP + FP + FN), with FN = pos - TP.
        let f1 = 2.0 * tp as f64 / (2 * tp + fp + (pos - tp)) as f64;
        if best.is_none_or(|(_, b)| f1 > b) {
            best = Some((score, f1));
        }
    }
    best
}

/// For each distinct score, from the highest: the score, and the true and false positives
/// of calling positive every sample that scores at least it. What the curves, average
/// precision and the F1 threshold all walk.
fn ranked_counts(scores: &[(f64, bool)]) -> Vec<(f64, usize, usize)> {
    let mut s = scores.to_vec();
    s.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut out: Vec<(f64, usize, usize)> = Vec::new();
    let (mut tp, mut fp) = (0, 0);
    for (i, &(score, positive)) in s.iter().enumerate() {
        if positive {
            tp += 1
        } else {
            fp += 1
        }
        // A tie is one threshold: count it once all its samples are in.
        if s.get(i + 1).is_none_or(|next| next.0 != score) {
            out.push((score, tp, fp));
        }
    }
    out
}

/// (true positives, false positives, false negatives) of (called, is) pairs.
pub fn tally(pairs: impl IntoIterator<Item = (bool, bool)>) -> (usize, usize, usize) {
    pairs.into_iter().fold((0, 0, 0), |(tp, fp, fn_), pair| match pair {
        (true, true) => (tp + 1, fp, fn_),
        (true, false) => (tp, fp + 1, fn_),
        (false, true) => (tp, fp, fn_ + 1),
        (false, false) => (tp, fp, fn_),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(k: usize) -> Vec<String> {
        (0..k).map(|i| format!("c{i}")).collect()
    }

    /// Hand-computed: true [0,0,1,1,2], predicted [0,1,1,1,0].
    #[test]
    fn per_class_and_averages_match_hand_computation() {
        let one = |c: usize| {
            let mut p = vec![0.1f32; 3];
            p[c] = 0.8;
            p
        };
        let probs = vec![one(0), one(1), one(1), one(1), one(0)];
        let r = report(&probs, &[0, 0, 1, 1, 2], &names(3), None);
        assert_eq!(r.confusion_matrix, vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 0]]);
        assert!((r.accuracy - 0.6).abs() < 1e-12);
        let c0 = &r.per_class["c0"];
        assert_eq!((c0.precision, c0.recall, c0.support), (0.5, 0.5, 2));
        let c1 = &r.per_class["c1"];
        assert!((c1.precision - 2.0 / 3.0).abs() < 1e-12 && c1.recall == 1.0);
        assert!((c1.f1 - 0.8).abs() < 1e-12);
        assert_eq!(r.per_class["c2"].f1, 0.0);
        assert!((r.balanced_accuracy - 0.5).abs() < 1e-12);
        assert!((r.macro_avg.f1 - (0.5 + 0.8) / 3.0).abs() < 1e-12);
        assert!((r.weighted_avg.f1 - (2.0 * 0.5 + 2.0 * 0.8) / 5.0).abs() < 1e-12);
        assert!((r.log_loss - (-(0.8f64.ln()) * 3.0 - (0.1f64.ln()) * 2.0) / 5.0).abs() < 1e-6);
        // Every true class is first or tied for second: ties do not rank above it.
        assert_eq!(r.top_k_accuracy["top_2"], 1.0);
    }

    #[test]
    fn binary_auc_and_average_precision() {
        // scikit-learn: roc_auc_score([0,0,1,1],[0.1,0.4,0.35,0.8]) = 0.75, average_precision = 0.8333…
        let probs: Vec<Vec<f32>> = [0.1f32, 0.4, 0.35, 0.8].iter().map(|p| vec![1.0 - p, *p]).collect();
        let r = report(&probs, &[0, 0, 1, 1], &names(2), None);
        assert!((r.roc_auc.unwrap() - 0.75).abs() < 1e-9);
        assert!((r.pr_auc.unwrap() - 5.0 / 6.0).abs() < 1e-6);
        assert!(r.binary.is_none());
    }

    #[test]
    fn a_binary_decision_sets_the_predictions_and_the_curves() {
        // Scores of c1: [0.1, 0.4, 0.35, 0.8], truth [0, 0, 1, 1]; called c1 from 0.35 on
        // (the f32 score itself: thresholds are chosen among the scores).
        let probs: Vec<Vec<f32>> = [0.1f32, 0.4, 0.35, 0.8].iter().map(|p| vec![1.0 - p, *p]).collect();
        let threshold = f64::from(0.35f32);
        let r = report(&probs, &[0, 0, 1, 1], &names(2), Some(Decision { positive: 1, threshold }));
        assert_eq!(r.confusion_matrix, vec![vec![1, 1], vec![0, 2]]);
        let b = r.binary.as_ref().unwrap();
        assert!((b.precision - 2.0 / 3.0).abs() < 1e-12 && b.recall == 1.0 && (b.f1 - 0.8).abs() < 1e-12);
        // scikit-learn: roc_curve(...) = fpr [0, 0, .5, .5, 1], tpr [0, .5, .5, 1, 1]; all corners.
        assert_eq!(b.roc_curve, vec![[0.0, 0.0], [0.0, 0.5], [0.5, 0.5], [0.5, 1.0], [1.0, 1.0]]);
        assert_eq!(b.pr_curve, vec![[0.5, 1.0], [0.5, 0.5], [1.0, 2.0 / 3.0], [1.0, 0.5]]);
        // The positive class may be the first: its scores are the first column.
        let flipped: Vec<Vec<f32>> = probs.iter().map(|p| vec![p[1], p[0]]).collect();
        let f = report(&flipped, &[1, 1, 0, 0], &names(2), Some(Decision { positive: 0, threshold }));
        assert_eq!(f.roc_auc, r.roc_auc);
        assert_eq!(f.binary.as_ref().unwrap().f1, b.f1);
        // Straight runs lose their inner points, the first point after (0, 0) stays
        // (scikit-learn: roc_curve([1,1,1,0], [.9,.8,.7,.1]) → fpr [0,0,0,1], tpr [0,1/3,1,1]).
        let (roc, _) = curves(&[(0.9, true), (0.8, true), (0.7, true), (0.1, false)]);
        assert_eq!(roc, vec![[0.0, 0.0], [0.0, 1.0 / 3.0], [0.0, 1.0], [1.0, 1.0]]);
    }

    #[test]
    fn the_threshold_is_the_score_with_the_best_f1() {
        // Called positive from 0.35 on: TP 2, FP 1, FN 0 → F1 0.8; from 0.8: F1 2/3;
        // from 0.4: TP 1, FP 1 → 0.5; from 0.1: 2/3.
        let s = [(0.1, false), (0.4, false), (0.35, true), (0.8, true)];
        let (t, f1) = best_f1_threshold(&s).unwrap();
        assert_eq!(t, 0.35);
        assert!((f1 - 0.8).abs() < 1e-12);
        // Ties keep the highest threshold, whatever the order.
        // From 0.9: F1 2/3; from 0.4: TP 2, FP 2 → 2/3 as well.
        let tied = [(0.9, true), (0.6, false), (0.5, false), (0.4, true)];
        let mut rev = tied;
        rev.reverse();
        assert_eq!(best_f1_threshold(&tied).unwrap().0, 0.9);
        assert_eq!(best_f1_threshold(&tied), best_f1_threshold(&rev));
        assert_eq!(best_f1_threshold(&[(0.3, false)]), None);
    }
}
