"""The sft and pref stages: TRL trainers inside Ray Train ``TorchTrainer`` workers.

``build_trainer`` is a plain function over plain data (rows, a model path, a dict of settings) and runs
without Ray: SFT (``SFTTrainer``), DPO and IPO (``DPOTrainer``), KTO (``KTOTrainer``), CPO and SimPO
(``CPOTrainer``), ORPO (``ORPOTrainer``). ``fit`` runs it on Ray Train workers: a checkpoint is saved at
every scheduled step, evaluated on the held-out rows, reported to Ray Train with its metrics and kept; a
restarted worker group resumes from the latest one (optimizer, scheduler, data position and RNG included),
so no step is repeated or lost. Every logging step's metrics (loss, rewards, accuracies, margins, learning
rate, tokens/s) go to the trainer's log history and to TensorBoard event files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import AlignmentError, InputError, unwrap

log = logging.getLogger("alignment")

TB_DIR = "runs"  # where transformers' TensorBoard callback writes, under the trainer's output_dir


class TrainError(InputError, ValueError):
    pass


class NonFiniteError(TrainError):
    """Training met a non-finite loss, gradient norm or weight: the run stops at that step, on every rank.

    ``step``, ``metrics`` (the non-finite values by name) and ``history`` (every log entry up to and including
    that step) travel with the error out of the Ray Train workers (an exception pickles its ``__dict__``).
    """

    def __init__(self, message: str, step: int | None = None, metrics: dict[str, float] | None = None,
                 history: list[dict] | None = None):
        super().__init__(message)
        self.step, self.metrics, self.history = step, metrics or {}, history or []


NONFINITE_CAUSES = ("usual causes: a learning rate too high for the model, fp16 overflow, starting weights that are "
                    "already non-finite, or rows with no completion token within max_length (length-averaged "
                    "losses divide by zero; such rows are set aside before training, see the stage's set_aside.jsonl)")


# ------------------------------------------------------------------------------------------------ data


def seeded_order(rows: list[dict], seed: int) -> list[dict]:
    """Rows in an order fixed by the seed and each row's id (not by the input's order)."""
    def key(r: dict) -> str:
        return hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest()

    return sorted(rows, key=key)


def split_rows(rows: list[dict], seed: int, eval_rows: int, num_rows: int | None) -> tuple[list[dict], list[dict]]:
    """(train, eval): ``eval_rows`` held out, then the first ``num_rows`` of the rest, both in the seeded order.

    The same seed gives nested subsets: the rows of a smaller ``num_rows`` are among those of a larger one,
    and the held-out rows are the same whatever ``num_rows`` is.
    """
    ordered = seeded_order(rows, seed)
    if eval_rows >= len(ordered):
        raise TrainError(f"eval_rows={eval_rows} leaves no training rows out of {len(ordered)}")
    held, rest = ordered[:eval_rows], ordered[eval_rows:]
    if num_rows is not None:
        if num_rows > len(rest):
            raise TrainError(f"num_pairs={num_rows} but only {len(rest)} rows are left after {eval_rows} eval rows")
        rest = rest[:num_rows]
    return rest, held


def _answers(row: dict) -> tuple[str, ...]:
    return ("completion",) if "completion" in row else ("chosen", "rejected")


def _set_aside(row: dict, field: str, why: str) -> dict:
    return {**{k: row[k] for k in ("id", "source", "row") if k in row}, "field": field, "error": why}


def trainable_rows(method: str, rows: list[dict], tok: Any, max_length: int) -> tuple[list[dict], list[dict]]:
    """(rows that can train, a set-aside record per row that cannot, with its field and reason).

    A row cannot train when no completion token is left within ``max_length`` (the prompt, in the chat template,
    fills it: TRL's DPO and KTO then drop the row silently, its CPO, SimPO and ORPO average over zero tokens and
    turn the weights NaN), when an answer is empty, or when chosen and rejected are the same answer. Token counts
    follow the trainers: the prompt templated with the generation prompt, the completion as the rest of
    prompt + answer; CPO, SimPO and ORPO add a BOS token where the prompt lacks one. sft rows: the prompt is
    everything before the first assistant turn.
    """
    aside: list[dict] = []
    candidates: list[dict] = []
    for r in rows:
        if method != "sft":
            empty = next((a for a in _answers(r) if not str(r[a]).strip()), None)
            if empty:
                aside.append(_set_aside(r, empty, "empty answer"))
                continue
            if "chosen" in r and r["chosen"].strip() == r["rejected"].strip():
                aside.append(_set_aside(r, "rejected", "the same answer as chosen: the pair states no preference"))
                continue
        candidates.append(r)

    def render(messages: list[dict], generation: bool = False) -> str:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    prefixes, fulls = [], []
    for r in candidates:
        if method == "sft":
            first = next(i for i, m in enumerate(r["messages"]) if m["role"] == "assistant")
            prompt, answers = r["messages"][:first], [r["messages"][first]]
        else:
            prompt, answers = r["prompt"], [{"role": "assistant", "content": r[a]} for a in _answers(r)]
        prefixes.append(render(prompt, generation=True))
        fulls.append([render(prompt + [a]) for a in answers])
    flat = [t for texts in fulls for t in texts]
    ids = tok(prefixes + flat, add_special_tokens=False)["input_ids"] if candidates else []
    prefix_ids, full_lens = ids[:len(prefixes)], iter(len(x) for x in ids[len(prefixes):])
    bos = tok.bos_token_id if method in ("cpo", "simpo", "orpo") else None
    kept = []
    for r, p, texts in zip(candidates, prefix_ids, fulls):
        prompt_len = len(p) + (1 if bos is not None and (not p or p[0] != bos) else 0)
        completion = min(next(full_lens) - len(p) for _ in texts)
        if prompt_len >= max_length or completion < 1:
            what = "the prompt is" if method != "sft" else "the turns before the first answer are"
            aside.append(_set_aside(r, "messages" if method == "sft" else "prompt",
                                    f"no completion token within max_length={max_length}: {what} {prompt_len} "
                                    f"tokens in the chat template, the answer {max(completion, 0)}"))
        else:
            kept.append(r)
    return kept, aside


def check_batch(rows: int, settings: dict[str, Any], num_workers: int, method: str) -> None:
    """Too few rows (as the trainer takes them: KTO's pairs are two rows each) for one optimizer step of every
    worker is an error before any worker starts."""
    need = settings["per_device_batch_size"] * settings["gradient_accumulation_steps"] * num_workers
    if rows < need:
        raise TrainError(f"{method}: {rows} training rows left, fewer than one optimizer step takes ({need} = "
                         f"per_device_batch_size {settings['per_device_batch_size']} x gradient_accumulation_steps "
                         f"{settings['gradient_accumulation_steps']} x {num_workers} workers); add data, lower "
                         "eval_rows or the batch size, or raise max_length")


def method_dataset(rows: list[dict], method: str) -> list[dict]:
    """The rows as the method's TRL trainer takes them (conversational: lists of messages).

    sft: ``{messages}``; paired methods: ``{prompt, chosen, rejected}``; kto: ``{prompt, completion, label}``,
    where each pair gives a desirable (chosen) and an undesirable (rejected) row.
    """
    def answer(text: str) -> list[dict]:
        return [{"role": "assistant", "content": text}]

    if method == "sft":
        return [{"messages": r["messages"]} for r in rows]
    unpaired = [r for r in rows if "completion" in r]
    if method == "kto":
        out = []
        for r in rows:
            if "completion" in r:
                out.append({"prompt": r["prompt"], "completion": answer(r["completion"]), "label": r["label"]})
            else:
                out.append({"prompt": r["prompt"], "completion": answer(r["chosen"]), "label": True})
                out.append({"prompt": r["prompt"], "completion": answer(r["rejected"]), "label": False})
        return out
    if unpaired:
        raise TrainError(f"method {method} trains on pairs, but {len(unpaired)} rows are unpaired "
                         f"(prompt/completion/label, first {unpaired[0]['id']}); only kto takes unpaired rows")
    return [{"prompt": r["prompt"], "chosen": answer(r["chosen"]), "rejected": answer(r["rejected"])} for r in rows]


# ---------------------------------------------------------------------------------------------- trainers


def _device_args(s: dict[str, Any]) -> dict[str, Any]:
    # TRL defaults to bf16; on CPUs without bf16 units that is 10x slower. Activation checkpointing: GPU default.
    ckpt = s.get("gradient_checkpointing")
    ckpt = s["use_gpu"] if ckpt is None else ckpt
    if s["use_gpu"]:
        if s.get("strategy") == "fsdp":
            # FSDP2 through accelerate: every decoder layer and the root sharded, full state dict on save,
            # FSDP's own activation checkpointing (the Trainer's would add an all-gather in the backward). Not
            # with LoRA: FSDP's checkpoint wrapper renames the layers (``_checkpoint_wrapped_module``), and peft,
            # matching the adapter's names against the full state dict, then saves an empty adapter (seen on
            # two ranks: tests/test_train.py); the Trainer's activation checkpointing renames nothing.
            lora = bool(s.get("lora"))
            return {"bf16": True, "activation_checkpointing": ckpt and lora, "fsdp": "full_shard auto_wrap",
                    "fsdp_config": {"version": 2, "state_dict_type": "FULL_STATE_DICT",
                                    "activation_checkpointing": ckpt and not lora}}
        return {"bf16": True, "activation_checkpointing": ckpt}
    return {"use_cpu": True, "bf16": False, "fp16": False, "activation_checkpointing": ckpt}


def _common_args(s: dict[str, Any], output_dir: str) -> dict[str, Any]:
    return {
        "output_dir": output_dir,
        "max_steps": s["max_steps"],
        "per_device_train_batch_size": s["per_device_batch_size"],
        "per_device_eval_batch_size": s["per_device_batch_size"],
        "gradient_accumulation_steps": s["gradient_accumulation_steps"],
        "learning_rate": s["learning_rate"],
        "lr_scheduler_type": s["lr_scheduler_type"],
        "warmup_steps": math.ceil(s["warmup_ratio"] * s["max_steps"]),
        "logging_steps": s["logging_steps"],
        # A non-finite loss is logged as it is (the Trainer's default logged 0.0 for an all-NaN window) and stops
        # training (_finite_guard).
        "logging_nan_inf_filter": False,
        "save_strategy": "no",  # SaveAtSteps decides
        "eval_strategy": "no",  # evaluated at every saved step, by SaveAtSteps
        "save_only_model": s.get("save_only_model", False),
        "report_to": ["tensorboard"],  # event files under <output_dir>/runs/ (TB_DIR)
        "seed": s["seed"],
        "data_seed": s["seed"],
        "dataloader_num_workers": 0,
        "max_length": s["max_length"],
        **_device_args(s),
    }


def _load_model(path: str, use_gpu: bool, lora: bool = False):
    """The starting weights: float32, which the Trainer's ``bf16`` autocasts to bf16 compute on GPU.

    Trained weights stay float32 (master weights) on every strategy: AdamW's step at preference-tuning rates
    (5e-7) is far below bf16's spacing at a typical weight (8e-5 at 0.02) and would round away in bf16
    weights. With LoRA only the adapters train (peft keeps them float32), so the frozen base loads in bf16
    on GPU.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .. import models

    dtype = torch.bfloat16 if use_gpu and lora else torch.float32
    if use_gpu:
        models.varying_length_attention()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    models.check_finite(model, path)
    return model


def chat_tokenizer(model_path: str, chat_template: str | None):
    """A fresh tokenizer (trainers modify it) that has a chat template."""
    from .. import models

    tok = models.tokenizer(model_path, chat_template)
    if tok.chat_template is None:
        raise TrainError(f"{model_path} has no chat template; set model.chat_template to a .jinja file")
    return tok


def _peft_config(lora: dict[str, Any] | None):
    if not lora:
        return None
    from peft import LoraConfig

    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=lora["target_modules"], task_type="CAUSAL_LM")


