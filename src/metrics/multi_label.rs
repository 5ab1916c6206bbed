//! Multi-label metrics (several classes per sample), with scikit-learn's definitions:
//! `classification_report` on indicator matrices (per class, micro, macro, weighted and
//! samples averages), `accuracy_score` (subset accuracy), `hamming_loss`,
//! `average_precision_score` and `roc_auc_score` per class.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Averages, average_precision, ratio, roc_auc, tally};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LabelMetrics {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Samples that have the class.
    pub support: usize,
    pub threshold: f64,
    /// Average precision and ROC-AUC of the class's scores; absent where the samples do not
    /// have both sides of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub average_precision: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roc_auc: Option<f64>,
}

/// Everything a multi-label model's `metrics.json` holds. Field order is the file's key order.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub task: &'static str,
    pub samples: usize,
    /// Samples whose every class was called right.
    pub subset_accuracy: f64,
    /// The share of (sample, class) pairs called wrong.
    pub hamming_loss: f64,
    pub micro_avg: Averages,
    pub macro_avg: Averages,
    pub weighted_avg: Averages,
    /// Per sample, then averaged over samples (a sample with no class true and none called
    /// counts 0, as scikit-learn's `zero_division = 0`).
    pub samples_avg: Averages,
    /// Mean average precision over the classes that some sample has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_average_precision: Option<f64>,
    /// Mean ROC-AUC over the classes the samples have both sides of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub macro_roc_auc: Option<f64>,
    pub per_class: BTreeMap<String, LabelMetrics>,
    pub classes: Vec<String>,
}

fn prf(tp: usize, fp: usize, fn_: usize) -> (f64, f64, f64) {
    let p = ratio(tp as f64, (tp + fp) as f64);
    let r = ratio(tp as f64, (tp + fn_) as f64);
    (p, r, ratio(2.0 * p * r, p + r))
}

