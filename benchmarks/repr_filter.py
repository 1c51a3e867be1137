"""Benchmark (b): Deita's repr filter choosing k rows from a pool of near-duplicate clusters.

    .venv/bin/python benchmarks/repr_filter.py [--rows 1000000] [--clusters 10000] [--k 10000] [--sample 20000]

The pool: `--clusters` random directions in 384 dimensions, each row a noisy copy of one of them, so two rows
of a cluster have cosine about 0.95 (tau = 0.9 rejects them) and the scan must run deep to find k distinct
clusters. Rows are in score order (random scores). Measured in one process:
- the fast filter on the whole pool (time, peak memory of the process);
- on the first `--sample` rows, the fast filter and the per-row rule (the reference's way: each candidate
  against every kept row): both times, the ratio, and whether they selected the same ids;
- the per-row rule's time on the whole pool, extrapolated from its sample rate per (candidate x kept row)
  similarity, since running it would take hours.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment.select import diversity  # noqa: E402


def make_pool(rows: int, clusters: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = diversity.normalise(rng.standard_normal((clusters, dim), dtype=np.float32))
    sigma = np.sqrt(1 / 0.95 - 1)  # cos(member, member) ~ 1 / (1 + sigma^2) = 0.95
    out = np.empty((rows, dim), dtype=np.float32)
    labels = rng.integers(0, clusters, rows)  # a random cluster per row: rows already in (random) score order
    for s in range(0, rows, 100_000):
        n = min(100_000, rows - s)
        noise = rng.standard_normal((n, dim), dtype=np.float32) * np.float32(sigma / np.sqrt(dim))
        out[s:s + n] = diversity.normalise(centres[labels[s:s + n]] + noise)
    return out, labels


def pairs_compared(kept_after_each: np.ndarray) -> int:
    """Similarities the per-row rule computes: each candidate against every row kept before it."""
    return int(kept_after_each.sum())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--clusters", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--tau", type=float, default=0.9)
    ap.add_argument("--sample", type=int, default=40_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t = time.perf_counter()
    pool, labels = make_pool(args.rows, args.clusters, args.dim, args.seed)
    print(f"pool: {args.rows:,} x {args.dim} float32 ({pool.nbytes / 2**30:.2f} GiB), {args.clusters:,} clusters, "
          f"made in {time.perf_counter() - t:.1f} s")
    first: dict[int, int] = {}
    same = []
    for i, c in enumerate(labels[:200_000].tolist()):
        if c in first and len(same) < 2000:
            same.append((first[c], i))
        first.setdefault(c, i)
    cos = np.array([pool[a] @ pool[b] for a, b in same])
    print(f"cosine of two rows of one cluster: mean {cos.mean():.3f}, min {cos.min():.3f} ({len(cos)} pairs); "
          f"tau = {args.tau}")

    t = time.perf_counter()
    fast = diversity.repr_filter(pool, args.k, args.tau)
    fast_s = time.perf_counter() - t
    last = fast[-1] if fast else 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"fast filter, full pool: {len(fast):,} rows kept in {fast_s:.1f} s (scan stopped at row {last + 1:,}); "
          f"process peak RSS {peak:.2f} GiB, of which the pool is {pool.nbytes / 2**30:.2f} GiB")

    sample = pool[:args.sample]
    t = time.perf_counter()
    fast_sample = diversity.repr_filter(sample, args.k, args.tau)
    fast_sample_s = time.perf_counter() - t
    t = time.perf_counter()
    slow_sample = diversity.repr_filter_reference(sample, args.k, args.tau)
    slow_sample_s = time.perf_counter() - t
    same = fast_sample == slow_sample
    print(f"sample of {args.sample:,} rows: per-row rule {slow_sample_s:.1f} s, fast {fast_sample_s:.2f} s, "
          f"ratio {slow_sample_s / fast_sample_s:.0f}x; same {len(fast_sample):,} ids: {same}")

    # Extrapolate the per-row rule to the full scan: its cost is one similarity per (candidate, kept row).
    def work(kept: list[int], scanned: int) -> int:
        counts = np.zeros(scanned, dtype=np.int64)
        kept_arr = np.asarray(kept)
        # number of kept rows before each candidate = how many kept positions are < candidate position
        counts[:] = np.searchsorted(kept_arr, np.arange(scanned), side="left")
        return pairs_compared(counts[1:])

    rate = work(slow_sample, min(len(sample), (slow_sample[-1] + 1) if len(slow_sample) == args.k else len(sample)))
    rate = rate / slow_sample_s
    full_work = work(fast, last + 1)
    est = full_work / rate
    print(f"per-row rule on the full pool, extrapolated from its sample rate ({rate / 1e6:.0f}M similarities/s): "
          f"{est:,.0f} s ({est / 3600:.1f} h); fast filter {fast_s:.1f} s, ratio {est / fast_s:.0f}x")
    print(f"targets: full pool under 30 s: {fast_s < 30}; at least 100x the per-row rule on the sample: "
          f"{slow_sample_s / fast_sample_s >= 100}; same ids: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
