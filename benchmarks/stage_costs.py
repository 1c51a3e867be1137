"""Benchmark: the fixed and the per-step cost of each stage, and the phases of their fixed cost.

    .venv/bin/python benchmarks/stage_costs.py [--model tiny | smollm2-135m-instruct] [--steps 4]
        [--stages sft dpo heldout generate] [--new-tokens 16] [--prompts 12] [--no-compare]

A search trial runs select -> sft -> pref -> generate -> judge; on a small model most of a stage's time is not its
work but its start: a Ray Train worker group, a fresh process importing torch, transformers and TRL, the model
loaded, the rows tokenized, a checkpoint saved and copied, a Ray task or Ray Data actors for the held-out scoring
and the generation. This runs each stage's own code on the quickstart's settings (``configs/quickstart.yaml``:
its SFT and DPO batch, lengths and rates, its generate section, 16 held-out pairs) and data (``examples/data``):

- ``sft`` and ``dpo``: ``alignment.train.fit`` (Ray Train, one worker, the quickstart's resources) for 1 step and
  for ``--steps`` steps, one checkpoint at the last step (DPO starts from the model itself). Per step:
  (wall(N) - wall(1)) / (N - 1); fixed: wall(1) - per step. The phases come from ``fit``'s facts
  (``timings``: spawn, boot, imports, load, tokenization, trainer set-up, train, save, report, end);
- ``heldout``: the held-out margin of the DPO checkpoint against its start on 16 pairs as the pref stage scores it
  (``alignment.evaluate.heldout.heldout`` in a Ray task with a training worker's CPUs); then the same task with the
  run's log-probabilities cache empty and full (what an SFT checkpoint alone costs once a preference run from it
  and another checkpoint's have scored its and model.base's);
- ``generate``: ``alignment.evaluate.generate.generate`` (Ray Data actors of the generate section) on ``--prompts``
  eval prompts with 1 and with ``--new-tokens`` new tokens; per token: the difference over the extra tokens. Its
  fixed part is split by running the same ``map_batches`` actor pool with probe actors: one that does nothing
  (Ray Data and the actor's process), one that imports torch and transformers' model class (imports), the model
  loaded in that probe (load).

Before and after the cuts, in one run: every fit runs twice, interleaved (so both arms see the same load), once as
``train.fit`` is and once as it was before (``--no-compare``: only as it is): Ray Train's ``TorchTrainer`` with
all its default callbacks (a DatasetManager and a placement-group cleaner actor), the controller's defaults (2 s
status polls, a preemption watcher actor) and each checkpoint copied into storage rather than moved; the held-out
scores as a Ray task after the fit against ``fit(heldout_rows=...)`` scoring them in the training worker. The
losses and the held-out margins of both arms are printed: they must be the same.

Every figure is wall time on this machine, printed with the calibration line (``benchmarks/calibration.py``);
figures of one run compare with each other, not with another machine's. Default model: the tests' tiny random
2-layer Llama (``tests/conftest.py``), where nearly all of a stage is fixed cost; ``--model
smollm2-135m-instruct`` for the quickstart's model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # conftest.make_tiny_model
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

from calibration import calibration_line  # noqa: E402  (benchmarks/calibration.py)

from alignment import formats, models, train  # noqa: E402
from alignment.config import load_config  # noqa: E402

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
TRAIN_PHASES = ("spawn_s", "boot_s", "import_s", "load_s", "tokenize_s", "trainer_init_s", "train_s", "eval_s",
                "save_s", "report_s", "heldout_s", "end_s")


def line(label: str, seconds: float, note: str = "") -> None:
    print(f"  {label:<34} {seconds:8.2f} s  {note}")


class EmptyProbe:
    """A Ray Data actor that does nothing: what Ray Data and a fresh actor process cost."""

    def __init__(self, **_):
        pass

    def __call__(self, batch):
        return batch


class ImportProbe:
    """A Ray Data actor that imports what the generate actor imports, then loads the model: the seconds of each
    come back as columns."""

    def __init__(self, model_path: str, threads: int, **_):
        t = time.perf_counter()
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(model_path))]
        self.import_s = time.perf_counter() - t
        torch.set_num_threads(threads)
        t = time.perf_counter()
        models.load_for_generation(model_path, False)
        self.load_s = time.perf_counter() - t

    def __call__(self, batch):
        import pyarrow as pa

        n = batch.num_rows
        return pa.table({"import_s": [self.import_s] * n, "load_s": [self.load_s] * n})


def probe(actor_cls, path: str, prompts: list[dict], g) -> tuple[float, list[dict]]:
    import ray

    from alignment.ray_env import actor_pool, actor_threads

    t = time.perf_counter()
    ds = ray.data.from_items([{"id": p["id"]} for p in prompts]).map_batches(
        actor_cls, fn_constructor_kwargs={"model_path": path, "threads": actor_threads(g)},
        batch_size=g.batch_size, batch_format="pyarrow", **actor_pool(g))
    rows = ds.take_all()
    return time.perf_counter() - t, rows


def fixed_and_step(w1: float, wn: float, n: int) -> tuple[float, float]:
    step = (wn - w1) / (n - 1)
    return w1 - step, step


def legacy_train_loop(job: dict) -> dict:
    """The worker's function of the 'before' arm: Ray Train's own checkpoint upload (a copy into storage) instead
    of the move. Defined here, it travels to the worker by value, and the patch applies in the worker's process."""
    from alignment.train import callbacks, run

    def copy_to_storage(checkpoint, name):
        import ray.train

        return ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, name)

    callbacks.move_to_storage = copy_to_storage
    return run.train_loop(job)


