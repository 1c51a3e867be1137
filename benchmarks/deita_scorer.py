"""Benchmark (c): Deita's complexity and quality scores, batched, against the reference's one-row-at-a-time way.

    .venv/bin/python benchmarks/deita_scorer.py [--rows 2000] [--model smollm2-135m-instruct] [--batch-size 8]

SmolLM2-135M-Instruct stands in for the 7B Deita scorers (the method does not depend on the model). The rows
are real instruction data from ../shared/data/sft, taken in turn from Alpaca and Evol-Instruct (``--files 3``
adds LIMA), so any ``--rows`` has the same mix of short and long rows.
Every row gets a complexity and a quality score per turn. Measured in one process, on the same rows:
- batched: :class:`alignment.select.scorers.deita.CausalLMScorer`, one forward pass per batch of length-sorted prompts,
  the output head on the last real token only;
- per row: the reference's way, a two-token greedy ``generate`` per prompt, the first step's scores;
then rows/s of each, the ratio, and the largest difference between the two scores (target: < 1e-3).
``--reference-every N`` runs the per-row way on every N-th row only (a strided sample with the same mix of
sources; its rate is measured on those rows, the scores compared on them, and the script says so).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignment import formats, models  # noqa: E402
from alignment.select.scorers import deita  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "sft"
FILES = ["alpagasus_alpaca_1k.json", "evol_instruct_1k.json", "lima_1k.json"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--files", type=int, default=2, help="how many of Alpaca, Evol-Instruct, LIMA to draw from")
    ap.add_argument("--reference-every", type=int, default=1, help="per-row way on every N-th row only")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batch-tokens", type=int, default=None,
                    help="padded tokens per batch at most (default: the scorer's, 2048 on CPU, none on GPU; 0: none)")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the scorer's weights (both ways use the same model)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    per_file = [[g["messages"] for g in formats.read_rows(str(DATA / name), "sft")[0]] for name in FILES[:args.files]]
    rows = [r for group in zip(*per_file) for r in group][:args.rows]  # round-robin: the same mix at any size
    path = models.resolve(args.model)
    plans = [deita.deita_prompts(m) for m in rows]
    prompts = [p for c, q in plans for p in c + q]
    print(f"{len(rows)} rows, {len(prompts)} prompts (complexity + quality per turn), model {args.model}, "
          f"device {args.device} ({args.dtype}), torch threads {torch.get_num_threads()}")

    scorer = deita.CausalLMScorer(path, args.max_length, args.batch_size, args.device, args.dtype,
                                    batch_tokens=args.batch_tokens)
    scorer.score(prompts[:4])  # warm-up
    t = time.perf_counter()
    scored = deita.deita_scores(rows, scorer, scorer)  # what the select stage's actors run
    fast_s = time.perf_counter() - t
    reasons = [r["error"] for r in scored]
    n_tokens = sum(min(len(scorer.encode(p)), args.max_length) for p in prompts)
    print(f"batched (batch {args.batch_size}): {fast_s:.1f} s, {len(rows) / fast_s:.1f} rows/s, "
          f"{n_tokens / fast_s:.0f} prompt tokens/s; unscored rows: {sum(r is not None for r in reasons)}")

    sample = list(range(0, len(rows), args.reference_every))
    n_ref = len(sample)
    ref_prompts = [p for j in sample for p in plans[j][0] + plans[j][1]]
    fast_sample = [x for j in sample for x in scored[j]["deita_complexity"] + scored[j]["deita_quality"]]
    model, tok = scorer.model, scorer.tok
    deita.reference_expected_score(model, tok, ref_prompts[0], scorer.ids)  # warm-up
    t = time.perf_counter()
    ref: list[float | None] = []
    for p in ref_prompts:
        ref.append(None if len(scorer.encode(p)) > args.max_length else
                   deita.reference_expected_score(model, tok, p, scorer.ids))
    ref_s = time.perf_counter() - t
    which = "" if n_ref == len(rows) else f", every {args.reference_every}th row ({n_ref} rows)"
    print(f"per row (two-token generate){which}: {ref_s:.1f} s, {n_ref / ref_s:.1f} rows/s")

    pairs = [(a, b) for a, b in zip(fast_sample, ref) if a is not None and b is not None]
    diff = max(abs(a - b) for a, b in pairs) if pairs else float("nan")
    same_nulls = all((a is None) == (b is None) for a, b in zip(fast_sample, ref))
    ratio = (len(rows) / fast_s) / (n_ref / ref_s)
    print(f"speed-up: {ratio:.1f}x rows/s (target >= 3x on CPU); max |batched - per-row| = {diff:.2e} over "
          f"{len(pairs)} prompts (target < 1e-3); same unscored prompts: {same_nulls}")
    ok = [r["score_deita_evol"] for r in scored if r["score_deita_evol"] is not None]
    print(f"evol scores: {len(ok)} rows, mean {np.mean(ok):.2f}, min {min(ok):.2f}, max {max(ok):.2f}")
    return 0 if diff < 1e-3 and same_nulls else 1


if __name__ == "__main__":
    raise SystemExit(main())
