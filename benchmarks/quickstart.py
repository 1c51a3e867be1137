"""Wall time and peak memory of the quickstart (the README's main command) against its targets.

    .venv/bin/python benchmarks/quickstart.py [--run-dir runs/bench-quickstart] [overrides ...]

Runs `alignment run --config configs/quickstart.yaml` in a fresh run directory and samples, every 0.5 s,
the summed resident memory of the command and every process it starts (driver, raylet, GCS, Ray workers,
Train workers, Data actors). Shared pages are counted once per process, so the figure is an upper bound.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
TARGET_S, TARGET_GIB = 15 * 60, 8.0


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/bench-quickstart")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    run_dir = ROOT / args.run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "alignment"), "run", "--config", "configs/quickstart.yaml",
           f"run_dir={run_dir}", *args.overrides]
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, tree_rss(ps))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.5)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    done.set()
    t.join()
    wall = time.time() - started
    gib = peak / 2**30
    print(f"quickstart: exit {proc.returncode}, wall {wall:.0f} s (target < {TARGET_S} s, "
          f"ratio {wall / TARGET_S:.2f}), peak memory {gib:.2f} GiB (target < {TARGET_GIB} GiB, "
          f"ratio {gib / TARGET_GIB:.2f})")
    if proc.returncode:
        print(err[-3000:], file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
