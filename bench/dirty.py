#!/usr/bin/env python3
"""Planted-fault benchmark (issue 16): does kiln's clean + label find the faults we plant,
and how many clean images does it take with them?

Run from the repository root after `cargo build --release`:
    apt-get install dataset-fashion-mnist            # for the fashion set
    python3 bench/dirty.py [--sets fashion,digits,photos] [--per-class N] [--faults-per-kind M]
                           [--seed S] [--kiln PATH] [--work DIR] [--keep] [--flips]

Each set is written as an ImageFolder `data/<class>/<name>.png` of clean images (PNG,
lossless): Fashion-MNIST (100 per class from the test split by default), the 1797
scikit-learn digits (8x8, as users have them), and the five shared photos cut into
non-overlapping tiles (`--tile` px, class = source photo; nearly flat tiles are left out).
Then M faults of each kind are planted at distinct, seeded clean images (never two on one
image), as extra files in the same tree with random names like the clean ones, so that
nothing in a name or in the id order gives them away. `truth.json` records each one.
kiln runs collect -> clean (default settings) -> label, and the script prints recall per
fault kind, precision per check, and the clean images lost, overall and per class.

Scoring rules:
  - a duplicate kind is caught when the copy is removed; kept the copy = the copy stayed
    and the original went in the same duplicate group (a miss, though the pair was found).
    For exact copies either side may stay: same bytes.
  - wrong_extension (a JPEG named .png, the original replaced in place) is caught when
    reported: its default policy is `keep`.
  - alias: clean images in a folder named like an alias of their class (`aliases` in the
    manifest); caught when label gives them their class.
  - conflict: an exact copy put in another class's folder; caught when label reports the
    conflict and the copy is not labelled with the wrong class.
  - lost: clean images (originals of planted copies included) that clean removed, except
    an original whose byte-identical planted copy stayed in its place.
  - precision of a check: the share of the items it flagged that are planted faults, or the
    original of a planted copy grouped with that copy.
--flips: flip 5 % and 10 % of the labels (fashion, digits; the shipped pipelines' clean and
preprocess settings), run collect -> clean -> label -> preprocess -> convert -> label_issues
and compare its suspects with the flips and with cleanlab (LABEL_ISSUES_STAGE below).
"""
import argparse
import collections
import csv
import gzip
import io
import json
import os
import random
import shlex
import shutil
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "datasets")
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

DUPLICATE_KINDS = ["exact", "resized", "reencoded", "cropped", "brightness"]
FILE_KINDS = ["truncated", "empty", "not_image", "bomb", "wrong_extension"]
LABEL_KINDS = ["alias", "conflict"]
KINDS = DUPLICATE_KINDS + FILE_KINDS + LABEL_KINDS
TARGETED = set(DUPLICATE_KINDS + FILE_KINDS)  # recall >= 0.95 (issue 16)
TARGET_RECALL, TARGET_LOST, TARGET_LOST_CLASS = 0.95, 0.005, 0.01
POLICY_ORDER = {"off": 0, "keep": 1, "quarantine": 2, "drop": 3}

# --flips: preprocess and the label_issues stage per set (from pipelines/*.toml): kind
# "label_issues", `folds`, a nested `train` table like a train stage's, and an artifact with
# label_issues_report.json + out_of_fold.csv (id, given, p_<class>...).
FLIP_STAGES = {
    "digits": {
        "clean": 'too_small = { policy = "quarantine", min_side = 8 }\nnear_duplicates = { policy = "keep" }',
        "preprocess": 'color = "grayscale"\nsize = [8, 8]\nresize = "exact"\nnormalize = { mean = [0.5], std = [0.5] }',
        "model": 'model = "cnn"\ncnn = { widths = [32, 64], hidden = 128, dropout = 0.25 }\n'
                 'epochs = 15\nbatch_size = 32\nlr = 0.002\nschedule = "cosine"\ndevice = "cpu"',
    },
    "fashion": {
        "clean": 'near_duplicates = { policy = "keep", max_distance = 6, max_colour_difference = 6.0 }\ntoo_dark = { policy = "off" }',
        "preprocess": 'color = "grayscale"\nsize = [28, 28]\nresize = "exact"\nnormalize = { mean = [0.286], std = [0.353] }',
        "model": 'model = "cnn"\ncnn = { widths = [32, 64], hidden = 128, dropout = 0.1 }\n'
                 'epochs = 8\nbatch_size = 64\nlr = 0.002\nschedule = "cosine"\ndevice = "cpu"',
    },
}
FLIP_FOLDS, FLIP_RATES = 5, (0.05, 0.10)
LABEL_ISSUES_STAGE = """
[stages.preprocess]
kind = "preprocess"
inputs = ["label"]
{preprocess}

[stages.convert]
kind = "convert"
inputs = ["preprocess"]

[stages.label_issues]
kind = "label_issues"
inputs = ["convert"]
folds = {folds}
[stages.label_issues.train]
{model}
"""