def _trainer_classes(method: str):
    """(config class, trainer class, method-specific config arguments from the settings)."""
    if method == "sft":
        from trl import SFTConfig, SFTTrainer

        return SFTConfig, SFTTrainer, lambda p: {}
    if method in ("dpo", "ipo"):
        from trl import DPOConfig, DPOTrainer

        def dpo_args(p: dict[str, Any]) -> dict[str, Any]:
            if method == "ipo":
                return {"beta": p["beta"], "loss_type": ["ipo"],
                        "precompute_ref_log_probs": p["precompute_ref_log_probs"]}
            # Every dpo parameter (config.METHOD_PARAMS) is DPOConfig's own, by the same name.
            losses = p["loss_type"]
            return {**p, "loss_type": [losses] if isinstance(losses, str) else list(losses)}

        return DPOConfig, DPOTrainer, dpo_args
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOConfig, KTOTrainer, lambda p: dict(p)  # every kto parameter is KTOConfig's own, by the same name
    if method in ("cpo", "simpo"):
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        if method == "cpo":
            return CPOConfig, CPOTrainer, lambda p: {
                "loss_type": p["loss_type"], "beta": p["beta"], "cpo_alpha": p["cpo_alpha"],
                "label_smoothing": p["label_smoothing"], "alpha": p["alphapo_alpha"]}
        return CPOConfig, CPOTrainer, lambda p: {"loss_type": "simpo", "beta": p["beta"], "simpo_gamma": p["gamma"],
                                                 "cpo_alpha": 0.0, "alpha": p["alphapo_alpha"]}
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer, lambda p: {"beta": p["lambda"]}  # TRL's ORPO beta is the paper's lambda
    raise TrainError(f"unknown method {method!r}")


