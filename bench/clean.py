#!/usr/bin/env python3
"""kiln's clean stage side by side with the same checks in Python (Pillow + imagehash + numpy).

Run from the repository root after `cargo build --release`:
    pip install pillow imagehash numpy
    python3 ../shared/datasets/make_photo_bench.py bench/work/photos5000 --count 5000
    python3 bench/clean.py [--photos bench/work/photos5000] [--repeat 3]

Both sides do, per image: decode, size and aspect checks, brightness and contrast, the
variance of the Laplacian, colourfulness, a 64-bit pHash and an 8x8 colour thumbnail; then
exact duplicates (content hash) and near duplicates (pHash distance <= 14 confirmed by the
thumbnail difference <= 12) over all pairs. Python uses a process pool as wide as the
machine; kiln uses its own threads. kiln's timing is a whole `kiln run --force clean` with
its memo store emptied first (every image decoded again; collect stays cached).
"""
import argparse
import hashlib
import io
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time

import imagehash
import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILN = os.path.join(ROOT, "target", "release", "kiln")


def measure(path):
    data = open(path, "rb").read()
    digest = hashlib.blake2b(data, digest_size=32).digest()
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # the same verdict kiln gives: quarantined with a reason
        return path, digest, None, str(e)
    w, h = img.size
    small = img.copy()
    small.thumbnail((512, 512))
    rgb = np.asarray(small.convert("RGB"), dtype=np.int16)
    luma = np.asarray(small.convert("L"), dtype=np.float64)
    lap = luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4 * luma[1:-1, 1:-1]
    diff = np.maximum(np.maximum(np.abs(rgb[..., 0] - rgb[..., 1]), np.abs(rgb[..., 1] - rgb[..., 2])), np.abs(rgb[..., 0] - rgb[..., 2]))
    ph = int(str(imagehash.phash(small)), 16)
    thumb = np.asarray(small.convert("RGB").resize((8, 8), Image.BILINEAR), dtype=np.int16).ravel()
    return path, digest, (w, h, luma.mean(), luma.std(), lap.var(), (diff > 12).mean(), ph, thumb), None


def python_clean(files, workers):
    with multiprocessing.Pool(workers) as pool:
        results = pool.map(measure, files, chunksize=32)
    seen, exact = {}, 0
    for path, digest, m, err in results:
        if digest in seen:
            exact += 1
        seen.setdefault(digest, path)
    ok = [r for r in results if r[2] is not None]
    hashes = np.array([r[2][6] for r in ok], dtype=np.uint64)
    thumbs = np.array([r[2][7] for r in ok], dtype=np.int16)
    near = 0
    for i in range(len(ok) - 1):
        d = np.bitwise_count(hashes[i] ^ hashes[i + 1:])
        for j in np.nonzero(d <= 14)[0]:
            if np.abs(thumbs[i] - thumbs[i + 1 + j]).mean() <= 12:
                near += 1
    return len(results), exact, near


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", default=os.path.join(ROOT, "bench", "work", "photos5000"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    photos = os.path.abspath(args.photos)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(photos) for f in fs if f.endswith(".jpg"))
    if not files:
        sys.exit(f"no photos under {photos}; see the usage above")
    workers = os.cpu_count()

    ws = os.path.join(ROOT, "bench", "work", "clean-ws")
    os.makedirs(ws, exist_ok=True)
    with open(os.path.join(ws, "kiln.toml"), "w") as f:
        f.write(f'[stages.collect]\nkind = "collect"\n[[stages.collect.sources]]\ntype = "dir"\npath = "{photos}"\n\n'
                '[stages.clean]\nkind = "clean"\ninputs = ["collect"]\n')
    run = lambda *a: subprocess.run([KILN, "-q", *a], cwd=ws, check=True, stdout=subprocess.DEVNULL)
    run("run")
    kiln_times = []
    for _ in range(args.repeat):
        run("gc", "--memo")
        t = time.perf_counter()
        run("run", "--force", "clean")
        kiln_times.append(time.perf_counter() - t)
    py_times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        n, exact, near = python_clean(files, workers)
        py_times.append(time.perf_counter() - t)
    k, p = statistics.median(kiln_times), statistics.median(py_times)
    print(f"{len(files)} JPEGs (500x375) on {workers} cores; median of {args.repeat}")
    print(f"  python (Pillow {Image.__version__}, imagehash {imagehash.__version__}, numpy {np.__version__}, {workers} processes): {p:6.2f} s  {len(files) / p:7.0f} img/s  (exact dups {exact}, near dups {near})")
    print(f"  kiln clean ({workers} threads):                  {k:6.2f} s  {len(files) / k:7.0f} img/s")
    print(f"  kiln is {p / k:.2f}x faster (target >= 3)")


if __name__ == "__main__":
    main()