/// `probs` and `truth` are row-major `[samples, classes]` (truth 0 or 1); a class is called
/// present from its threshold on.
pub fn report(probs: &[f32], truth: &[f32], classes: &[String], thresholds: &[f64]) -> Report {
    let k = classes.len();
    let n = truth.len().checked_div(k).unwrap_or(0);
    let called = |r: usize, c: usize| f64::from(probs[r * k + c]) >= thresholds[c];
    let has = |r: usize, c: usize| truth[r * k + c] > 0.5;
    let mut per_class = BTreeMap::new();
    let (mut all_tp, mut all_fp, mut all_fn) = (0, 0, 0);
    let (mut macro_sum, mut weighted_sum, mut total_support) = ([0.0; 3], [0.0; 3], 0usize);
    let (mut aps, mut aucs) = (Vec::new(), Vec::new());
    for (c, name) in classes.iter().enumerate() {
        let (tp, fp, fn_) = tally((0..n).map(|r| (called(r, c), has(r, c))));
        let (p, rc, f) = prf(tp, fp, fn_);
        let support = tp + fn_;
        for (acc, v) in macro_sum.iter_mut().zip([p, rc, f]) {
            *acc += v;
        }
        for (acc, v) in weighted_sum.iter_mut().zip([p, rc, f]) {
            *acc += v * support as f64;
        }
        total_support += support;
        all_tp += tp;
        all_fp += fp;
        all_fn += fn_;
        let scores: Vec<(f64, bool)> = (0..n).map(|r| (f64::from(probs[r * k + c]), has(r, c))).collect();
        let ap = average_precision(&scores);
        let auc = roc_auc(&scores);
        aps.extend(ap);
        aucs.extend(auc);
        per_class.insert(
            name.clone(),
            LabelMetrics { precision: p, recall: rc, f1: f, support, threshold: thresholds[c], average_precision: ap, roc_auc: auc },
        );
    }
    let avg = |sum: [f64; 3], by: f64| Averages { precision: ratio(sum[0], by), recall: ratio(sum[1], by), f1: ratio(sum[2], by) };
    let (mp, mr, mf) = prf(all_tp, all_fp, all_fn);
    let mut samples_sum = [0.0; 3];
    let (mut exact, mut wrong) = (0usize, 0usize);
    for r in 0..n {
        let (tp, fp, fn_) = tally((0..k).map(|c| (called(r, c), has(r, c))));
        let (p, rc, f) = prf(tp, fp, fn_);
        for (acc, v) in samples_sum.iter_mut().zip([p, rc, f]) {
            *acc += v;
        }
        exact += usize::from(fp + fn_ == 0);
        wrong += fp + fn_;
    }
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    Report {
        task: "multi_label",
        samples: n,
        subset_accuracy: ratio(exact as f64, n as f64),
        hamming_loss: ratio(wrong as f64, (n * k) as f64),
        micro_avg: Averages { precision: mp, recall: mr, f1: mf },
        macro_avg: avg(macro_sum, k as f64),
        weighted_avg: avg(weighted_sum, total_support as f64),
        samples_avg: avg(samples_sum, n as f64),
        mean_average_precision: mean(&aps),
        macro_roc_auc: mean(&aucs),
        per_class,
        classes: classes.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-computed on 3 samples × 3 classes, all thresholds 0.5:
    /// truth [[1,0,1],[0,1,0],[1,1,0]], called [[1,0,0],[0,1,1],[1,1,0]].
    #[test]
    fn figures_match_hand_computation() {
        let classes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let truth = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0];
        let probs = [0.9f32, 0.2, 0.4, 0.1, 0.8, 0.6, 0.7, 0.55, 0.3];
        let r = report(&probs, &truth, &classes, &[0.5; 3]);
        assert_eq!(r.samples, 3);
        assert!((r.subset_accuracy - 1.0 / 3.0).abs() < 1e-12);
        // Two of nine pairs wrong: (0, c) missed, (1, c) called.
        assert!((r.hamming_loss - 2.0 / 9.0).abs() < 1e-12);
        // Micro: TP 4, FP 1, FN 1.
        assert!((r.micro_avg.precision - 0.8).abs() < 1e-12 && (r.micro_avg.f1 - 0.8).abs() < 1e-12);
        // a and b perfect, c 0: macro F1 2/3; weighted by support (2, 2, 1): 4/5.
        assert!((r.macro_avg.f1 - 2.0 / 3.0).abs() < 1e-12);
        assert!((r.weighted_avg.f1 - 0.8).abs() < 1e-12);
        // Samples: F1 2/3, 2/3 (P ½, R 1), 1.
        assert!((r.samples_avg.f1 - (2.0 / 3.0 + 2.0 / 3.0 + 1.0) / 3.0).abs() < 1e-12);
        assert_eq!(r.per_class["c"].support, 1);
        // c: scores [0.4 (true), 0.6, 0.3]: AP ½, ROC-AUC ½.
        assert_eq!(r.per_class["c"].average_precision, Some(0.5));
        assert_eq!(r.per_class["c"].roc_auc, Some(0.5));
        assert_eq!(r.per_class["a"].average_precision, Some(1.0));
        assert!((r.mean_average_precision.unwrap() - (1.0 + 1.0 + 0.5) / 3.0).abs() < 1e-12);
        // A sample with no class true and none called scores 0 in the samples average
        // (zero_division = 0); a class nobody has is left out of mAP and macro ROC-AUC.
        let empty = report(&[0.1f32, 0.9, 0.2, 0.1], &[0.0, 1.0, 0.0, 0.0], &classes[..2], &[0.5, 0.5]);
        assert_eq!(empty.samples_avg.f1, 0.5);
        assert_eq!(empty.subset_accuracy, 1.0);
        assert_eq!(empty.per_class["a"].average_precision, None);
        assert_eq!(empty.mean_average_precision, Some(1.0));
        assert_eq!(empty.per_class["a"].f1, 0.0);
        // Thresholds move the calls: c from 0.35 on is right for sample 0.
        let moved = report(&probs, &truth, &classes, &[0.5, 0.5, 0.35]);
        assert_eq!(moved.per_class["c"].recall, 1.0);
    }
}
