#!/usr/bin/env python3
"""Model throughput and peak memory, kiln (candle) vs PyTorch on the CPU, side by side.

Same models, batch, input size and thread count; random input; inference in eval mode
without gradients, training as forward + backward + AdamW step. Each case runs each side
in a fresh process of its own: kiln as `target/release/examples/model_bench`, PyTorch as
this script re-invoked with a hidden `--torch-case` flag. Throughput is images per second
after one warm-up step; peak memory is the maximum resident set size (ru_maxrss from
wait4) of that case's own process, so it counts the model, its activations and the
runtime itself. For PyTorch that includes the torch library's own footprint, which is
part of what a user pays. MB here are MiB.

Prints a header line, then a Markdown table to paste into BENCHMARKS.md. Ratio is kiln /
PyTorch in images per second (above 1 means kiln is faster); memory ratio is kiln peak /
PyTorch peak (below 1 means kiln uses less).

    pip install torch torchvision
    python3 bench/models.py [--threads 2] [--iters 5] [--only resnet18,resnet50]
                            [--modes infer,train] [--no-build]

Without --no-build it first runs `cargo build --release --example model_bench`.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KILN = ROOT / "target/release/examples/model_bench"

CASES = [
    # model, mode, batch, size, channels
    ("cnn", "infer", 128, 28, 1),
    ("cnn", "train", 128, 28, 1),
    ("resnet18", "infer", 8, 224, 3),
    ("resnet18", "train", 8, 224, 3),
    ("resnet50", "infer", 8, 224, 3),
    ("resnet50", "train", 8, 224, 3),
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
    if name == "resnet50":
        return torchvision.models.resnet50(num_classes=10)
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


def torch_case(model, mode, batch, size, channels, iters, threads):
    import torch

    torch.set_num_threads(threads)
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


def run_measured(cmd, env):
    """Run one case's process; return its last JSON line and its peak RSS in MiB."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    p.stdout.close()
    # wait4 rather than p.wait(): it reaps the child and hands back the rusage of that
    # child alone, where RUSAGE_CHILDREN would give the maximum over every child so far.
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise subprocess.CalledProcessError(p.returncode, cmd, out)
    result = json.loads(out.strip().splitlines()[-1])
    return result["images_per_sec"], usage.ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def kiln_run(model, mode, batch, size, channels, iters, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    return run_measured([str(KILN), model, mode, str(batch), str(size), str(iters), str(channels)], env)


def torch_run(model, mode, batch, size, channels, iters, threads):
    # The OpenMP and MKL pools size themselves when torch loads, before set_num_threads runs.
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    args = [model, mode, batch, size, channels, iters, threads]
    return run_measured([sys.executable, str(Path(__file__).resolve()), "--torch-case", *map(str, args)], env)


def main():
    ap = argparse.ArgumentParser(description="kiln vs PyTorch model throughput and peak memory on the CPU")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5, help="timed iterations after one warm-up")
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument("--modes", default="infer,train", help="comma-separated: infer, train")
    ap.add_argument("--no-build", action="store_true", help="skip cargo build; use the existing model_bench")
    ap.add_argument("--torch-case", nargs=7, help=argparse.SUPPRESS,
                    metavar=("MODEL", "MODE", "BATCH", "SIZE", "CHANNELS", "ITERS", "THREADS"))
    args = ap.parse_args()

    if args.torch_case:
        model, mode, *numbers = args.torch_case
        batch, size, channels, iters, threads = map(int, numbers)
        ips = torch_case(model, mode, batch, size, channels, iters, threads)
        print(json.dumps({"impl": "torch", "model": model, "mode": mode, "batch": batch, "size": size,
                          "threads": threads, "images_per_sec": round(ips, 2)}))
        return 0

    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--example", "model_bench"], cwd=ROOT, check=True)
    only = set(args.only.split(",")) if args.only else None
    modes = set(args.modes.split(","))
    print(f"threads {args.threads}, torch {version('torch')}, {args.iters} timed iterations after one warm-up "
          f"(training of the 224 px models: max(2, iters // 2))")
    print()
    print("| model | mode | batch | size | kiln img/s | torch img/s | ratio | kiln peak MB | torch peak MB | memory ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for model, mode, batch, size, channels in CASES:
        if (only and model not in only) or mode not in modes:
            continue
        iters = args.iters if model == "cnn" or mode == "infer" else max(2, args.iters // 2)
        case = (model, mode, batch, size, channels, iters, args.threads)
        k_ips, k_mb = kiln_run(*case)
        t_ips, t_mb = torch_run(*case)
        print(f"| {model} | {mode} | {batch} | {size} | {k_ips:.1f} | {t_ips:.1f} | {k_ips / t_ips:.2f} "
              f"| {k_mb:.0f} | {t_mb:.0f} | {k_mb / t_mb:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
