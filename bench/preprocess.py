#!/usr/bin/env python3
"""Decode + resize to 224x224 + horizontal flip + normalise: kiln vs Pillow, side by side.

    pip install pillow numpy
    python3 ../shared/datasets/make_photo_bench.py bench/work/photos5000 --count 5000
    python3 bench/preprocess.py [--photos bench/work/photos5000] [--repeat 3]

Both sides: shorter side to 224 with bilinear filtering and a centre crop, a horizontal
flip, then float32 CHW normalised with the ImageNet mean and std. Pillow runs in a pool
of as many processes as cores; kiln (`examples/preprocess_bench.rs`) on as many threads.
torchvision is measured too when it is installed.
"""
import argparse
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


def pillow_one(path):
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = 224 / min(w, h)
    img = img.resize((max(224, round(w * s)), max(224, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    img = img.crop((left, top, left + 224, top + 224)).transpose(Image.FLIP_LEFT_RIGHT)
    x = (np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0 - MEAN) / STD
    return float(x[1, 112, 112])


def torchvision_transform():
    try:
        from torchvision import transforms
    except ImportError:
        return None
    return transforms.Compose([transforms.Resize(224), transforms.CenterCrop(224), transforms.RandomHorizontalFlip(p=1.0), transforms.ToTensor(), transforms.Normalize(MEAN.ravel().tolist(), STD.ravel().tolist())])


def torchvision_one(path):
    t = torchvision_one.t
    return float(t(Image.open(path).convert("RGB"))[1, 112, 112])


def timed_pool(fn, files, workers, repeat, init=None):
    times = []
    for _ in range(repeat):
        with multiprocessing.Pool(workers, initializer=init) as pool:
            t = time.perf_counter()
            pool.map(fn, files, chunksize=32)
            times.append(time.perf_counter() - t)
    return min(times)


def init_tv():
    torchvision_one.t = torchvision_transform()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", default=os.path.join(ROOT, "bench", "work", "photos5000"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(args.photos) for f in fs if f.endswith(".jpg"))
    if not files:
        sys.exit(f"no photos under {args.photos}; see the usage above")
    workers = os.cpu_count()
    out = subprocess.run(["cargo", "run", "-q", "--release", "--example", "preprocess_bench", "--", args.photos, str(args.repeat)], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    kiln = float(re.search(r"images ([0-9.]+) s", out).group(1))
    pil = timed_pool(pillow_one, files, workers, args.repeat)
    print(f"{len(files)} JPEGs, {workers} cores, best of {args.repeat}")
    print(f"  Pillow {Image.__version__} ({workers} processes): {pil:6.2f} s {len(files) / pil:6.0f} img/s")
    if torchvision_transform() is not None:
        tv = timed_pool(torchvision_one, files, workers, args.repeat, init_tv)
        print(f"  torchvision ({workers} processes):     {tv:6.2f} s {len(files) / tv:6.0f} img/s")
    print(f"  kiln ({workers} threads):               {kiln:6.2f} s {len(files) / kiln:6.0f} img/s")
    print(f"  kiln is {pil / kiln:.2f}x Pillow (target >= 2.2)")


if __name__ == "__main__":
    main()
