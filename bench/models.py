#!/usr/bin/env python3
"""Model throughput, kiln (candle) vs PyTorch on the CPU, side by side.

Same models, batch, input size and thread count; random input; inference in eval mode
without gradients, training as forward + backward + AdamW step. Prints one row per case
with the ratio kiln / PyTorch in images per second (above 1 means kiln is faster).

    pip install torch torchvision
    python3 bench/models.py [--threads 2] [--iters 5]

kiln side: `cargo run --release --example model_bench`.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CASES = [
    # model, mode, batch, size, channels
    ("cnn", "infer", 128, 28, 1),
    ("cnn", "train", 128, 28, 1),
    ("resnet18", "infer", 8, 224, 3),
    ("resnet18", "train", 8, 224, 3),
    ("efficientnet_lite0", "infer", 8, 224, 3),
    ("efficientnet_lite0", "train", 8, 224, 3),
]


def torch_model(name, channels, size):
    import torch.nn as nn
    import torchvision

    if name == "cnn":
        # kiln's CnnConfig { widths: [32, 64], convs_per_stage: 1, hidden: 128, dropout: 0.25 }
        return nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * (size // 4) ** 2, 128), nn.ReLU(),
            nn.Dropout(0.25), nn.Linear(128, 10))
    if name == "resnet18":
        return torchvision.models.resnet18(num_classes=10)
    if name == "efficientnet_lite0":
        return lite0()
    raise ValueError(name)


def lite0():
    import torch.nn as nn

    def cbr(cin, cout, k, s, groups=1):
        return [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout, eps=1e-3), nn.ReLU6()]

    class Block(nn.Module):
        def __init__(self, cin, cout, e, k, s):
            super().__init__()
            mid = cin * e
            layers = (cbr(cin, mid, 1, 1) if e != 1 else []) + cbr(mid, mid, k, s, groups=mid)
            layers += [nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout, eps=1e-3)]
            self.body = nn.Sequential(*layers)
            self.res = s == 1 and cin == cout

        def forward(self, x):
            y = self.body(x)
            return x + y if self.res else y

    stages = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
    layers, cin = cbr(3, 32, 3, 2), 32
    for e, k, s, cout, n in stages:
        for i in range(n):
            layers.append(Block(cin, cout, e, k, s if i == 0 else 1))
            cin = cout
    layers += cbr(cin, 1280, 1, 1) + [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(1280, 10)]
    return nn.Sequential(*layers)


def torch_case(model, mode, batch, size, channels, iters):
    import torch

    net = torch_model(model, channels, size)
    x = torch.rand(batch, channels, size, size) * 2 - 1
    y = torch.arange(batch) % 10
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        if mode == "train":
            net.train()
            opt.zero_grad()
            loss_fn(net(x), y).backward()
            opt.step()
        else:
            net.eval()
            with torch.no_grad():
                net(x).sum().item()

    step()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return batch * iters / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated model names")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    subprocess.run(["cargo", "build", "--release", "--example", "model_bench"], cwd=ROOT, check=True)
    exe = ROOT / "target/release/examples/model_bench"
    print(f"threads {args.threads}, torch {torch.__version__}, {args.iters} timed iterations after one warm-up")
    print(f"{'model':20} {'mode':6} {'batch':>5} {'size':>5} {'kiln img/s':>11} {'torch img/s':>12} {'ratio':>6}")
    for model, mode, batch, size, channels in CASES:
        if args.only and model not in args.only.split(","):
            continue
        iters = args.iters if model == "cnn" or mode == "infer" else max(2, args.iters // 2)
        out = subprocess.run([str(exe), model, mode, str(batch), str(size), str(iters), str(channels)], env=env, check=True, capture_output=True, text=True)
        k = json.loads(out.stdout.strip().splitlines()[-1])["images_per_sec"]
        t = torch_case(model, mode, batch, size, channels, iters)
        print(f"{model:20} {mode:6} {batch:5} {size:5} {k:11.1f} {t:12.1f} {k / t:6.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
