"""The trainer's callbacks: tokens/s, the non-finite guard, and saving at exactly the scheduled steps with each
checkpoint reported to Ray Train (its weights checked finite, its metrics and what really ran beside it)."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .errors import NONFINITE_CAUSES, NonFiniteError

TB_DIR = "runs"  # where transformers' TensorBoard callback writes, under the trainer's output_dir


class TokenCounter:
    """Counts the real (unpadded) tokens the model trains on: a forward pre-hook on the model, counting forwards
    with gradients in training mode, when they happen (chosen and rejected; not evaluation, nor the no-grad
    forwards of a reference pass, KTO's KL batch or LoRA's adapters-off reference)."""

    def __init__(self, model):
        self.tokens = 0
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        import torch

        if not (module.training and torch.is_grad_enabled()):
            return
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            self.tokens += int(mask.sum())
        else:  # padding-free batches (packing) have no padding to leave out
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None:
                self.tokens += int(ids.numel())


def _all_ranks_sum(x: float) -> float:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t.item())


def throughput_callback(counter: TokenCounter):
    """Adds ``tokens_per_second`` (all workers, since the last log; evaluation excluded) and ``tokens`` (this
    session's total) to each training log entry."""
    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        last_time: float | None = None
        last_tokens = 0.0

        def _mark(self):
            self.last_time, self.last_tokens = time.perf_counter(), _all_ranks_sum(counter.tokens)

        def on_train_begin(self, args, state, control, **kwargs):
            self._mark()

        def on_evaluate(self, args, state, control, **kwargs):
            self._mark()  # the evaluation's time and tokens are not training throughput

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "loss" not in logs or self.last_time is None:
                return
            now = time.perf_counter()
            tokens = _all_ranks_sum(counter.tokens)
            logs["tokens_per_second"] = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
            logs["tokens"] = tokens
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(tokens_per_second=logs["tokens_per_second"], tokens=tokens)
            self.last_time, self.last_tokens = now, tokens

    return Throughput()


WATCHED = ("loss", "grad_norm", "eval_loss")  # what a non-finite value of stops training


def finite_guard(stage: str):
    """Stops training at the first logged non-finite loss, gradient norm or eval loss, raising
    :class:`NonFiniteError`: at the step where it happens with ``logging_steps`` 1 (the default), else at the
    next logging step (the logged loss averages the window, so a NaN in it shows). Every rank logs the same
    values (the loss is averaged over ranks, the gradient norm is global), so every rank stops at the same step;
    the step's checkpoint, saved after its log, is never written."""
    from transformers import TrainerCallback

    class FiniteGuard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            bad = {k: v for k, v in (logs or {}).items()
                   if k in WATCHED and isinstance(v, float) and not math.isfinite(v)}
            if bad:
                values = ", ".join(f"{k}={v}" for k, v in bad.items())
                raise NonFiniteError(f"{stage}: non-finite {values} at step {state.global_step} of "
                                     f"{state.max_steps}; training stopped there, and no checkpoint from that "
                                     f"step on is kept ({NONFINITE_CAUSES})",
                                     state.global_step, bad, list(state.log_history))

    return FiniteGuard()


def check_saved_weights(stage: str, step: int, model, log_history: list[dict]) -> None:
    """Every rank checks its weights (its shard under FSDP2) before a checkpoint is reported; all of them raise
    if any rank found a non-finite one."""
    from .. import models

    bad = models.nonfinite_weights(model)
    if _all_ranks_sum(float(len(bad))) > 0:
        raise NonFiniteError(f"{stage}: non-finite weights at step {step} (first on this rank: "
                             f"{', '.join(bad[:3]) or 'none'}); the checkpoint is not kept ({NONFINITE_CAUSES})",
                             step, {"weights": float("nan")}, list(log_history))


def _last_logged(log_history: list[dict], step: int) -> dict[str, float]:
    """The training metrics logged at or before ``step`` (loss, rewards/..., learning_rate), and the eval
    loss logged at ``step``."""
    out: dict[str, float] = {}
    for entry in log_history:
        if entry.get("step", 0) <= step and "loss" in entry:
            out = {k: v for k, v in entry.items() if isinstance(v, (int, float))}
    for entry in log_history:
        if entry.get("step") == step and "eval_loss" in entry:
            out["eval_loss"] = entry["eval_loss"]
    return out


def run_facts(trainer) -> dict[str, Any]:
    """What really ran, read from accelerate and torch.distributed (not from what was asked for)."""
    import torch.distributed as dist

    acc = trainer.accelerator
    kind = str(acc.distributed_type).split(".")[-1]
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if kind == "FSDP":
        version = getattr(acc.state.fsdp_plugin, "fsdp_version", 1)
        strategy = f"fsdp{version}"
    elif kind in ("MULTI_GPU", "MULTI_CPU"):
        strategy = "ddp" if world > 1 else "single-process"  # Ray Train sets up a process group even for one
    elif kind == "NO":
        strategy = "single-process"
    else:
        strategy = kind.lower()
    param = next(trainer.model.parameters())
    trained = next((p for p in trainer.model.parameters() if p.requires_grad), param)
    return {"strategy": strategy, "world_size": world, "device": param.device.type,
            "dtype": "bf16" if trainer.args.bf16 else str(param.dtype).replace("torch.", ""),
            "weights": str(trained.dtype).replace("torch.", ""),
            "backend": dist.get_backend() if world > 1 else None,
            "lora": bool(getattr(trainer.model, "peft_config", None))}


def add_time(timings: dict[str, float] | None, key: str, seconds: float) -> None:
    """Adds ``seconds`` to ``timings[key]`` (rounded to ms), where there is a ``timings`` dict."""
    if timings is not None:
        timings[key] = round(timings.get(key, 0.0) + seconds, 3)


def _move_tree(src: Path, dest: Path) -> None:
    """The files of ``src`` moved into ``dest`` (created), merged with what is there (a file of the same name
    replaced, as a copy would); ``src`` removed."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        target = dest / entry.name
        if entry.is_dir() and target.is_dir():
            _move_tree(entry, target)
        else:
            os.replace(entry, target)
    shutil.rmtree(src, ignore_errors=True)


def move_to_storage(checkpoint, checkpoint_dir_name: str):
    """Ray Train's checkpoint upload (``ray.train.report``'s ``checkpoint_upload_fn``), moving the checkpoint's
    files into storage where storage is a local directory on the same file system (a rename: no second copy of
    the weights written, and no copy left behind in the worker's temporary directory); elsewhere (cloud storage,
    another file system) Ray Train's own copy. Each rank moves its own files into the one checkpoint directory,
    as Ray Train's copy merges them."""
    import pyarrow.fs as pafs
    import ray.train

    storage = ray.train.get_context().get_storage()
    experiment = Path(storage.experiment_fs_path)
    src = Path(checkpoint.path)
    if (isinstance(storage.storage_filesystem, pafs.LocalFileSystem) and experiment.is_dir()
            and src.stat().st_dev == experiment.stat().st_dev):
        dest = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
        _move_tree(src, Path(dest))
        return ray.train.Checkpoint(dest, filesystem=storage.storage_filesystem)
    return storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name)


