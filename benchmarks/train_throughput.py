"""Benchmark: training tokens/s under Ray Train (one worker) against plain TRL in this process.

    .venv/bin/python benchmarks/train_throughput.py [--model smollm2-135m-instruct] [--steps 10] [--methods sft dpo]

Same model, same rows, same settings, same machine, in one run: for each method, the trainer is built by
``alignment.train.build_trainer`` and trained once in this process, then once through ``alignment.train.fit``
(a Ray Train ``TorchTrainer`` with one worker holding every CPU of the local Ray). Tokens are the real
(unpadded) tokens the model forwards in training (the stage's own ``tokens_per_second`` metric); the steady
rate leaves out the first ``--warmup`` steps. Wall time counts everything each way (Ray: starting the worker
group, loading the model in the worker, reporting the checkpoint). Target: Ray's steady-state overhead at most
10% with one worker.

Data: Alpaca rows from ../shared/data/sft (SFT) and HH-RLHF pairs from ../shared/data/preferences (DPO).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from alignment import formats, models, train  # noqa: E402
from alignment.config import ResourcesConfig  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def steady_rate(history: list[dict], warmup: int) -> tuple[float, int]:
    """Tokens/s over the logged steps after ``warmup``: their tokens over their time (from each step's rate)."""
    logs = [h for h in history if "loss" in h]
    tokens_time = []
    prev = 0.0
    for h in logs:
        delta = h["tokens"] - prev
        prev = h["tokens"]
        if h["step"] > warmup and h["tokens_per_second"] > 0:
            tokens_time.append((delta, delta / h["tokens_per_second"]))
    tok = sum(t for t, _ in tokens_time)
    return tok / sum(s for _, s in tokens_time), int(tok)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--methods", nargs="+", default=["sft", "dpo"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    args = ap.parse_args()

    import ray
    import torch

    from alignment.ray_env import ensure_ray

    path = models.resolve(args.model)
    sft_rows = formats.read_rows(str(DATA / "sft" / "alpagasus_alpaca_1k.json"), "sft")[0][:400]
    pairs = formats.read_rows(str(DATA / "preferences" / "hh_rlhf_harmless_base_test.jsonl.gz"), "preference")[0][:400]
    settings = {"max_steps": args.steps, "per_device_batch_size": args.batch_size, "gradient_accumulation_steps": 1,
                "learning_rate": 1e-5, "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "logging_steps": 1,
                "max_length": args.max_length, "save_only_model": True, "gradient_checkpointing": False,
                "lora": None, "seed": 0}
    per_method = {"sft": ({**settings, "assistant_only_loss": True, "packing": False}, sft_rows),
                  "dpo": ({**settings, "params": {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0,
                                                  "precompute_ref_log_probs": False}}, pairs)}
    torch.set_num_threads(args.cpus)
    print(f"model {args.model}, {args.steps} steps of {args.batch_size} rows (max_length {args.max_length}), "
          f"{args.cpus} CPUs, torch threads {torch.get_num_threads()}; steady rate after step {args.warmup}")
    ensure_ray(num_cpus=args.cpus)
    results = []
    for method in args.methods:
        s, rows = per_method[method]
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            trainer = train.build_trainer(method, rows, path, {**s, "use_gpu": False}, str(Path(tmp) / "plain"))
            trainer.train()
            trainer.save_model(str(Path(tmp) / "plain" / "final"))
            plain_wall = time.perf_counter() - t
            plain_rate, plain_tokens = steady_rate(trainer.state.log_history, args.warmup)
            del trainer

            t = time.perf_counter()
            run = train.fit(method, rows, path, s, [args.steps], str(Path(tmp) / "ray"),
                            ResourcesConfig(num_workers=1, cpus_per_worker=float(args.cpus)))
            ray_wall = time.perf_counter() - t
            ray_rate, ray_tokens = steady_rate(run["history"], args.warmup)
        overhead = 1 - ray_rate / plain_rate
        results.append(overhead)
        print(f"{method}: plain TRL {plain_rate:,.0f} tokens/s ({plain_tokens:,} tokens, wall {plain_wall:.1f} s); "
              f"Ray Train 1 worker {ray_rate:,.0f} tokens/s ({ray_tokens:,} tokens, wall {ray_wall:.1f} s, "
              f"strategy {run['facts'].get('strategy')}); ratio {ray_rate / plain_rate:.3f}, steady overhead "
              f"{overhead:+.1%} (target <= 10%); wall overhead {ray_wall - plain_wall:+.1f} s")
    ray.shutdown()
    return 0 if all(o <= 0.10 for o in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
