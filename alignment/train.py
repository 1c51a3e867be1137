"""The sft and pref stages: TRL trainers inside Ray Train ``TorchTrainer`` workers.

``build_sft_trainer`` / ``build_pref_trainer`` are plain functions over plain data (rows, a model path,
a dict of settings) and run without Ray. ``fit`` runs one of them on Ray Train workers: every checkpoint
is saved at its step, reported to Ray Train with its metrics and kept; a restarted worker group resumes
from the latest one.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("alignment")


def _device_args(use_gpu: bool) -> dict[str, Any]:
    # TRL defaults to bf16 and gradient checkpointing; on CPUs without bf16 units that is 10x slower.
    if use_gpu:
        return {"bf16": True, "gradient_checkpointing": True}
    return {"use_cpu": True, "bf16": False, "fp16": False, "gradient_checkpointing": False}


def _common_args(s: dict[str, Any], output_dir: str) -> dict[str, Any]:
    return {
        "output_dir": output_dir,
        "max_steps": s["max_steps"],
        "per_device_train_batch_size": s["per_device_batch_size"],
        "gradient_accumulation_steps": s["gradient_accumulation_steps"],
        "learning_rate": s["learning_rate"],
        "lr_scheduler_type": s["lr_scheduler_type"],
        "warmup_steps": math.ceil(s["warmup_ratio"] * s["max_steps"]),
        "logging_steps": s["logging_steps"],
        "save_strategy": "no",  # SaveAtSteps decides
        "save_only_model": s.get("save_only_model", False),
        "report_to": "none",
        "seed": s["seed"],
        "data_seed": s["seed"],
        "dataloader_num_workers": 0,
        **_device_args(s["use_gpu"]),
    }


def _load_model(path: str, use_gpu: bool):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if use_gpu else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def _tokenizer(model_path: str, chat_template: str | None):
    """A fresh tokenizer (trainers modify it), with the configured chat template and a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if chat_template:
        tok.chat_template = Path(chat_template).read_text()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_sft_trainer(rows: list[dict], model_path: str, settings: dict[str, Any], output_dir: str,
                      chat_template: str | None = None):
    """TRL SFTTrainer on conversational rows ``{"messages": [...]}``, loss on assistant tokens only."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from . import models

    tok = _tokenizer(model_path, chat_template)
    if settings["assistant_only_loss"]:
        training_template = models.training_chat_template(tok)
        if training_template:
            tok.chat_template = training_template  # renders the same; saved checkpoints carry it
    args = SFTConfig(
        **_common_args(settings, output_dir),
        max_length=settings["max_length"],
        assistant_only_loss=settings["assistant_only_loss"],
        packing=False,
    )
    ds = Dataset.from_list([{"messages": r["messages"]} for r in rows])
    return SFTTrainer(model=_load_model(model_path, settings["use_gpu"]), args=args, train_dataset=ds,
                      processing_class=tok)


def build_pref_trainer(pairs: list[dict], model_path: str, settings: dict[str, Any], output_dir: str,
                       chat_template: str | None = None):
    """TRL DPOTrainer on ``{"prompt": messages, "chosen": str, "rejected": str}``; the reference model is the start."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = _tokenizer(model_path, chat_template)
    args = DPOConfig(
        **_common_args(settings, output_dir),
        beta=settings["beta"],
        loss_type=[settings["loss_type"]],
        max_length=settings["max_length"],
    )
    ds = Dataset.from_list([
        {"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
         "rejected": [{"role": "assistant", "content": p["rejected"]}]}
        for p in pairs
    ])
    return DPOTrainer(model=_load_model(model_path, settings["use_gpu"]), ref_model=None, args=args,
                      train_dataset=ds, processing_class=tok)


def _last_logged(log_history: list[dict], step: int) -> dict[str, float]:
    """The training metrics logged at or before ``step`` (loss, rewards/..., learning_rate)."""
    out: dict[str, float] = {}
    for entry in log_history:
        if entry.get("step", 0) <= step and "loss" in entry:
            out = {k: v for k, v in entry.items() if isinstance(v, (int, float))}
    return out


