"""Wall time and peak memory of the quickstart (the README's main command) against its targets.

    .venv/bin/python benchmarks/quickstart.py [--run-dir runs/bench-quickstart] [overrides ...]

Runs `alignment run --config configs/quickstart.yaml` in a fresh run directory and samples, every second,
the memory of the command and every process it starts (driver, raylet, GCS, Ray workers, Train workers,
Data actors), summed two ways: PSS (proportional set size: a page shared by n processes counts 1/n in
each, so the sum is the memory really used) and RSS (every shared page counted in every process that maps
it, e.g. torch's libraries in each Ray worker: an upper bound). The target applies to PSS.
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
from calibration import calibration_line

ROOT = Path(__file__).resolve().parents[1]
TARGET_S, TARGET_GIB = 15 * 60, 8.0


def tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(summed PSS, summed RSS) of a process and all its descendants."""
    pss = rss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            pss += info.pss
            rss += info.rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pss, rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/bench-quickstart")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    run_dir = ROOT / args.run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "alignment"), "run", "--config", "configs/quickstart.yaml",
           f"run_dir={run_dir}", *args.overrides]
    print(calibration_line(), "(before)", flush=True)
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak_pss = peak_rss = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_pss, peak_rss
        while not done.is_set():
            try:
                pss, rss = tree_memory(ps)
            except psutil.NoSuchProcess:
                break
            peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
            time.sleep(1.0)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    done.set()
    t.join()
    wall = time.time() - started
    gib, rss_gib = peak_pss / 2**30, peak_rss / 2**30
    print(f"quickstart: exit {proc.returncode}, wall {wall:.0f} s (target < {TARGET_S} s, "
          f"ratio {wall / TARGET_S:.2f}), peak memory {gib:.2f} GiB PSS (target < {TARGET_GIB} GiB, "
          f"ratio {gib / TARGET_GIB:.2f}); summed RSS, an upper bound: {rss_gib:.2f} GiB")
    print(calibration_line(), "(after)")
    if proc.returncode:
        print(err[-3000:], file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
