"""Benchmark: bf16 training throughput and model FLOPs utilisation on one GPU, and the FSDP2 check.

    python benchmarks/gpu_train.py [--models smollm2-135m llama-1b] [--methods sft dpo] [--steps 20]
    torchrun --nproc_per_node N benchmarks/gpu_train.py --strategy fsdp ...

Runs ``alignment.train.build_trainer``, the code the sft and pref stages run inside each Ray Train worker, in
this process without Ray (Ray's own overhead is measured on CPU by ``train_throughput.py``), with the settings a
GPU worker gets: bf16 weights, activation checkpointing on unless ``--no-checkpointing``, and with ``--strategy
fsdp`` the FSDP2 arguments of ``alignment.train.trainer._device_args`` (launch through torchrun, which sets up the
process group as Ray Train does). Models are random-initialised from a config, since the weights do not change
the arithmetic: ``smollm2-135m`` is SmolLM2-135M-Instruct's config and tokenizer (``--smollm2-dir``, default the
cached checkpoint), ``llama-1b`` a Llama with Llama-3.2-1B's shape (2048 wide, 16 layers, 32 heads, 8 KV heads,
8192 MLP) and SmolLM2's 49,152-token vocabulary.

Tokens are the real (unpadded) tokens the policy trains on (the stage's ``tokens_per_second``), steady after
``--warmup`` steps. Model FLOPs per token: 6 N + 12 L d S (N: the weights of every matrix product, the output
head included, the input embedding not; L layers, d width, S the mean row length: the attention scores, as in
PaLM's MFU), and for DPO one more forward of the reference, 2 N + 4 L d S. Activation checkpointing's
recomputed forward is not counted (model FLOPs, not hardware FLOPs). MFU is that rate over the bf16 matrix
product rate measured in the same process (8192^3, the ceiling this card really reaches) and over the
datasheet's 989 TFLOP/s (H100 SXM, dense bf16).

With ``--strategy fsdp`` each run also reports what FSDP2 did to the weights: how many parameters are DTensors,
their placements, and the numbers of elements this rank holds against the whole model's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from alignment import formats, train  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
DATASHEET_TFLOPS = 989.0  # H100 SXM, dense bf16
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def say(*a) -> None:
    if rank() == 0:
        print(*a, flush=True)


def make_model(name: str, smollm2_dir: Path, out: Path) -> Path:
    """A random-initialised checkpoint of the named shape, with SmolLM2's tokenizer and chat template."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if name == "smollm2-135m":
        config = AutoConfig.from_pretrained(smollm2_dir)
    elif name == "llama-1b":
        config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=49152, max_position_embeddings=8192,
                             rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    else:
        raise SystemExit(f"unknown model {name!r}")
    target = out / name
    if rank() == 0 and not (target / "config.json").exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(target)
        for f in TOKENIZER_FILES:
            if (smollm2_dir / f).exists():
                shutil.copy(smollm2_dir / f, target / f)
        del model
    if "WORLD_SIZE" in os.environ:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        dist.barrier()
    return target


def matmul_flops(model) -> tuple[int, int, int]:
    """(N, layers, width): N counts the weights of every matrix product a token goes through, the output head
    included (tied or not), the input embedding table not."""
    cfg = model.config
    emb = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())  # a tied head is counted once, as the embedding
    head = cfg.vocab_size * cfg.hidden_size
    return total - emb + head, cfg.num_hidden_layers, cfg.hidden_size


def measured_peak() -> float:
    """bf16 dense matrix-product TFLOP/s on this card: median of 20 timed 8192^3 products after warm-up."""
    import torch

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    times.sort()
    return 2 * n ** 3 / times[len(times) // 2] / 1e12


def shard_facts(model) -> dict:
    """What FSDP2 did to the weights on this rank."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    dt = [p for p in params if isinstance(p, DTensor)]
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    full = sum(p.numel() for p in params)
    return {"params": len(params), "dtensor_params": len(dt),
            "placements": sorted({str(p.placements) for p in dt}),
            "mesh_size": dt[0].device_mesh.size() if dt else None,
            "local_elements": local, "full_elements": full, "param_dtype": str(params[0].dtype)}


def ShardFacts(trainer, box: dict):
    """A callback that records, after the first step, what FSDP2 did to the trainer's weights."""
    from transformers import TrainerCallback

    class S(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == 1:
                box["shards"] = shard_facts(trainer.model)

    return S()


def Profile(warmup: int, gpu: bool):
    """A callback that profiles steps warmup+1 .. warmup+3 and prints the top operators and Python functions."""
    import cProfile
    import pstats

    import torch
    from transformers import TrainerCallback

    class P(TrainerCallback):
        prof = py = t0 = None

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == warmup:
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
                self.py = cProfile.Profile()
                self.py.enable()
                self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == warmup + 3 and self.prof is not None:
                if gpu:
                    torch.cuda.synchronize()
                wall = time.perf_counter() - self.t0
                self.py.disable()
                self.prof.__exit__(None, None, None)
                events = self.prof.key_averages()
                say(f"--- profile of 3 steps: wall {wall:.2f} s")
                if gpu:
                    kernel = sum(e.self_device_time_total for e in events) / 1e6
                    say(f"GPU kernel time {kernel:.2f} s ({kernel / wall:.0%} of wall)")
                    say(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=50))
                say(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))
                if rank() == 0:
                    pstats.Stats(self.py).sort_stats("cumulative").print_stats(35)
                self.prof = None

    return P()


