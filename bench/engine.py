#!/usr/bin/env python3
"""kiln's engine side by side with b3sum, a plain `find` stat pass, and DVC.

Run from the repository root after `cargo build --release`:
    python3 bench/engine.py [--files 20000] [--repeat 5] [--chain 1000]

Every timing is the median of --repeat runs of the whole command (process start
included), with the OS page cache warm for everyone. Tools that are not installed
(b3sum: `cargo install b3sum`; DVC: `pip install dvc`) are reported as skipped.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILN = os.path.join(ROOT, "target", "release", "kiln")
WORK = os.path.join(ROOT, "bench", "work")


def sh(cmd, cwd, check=True):
    return subprocess.run(cmd, cwd=cwd, shell=True, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def timed(cmd, cwd, repeat, before=None):
    times = []
    for _ in range(repeat):
        if before:
            sh(before, cwd)
        t = time.perf_counter()
        r = sh(cmd, cwd, check=False)
        times.append(time.perf_counter() - t)
        if r.returncode != 0:
            sys.exit(f"command failed: {cmd}\n{r.stderr.decode()}")
    return statistics.median(times)


def have(tool):
    return shutil.which(tool) is not None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--chain", type=int, default=1000)
    args = ap.parse_args()
    if not os.path.exists(KILN):
        sys.exit("build first: cargo build --release")

    ws = os.path.join(WORK, f"tree{args.files}")
    os.makedirs(ws, exist_ok=True)
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "make_tree.py"), os.path.join(ws, "data"), "--count", str(args.files)], check=True)
    if not os.path.exists(os.path.join(ws, ".git")):
        sh("git init -q && git config user.email b@b && git config user.name bench", ws)
    with open(os.path.join(ws, "kiln.toml"), "w") as f:
        f.write('[stages.scan]\nkind = "command"\ncmd = "true"\ndeps = ["data"]\n')
    n_bytes = sum(os.path.getsize(os.path.join(d, x)) for d, _, fs in os.walk(os.path.join(ws, "data")) for x in fs if not x.startswith("."))
    print(f"tree: {args.files} files, {n_bytes / 1e6:.0f} MB, {os.cpu_count()} cores; median of {args.repeat}\n")

    rows = []
    kiln_cold = timed(f"{KILN} -q run", ws, args.repeat, before="rm -rf cache kiln.lock")
    rows.append(("kiln run, cold cache (hash every file)", kiln_cold))
    kiln_noop = timed(f"{KILN} -q run", ws, args.repeat)
    kiln_status = timed(f"{KILN} -q status", ws, args.repeat)
    rows.append(("kiln run, no-op", kiln_noop))
    rows.append(("kiln status, no-op", kiln_status))

    floor = timed("find data -printf '%s %T@ %i\\n' > /dev/null", ws, args.repeat)
    rows.append(("find -printf (stat floor)", floor))
    b3 = None
    if have("b3sum"):
        b3 = timed("find data -type f -print0 | xargs -0 b3sum > /dev/null", ws, args.repeat)
        rows.append(("b3sum over the same files", b3))

    dvc = {}
    if have("dvc"):
        if not os.path.exists(os.path.join(ws, ".dvc")):
            sh("dvc init -q && dvc config core.analytics false && dvc config core.autostage false", ws)
        with open(os.path.join(ws, "dvc.yaml"), "w") as f:
            f.write("stages:\n  scan:\n    cmd: 'true'\n    deps:\n      - data\n")
        with open(os.path.join(ws, ".gitignore"), "w") as f:
            f.write("/cache\n/data\n")
        dvc["cold"] = timed("dvc repro -q", ws, max(1, args.repeat // 2), before="rm -rf .dvc/cache .dvc/tmp dvc.lock")
        dvc["noop"] = timed("dvc repro -q", ws, args.repeat)
        dvc["status"] = timed("dvc status -q", ws, args.repeat)
        rows += [("dvc repro, cold", dvc["cold"]), ("dvc repro, no-op", dvc["noop"]), ("dvc status, no-op", dvc["status"])]

    chain = os.path.join(WORK, f"chain{args.chain}")
    os.makedirs(chain, exist_ok=True)
    with open(os.path.join(chain, "kiln.toml"), "w") as f:
        for i in range(args.chain):
            f.write(f'[stages.s{i:04d}]\nkind = "command"\ncmd = "echo {i} > out/s{i:04d}.txt"\nouts = ["out/s{i:04d}.txt"]\n')
            f.write(f'inputs = ["s{i - 1:04d}"]\n' if i else 'deps = []\n')
        f.write("")
    os.makedirs(os.path.join(chain, "out"), exist_ok=True)
    chain_cold = timed(f"{KILN} -q run", chain, 1, before="rm -rf cache kiln.lock out/*")
    time.sleep(0.2)
    sh(f"{KILN} -q status", chain)  # the first check after a run records the fresh outputs
    chain_status = timed(f"{KILN} -q status", chain, args.repeat)
    chain_noop = timed(f"{KILN} -q run", chain, args.repeat)
    rows += [(f"{args.chain} chained stages: kiln run, cold", chain_cold), (f"{args.chain} chained stages: kiln status, no-op", chain_status), (f"{args.chain} chained stages: kiln run, no-op", chain_noop)]

    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  seconds")
    for name, t in rows:
        print(f"{name:<{width}}  {t:7.3f}")
    print("\nratios (lower is better for kiln):")
    print(f"  kiln status no-op / stat floor   {kiln_status / floor:6.2f}x  (target <= 3)")
    print(f"  kiln run no-op / stat floor      {kiln_noop / floor:6.2f}x  (target <= 3)")
    if b3:
        print(f"  kiln cold run / b3sum            {kiln_cold / b3:6.2f}x  (target <= 1.5)")
    if dvc:
        print(f"  dvc repro cold / kiln cold       {dvc['cold'] / kiln_cold:6.1f}x faster  (target >= 10)")
        print(f"  dvc repro no-op / kiln no-op     {dvc['noop'] / kiln_noop:6.1f}x faster  (target >= 30)")
        print(f"  dvc status / kiln status         {dvc['status'] / kiln_status:6.1f}x faster")
    print(f"  {args.chain}-stage no-op status         {chain_status:6.3f}s  (target <= 0.3)")


if __name__ == "__main__":
    main()