def _save_and_report_callback(save_steps: list[int]):
    """Save at exactly ``save_steps`` and report each checkpoint to Ray Train (kept, never rotated)."""
    from transformers import TrainerCallback

    class SaveAtSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in save_steps:
                control.should_save = True
            return control

        def on_save(self, args, state, control, **kwargs):
            import ray.train

            step = state.global_step
            metrics = {**_last_logged(state.log_history, step), "step": step, "epoch": state.epoch or 0.0}
            ckpt_dir = Path(args.output_dir) / f"checkpoint-{step}"
            if ray.train.get_context().get_world_rank() == 0 and ckpt_dir.is_dir():
                (ckpt_dir / "alignment_metrics.json").write_text(json.dumps(metrics))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)))
            else:
                ray.train.report(metrics, checkpoint=None)

    return SaveAtSteps()


def train_loop(job: dict[str, Any]) -> None:
    """Ray Train worker entry: build the stage's trainer, resume from the latest checkpoint, train."""
    import tempfile

    import ray.train
    import torch
    from ray.train.huggingface.transformers import prepare_trainer

    from . import models

    torch.set_num_threads(job["torch_threads"])
    model_path = models.materialize(job["model"])
    output_dir = tempfile.mkdtemp(prefix=f"alignment-{job['kind']}-")
    build = build_sft_trainer if job["kind"] == "sft" else build_pref_trainer
    trainer = build(job["rows"], model_path, job["settings"], output_dir, job.get("chat_template"))
    trainer.add_callback(_save_and_report_callback(job["save_steps"]))
    trainer = prepare_trainer(trainer)
    resume = ray.train.get_checkpoint()
    if resume:
        with resume.as_directory() as d:
            log.info("resuming from %s", d)
            trainer.train(resume_from_checkpoint=d)
    else:
        trainer.train()


def fit(kind: str, rows: list[dict], model: str, settings: dict[str, Any], save_steps: list[int],
        storage_path: str, resources: dict[str, Any], chat_template: str | None = None,
        max_failures: int = 0) -> list[dict[str, Any]]:
    """Run ``kind`` ('sft' or 'pref') on Ray Train; return every checkpoint as ``{step, path, metrics}``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cpus = resources["cpus_per_worker"]
    job = {
        "kind": kind, "rows": rows, "model": model, "settings": {**settings, "use_gpu": resources["use_gpu"]},
        "save_steps": save_steps, "chat_template": chat_template, "torch_threads": max(1, math.ceil(cpus)),
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=resources["num_workers"], use_gpu=resources["use_gpu"],
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=kind,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    checkpoints = []
    for ckpt, metrics in result.best_checkpoints:
        checkpoints.append({"step": int(metrics["step"]), "path": ckpt.path, "metrics": metrics})
    checkpoints.sort(key=lambda c: c["step"])
    missing = sorted(set(save_steps) - {c["step"] for c in checkpoints})
    if missing:
        raise RuntimeError(f"{kind}: checkpoints for steps {missing} were not reported")
    return checkpoints


def sft_settings(sft: dict[str, Any], seed: int) -> dict[str, Any]:
    keys = ("max_steps", "per_device_batch_size", "gradient_accumulation_steps", "learning_rate",
            "lr_scheduler_type", "warmup_ratio", "logging_steps", "max_length", "assistant_only_loss",
            "save_only_model")
    return {**{k: sft[k] for k in keys}, "seed": seed}


def pref_settings(pref: dict[str, Any], seed: int) -> dict[str, Any]:
    keys = ("max_steps", "per_device_batch_size", "gradient_accumulation_steps", "learning_rate",
            "lr_scheduler_type", "warmup_ratio", "logging_steps", "max_length", "beta", "loss_type")
    return {**{k: pref[k] for k in keys}, "seed": seed, "save_only_model": True}


def environment_facts(resources: dict[str, Any]) -> dict[str, Any]:
    """What really ran: HF Trainer over torch.distributed is DDP with more than one worker, else one process."""
    n = resources["num_workers"]
    return {"strategy": "ddp" if n > 1 else "single-process", "world_size": n,
            "device": "cuda" if resources["use_gpu"] else "cpu", "backend": "nccl" if resources["use_gpu"] else "gloo"}