def save_and_report_callback(stage: str, save_steps: list[int], has_eval: bool, trainer,
                             timings: dict[str, float] | None = None, saved: dict[str, str] | None = None):
    """Save (and evaluate) at exactly ``save_steps``; report each checkpoint to Ray Train (kept, never rotated),
    moved into local storage rather than copied (:func:`move_to_storage`).

    ``timings`` (optional) gets the seconds spent evaluating (``eval_s``), writing checkpoints (``save_s``: the
    Trainer's save, from the step's log or evaluation to ``on_save``) and reporting them (``report_s``: the weights'
    check, the metrics file and Ray Train's upload of the checkpoint to storage). ``saved`` (optional) gets
    ``path``: where the files of this worker's latest checkpoint are now, on this node (in local storage, or the
    Trainer's own directory where they were copied to storage)."""
    from transformers import TrainerCallback

    class SaveAtSteps(TrainerCallback):
        mark = 0.0  # when the latest event of a step that saves ended (its step, log or evaluation)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in save_steps:
                control.should_save = True
                control.should_evaluate = has_eval
                self.mark = time.perf_counter()
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step in save_steps and "loss" in (logs or {}):  # the step's log, not the evaluation's
                self.mark = time.perf_counter()

        def on_evaluate(self, args, state, control, **kwargs):
            if state.global_step in save_steps:
                now = time.perf_counter()
                add_time(timings, "eval_s", now - self.mark)
                self.mark = now

        def on_save(self, args, state, control, **kwargs):
            import ray.train

            started = time.perf_counter()
            add_time(timings, "save_s", started - self.mark)
            step = state.global_step
            check_saved_weights(stage, step, trainer.model, state.log_history)
            metrics = {**_last_logged(state.log_history, step), "step": step, "epoch": state.epoch or 0.0,
                       **{k: v for k, v in run_facts(trainer).items() if v is not None}}
            ckpt_dir = Path(args.output_dir) / f"checkpoint-{step}"
            if ray.train.get_context().get_world_rank() == 0 and ckpt_dir.is_dir():
                logs = Path(args.output_dir) / TB_DIR
                if logs.is_dir():  # TensorBoard events so far travel with the checkpoint
                    shutil.copytree(logs, ckpt_dir / "tensorboard", dirs_exist_ok=True)
                (ckpt_dir / "alignment_metrics.json").write_text(json.dumps(metrics))
            # Every rank reports what it wrote (rank 0: the model, optimizer and trainer state; each rank: its
            # rng_state_<rank>.pth), and Ray Train merges them into one directory, so that a restarted
            # worker group restores every rank's random state, not rank 0's alone.
            ckpt = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir.is_dir() else None
            where: list[str] = []

            def upload(checkpoint, name: str):
                persisted = move_to_storage(checkpoint, name)
                where.append(persisted.path if not ckpt_dir.is_dir() else str(ckpt_dir))
                return persisted

            ray.train.report(metrics, checkpoint=ckpt, checkpoint_upload_fn=upload if ckpt else None)
            if saved is not None and where:
                saved["path"] = where[0]
            add_time(timings, "report_s", time.perf_counter() - started)

    return SaveAtSteps()
