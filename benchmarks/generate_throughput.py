"""Benchmark: generation tokens/s on CPU, batched against one prompt at a time, on the generate stage's own path.

    .venv/bin/python benchmarks/generate_throughput.py [--prompts 16] [--max-new-tokens 64] [--batch-sizes 1 4 8 16]
        [--single-prompts 4]

The transformers backend of ``alignment.evaluate.generate`` runs Ray Data actors of ``HFGenerator`` over
batches of the prompts, sorted by length. Ray's start and the actors' model loading are not generation, so this
measures the path inside the actor, in this process: one ``HFGenerator`` (the model loaded once, torch on
``--threads`` threads), called on pyarrow batches exactly as ``map_batches`` calls it, over the same
length-sorted prompts, once per batch size (1: one prompt at a time; 8: ``generate.batch_size``'s default).
One prompt at a time is slow on CPU, so batch size 1 runs on ``--single-prompts`` of them only (spread over the
lengths; 0: all): tokens/s is a rate, compared as such.
Tokens are the answers' real new tokens (``num_new_tokens``: up to and with the stop token), not the padding a
batch goes on generating for its finished rows. Greedy decoding, so every setting writes the same answers, up to
the small float differences that padding makes (the count of answers that differ from one-at-a-time is printed).

Model: SmolLM2-135M-Instruct (``alignment.models.resolve``: converted from the GGUF wheel into the cache the
first time). Prompts: the first ``--prompts`` of ../shared/data/eval_prompts/vicuna_test_set.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from calibration import calibration_line  # noqa: E402  (benchmarks/calibration.py)

from alignment import formats, models  # noqa: E402
from alignment.evaluate.generate import HFGenerator  # noqa: E402

PROMPTS = ROOT.parent / "shared" / "data" / "eval_prompts" / "vicuna_test_set.jsonl"


def run(gen: HFGenerator, rows: list[dict], batch_size: int) -> tuple[float, int, dict[str, str]]:
    """(seconds, new tokens, answers by id) of the rows in batches of ``batch_size``, as the actor gets them."""
    import pyarrow as pa

    answers: dict[str, str] = {}
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        out = gen(pa.Table.from_pylist(rows[i:i + batch_size])).to_pylist()
        tokens += sum(r["num_new_tokens"] for r in out)
        answers.update((r["id"], r["answer"]) for r in out)
    return time.perf_counter() - start, tokens, answers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--single-prompts", type=int, default=4, help="prompts batch size 1 runs on (0: all)")
    args = ap.parse_args()

    print(calibration_line())
    t = time.perf_counter()
    path = models.resolve(args.model)
    print(f"model {args.model} at {path} (resolved in {time.perf_counter() - t:.1f} s)")
    prompts = formats.read_rows(str(PROMPTS), "eval")[0][:args.prompts]
    # The rows as _generate_transformers hands them to the actors: shortest first, greedy (temperature 0).
    prompts.sort(key=lambda p: sum(len(m["content"]) for m in p["messages"]))
    rows = [{"id": p["id"], "messages": p["messages"], "temperature": 0.0, "seed": 0} for p in prompts]

    t = time.perf_counter()
    gen = HFGenerator(path, args.max_new_tokens, args.threads, use_gpu=False)
    print(f"HFGenerator (the generate actor, in this process) loaded in {time.perf_counter() - t:.1f} s; "
          f"{len(rows)} prompts, max_new_tokens {args.max_new_tokens}, torch threads {args.threads}")
    run(gen, rows[:2], 2)  # warm-up: the first generate call pays one-off costs

    results: dict[int, tuple[float, int, dict[str, str]]] = {}
    single = args.single_prompts
    for b in args.batch_sizes:
        some = rows[::-(-len(rows) // single)] if b == 1 and 0 < single < len(rows) else rows
        results[b] = run(gen, some, b)
        seconds, tokens, _ = results[b]
        print(f"batch size {b:>3}: {tokens} new tokens ({len(some)} prompts) in {seconds:.1f} s, "
              f"{tokens / seconds:.1f} tokens/s (load average {os.getloadavg()[0]:.2f})")
    base = min(results)
    b_seconds, b_tokens, b_answers = results[base]
    for b, (seconds, tokens, answers) in results.items():
        if b != base:
            differ = sum(answers[i] != b_answers[i] for i in b_answers)
            print(f"batch size {b} / batch size {base}: {(tokens / seconds) / (b_tokens / b_seconds):.2f}x tokens/s; "
                  f"{differ} of the {len(b_answers)} answers both wrote differ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
