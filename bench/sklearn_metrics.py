#!/usr/bin/env python3
"""Check kiln's eval metrics against scikit-learn on the same predictions.

    python3 bench/sklearn_metrics.py outputs/digits/eval [outputs/fashion_mnist/eval ...]

Each argument is an eval stage's output directory (metrics.json + predictions.csv). The
script recomputes, from predictions.csv alone, what scikit-learn's classification_report,
confusion_matrix, accuracy_score, balanced_accuracy_score, log_loss, top_k_accuracy_score
(and roc_auc_score / average_precision_score for two classes) give, and for a binary model
precision_recall_fscore_support at its threshold, roc_curve and precision_recall_curve; and
compares each number with kiln's metrics.json. It prints the largest difference per directory and exits 1 if any
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
    log_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
    top_k_accuracy_score,
)


def compare(directory: Path, tol: float) -> bool:
    kiln = json.loads((directory / "metrics.json").read_text())
    classes = kiln["classes"]
    index = {c: i for i, c in enumerate(classes)}
    with open(directory / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    y_true = np.array([index[r["label"]] for r in rows])
    y_pred = np.array([index[r["predicted"]] for r in rows])
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows], dtype=np.float64)
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
