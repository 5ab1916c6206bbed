#!/usr/bin/env python3
"""Write tests/fixtures/cleanlab/label_issues.json: what cleanlab finds, for the Rust tests of
src/stages/label_issues/confident.rs to match.

    python3 bench/cleanlab_fixture.py            # needs numpy and cleanlab (pip install cleanlab)

Each case simulates a classifier's out-of-fold probabilities over items whose labels were
partly corrupted, then records what cleanlab's default
`cleanlab.filter.find_label_issues(labels, pred_probs, return_indices_ranked_by="self_confidence")`
flags, with the estimates on the way (per-class thresholds, calibrated confident joint, how
many items of each cell prune-by-noise-rate removes).

Both sides must see the same numbers. Probabilities are stored with 6 decimals, each row
summing to exactly 1 in decimal; the Rust test reads them as f32, so cleanlab is run on the
values reloaded from the written file, cast to float32 and back to float64.

numpy's argsort is not stable, and which of several tied items it puts first depends on its
SIMD code path (it differs between CPUs). cleanlab sorts in three places (rounding the joint,
picking items by margin, ranking), so a case whose answer hinges on an exact tie has no single
right answer. Every case is therefore checked to be tie-free: cleanlab must give the same
answer on permuted rows and permuted classes, and no two flagged items may share a
self-confidence. A case that fails is drawn again from the next seed.
"""
import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np

import cleanlab
from cleanlab.count import compute_confident_joint, get_confident_thresholds
from cleanlab.filter import _keep_at_least_n_per_class, find_label_issues

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "cleanlab" / "label_issues.json"
MICRO = 1_000_000


def softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def model_probs(rng, truth, classes, *, strength=(0.5, 5.0), confusions=()):
    """A plausible classifier: sure of most items, unsure or wrong on some, and drawn towards
    the partner class of each (a, b, weight) in `confusions` for items truly of class a."""
    n = len(truth)
    logits = rng.normal(0.0, 1.0, (n, classes))
    logits[np.arange(n), truth] += rng.uniform(*strength, n)
    for a, b, weight in confusions:
        rows = truth == a
        logits[rows, b] += rng.uniform(0.0, weight, rows.sum())
    return softmax(logits)


def flip(rng, truth, classes, rate):
    labels = truth.copy()
    chosen = rng.random(len(truth)) < rate
    labels[chosen] = (truth[chosen] + rng.integers(1, classes, chosen.sum())) % classes
    return labels


def case_noisy(rng):
    """300 items, 4 classes, about 8 % of labels flipped uniformly."""
    truth = rng.integers(0, 4, 300)
    return 4, flip(rng, truth, 4, 0.08), model_probs(rng, truth, 4)


def case_asymmetric(rng):
    """1000 items, 10 classes; some pairs are confused by the annotators and the model."""
    classes = 10
    truth = rng.integers(0, classes, 1000)
    labels = flip(rng, truth, classes, 0.02)
    for a, b, rate in [(1, 7, 0.30), (3, 5, 0.20), (5, 3, 0.20), (8, 0, 0.15)]:
        chosen = (truth == a) & (rng.random(len(truth)) < rate)
        labels[chosen] = b
    probs = model_probs(rng, truth, classes, confusions=[(1, 7, 2.0), (3, 5, 1.5), (5, 3, 1.5), (8, 0, 1.0)])
    return classes, labels, probs


def case_imbalanced(rng):
    """6 classes: 110, 60, 20 and 6 items of classes 0-3 (10 % of their labels flipped among
    them), one item given class 4 that the model takes for class 0, and no item given class 5,
    which the model sometimes predicts. Class 4 keeps its item (min_examples_per_class), and its
    threshold, the mean of one small probability, is low enough to draw many class-0 items into
    the joint's class-4 column."""
    truth = np.repeat(np.arange(5), [110, 60, 20, 6, 1])
    labels = flip(rng, truth, 4, 0.10)
    labels[truth == 4] = 4
    truth = truth.copy()
    truth[truth == 4] = 0
    probs = model_probs(rng, truth, 6, confusions=[(2, 5, 2.5)])
    order = rng.permutation(len(labels))
    return 6, labels[order], probs[order]