@contextmanager
def before_cuts():
    """``train.fit`` as it was before the cuts: Ray Train's TorchTrainer with every default callback (a
    DatasetManager actor), its controller's default settings (2 s status polls, the preemption watcher) and a
    checkpoint copied into storage."""
    import contextlib

    from ray.train.torch import TorchTrainer

    from alignment.train import run

    saved = run._trainer_class, run._controller_env, run.train_loop
    run._trainer_class, run._controller_env, run.train_loop = (lambda: TorchTrainer), contextlib.nullcontext, \
        legacy_train_loop
    try:
        yield
    finally:
        run._trainer_class, run._controller_env, run.train_loop = saved


def one_fit(method, rows, path, cfg, n, storage, arm, held=None) -> dict:
    section = cfg.sft if method == "sft" else cfg.pref
    settings = {**train.train_settings(section, cfg.seed, method), "max_steps": n}
    ctx = before_cuts() if arm == "before" else nullcontext()
    t = time.perf_counter()
    with ctx:
        run = train.fit(method, rows, path, settings, [n], str(storage / f"{method}{n}-{arm}"), cfg.resources,
                        cfg.model.chat_template, heldout_rows=held if arm == "after" else None)
    return {"wall": time.perf_counter() - t, "timings": run["facts"].get("timings", {}), "run": run}