def build_trainer(method: str, rows: list[dict], model_path: str, settings: dict[str, Any], output_dir: str,
                  chat_template: str | None = None, eval_rows: list[dict] | None = None):
    """The TRL trainer for ``method`` ('sft' or a preference method) on normalised rows.

    sft rows: ``{messages}``, loss on assistant tokens only when ``settings['assistant_only_loss']``;
    preference rows: ``{prompt: messages, chosen: str, rejected: str}`` (or unpaired ``completion``/``label``
    for kto). Reference-model methods (dpo, ipo, kto) use the starting weights as the reference (with LoRA:
    the weights with the adapters off); cpo, simpo and orpo have none.
    """
    from datasets import Dataset

    from .. import models

    config_cls, trainer_cls, method_args = _trainer_classes(method)
    tok = chat_tokenizer(model_path, chat_template)
    extra: dict[str, Any] = {}
    if method == "sft":
        if settings["assistant_only_loss"]:
            training_template = models.training_chat_template(tok)
            if training_template:
                tok.chat_template = training_template  # renders the same; saved checkpoints carry it
        extra = {"assistant_only_loss": settings["assistant_only_loss"], "packing": settings.get("packing", False)}
    args = config_cls(**_common_args(settings, output_dir), **extra,
                      **method_args(settings.get("params", {})))
    kwargs: dict[str, Any] = {}
    if method in ("dpo", "ipo", "kto"):
        kwargs["ref_model"] = None  # a copy of the starting model (or the adapters switched off)
        if args.precompute_ref_log_probs:
            trainer_cls = _precompute_on_every_rank(trainer_cls)
    peft_config = _peft_config(settings.get("lora"))
    if peft_config is not None:
        kwargs["peft_config"] = peft_config
    trainer = trainer_cls(
        model=_load_model(model_path, settings["use_gpu"], lora=peft_config is not None), args=args,
        train_dataset=Dataset.from_list(method_dataset(rows, method)),
        eval_dataset=Dataset.from_list(method_dataset(eval_rows, method)) if eval_rows else None,
        processing_class=tok, **kwargs,
    )
    trainer.add_callback(_throughput_callback(TokenCounter(trainer.model)))
    trainer.add_callback(_finite_guard(method))  # after the TensorBoard and throughput callbacks: they log first
    return trainer


