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
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config import PrefConfig, ResourcesConfig, SFTConfig, config_dict
from ..errors import AlignmentError, unwrap
from .callbacks import TB_DIR, add_time, save_and_report_callback
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


def train_loop(job: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker entry: build the stage's trainer, resume from the latest checkpoint, train; with held-out
    pairs (``job['heldout_rows']``), rank 0 then scores them (see :func:`fit`).

    Returns ``{"timings"}``: the seconds of this worker's phases and when it entered and finished, and
    ``{"heldout"}`` where it scored (:func:`fit` reads rank 0's: Ray Train's result's ``return_value``). The
    Trainer's temporary directory is removed at the end (the checkpoints were moved or copied to storage)."""
    entered = time.time()
    import tempfile

    import ray
    import ray.train
    import torch

    from .. import models

    timings: dict[str, float] = {"entered": entered, "boot_s": round(entered - _process_started(), 3)}
    torch.set_num_threads(job["torch_threads"])
    model_path = models.materialize(job["model"])
    output_dir = tempfile.mkdtemp(prefix=f"alignment-{job['method']}-")
    try:
        rows, eval_rows = ray.get(job["rows"]), ray.get(job["eval_rows"]) if job["eval_rows"] is not None else None
        add_time(timings, "import_s", time.time() - entered)  # torch (Ray Train's worker imported it already), rows
        trainer = build_trainer(job["method"], rows, model_path, job["settings"], output_dir,
                                job.get("chat_template"), eval_rows, timings=timings)
        # (Ray's prepare_trainer only matters for Ray Data iterables; these are in-memory datasets.)
        saved: dict[str, str] = {}
        trainer.add_callback(save_and_report_callback(job["method"], job["save_steps"], bool(eval_rows), trainer,
                                                      timings, saved))
        resume = ray.train.get_checkpoint()
        started = time.perf_counter()
        if resume:
            with resume.as_directory() as d:
                log.info("resuming from %s", d)
                if (Path(d) / "tensorboard").is_dir():  # the event history up to the checkpoint continues
                    shutil.copytree(Path(d) / "tensorboard", Path(output_dir) / TB_DIR, dirs_exist_ok=True)
                trainer.train(resume_from_checkpoint=d)
        else:
            trainer.train()
        inside = sum(timings.get(k, 0.0) for k in ("eval_s", "save_s", "report_s"))
        timings["train_s"] = round(time.perf_counter() - started - inside, 3)
        out: dict[str, Any] = {"timings": timings}
        if job.get("heldout_rows") is not None and ray.train.get_context().get_world_rank() == 0:
            del trainer  # its weights, optimizer state and reference model: scoring loads the saved files
            out["heldout"] = _score_heldout(job, model_path, saved.get("path"), timings)
        timings["finished"] = time.time()
        return out
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)


def _score_heldout(job: dict[str, Any], start: str, checkpoint: str | None,
                   timings: dict[str, float]) -> dict[str, Any] | None:
    """The held-out pairs' accuracy and margin of ``checkpoint`` (the last one this worker saved, where its files
    are now) against the starting weights, as :func:`alignment.evaluate.heldout.heldout`; None where this worker
    saved no checkpoint (a resumed run whose last checkpoint an earlier worker group saved): the caller scores."""
    import gc

    import ray
    import torch

    if checkpoint is None or not Path(checkpoint).is_dir():
        return None
    gc.collect()
    s = job["settings"]
    if s["use_gpu"] and torch.cuda.is_available():
        torch.cuda.empty_cache()
    started = time.perf_counter()
    scores = job["heldout_fn"](checkpoint, start, ray.get(job["heldout_rows"]), s["max_length"],
                               job.get("chat_template"), s["use_gpu"], job["cpus"])
    add_time(timings, "heldout_s", time.perf_counter() - started)
    return scores


def _process_started() -> float:
    """When this process started (seconds since the epoch)."""
    import psutil

    return psutil.Process().create_time()


def fit(method: str, rows: list[dict], model: str, settings: dict[str, Any], save_steps: list[int],
        storage_path: str, resources: ResourcesConfig, chat_template: str | None = None,
        eval_rows: list[dict] | None = None, max_failures: int = 0,
        heldout_rows: list[dict] | None = None, heldout_fn: Any = None) -> dict[str, Any]:
    """Run ``method`` ('sft' or a preference method) on Ray Train.

    Returns ``{checkpoints: [{step, path, metrics}], history: [every log entry], facts: {strategy, ...,
    timings: {phase: seconds}}, tensorboard: <dir in the latest checkpoint>}``, and with ``heldout_rows``
    (preference pairs) ``heldout``: their held-out accuracy and margin (:func:`alignment.evaluate.heldout.heldout`)
    of the last checkpoint against the starting weights ``model``, scored by rank 0's worker once training is
    done, in the process that trained (no second process importing torch and transformers), at
    ``settings['max_length']``: the same call on the same files as a Ray task after ``fit`` would make (None
    where the last worker group saved no checkpoint itself, a resumed run's that had: the caller scores then).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

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
        "cpus": cpus, "heldout_rows": ray.put(heldout_rows) if heldout_rows and heldout_fn else None,
        "heldout_fn": heldout_fn,  # the caller's scorer (alignment.evaluate.heldout.heldout): stages import no stage
    }
    trainer = _trainer_class()(
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

    submitted = time.time()
    try:
        with _controller_env():
            result = trainer.fit()
    except TrainingFailedError as e:
        result = e
    error = result if isinstance(result, BaseException) else result.error
    if error:
        # The project's own error a worker raised (a non-finite loss, its log with it), not Ray Train's wrapping.
        known = unwrap(error)
        raise known if isinstance(known, AlignmentError) else error
    returned = getattr(result, "return_value", None) or {}
    timings = _fit_timings(returned.get("timings", {}), submitted, time.time())
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
    facts["timings"] = timings
    out = {"checkpoints": checkpoints, "history": history, "facts": facts,
           "tensorboard": storage_uri(storage_path, latest.path.rstrip("/") + "/tensorboard")}
    if heldout_rows:
        out["heldout"] = returned.get("heldout")
    return out


def _trainer_class():
    """Ray Train's ``TorchTrainer`` without two of its default callbacks where they serve nothing, each an actor
    process started for every run (importing Ray Train or Ray Data beside the worker, on the run's critical path):
    the datasets callback when the run has no Ray Data datasets (these runs never do: their rows are in memory),
    which starts a ``DatasetManager``; and the placement-group cleaner when the cluster has no dashboard (the
    embedded local Ray), whose monitor asks the state API, which needs the dashboard, and dies at its first check."""
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            unused = set() if self.datasets else {"DatasetsCallback"}
            if not _has_dashboard():
                unused.add("PlacementGroupCleanerCallback")
            return [cb for cb in super()._create_default_callbacks() if type(cb).__name__ not in unused]

    return Trainer


def _has_dashboard() -> bool:
    import ray._private.worker

    try:
        return bool(ray._private.worker.get_dashboard_url())
    except Exception:  # noqa: BLE001 - cannot tell: as if it had one (the callback stays)
        return True


# Ray Train's controller settings, read from the driver's environment when ``fit`` starts it (a value already set
# in the environment wins): the worker group's status every 0.5 s rather than 2 s (the end of a run is seen
# sooner, at the cost of a status call a worker every 0.5 s).
CONTROLLER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


@contextmanager
def _controller_env():
    """``CONTROLLER_ENV`` in this process's environment while ``fit`` starts the controller, which copies it; on a
    cluster of one node, this process's own (the embedded local Ray), also no preemption watcher: one actor process
    less a run, watching for the drain of a node that would take this process with it."""
    import ray

    env = dict(CONTROLLER_ENV)
    alive = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if alive == [ray.get_runtime_context().get_node_id()]:
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    added = [k for k in env if k not in os.environ]
    os.environ.update({k: env[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


# The phases of a training run, in order, as fit's facts name them (seconds; rank 0's worker).
PHASES = ("spawn_s", "boot_s", "import_s", "load_s", "tokenize_s", "trainer_init_s", "train_s", "eval_s", "save_s",
          "report_s", "heldout_s", "end_s")


def _fit_timings(w: dict[str, Any], submitted: float, returned: float) -> dict[str, float]:
    """The phases of a run from what its rank-0 worker returned (``w``): ``spawn_s`` (``fit`` called to the
    worker process started: the controller, the placement group, the worker actor's process), ``boot_s`` (the
    process started to the training function entered: Ray's worker, Ray Train's imports, its torch process group),
    the worker's set-up and training phases (:func:`build_trainer`, :func:`callbacks.save_and_report_callback`),
    ``end_s`` (the function returned to ``fit`` returning: the worker group's shutdown), and ``fit_s``, all of it.
    A resumed run's are those of its last worker group."""
    out: dict[str, float] = {}
    if "entered" in w:
        out["spawn_s"] = round(w["entered"] - w.get("boot_s", 0.0) - submitted, 3)
    out.update({k: w[k] for k in PHASES if k in w})
    if "finished" in w:
        out["end_s"] = round(returned - w["finished"], 3)
    out["fit_s"] = round(returned - submitted, 3)
    return out


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