# ---------------------------------------------------------------- the clean sets

def load_fashion(rng, per_class, _tile):
    """(class, image) pairs: a seeded sample of `per_class` per class from the test split."""
    def idx(name):
        path = os.path.join(FASHION_DIR, name)
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: apt-get install dataset-fashion-mnist")
        with gzip.open(path, "rb") as f:
            return f.read()
    images = np.frombuffer(idx("t10k-images-idx3-ubyte.gz"), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(idx("t10k-labels-idx1-ubyte.gz"), np.uint8, offset=8)
    out = []
    for c, name in enumerate(FASHION_CLASSES):
        members = sorted(np.nonzero(labels == c)[0].tolist())
        for i in sorted(rng.sample(members, min(per_class or 100, len(members)))):
            out.append((name, Image.fromarray(images[i], "L")))
    return FASHION_CLASSES, out


def load_digits(rng, per_class, _tile):
    """All 1797 digits (or `per_class` of each), 8x8 gray, 0-16 scaled as make_imagefolder.py does."""
    by_class = collections.defaultdict(list)
    with gzip.open(os.path.join(SHARED, "digits.csv.gz"), "rt") as f:
        for line in f:
            v = [int(float(x)) for x in line.split(",")]
            px = np.array([min(255, x * 16) for x in v[:64]], np.uint8).reshape(8, 8)
            by_class[str(v[64])].append(Image.fromarray(px, "L"))
    classes = sorted(by_class)
    out = []
    for c in classes:
        keep = range(len(by_class[c])) if not per_class else sorted(rng.sample(range(len(by_class[c])), min(per_class, len(by_class[c]))))
        out += [(c, by_class[c][i]) for i in keep]
    return classes, out


def load_photos(rng, per_class, tile):
    """Non-overlapping tile x tile cuts of each shared photo (class = photo). Overlapping
    crops would be near duplicates of each other, so could not serve as clean images."""
    folder = os.path.join(SHARED, "photos")
    classes, out = [], []
    for name in sorted(os.listdir(folder)):
        img = Image.open(os.path.join(folder, name)).convert("RGB")
        cls = os.path.splitext(name)[0]
        nx, ny = img.width // tile, img.height // tile
        x0, y0 = (img.width - nx * tile) // 2, (img.height - ny * tile) // 2
        tiles = [img.crop((x0 + i * tile, y0 + j * tile, x0 + (i + 1) * tile, y0 + (j + 1) * tile)) for j in range(ny) for i in range(nx)]
        # Nearly flat tiles (the retina's black corners) are no clean images: leave them out.
        tiles = [t for t in tiles if np.asarray(t.convert("L"), np.float64).std() >= 4.0]
        if per_class:
            tiles = [tiles[i] for i in sorted(rng.sample(range(len(tiles)), min(per_class, len(tiles))))]
        classes.append(cls)
        out += [(cls, t) for t in tiles]
    return classes, out


LOADERS = {"fashion": load_fashion, "digits": load_digits, "photos": load_photos}


# ---------------------------------------------------------------- writing the tree

def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(img, quality):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class Tree:
    """The ImageFolder on disk, its clean images and the ground truth of what was planted.
    Paths are relative to the workspace: `data/<folder>/<name>` (kiln's item `source`)."""

    def __init__(self, ws, rng):
        self.ws, self.rng = ws, rng
        self.clean = {}   # rel -> {"class", "image"}: the clean images as they finally lie
        self.truth = {}   # rel -> {"kind", "original", "class", "extra", ...}
        self.names = set()

    def new_rel(self, folder, ext):
        while True:
            name = "%08x" % self.rng.getrandbits(32)
            if name not in self.names:
                self.names.add(name)
                return f"data/{folder}/{name}.{ext}"

    def write(self, rel, data):
        path = os.path.join(self.ws, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    def add_clean(self, cls, img):
        rel = self.new_rel(cls, "png")
        self.write(rel, png_bytes(img))
        self.clean[rel] = {"class": cls, "image": img}
        return rel

    def plant(self, kind, folder, ext, data, original=None, cls=None, **info):
        rel = self.new_rel(folder, ext)
        self.write(rel, data)
        cls = cls or (self.clean[original]["class"] if original else folder)
        self.truth[rel] = {"kind": kind, "original": original, "class": cls, "extra": True, **info}
        return rel


# ---------------------------------------------------------------- one function per fault kind

def plant_exact(t, orig):
    with open(os.path.join(t.ws, orig), "rb") as f:
        t.plant("exact", t.clean[orig]["class"], "png", f.read(), orig)


def plant_resized(t, orig):
    img = t.clean[orig]["image"]
    f = t.rng.uniform(0.5, 2.0)
    while abs(f - 1.0) <= 0.05:
        f = t.rng.uniform(0.5, 2.0)
    size = (max(1, round(img.width * f)), max(1, round(img.height * f)))
    t.plant("resized", t.clean[orig]["class"], "png", png_bytes(img.resize(size, Image.BICUBIC)), orig, factor=round(f, 3))


def plant_reencoded(t, orig):
    q = t.rng.randint(30, 90)
    t.plant("reencoded", t.clean[orig]["class"], "jpg", jpeg_bytes(t.clean[orig]["image"], q), orig, quality=q)


def plant_cropped(t, orig):
    """2-8 % off each axis, split at random between the two sides (at least 1 px)."""
    img = t.clean[orig]["image"]
    p = t.rng.uniform(0.02, 0.08)
    cut_x, cut_y = max(1, round(p * img.width)), max(1, round(p * img.height))
    left, top = t.rng.randint(0, cut_x), t.rng.randint(0, cut_y)
    box = (left, top, img.width - (cut_x - left), img.height - (cut_y - top))
    t.plant("cropped", t.clean[orig]["class"], "png", png_bytes(img.crop(box)), orig, share=round(p, 3), box=box)


def plant_brightness(t, orig):
    d = t.rng.randint(10, 25) * t.rng.choice([-1, 1])
    px = np.clip(np.asarray(t.clean[orig]["image"], np.int16) + d, 0, 255).astype(np.uint8)
    t.plant("brightness", t.clean[orig]["class"], "png", png_bytes(Image.fromarray(px)), orig, delta=d)


def plant_truncated(t, orig):
    """A real PNG or JPEG of the image cut at 30-70 % of its bytes."""
    img, fmt = t.clean[orig]["image"], t.rng.choice(["png", "jpg"])
    data = png_bytes(img) if fmt == "png" else jpeg_bytes(img, 90)
    cut = t.rng.uniform(0.3, 0.7)
    t.plant("truncated", t.clean[orig]["class"], fmt, data[: int(len(data) * cut)], orig, format=fmt, cut=round(cut, 3))


def plant_empty(t, cls):
    t.plant("empty", cls, "png", b"")


def plant_not_image(t, cls):
    t.plant("not_image", cls, "png", b"Not an image, whatever its name says (%08x).\n" % t.rng.getrandbits(32) * t.rng.randint(1, 20))


def plant_bomb(t, cls):
    """A valid PNG whose header claims 100000 x 100000 gray pixels, with a tiny body (each
    one different: identical junk would be grouped as exact duplicates first)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" + t.rng.randbytes(64) + b"\x00" * 4096, 9)) + chunk(b"IEND", b""))
    t.plant("bomb", cls, "png", data)


def plant_wrong_extension(t, orig):
    """The clean image itself, replaced in place by a JPEG (q90) under its .png name."""
    t.write(orig, jpeg_bytes(t.clean[orig]["image"], 90))
    t.truth[orig] = {"kind": "wrong_extension", "original": orig, "class": t.clean[orig]["class"], "extra": False}


def plant_alias(t, orig, alias):
    """The clean image moved to a folder named like an alias of its class."""
    entry = t.clean.pop(orig)
    rel = f"data/{alias}/{os.path.basename(orig)}"
    os.makedirs(os.path.dirname(os.path.join(t.ws, rel)), exist_ok=True)
    os.rename(os.path.join(t.ws, orig), os.path.join(t.ws, rel))
    t.clean[rel] = entry
    t.truth[rel] = {"kind": "alias", "original": rel, "class": entry["class"], "extra": False, "folder": alias}


def plant_conflict(t, orig, classes):
    other = t.rng.choice([c for c in classes if c != t.clean[orig]["class"]])
    with open(os.path.join(t.ws, orig), "rb") as f:
        t.plant("conflict", other, "png", f.read(), orig, wrong_label=other)


COPY_FAULTS = {"exact": plant_exact, "resized": plant_resized, "reencoded": plant_reencoded, "cropped": plant_cropped,
               "brightness": plant_brightness, "truncated": plant_truncated, "wrong_extension": plant_wrong_extension}
STANDALONE_FAULTS = {"empty": plant_empty, "not_image": plant_not_image, "bomb": plant_bomb}


def alias_name(cls, i):
    if cls.isdigit():
        return DIGIT_WORDS[int(cls)] if int(cls) < 10 else f"digit-{cls}"
    return cls[0].upper() + cls[1:] if i % 2 == 0 else cls + "s"


def build_set(name, ws, args, rng):
    classes, images = LOADERS[name](rng, args.per_class, args.tile)
    t = Tree(ws, rng)
    for cls, img in images:
        t.add_clean(cls, img)
    m = args.faults_per_kind
    pool = sorted(t.clean)
    rng.shuffle(pool)
    needed = m * (len(COPY_FAULTS) + 2)
    if len(pool) < needed:
        sys.exit(f"{name}: {len(pool)} clean images, but {needed} are needed for {m} faults per kind")
    for fn in COPY_FAULTS.values():
        for _ in range(m):
            fn(t, pool.pop())
    for _ in range(m):
        plant_conflict(t, pool.pop(), classes)
    for fn in STANDALONE_FAULTS.values():
        for _ in range(m):
            fn(t, rng.choice(classes))
    # Aliases: up to three classes get an alias folder; m of their unused images move there.
    alias_classes = rng.sample(classes, min(3, len(classes)))
    aliases = {alias_name(c, i): c for i, c in enumerate(alias_classes)}
    by_class = {c: [r for r in pool if t.clean[r]["class"] == c] for c in alias_classes}
    for i in range(m):
        alias = list(aliases)[i % len(aliases)]
        if by_class[aliases[alias]]:
            plant_alias(t, by_class[aliases[alias]].pop(), alias)
    with open(os.path.join(ws, "truth.json"), "w") as f:
        json.dump({"clean": {r: e["class"] for r, e in sorted(t.clean.items())}, "planted": t.truth, "aliases": aliases}, f, indent=1, sort_keys=True)
    return classes, aliases, t


# ---------------------------------------------------------------- running kiln

def write_manifest(ws, pipeline, seed, classes, aliases, clean_checks="", extra=""):
    alias_table = ", ".join(f"{json.dumps(a)} = {json.dumps(c)}" for a, c in sorted(aliases.items()))
    text = (f'[pipeline]\nname = "{pipeline}"\nseed = {seed}\n\n'
            '[stages.collect]\nkind = "collect"\n[[stages.collect.sources]]\ntype = "dir"\nname = "data"\npath = "data"\n\n'
            '[stages.clean]\nkind = "clean"\ninputs = ["collect"]\n'
            + (f"[stages.clean.checks]\n{clean_checks}\n" if clean_checks else "") + "\n"
            f'[stages.label]\nkind = "label"\ninputs = ["clean"]\nclasses = {json.dumps(classes)}\n'
            + (f"aliases = {{ {alias_table} }}\n" if aliases else "") + extra)
    path = os.path.join(ws, "kiln.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def run_kiln(kiln, ws):
    t = time.perf_counter()
    p = subprocess.run([kiln, "--no-progress", "run", "kiln.toml"], cwd=ws, capture_output=True, text=True)
    wall = time.perf_counter() - t
    with open(os.path.join(ws, "kiln.log"), "w") as f:
        f.write(p.stdout + p.stderr)
    return p, wall


def read_json(path, lines=False):
    """The JSON (or JSON lines) file at path, or None when it is not there."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()] if lines else json.load(f)


# ---------------------------------------------------------------- scoring

def score(ws, pipeline, t):
    out = os.path.join(ws, "outputs", pipeline)
    collected = read_json(os.path.join(out, "collect", "items.jsonl"), True)
    cleaned = read_json(os.path.join(out, "clean", "items.jsonl"), True)
    report = read_json(os.path.join(out, "clean", "clean_report.json"))
    if collected is None or cleaned is None or report is None:
        raise RuntimeError(f"clean's results are missing under {out} (see {ws}/kiln.log)")
    labelled = read_json(os.path.join(out, "label", "items.jsonl"), True)
    lreport = read_json(os.path.join(out, "label", "label_report.json"))
    norm = lambda s: os.path.relpath(s, ws) if os.path.isabs(s) else s
    id_of = {norm(it["source"]): it["id"] for it in collected}
    rel_of = {v: k for k, v in id_of.items()}
    kept_ids = {it["id"] for it in cleaned}
    findings = collections.defaultdict(list)
    for f in report["findings"]:
        findings[f["id"]].append(f)

    def why(rel):
        """None if the file is still there after clean, else (check, reason)."""
        if rel not in id_of:
            return ("collect", "not collected")
        i = id_of[rel]
        if i in kept_ids:
            return None
        fs = findings.get(i, [])
        top = max((POLICY_ORDER[f["policy"]] for f in fs), default=0)
        f = next((f for f in fs if POLICY_ORDER[f["policy"]] == top), None)
        return (f["check"], f["reason"]) if f else ("?", "removed without a finding")

    group_of = {}  # item id -> the ids of its duplicate group
    for g in report.get("duplicate_groups", []):
        members = {g["kept"]} | {c["id"] for c in g["copies"]}
        for m in members:
            group_of[m] = members
    same_group = lambda a, b: id_of.get(a) in group_of.get(id_of.get(b), ())

    # Fault kinds.
    kinds = {k: {"n": 0, "caught": 0, "how": collections.Counter(), "kept_copy": []} for k in KINDS}
    label_of = {it["id"]: it.get("label") for it in labelled} if labelled is not None else None
    conflict_ids = set()
    for c in (lreport or {}).get("conflicts", []):
        conflict_ids |= set(c.get("labels", {}))
    for rel, tr in sorted(t.truth.items()):
        k, orig = tr["kind"], tr["original"]
        s = kinds[k]
        s["n"] += 1
        gone, orig_gone = why(rel), (why(orig) if orig else None)
        if k == "wrong_extension":
            hit = any(f["check"] == "wrong_extension" for f in findings.get(id_of.get(rel), []))
            how = "reported" if hit else None
        elif k == "alias":
            hit = label_of is not None and label_of.get(id_of.get(rel)) == tr["class"]
            how = "labelled right" if hit else None
        elif k == "conflict":
            wrong = label_of is not None and label_of.get(id_of.get(rel)) == tr["wrong_label"]
            hit = labelled is not None and id_of.get(rel) in conflict_ids and not wrong
            how = "conflict reported" if hit else None
        elif k == "exact" and gone is None and orig_gone is not None:
            hit, how = True, f"kept the copy (same bytes), original: {orig_gone[0]}"
        else:
            hit, how = gone is not None, gone[0] if gone else None
            if k in DUPLICATE_KINDS and gone is None and orig_gone is not None and same_group(rel, orig):
                s["kept_copy"].append((rel, orig, orig_gone[0]))
        s["caught"] += hit
        if how:
            s["how"][how] += 1

    copies_of = collections.defaultdict(list)  # original -> [(planted copy, kind)]
    for r, x in t.truth.items():
        if x["extra"] and x["original"]:
            copies_of[x["original"]].append((r, x["kind"]))

    # Precision per check: of the items a check flagged, how many were planted faults (or
    # the original of a planted copy that a duplicate check grouped with that copy).
    checks = collections.OrderedDict()
    for f in report["findings"]:
        c = checks.setdefault(f["check"], {"policy": f["policy"], "flagged": 0, "removed": 0, "true": 0})
        c["flagged"] += 1
        c["removed"] += f["id"] not in kept_ids
        rel = rel_of.get(f["id"])
        tr = t.truth.get(rel)
        planted = tr is not None and (tr["extra"] or tr["kind"] == "wrong_extension")
        pair = f["check"] in ("exact_duplicates", "near_duplicates") and any(same_group(r, rel) for r, _ in copies_of.get(rel, []))
        c["true"] += planted or pair

    # Clean images lost.
    per_class = collections.defaultdict(lambda: [0, 0])
    lost, replaced_identical, replaced_near, reasons = [], 0, 0, collections.Counter()
    for rel, e in sorted(t.clean.items()):
        per_class[e["class"]][0] += 1
        g = why(rel)
        if g is None:
            continue
        survivors = [(r, k) for r, k in copies_of[rel] if k in DUPLICATE_KINDS + ["conflict"] and why(r) is None]
        if any(k in ("exact", "conflict") for _, k in survivors):
            replaced_identical += 1
            continue
        replaced_near += bool(survivors)
        per_class[e["class"]][1] += 1
        reasons[g[0]] += 1
        lost.append((bool(survivors), rel, g[0], g[1] + (f" (its planted {survivors[0][1]} copy stayed)" if survivors else "")))
    lost.sort()  # those not replaced by their own planted copy first: they are the false alarms
    n_clean = len(t.clean)
    worst = max(per_class.items(), key=lambda kv: (kv[1][1] / kv[1][0], kv[0]))
    label_dropped = [d for d in (lreport or {}).get("dropped", []) if rel_of.get(d["id"]) in t.clean]
    return {
        "kinds": kinds, "checks": checks, "n_clean": n_clean, "lost": lost, "reasons": reasons,
        "replaced_identical": replaced_identical, "replaced_near": replaced_near,
        "worst": (worst[0], worst[1][1], worst[1][0]), "label_ok": labelled is not None,
        "label_dropped": label_dropped, "items_in": report.get("items_in"), "per_class": dict(per_class),
    }


# ---------------------------------------------------------------- printing

def verdict(ok):
    return "PASS" if ok else "**FAIL**"


def pct(x):
    return f"{100 * x:.2f} %"


def print_set(name, s, wall, n_classes):
    print(f"\n### {name}: {s['n_clean']} clean images in {n_classes} classes, {s['items_in']} files; kiln run {wall:.1f} s\n")
    print("| fault kind | planted | caught | recall | target | how caught | kept the copy (a miss) | pair found (either side removed) |")
    print("|---|---:|---:|---:|---|---|---:|---:|")
    for k in KINDS:
        x = s["kinds"][k]
        if not x["n"]:
            continue
        r = x["caught"] / x["n"]
        target = f"≥ {TARGET_RECALL} {verdict(r >= TARGET_RECALL)}" if k in TARGETED else "—"
        if k in LABEL_KINDS and not s["label_ok"]:
            target = "label failed"
        how = ", ".join(f"{h} {n}" for h, n in x["how"].most_common())
        found = f"{x['caught'] + len(x['kept_copy'])}" if k in DUPLICATE_KINDS else ""
        print(f"| {k} | {x['n']} | {x['caught']} | {r:.2f} | {target} | {how} | {len(x['kept_copy']) or ''} | {found} |")
    print("\n| check | policy | flagged | of these removed (by any check) | planted among flagged | precision |")
    print("|---|---|---:|---:|---:|---:|")
    for c, x in sorted(s["checks"].items()):
        print(f"| {c} | {x['policy']} | {x['flagged']} | {x['removed']} | {x['true']} | {x['true'] / x['flagged']:.2f} |")
    n, lost = s["n_clean"], len(s["lost"])
    wc, wl, wn = s["worst"]
    print(f"\nClean images lost: {lost} of {n} ({pct(lost / n)}; target ≤ {pct(TARGET_LOST)}: {verdict(lost / n <= TARGET_LOST)}); "
          f"worst class `{wc}`: {wl} of {wn} ({pct(wl / wn)}; target ≤ {pct(TARGET_LOST_CLASS)}: {verdict(wl / wn <= TARGET_LOST_CLASS)}).")
    if s["reasons"]:
        print("By check: " + ", ".join(f"{c} {k}" for c, k in s["reasons"].most_common())
              + f". Of these, {s['replaced_near']} were replaced by their own planted near copy.")
    if s["replaced_identical"]:
        print(f"Not counted: {s['replaced_identical']} originals removed in favour of their byte-identical planted copy.")
    print("Lost per class: " + ", ".join(f"{c} {pct(l / n)}" for c, (n, l) in sorted(s["per_class"].items())) + ".")
    for _, rel, check, reason in s["lost"][:10]:
        print(f"  lost: {rel}  [{check}] {reason}")
    for k in DUPLICATE_KINDS:
        for rel, orig, check in s["kinds"][k]["kept_copy"]:
            print(f"  kept the copy: {k} {rel} stayed, original {orig} removed [{check}]")
    if s["label_dropped"]:
        print(f"label dropped {len(s['label_dropped'])} clean images (conflicts = \"drop\" takes the original too): "
              + "; ".join(d["reason"] for d in s["label_dropped"][:3]))


def print_summary(results):
    names = list(results)
    print("\n### Summary (recall per fault kind; clean images lost)\n")
    print("| | " + " | ".join(names) + " | target |")
    print("|---|" + "---:|" * len(names) + "---|")
    for k in KINDS:
        cells = []
        for n in names:
            x = results[n][0]["kinds"][k]
            cells.append(f"{x['caught']}/{x['n']} = {x['caught'] / x['n']:.2f}" if x["n"] else "—")
        print(f"| {k} | " + " | ".join(cells) + f" | {'≥ 0.95' if k in TARGETED else '—'} |")
    row = lambda label, f, target: print(f"| {label} | " + " | ".join(f(results[n][0]) for n in names) + f" | {target} |")
    row("clean images lost", lambda s: f"{len(s['lost'])}/{s['n_clean']} = {pct(len(s['lost']) / s['n_clean'])}", "≤ 0.5 %")
    row("worst class", lambda s: f"{s['worst'][0]}: {pct(s['worst'][1] / s['worst'][2])}", "≤ 1 %")
    row("lost, less those replaced by their own planted copy",
        lambda s: f"{len(s['lost']) - s['replaced_near']}/{s['n_clean']} = {pct((len(s['lost']) - s['replaced_near']) / s['n_clean'])}", "")
    print("| kiln run (wall) | " + " | ".join(f"{results[n][1]:.1f} s" for n in names) + " | |")
    fails = []
    for n in names:
        s = results[n][0]
        fails += [f"{n}: {k}" for k in TARGETED if s["kinds"][k]["n"] and s["kinds"][k]["caught"] / s["kinds"][k]["n"] < TARGET_RECALL]
        if len(s["lost"]) / s["n_clean"] > TARGET_LOST or s["worst"][1] / s["worst"][2] > TARGET_LOST_CLASS:
            fails.append(f"{n}: clean images lost")
    print("\nTargets: " + ("all met" if not fails else "missed: " + "; ".join(fails)))


# ---------------------------------------------------------------- --flips

def run_flips(name, args, kiln, seed):
    """Flip `rate` of the labels, run through label_issues, compare with the flips and cleanlab."""
    rows = []
    for rate in FLIP_RATES:
        rng = random.Random(f"{seed}-{name}-flips-{rate}")
        ws = os.path.join(args.work, f"{name}-flips{round(rate * 100):02d}")
        shutil.rmtree(ws, ignore_errors=True)
        classes, images = LOADERS[name](rng, args.per_class, args.tile)
        t = Tree(ws, rng)
        order = list(range(len(images)))
        rng.shuffle(order)
        to_flip = set(order[: round(rate * len(images))])
        flipped = set()
        for i, (cls, img) in enumerate(images):
            if i in to_flip:
                flipped.add(t.add_clean(rng.choice([c for c in classes if c != cls]), img))
            else:
                t.add_clean(cls, img)
        cfg = FLIP_STAGES[name]
        pipeline = f"flips_{name}_{round(rate * 100):02d}"
        extra = LABEL_ISSUES_STAGE.format(preprocess=cfg["preprocess"], folds=FLIP_FOLDS, model=cfg["model"])
        write_manifest(ws, pipeline, seed, classes, {}, cfg["clean"], extra)
        p, wall = run_kiln(kiln, ws)
        out = os.path.join(ws, "outputs", pipeline, "label_issues")
        if p.returncode != 0:
            log = p.stderr + p.stdout
            if "unknown kind" in log and "label_issues" in log:  # the other rate would fail alike
                rows.append((name, rate, "this kiln has no `label_issues` stage kind yet (exit 2): nothing to score"))
                break
            first = next((l.strip() for l in log.splitlines() if "error" in l.lower()), log.strip()[-200:])
            rows.append((name, rate, f"kiln failed (exit {p.returncode}, {wall:.1f} s): {first}; see {ws}/kiln.log"))
            continue
        try:
            rows.append((name, rate, score_flips(ws, pipeline, out, flipped, wall)))
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            rows.append((name, rate, f"unexpected label_issues layout under {out}: {e}"))
    return rows


def score_flips(ws, pipeline, out, flipped, wall):
    issues = read_json(os.path.join(out, "label_issues_report.json"))
    if issues is None:
        raise RuntimeError("no label_issues_report.json")
    suspects = issues["suspects"] if isinstance(issues, dict) else issues
    labelled = read_json(os.path.join(ws, "outputs", pipeline, "label", "items.jsonl"), True) or []
    rel_of = {it["id"]: (os.path.relpath(it["source"], ws) if os.path.isabs(it["source"]) else it["source"]) for it in labelled}
    with open(os.path.join(out, "out_of_fold.csv")) as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    if header[:2] != ["id", "given"]:
        raise ValueError(f"out_of_fold.csv starts with {header[:2]}, expected id,given")
    classes = [h[2:] if h.startswith("p_") else h for h in header[2:]]
    ids = [r[0] for r in body]
    labels = np.array([classes.index(r[1]) for r in body])
    probs = np.array([[float(v) for v in r[2:]] for r in body])
    present = {rel_of.get(i) for i in ids}
    flips_in = flipped & present
    kiln_set = {s["id"] for s in suspects}
    tp = sum(rel_of.get(i) in flipped for i in kiln_set)
    from cleanlab.filter import find_label_issues
    ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    cl_set = {ids[i] for i in ranked}
    return {"flipped": len(flipped), "reached": len(flips_in), "suspects": len(kiln_set), "tp": tp,
            "precision": tp / max(1, len(kiln_set)), "recall": tp / max(1, len(flips_in)),
            "same": kiln_set == cl_set, "only_kiln": len(kiln_set - cl_set), "only_cleanlab": len(cl_set - kiln_set), "wall": wall}


def print_flips(rows):
    print("\n### Label flips: label_issues suspects vs planted flips, and vs cleanlab\n")
    print("| set | flipped | reached the stage | suspects | right | precision (≥ 0.7) | recall (≥ 0.6) | cleanlab: same set? | only kiln | only cleanlab | kiln run |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for name, rate, r in rows:
        if isinstance(r, str):
            print(f"| {name} {pct(rate)} | {r} |||||||||")
            continue
        print(f"| {name} {pct(rate)} | {r['flipped']} | {r['reached']} | {r['suspects']} | {r['tp']} | {r['precision']:.2f} {verdict(r['precision'] >= 0.7)} | "
              f"{r['recall']:.2f} {verdict(r['recall'] >= 0.6)} | {'yes' if r['same'] else 'no'} | {r['only_kiln']} | {r['only_cleanlab']} | {r['wall']:.1f} s |")


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="fashion,digits,photos")
    ap.add_argument("--per-class", type=int, default=0, help="clean images per class (default: fashion 100, digits all, photos all tiles)")
    ap.add_argument("--faults-per-kind", type=int, default=10)
    ap.add_argument("--tile", type=int, default=96, help="photo tile side in pixels")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--kiln", default=os.path.join(ROOT, "target", "release", "kiln"))
    ap.add_argument("--work", default=os.path.join(ROOT, "bench", "work", "dirty"))
    ap.add_argument("--keep", action="store_true", help="keep the work folders (images, truth.json, outputs, kiln.log)")
    ap.add_argument("--flips", action="store_true", help="also the label-flip benchmark (fashion, digits; needs cleanlab)")
    args = ap.parse_args()
    args.work = os.path.abspath(args.work)
    kiln = os.path.abspath(args.kiln)
    if not os.access(kiln, os.X_OK):
        sys.exit(f"no kiln binary at {kiln}: run `cargo build --release`, or pass --kiln")
    sets = [s for s in args.sets.split(",") if s]
    unknown = [s for s in sets if s not in LOADERS]
    if unknown:
        sys.exit(f"unknown sets {unknown}; choose from {sorted(LOADERS)}")
    command = "python3 " + " ".join(shlex.quote(a) for a in [os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:])
    version = subprocess.run([kiln, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"{command}\n{version}, seed {args.seed}, {args.faults_per_kind} faults per kind, work folder {args.work}")

    results = {}
    for name in sets:
        rng = random.Random(f"{args.seed}-{name}")
        ws = os.path.join(args.work, name)
        shutil.rmtree(ws, ignore_errors=True)
        os.makedirs(ws)
        classes, aliases, tree = build_set(name, ws, args, rng)
        write_manifest(ws, f"dirty_{name}", args.seed, classes, aliases)
        p, wall = run_kiln(kiln, ws)
        if p.returncode != 0:
            print(f"\n{name}: kiln exited with {p.returncode} after {wall:.1f} s (log: {ws}/kiln.log):\n" + "\n".join((p.stderr or p.stdout).strip().splitlines()[-8:]))
        warnings = [line.strip() for line in p.stderr.splitlines() if "warn" in line.lower()]
        try:
            s = score(ws, f"dirty_{name}", tree)
        except RuntimeError as e:
            print(f"{name}: {e}")
            continue
        results[name] = (s, wall)
        print_set(name, s, wall, len(classes))
        if warnings:
            print(f"kiln printed {len(warnings)} warnings (all in kiln.log; --keep keeps it), the first: {warnings[0]}")
    if results:
        print_summary(results)
    if args.flips:
        rows = []
        for name in [s for s in sets if s in FLIP_STAGES]:
            rows += run_flips(name, args, kiln, args.seed)
        print_flips(rows)
    print(f"\n{command}")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