def bench_train(method: str, rows: list[dict], path: str, cfg, steps: int, storage: Path, arms: list[str],
                held: list[dict] | None = None) -> dict:
    """Each arm's fit of 1 and ``steps`` steps, interleaved (before, after, before, after): the same load on the
    machine for both. ``held``: the after arm's ``steps``-step fit scores them in its worker."""
    out: dict = {arm: {} for arm in arms}
    for n in (1, steps):
        for arm in arms:
            out[arm][n] = one_fit(method, rows, path, cfg, n, storage, arm, held if n == steps else None)
    for arm in arms:
        o = out[arm]
        fixed, step = fixed_and_step(o[1]["wall"], o[steps]["wall"], steps)
        ratio = fixed / step if step > 0 else float("inf")
        print(f"{method} [{arm}]: 1 step {o[1]['wall']:.1f} s, {steps} steps {o[steps]['wall']:.1f} s -> fixed "
              f"{fixed:.1f} s, per step {step:.2f} s; fixed / per step = {ratio:.0f}")
        t1 = o[1]["timings"]
        for k in TRAIN_PHASES:
            if k in t1 or k in o[steps]["timings"]:
                per = o[steps]["timings"].get(k)
                line(k, t1.get(k, 0.0), f"({steps} steps: {per:.2f} s)" if per is not None else "")
        rest = o[1]["wall"] - sum(t1.get(k, 0.0) for k in TRAIN_PHASES)
        line("(not in a phase)", rest)
        losses = [h["loss"] for h in o[steps]["run"]["history"] if "loss" in h]
        print(f"  losses ({steps} steps): {json.dumps([round(x, 6) for x in losses])}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny (the tests' random 2-layer Llama) or a registry name")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--stages", nargs="+", default=["sft", "dpo", "heldout", "generate"])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--no-compare", dest="compare", action="store_false",
                    help="only the current code (default: each fit also as before the cuts, interleaved)")
    args = ap.parse_args()

    print(calibration_line())
    tmp = Path(tempfile.mkdtemp(prefix="stage-costs-"))
    if args.model == "tiny":
        from conftest import make_tiny_model

        path = str(make_tiny_model(tmp / "tiny-llama"))
    else:
        path = models.resolve(args.model)
    cfg = load_config(str(QUICKSTART), [f"model.base={path}", f"run_dir={tmp / 'run'}"])
    print(f"model {args.model} ({path}); quickstart settings; {args.cpus} CPUs; storage {tmp}")

    import ray

    from alignment.ray_env import ensure_ray

    t = time.perf_counter()
    ensure_ray(num_cpus=args.cpus)
    print(f"ray init: {time.perf_counter() - t:.1f} s")

    tok = train.chat_tokenizer(path, cfg.model.chat_template)
    sft_rows = formats.read_rows([str(p) for p in cfg.data.sft], "sft")[0]
    sft_rows, _ = train.trainable_rows("sft", [{"id": r["id"], "messages": r["messages"]} for r in sft_rows],
                                       tok, cfg.sft.max_length)
    sft_rows = train.seeded_order(sft_rows, cfg.seed)[:cfg.select.k]
    pairs = formats.read_rows([str(p) for p in cfg.data.preferences], "preference")[0]
    pairs, _ = train.trainable_rows("dpo", pairs, tok, cfg.pref.max_length)
    keys = ("id", "prompt", "chosen", "rejected")
    used, held = train.split_rows([{k: r[k] for k in keys} for r in pairs], cfg.seed, cfg.pref.eval_rows,
                                  cfg.pref.num_pairs)
    arms = ["before", "after"] if args.compare else ["after"]
    runs = {}
    if "sft" in args.stages:
        runs["sft"] = bench_train("sft", sft_rows, path, cfg, args.steps, tmp, arms)
    if "dpo" in args.stages or "heldout" in args.stages:
        runs["dpo"] = bench_train("dpo", used, path, cfg, args.steps, tmp, arms,
                                  held if "heldout" in args.stages else None)
    if "heldout" in args.stages:
        from alignment.evaluate import heldout

        before = runs["dpo"].get("before", runs["dpo"]["after"])[args.steps]
        policy = before["run"]["checkpoints"][-1]["path"]
        res = cfg.resources
        task = ray.remote(heldout.heldout).options(num_cpus=res.cpus_per_worker, scheduling_strategy="DEFAULT")
        t = time.perf_counter()
        scores = ray.get(task.remote(policy, path, held, cfg.pref.max_length, cfg.model.chat_template, False,
                                     res.cpus_per_worker))
        remote = time.perf_counter() - t
        print(f"heldout ({len(held)} pairs) as the pref stage scores it, a Ray task after fit: {remote:.1f} s; "
              f"margin {scores['pref_margin']!r}, accuracy {scores['pref_accuracy']}")
        # The same task with the run's log-probabilities cache, empty then holding both models' (as an SFT
        # checkpoint alone finds it after a preference run from it and another checkpoint against model.base).
        cached = {}
        for state in ("empty", "full"):
            t = time.perf_counter()
            got = ray.get(task.remote(policy, path, held, cfg.pref.max_length, cfg.model.chat_template, False,
                                      res.cpus_per_worker, str(tmp / "logprobs")))
            cached[state] = time.perf_counter() - t
            assert got == scores, (got, scores)
        print(f"  with the log-probabilities cache: empty {cached['empty']:.1f} s, both models there "
              f"{cached['full']:.1f} s ({cached['full'] / cached['empty']:.2f}x); the same scores")
        after = runs["dpo"]["after"][args.steps]
        inside = after["run"].get("heldout")
        if inside is not None:
            print(f"  in the training worker (fit(heldout_rows=...)): {after['timings'].get('heldout_s', 0.0):.1f} s "
                  f"inside the fit; margin {inside['pref_margin']!r}, accuracy {inside['pref_accuracy']}")
        if "before" in runs["dpo"]:
            b, a = before["wall"] + remote, after["wall"]
            print(f"  dpo {args.steps} steps + held-out scores: before {b:.1f} s (fit {before['wall']:.1f} s + task "
                  f"{remote:.1f} s), after {a:.1f} s (one fit): {b - a:+.1f} s saved")
        same = [(x["path"], y["path"]) for x, y in zip(before["run"]["checkpoints"], after["run"]["checkpoints"])]
        print(f"  checkpoints compared: {same}")
    if "generate" in args.stages:
        from alignment.evaluate.generate import generate

        prompts = formats.read_rows(cfg.data.eval_prompts, "eval")[0][:args.prompts]
        asked = [{"id": p["id"], "messages": p["messages"]} for p in prompts]
        g = cfg.generate
        walls = {}
        for n in (1, args.new_tokens):
            t = time.perf_counter()
            out = generate(path, asked, g.model_copy(update={"max_new_tokens": n}))
            walls[n] = time.perf_counter() - t
        fixed, step = fixed_and_step(walls[1], walls[args.new_tokens], args.new_tokens)
        tokens = sum(o["num_new_tokens"] for o in out)
        print(f"generate ({len(asked)} prompts, batch {g.batch_size}, {g.num_actors} actor(s) of "
              f"{g.cpus_per_actor} CPUs): 1 token {walls[1]:.1f} s, {args.new_tokens} tokens "
              f"{walls[args.new_tokens]:.1f} s "
              f"({tokens} new tokens) -> fixed {fixed:.1f} s, per token step {step:.2f} s; fixed / per step = "
              f"{fixed / step if step > 0 else float('inf'):.0f}")
        empty, _ = probe(EmptyProbe, path, asked, g)
        loaded, rows = probe(ImportProbe, path, asked, g)
        line("Ray Data + actor process", empty)
        line("imports in the actor", rows[0]["import_s"])
        line("model load in the actor", rows[0]["load_s"])
        line("(rest: generation of 1 token, ...)", walls[1] - loaded)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
