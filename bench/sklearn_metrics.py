#!/usr/bin/env python3
"""Check kiln's eval metrics against scikit-learn on the same predictions.

    python3 bench/sklearn_metrics.py outputs/digits/eval [outputs/fashion_mnist/eval ...]

Each argument is an eval stage's output directory (metrics.json + predictions.csv). The
script recomputes, from predictions.csv alone, what scikit-learn's classification_report,
confusion_matrix, accuracy_score, balanced_accuracy_score, log_loss, top_k_accuracy_score
(and roc_auc_score / average_precision_score for two classes) give, and for a binary model
precision_recall_fscore_support at its threshold, roc_curve and precision_recall_curve; for a
multi-label model classification_report on the indicator matrices (per class, micro, macro,
weighted and samples averages), accuracy_score (subset accuracy), hamming_loss and
average_precision_score / roc_auc_score per class; and compares each number with kiln's
metrics.json. It prints the largest difference per directory and exits 1 if any
difference exceeds the tolerance (default 1e-6; --tol).
"""
import argparse
import csv
import json
import sys
import warnings
from pathlib import Path

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    hamming_loss,
    log_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
    top_k_accuracy_score,
)


def compare_multi_label(directory: Path, kiln: dict, tol: float) -> list:
    """A multi-label model: indicator matrices from predictions.csv's `labels` and
    `predicted` (joined by `|`), and the probability of every class."""
    classes = kiln["classes"]
    with open(directory / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    def indicator(field):
        return np.array([[int(c in r[field].split("|")) for c in classes] for r in rows])
    y_true, y_pred = indicator("labels"), indicator("predicted")
    probs = np.array([[np.float32(r[f"p_{c}"]) for c in classes] for r in rows], dtype=np.float32).astype(np.float64)
    thresholds = np.array([kiln["per_class"][c]["threshold"] for c in classes])
    checks = [("predicted", y_pred, (probs >= thresholds).astype(int))]
    report = classification_report(y_true, y_pred, target_names=classes, output_dict=True, zero_division=0)
    for c in classes:
        for field in ("precision", "recall", "f1"):
            checks.append((f"{c}.{field}", kiln["per_class"][c][field], report[c][field + ("-score" if field == "f1" else "")]))
        checks.append((f"{c}.support", kiln["per_class"][c]["support"], report[c]["support"]))
    for avg, key in (("micro avg", "micro_avg"), ("macro avg", "macro_avg"), ("weighted avg", "weighted_avg"), ("samples avg", "samples_avg")):
        for field in ("precision", "recall", "f1"):
            checks.append((f"{key}.{field}", kiln[key][field], report[avg][field + ("-score" if field == "f1" else "")]))
    checks.append(("subset_accuracy", kiln["subset_accuracy"], accuracy_score(y_true, y_pred)))
    checks.append(("hamming_loss", kiln["hamming_loss"], hamming_loss(y_true, y_pred)))
    aps, aucs = [], []
    for i, c in enumerate(classes):
        if 0 < y_true[:, i].sum():
            ap = average_precision_score(y_true[:, i], probs[:, i])
            aps.append(ap)
            checks.append((f"{c}.average_precision", kiln["per_class"][c]["average_precision"], ap))
        if 0 < y_true[:, i].sum() < len(rows):
            auc = roc_auc_score(y_true[:, i], probs[:, i])
            aucs.append(auc)
            checks.append((f"{c}.roc_auc", kiln["per_class"][c]["roc_auc"], auc))
    checks.append(("mean_average_precision", kiln["mean_average_precision"], np.mean(aps)))
    checks.append(("macro_roc_auc", kiln["macro_roc_auc"], np.mean(aucs)))
    return rows, checks


def compare(directory: Path, tol: float) -> bool:
    kiln = json.loads((directory / "metrics.json").read_text())
    if kiln.get("task") == "multi_label":
        rows, checks = compare_multi_label(directory, kiln, tol)
        return report_checks(directory, rows, checks, tol)
    classes = kiln["classes"]
    index = {c: i for i, c in enumerate(classes)}
    with open(directory / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    y_true = np.array([index[r["label"]] for r in rows])
    y_pred = np.array([index[r["predicted"]] for r in rows])
    # Read as kiln wrote them (f32), then widened: a threshold is an f32 score widened the
    # same way, so a score equal to it compares equal here too.
    probs = np.array([[np.float32(r[f"p_{c}"]) for c in classes] for r in rows], dtype=np.float32).astype(np.float64)
    labels = list(range(len(classes)))

    checks = []  # (name, kiln, sklearn)
    report = classification_report(y_true, y_pred, labels=labels, target_names=classes, output_dict=True, zero_division=0)
    for c in classes:
        for field in ("precision", "recall", "f1"):
            checks.append((f"{c}.{field}", kiln["per_class"][c][field], report[c][field + ("-score" if field == "f1" else "")]))
        checks.append((f"{c}.support", kiln["per_class"][c]["support"], report[c]["support"]))
    for avg, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        for field in ("precision", "recall", "f1"):
            checks.append((f"{key}.{field}", kiln[key][field], report[avg][field + ("-score" if field == "f1" else "")]))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    checks.append(("confusion_matrix", np.array(kiln["confusion_matrix"]), cm))
    checks.append(("accuracy", kiln["accuracy"], accuracy_score(y_true, y_pred)))
    checks.append(("balanced_accuracy", kiln["balanced_accuracy"], balanced_accuracy_score(y_true, y_pred)))
    # kiln clips probabilities to [1e-15, 1] like scikit-learn did before 1.5; rows sum to 1
    # within f32 rounding, so renormalising them (as sklearn does) moves nothing beyond 1e-7.
    checks.append(("log_loss", kiln["log_loss"], log_loss(y_true, np.clip(probs, 1e-15, 1.0), labels=labels)))
    for name, value in kiln["top_k_accuracy"].items():
        k = int(name.split("_")[-1])
        checks.append((f"top_k_accuracy.{name}", value, top_k_accuracy_score(y_true, probs, k=k, labels=labels)))
    binary = kiln.get("binary")
    if len(classes) == 2:
        # A binary model's ROC-AUC and PR-AUC are its positive class's, else the second's.
        pos = index[binary["positive"]] if binary else 1
        score, is_pos = probs[:, pos], (y_true == pos).astype(int)
        checks.append(("roc_auc", kiln["roc_auc"], roc_auc_score(is_pos, score)))
        checks.append(("pr_auc", kiln["pr_auc"], average_precision_score(is_pos, score)))
    if binary:
        # The model's decisions: positive from its threshold on, as predictions.csv says.
        called = (score >= binary["threshold"]).astype(int)
        checks.append(("binary.predicted", (y_pred == pos).astype(int), called))
        p, r, f, _ = precision_recall_fscore_support(is_pos, called, average="binary", pos_label=1, zero_division=0)
        checks += [("binary.precision", binary["precision"], p), ("binary.recall", binary["recall"], r), ("binary.f1", binary["f1"], f)]
        checks.append(("binary.roc_auc", binary["roc_auc"], roc_auc_score(is_pos, score)))
        checks.append(("binary.pr_auc", binary["pr_auc"], average_precision_score(is_pos, score)))
        fpr, tpr, _ = roc_curve(is_pos, score, drop_intermediate=True)
        checks.append(("binary.roc_curve", np.array(binary["roc_curve"]), np.stack([fpr, tpr], axis=1)))
        # scikit-learn lists the PR curve from the lowest threshold and ends at (0, 1); kiln's
        # runs from the highest score down.
        prec, rec, _ = precision_recall_curve(is_pos, score)
        checks.append(("binary.pr_curve", np.array(binary["pr_curve"]), np.stack([rec[:-1], prec[:-1]], axis=1)[::-1]))

    return report_checks(directory, rows, checks, tol)


def report_checks(directory: Path, rows: list, checks: list, tol: float) -> bool:
    worst = 0.0
    ok = True
    for name, ours, theirs in checks:
        diff = float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - np.asarray(theirs, dtype=np.float64))))
        worst = max(worst, diff)
        if diff > tol:
            ok = False
            print(f"  MISMATCH {name}: kiln {ours} sklearn {theirs} (|diff| {diff:.3g})")
    status = "ok" if ok else "FAILED"
    print(f"{directory}: {len(rows)} predictions, {len(checks)} numbers compared, max |kiln - sklearn| = {worst:.3g}: {status}")
    return ok


def main() -> int:
    # kiln's rows are f32 softmax outputs: they sum to one within 1e-7, which sklearn flags.
    warnings.filterwarnings("ignore", message="The y_prob values do not sum to one")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--tol", type=float, default=1e-6)
    args = parser.parse_args()
    results = [compare(d, args.tol) for d in args.dirs]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