def _precompute_on_every_rank(trainer_cls):
    """``trainer_cls`` whose precomputed reference log-probs every rank keeps for itself.

    TRL (1.16: DPO and KTO alike) runs the reference forwards on every rank and gathers the log-probs of all
    rows to every rank, then has rank 0 alone write them to a datasets cache file that every rank opens. For
    an in-memory dataset (the stage's) that file is rank 0's own temporary file, under a random name: every
    other rank failed with FileNotFoundError (2 Ray Train workers, DDP and FSDP2). Here each rank writes the
    log-probs it already holds to its own cache file, with TRL's own code: the same values on every rank,
    nothing shared between processes or nodes. A dataset backed by files keeps TRL's behaviour (one cache
    file beside them, which every rank can open where they are).
    """
    class EveryRankPrecomputes(trainer_cls):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            if dataset.cache_files:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            accelerator = self.accelerator
            shared = type(accelerator)
            accelerator.__class__ = type("EveryRankWrites", (shared,), {"is_main_process": property(lambda _: True)})
            try:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                accelerator.__class__ = shared

    EveryRankPrecomputes.__name__ = EveryRankPrecomputes.__qualname__ = trainer_cls.__name__
    return EveryRankPrecomputes


# --------------------------------------------------------------------------------------------- callbacks


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


