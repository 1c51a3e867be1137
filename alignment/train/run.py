"""Training on Ray Train: ``fit`` runs a method's trainer (``build_trainer``) on ``TorchTrainer`` workers.

A checkpoint is saved at every scheduled step, evaluated on the held-out rows, reported to Ray Train with its
metrics and kept; a restarted worker group resumes from the latest one (optimizer, scheduler, data position and
RNG included), so no step is repeated or lost. Every logging step's metrics (loss, rewards, accuracies, margins,
learning rate, tokens/s) go to the trainer's log history and to TensorBoard event files.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from ..config import PrefConfig, ResourcesConfig, SFTConfig, config_dict
from ..errors import AlignmentError, unwrap
from .callbacks import TB_DIR, save_and_report_callback
from .errors import TrainRunError
from .trainer import build_trainer

log = logging.getLogger("alignment")

# The sft and pref sections' keys every trainer takes (the rest choose data and the checkpoint schedule).
_SETTINGS = ("max_steps", "per_device_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
             "warmup_ratio", "logging_steps", "max_length", "save_only_model", "gradient_checkpointing", "lora")


def train_settings(section: SFTConfig | PrefConfig, seed: int, method: str) -> dict[str, Any]:
    """The trainer settings of the sft or pref section for ``method``, as plain values: what crosses into the
    Ray Train workers (and the stage's key). A preference method's ``params`` are its own, its defaults in
    methods.METHODS where the config sets none."""
    plain = config_dict(section)
    out = {**{k: plain[k] for k in _SETTINGS}, "seed": seed}
    if method == "sft":
        out.update(assistant_only_loss=plain["assistant_only_loss"], packing=plain["packing"])
    else:
        out["params"] = section.method_params(method)
    return out


def train_loop(job: dict[str, Any]) -> None:
    """Ray Train worker entry: build the stage's trainer, resume from the latest checkpoint, train."""
    import tempfile

    import ray
    import ray.train
    import torch

    from .. import models

    torch.set_num_threads(job["torch_threads"])
    model_path = models.materialize(job["model"])
    output_dir = tempfile.mkdtemp(prefix=f"alignment-{job['method']}-")
    rows, eval_rows = ray.get(job["rows"]), ray.get(job["eval_rows"]) if job["eval_rows"] is not None else None
    trainer = build_trainer(job["method"], rows, model_path, job["settings"], output_dir,
                            job.get("chat_template"), eval_rows)
    # (Ray's prepare_trainer only matters for Ray Data iterables; these are in-memory datasets.)
    trainer.add_callback(save_and_report_callback(job["method"], job["save_steps"], bool(eval_rows), trainer))
    resume = ray.train.get_checkpoint()
    if resume:
        with resume.as_directory() as d:
            log.info("resuming from %s", d)
            if (Path(d) / "tensorboard").is_dir():  # the event history up to the checkpoint continues
                shutil.copytree(Path(d) / "tensorboard", Path(output_dir) / TB_DIR, dirs_exist_ok=True)
            trainer.train(resume_from_checkpoint=d)
    else:
        trainer.train()


def fit(method: str, rows: list[dict], model: str, settings: dict[str, Any], save_steps: list[int],
        storage_path: str, resources: ResourcesConfig, chat_template: str | None = None,
        eval_rows: list[dict] | None = None, max_failures: int = 0) -> dict[str, Any]:
    """Run ``method`` ('sft' or a preference method) on Ray Train.

    Returns ``{checkpoints: [{step, path, metrics}], history: [every log entry], facts: {strategy, ...},
    tensorboard: <dir in the latest checkpoint>}``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cpus = resources.cpus_per_worker
    strategy = resources.strategy
    if strategy == "auto":
        strategy = "fsdp" if resources.use_gpu and resources.num_workers > 1 else "ddp"
    import ray

    # The rows go to the object store once, and each worker (a restarted one too) fetches them by reference:
    # Ray Train warns against data in train_loop_config, which it serialises into its run context.
    job = {
        "method": method, "rows": ray.put(rows), "eval_rows": ray.put(eval_rows) if eval_rows else None, "model": model,
        "settings": {**settings, "use_gpu": resources.use_gpu, "strategy": strategy},
        "save_steps": save_steps, "chat_template": chat_template, "torch_threads": max(1, math.ceil(cpus)),
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=method,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    from ray.train import TrainingFailedError

    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        result = e
    error = result if isinstance(result, BaseException) else result.error
    if error:
        # The project's own error a worker raised (a non-finite loss, its log with it), not Ray Train's wrapping.
        known = unwrap(error)
        raise known if isinstance(known, AlignmentError) else error
    checkpoints = []
    for ckpt, metrics in result.best_checkpoints:
        checkpoints.append({"step": int(metrics["step"]), "path": storage_uri(storage_path, ckpt.path),
                            "metrics": metrics})
    checkpoints.sort(key=lambda c: c["step"])
    missing = sorted(set(save_steps) - {c["step"] for c in checkpoints})
    if missing:
        raise TrainRunError(f"{method}: checkpoints for steps {missing} were not reported")
    latest = result.checkpoint  # its trainer_state.json only (not the weights, which may be on cloud storage)
    with latest.filesystem.open_input_file(latest.path.rstrip("/") + "/trainer_state.json") as f:
        history = json.loads(f.read())["log_history"]
    last = checkpoints[-1]["metrics"]
    facts = {k: last[k] for k in ("strategy", "world_size", "device", "dtype", "weights", "backend", "lora")
             if k in last}
    return {"checkpoints": checkpoints, "history": history, "facts": facts,
            "tensorboard": storage_uri(storage_path, latest.path.rstrip("/") + "/tensorboard")}


def write_tensorboard(history: list[dict], log_dir: str | Path) -> None:
    """TensorBoard events of a log history, named as the Trainer's callback names them (``train/loss``,
    ``eval/loss``): the log of a run that failed in its workers, NaN values as they are."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        for entry in history:
            for key, value in entry.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    name = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                    writer.add_scalar(name, value, entry.get("step", 0))


def storage_uri(storage_path: str, fs_path: str) -> str:
    """A path that Ray Train reports on the storage's file system, as a URI every stage can open.

    Ray gives checkpoint paths with the URI's scheme and options stripped (``bucket/prefix/checkpoint_...`` for
    ``s3://bucket/prefix?region=...``), which would read as a relative local path; on local storage the path
    is already what it is.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(storage_path)
    if "://" not in storage_path or parts.scheme == "file":  # local storage: the path is the path
        return fs_path
    query = f"?{parts.query}" if parts.query else ""
    if parts.netloc and not fs_path.startswith(parts.netloc):  # hdfs://host:port/path: the path is /path
        return f"{parts.scheme}://{parts.netloc}/{fs_path.lstrip('/')}{query}"
    return f"{parts.scheme}://{fs_path}{query}"
