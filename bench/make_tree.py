#!/usr/bin/env python3
"""Writes COUNT files of 20-50 KB of incompressible bytes under OUT (100 per folder).

Deterministic for a given --seed, so reruns measure the same tree.
Usage: make_tree.py OUT [--count 20000] [--seed 0]
"""
import argparse
import os
import random


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    marker = os.path.join(args.out, f".complete-{args.count}-{args.seed}")
    if os.path.exists(marker):
        return
    for i in range(args.count):
        folder = os.path.join(args.out, f"d{i // 100:04d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"f{i:06d}.bin"), "wb") as f:
            f.write(rng.randbytes(rng.randint(20_000, 50_000)))
    open(marker, "w").close()


if __name__ == "__main__":
    main()