def _throughput_callback(counter: TokenCounter):
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


def _finite_guard(stage: str):
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


def _check_saved_weights(stage: str, step: int, model, log_history: list[dict]) -> None:
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


def _save_and_report_callback(stage: str, save_steps: list[int], has_eval: bool, trainer):
    """Save (and evaluate) at exactly ``save_steps``; report each checkpoint to Ray Train (kept, never rotated)."""
    from transformers import TrainerCallback

    class SaveAtSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in save_steps:
                control.should_save = True
                control.should_evaluate = has_eval
            return control

        def on_save(self, args, state, control, **kwargs):
            import ray.train

            step = state.global_step
            _check_saved_weights(stage, step, trainer.model, state.log_history)
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
            ray.train.report(metrics, checkpoint=ckpt)

    return SaveAtSteps()


# ------------------------------------------------------------------------------------------------ Ray


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
    trainer.add_callback(_save_and_report_callback(job["method"], job["save_steps"], bool(eval_rows), trainer))
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
        storage_path: str, resources: dict[str, Any], chat_template: str | None = None,
        eval_rows: list[dict] | None = None, max_failures: int = 0) -> dict[str, Any]:
    """Run ``method`` ('sft' or a preference method) on Ray Train.

    Returns ``{checkpoints: [{step, path, metrics}], history: [every log entry], facts: {strategy, ...},
    tensorboard: <dir in the latest checkpoint>}``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cpus = resources["cpus_per_worker"]
    strategy = resources.get("strategy", "auto")
    if strategy == "auto":
        strategy = "fsdp" if resources["use_gpu"] and resources["num_workers"] > 1 else "ddp"
    import ray

    # The rows go to the object store once, and each worker (a restarted one too) fetches them by reference:
    # Ray Train warns against data in train_loop_config, which it serialises into its run context.
    job = {
        "method": method, "rows": ray.put(rows), "eval_rows": ray.put(eval_rows) if eval_rows else None, "model": model,
        "settings": {**settings, "use_gpu": resources["use_gpu"], "strategy": strategy},
        "save_steps": save_steps, "chat_template": chat_template, "torch_threads": max(1, math.ceil(cpus)),
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=resources["num_workers"], use_gpu=resources["use_gpu"],
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
        raise RuntimeError(f"{method}: checkpoints for steps {missing} were not reported")
    latest = result.checkpoint  # its trainer_state.json only (not the weights, which may be on cloud storage)
    with latest.filesystem.open_input_file(latest.path.rstrip("/") + "/trainer_state.json") as f:
        history = json.loads(f.read())["log_history"]
    last = checkpoints[-1]["metrics"]
    facts = {k: last[k] for k in ("strategy", "world_size", "device", "dtype", "weights", "backend", "lora") if k in last}
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


def train_settings(section: dict[str, Any], seed: int, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The trainer settings of an sft or pref config section (everything but data and schedule choices)."""
    keys = ("max_steps", "per_device_batch_size", "gradient_accumulation_steps", "learning_rate",
            "lr_scheduler_type", "warmup_ratio", "logging_steps", "max_length", "save_only_model",
            "gradient_checkpointing", "lora")
    out = {**{k: section[k] for k in keys}, "seed": seed}
    if method == "sft":
        out.update(assistant_only_loss=section["assistant_only_loss"], packing=section["packing"])
    else:
        out["params"] = dict(params or {})
    return out