def case_small(rng):
    """16 items, 3 classes, two labels flipped. cleanlab catches one: the other (item 2) has
    class 0 at 0.78, under class 0's threshold of 0.87, so it counts as confident of nothing."""
    truth = np.repeat(np.arange(3), [6, 5, 5])
    labels = truth.copy()
    labels[[2, 9]] = [1, 2]
    return 3, labels, model_probs(rng, truth, 3, strength=(2.0, 5.0))


CASES = [("noisy_4", 10, case_noisy), ("asymmetric_10", 20, case_asymmetric), ("imbalanced", 30, case_imbalanced), ("small", 40, case_small)]


def quantize(probs):
    """Rows of 6-decimal values summing to exactly 1 (the rounding residue goes to the largest)."""
    micro = np.round(probs * MICRO).astype(np.int64)
    top = micro.argmax(axis=1)
    micro[np.arange(len(micro)), top] += MICRO - micro.sum(axis=1)
    assert (micro >= 0).all()
    return [[int(m) / MICRO for m in row] for row in micro]


def as_read(rows):
    """The probabilities as the Rust side holds them: f32, widened to f64."""
    return np.asarray(rows, dtype=np.float64).astype(np.float32).astype(np.float64)


def cleanlab_answer(labels, probs):
    ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    mask = find_label_issues(labels, probs, n_jobs=1)
    assert sorted(ranked.tolist()) == np.flatnonzero(mask).tolist(), "ranked and mask disagree"
    joint = compute_confident_joint(labels, probs)
    # cleanlab's prune count matrix is [true][given]; store it [given][true], diagonal 0.
    pruned = _keep_at_least_n_per_class(joint.T, 1).T.copy()
    np.fill_diagonal(pruned, 0)
    return {
        "issues": ranked.tolist(),
        "thresholds": get_confident_thresholds(labels, probs).tolist(),
        "confident_joint": joint.tolist(),
        "pruned": pruned.tolist(),
    }


def tie_free(labels, probs, answer, rng):
    confidence = probs[np.arange(len(labels)), labels]
    if len(set(confidence[answer["issues"]].tolist())) < len(answer["issues"]):
        return False
    classes = probs.shape[1]
    for _ in range(6):
        rows, cls = rng.permutation(len(labels)), rng.permutation(classes)
        moved = np.empty_like(probs)
        moved[:, cls] = probs[rows]
        other = cleanlab_answer(cls[labels[rows]], moved)
        if sorted(rows[other["issues"]].tolist()) != sorted(answer["issues"]):
            return False
        if np.asarray(other["confident_joint"])[np.ix_(cls, cls)].tolist() != answer["confident_joint"]:
            return False
    return True


def make(name, seed, build):
    for attempt in range(seed, seed + 50):
        rng = np.random.default_rng(attempt)
        classes, labels, probs = build(rng)
        labels = np.asarray(labels, dtype=np.int64)
        rows = quantize(probs)
        answer = cleanlab_answer(labels, as_read(rows))
        if tie_free(labels, as_read(rows), answer, np.random.default_rng(attempt + 1000)):
            return {"name": name, "seed": attempt, "classes": classes, "labels": labels.tolist(), "probs": rows, **answer}
        print(f"{name}: seed {attempt} hinges on a tie, drawing again", file=sys.stderr)
    raise SystemExit(f"{name}: no tie-free draw")


def dump(fixture):
    text = json.dumps(fixture, indent=1)
    # One line per innermost list (a row of probabilities, the labels) keeps the file readable.
    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + ",".join(v.strip() for v in m.group(1).split(",")) + "]", text)


def main():
    warnings.filterwarnings("ignore")  # cleanlab warns about classes with few examples
    fixture = {
        "about": "made by bench/cleanlab_fixture.py; issues = cleanlab.filter.find_label_issues(labels, probs, "
        "return_indices_ranked_by='self_confidence') on probs read as float32",
        "cleanlab_version": cleanlab.__version__,
        "numpy_version": np.__version__,
        "cases": [make(name, seed, build) for name, seed, build in CASES],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(dump(fixture) + "\n")
    # Recompute from the file as written: the stored text is what both sides read.
    for case in json.loads(OUT.read_text())["cases"]:
        answer = cleanlab_answer(np.asarray(case["labels"]), as_read(case["probs"]))
        assert all(case[key] == value for key, value in answer.items()), case["name"]
        print(f"{case['name']}: {len(case['labels'])} items, {case['classes']} classes, seed {case['seed']}, "
              f"{len(case['issues'])} flagged")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