def steady(history: list[dict], warmup: int) -> tuple[float, int, float]:
    """(tokens/s, tokens, seconds) over the logged steps after ``warmup``."""
    prev, tok, sec = 0.0, 0.0, 0.0
    for h in history:
        if "loss" not in h:
            continue
        delta, prev = h["tokens"] - prev, h["tokens"]
        if h["step"] > warmup and h["tokens_per_second"] > 0:
            tok += delta
            sec += delta / h["tokens_per_second"]
    return tok / sec, int(tok), sec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "llama-1b"])
    ap.add_argument("--methods", nargs="+", default=["sft", "dpo"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--strategy", choices=["auto", "fsdp"], default="auto")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--smollm2-dir", default=str(Path.home() / ".cache/alignment/models/smollm2-135m-instruct"))
    ap.add_argument("--profile", action="store_true",
                    help="profile 3 steps after the warm-up (torch.profiler, cProfile): where the time goes")
    ap.add_argument("--cpu-smoke-test", action="store_true", help="run on CPU in float32 to check the script")
    ap.add_argument("--json", help="append one JSON line per run to this file")
    args = ap.parse_args()

    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.cpu_smoke_test:
        raise SystemExit("gpu_train.py measures a GPU; none is visible (CUDA unavailable); --cpu-smoke-test checks "
                         "the script on CPU")
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    peak = measured_peak() if gpu else 1.0
    device = torch.cuda.get_device_name() if gpu else "CPU (smoke test: figures mean nothing)"
    say(f"{device}: bf16 matrix product {peak:.0f} TFLOP/s measured (datasheet {DATASHEET_TFLOPS:.0f}); torch "
        f"{torch.__version__}; strategy {args.strategy}, world size {os.environ.get('WORLD_SIZE', '1')}, "
        f"activation checkpointing {not args.no_checkpointing}")
    sft_rows = [r for name in ("alpagasus_alpaca_1k.json", "evol_instruct_1k.json", "lima_1k.json")
                for r in formats.read_rows(str(DATA / "sft" / name), "sft")[0]]
    pairs = formats.read_rows(str(DATA / "preferences" / "hh_rlhf_harmless_base_test.jsonl.gz"), "preference")[0]
    base = {"per_device_batch_size": args.batch_size, "gradient_accumulation_steps": 1, "learning_rate": 1e-5,
            "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "logging_steps": 1, "max_length": args.max_length,
            "save_only_model": True, "gradient_checkpointing": not args.no_checkpointing, "lora": None, "seed": 0,
            "use_gpu": gpu, "strategy": args.strategy, "max_steps": args.warmup + args.steps}
    per_method = {"sft": ({**base, "assistant_only_loss": True, "packing": False}, sft_rows),
                  "dpo": ({**base, "params": {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0,
                                              "precompute_ref_log_probs": False}}, pairs)}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows_needed = args.batch_size * (args.warmup + args.steps) * world
    say(f"{len(sft_rows)} SFT rows (Alpaca, Evol-Instruct, LIMA), {len(pairs)} HH-RLHF pairs; {args.steps} steps "
        f"of {args.batch_size} rows per device after {args.warmup} warm-up steps, max_length {args.max_length}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = make_model(name, Path(args.smollm2_dir), Path(tmp))
            for method in args.methods:
                settings, rows = per_method[method]
                rows = (rows * (rows_needed // len(rows) + 1))[:rows_needed]
                rows = [{**r, "id": f"{r['id']}#{i}"} for i, r in enumerate(rows)]
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                trainer = train.build_trainer(method, rows, str(path), settings, str(Path(tmp) / f"{name}-{method}"))
                facts_box: dict = {}
                if args.strategy == "fsdp":
                    trainer.add_callback(ShardFacts(trainer, facts_box))
                if args.profile:
                    trainer.add_callback(Profile(args.warmup, gpu))
                trainer.train()
                wall = time.perf_counter() - t
                rate, tokens, _ = steady(trainer.state.log_history, args.warmup)
                n, layers, width = matmul_flops(trainer.accelerator.unwrap_model(trainer.model))
                mean_len = tokens / (args.steps * args.batch_size * world * (2 if method == "dpo" else 1))
                per_token = 6 * n + 12 * layers * width * mean_len
                if method == "dpo":
                    per_token += 2 * n + 4 * layers * width * mean_len  # the reference model's forward
                tflops = rate * per_token / 1e12
                losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
                facts = train.run_facts(trainer)
                result = {"model": name, "method": method, "params_matmul": n, "tokens_per_second": rate,
                          "tokens": tokens, "mean_row_tokens": mean_len, "model_tflops": tflops,
                          "mfu_measured_peak": tflops / peak, "mfu_datasheet": tflops / DATASHEET_TFLOPS,
                          "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if gpu else 0.0,
                          "wall_s": wall,
                          "first_loss": losses[0], "last_loss": losses[-1], "facts": facts, **facts_box,
                          "checkpointing": not args.no_checkpointing, "batch_size": args.batch_size,
                          "max_length": args.max_length, "steps": args.steps, "peak_tflops": peak}
                say(f"{name} {method}: {rate:,.0f} tokens/s, {tflops:.1f} model TFLOP/s, MFU {tflops / peak:.1%} of "
                    f"measured peak ({tflops / DATASHEET_TFLOPS:.1%} of datasheet); N {n / 1e6:.0f}M, mean row "
                    f"{mean_len:.0f} tokens; peak memory {result['peak_memory_gib']:.1f} GiB; loss "
                    f"{losses[0]:.3f} -> {losses[-1]:.3f}; facts {facts}"
                    + (f"; shards {facts_box.get('shards')}" if args.strategy == "fsdp" else ""))
                if args.json and rank() == 0:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(result) + "\n")
                if args.strategy == "fsdp":
                    ok &= facts["strategy"] == "fsdp2" and bool(facts_box.get("shards", {}).get("dtensor_params"))
                del trainer
                if gpu:
                    torch.cuda.empty_cache()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
