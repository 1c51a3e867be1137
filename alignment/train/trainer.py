"""The TRL trainer of a method (``build_trainer``): a plain function over plain data (rows, a model path, a dict
of settings) that runs inside Ray Train workers and without Ray. SFT (``SFTTrainer``) and every preference method
of methods.METHODS (DPO and IPO: ``DPOTrainer``; KTO: ``KTOTrainer``; CPO and SimPO: ``CPOTrainer``; ORPO:
``ORPOTrainer``), on CPU or GPU (DDP or FSDP2), with LoRA or not.
"""

from __future__ import annotations

import math
import time
from typing import Any

from .callbacks import TokenCounter, add_time, finite_guard, throughput_callback
from .data import method_dataset, method_spec
from .errors import TrainError


def _device_args(s: dict[str, Any]) -> dict[str, Any]:
    # TRL defaults to bf16; on CPUs without bf16 units that is 10x slower. Activation checkpointing: GPU default.
    ckpt = s.get("gradient_checkpointing")
    ckpt = s["use_gpu"] if ckpt is None else ckpt
    if s["use_gpu"]:
        if s.get("strategy") == "fsdp":
            # FSDP2: every decoder layer sharded, full state dict on save, FSDP's own activation checkpointing
            # (the Trainer's adds an all-gather in the backward) except with LoRA, whose layers FSDP's wrapper
            # renames so that peft saves an empty adapter (tests/train/test_train.py, two ranks).
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
        # training (callbacks.finite_guard).
        "logging_nan_inf_filter": False,
        "save_strategy": "no",  # SaveAtSteps decides
        "eval_strategy": "no",  # evaluated at every saved step, by SaveAtSteps
        "save_only_model": s["save_only_model"],
        "report_to": ["tensorboard"],  # event files under <output_dir>/runs/ (callbacks.TB_DIR)
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


def trainer_args(method: str, settings: dict[str, Any], output_dir: str):
    """The TRL config object of ``method`` ('sft' or a preference method) for ``settings``: the arguments every
    trainer shares, then sft's own (assistant-only loss, packing) or the method's parameters (``params``: its
    defaults in methods.METHODS where one is missing) renamed and completed as the table says."""
    spec = method_spec(method)
    config_cls, _ = spec.trl()
    if method == "sft":
        extra = {"assistant_only_loss": settings["assistant_only_loss"], "packing": settings["packing"]}
    else:
        extra = spec.trl_kwargs({**spec.params, **settings.get("params", {})})
    return config_cls(**_common_args(settings, output_dir), **extra)


def build_trainer(method: str, rows: list[dict], model_path: str, settings: dict[str, Any], output_dir: str,
                  chat_template: str | None = None, eval_rows: list[dict] | None = None,
                  timings: dict[str, float] | None = None):
    """The TRL trainer for ``method`` ('sft' or a preference method) on normalised rows.

    sft rows: ``{messages}``, loss on assistant tokens only when ``settings['assistant_only_loss']``;
    preference rows: ``{prompt: messages, chosen: str, rejected: str}`` (or unpaired ``completion``/``label``
    for kto). Methods with a reference model (``reference_model`` in methods.METHODS: dpo, ipo, kto) use the
    starting weights as the reference (with LoRA: the weights with the adapters off); cpo, simpo and orpo have none.

    ``timings`` (optional) gets the seconds of each part of the set-up: ``import_s`` (TRL, transformers' model
    class of the checkpoint: what a fresh process imports first), ``load_s`` (tokenizer and starting weights),
    ``tokenize_s`` (the trainer's tokenization of the rows, where TRL does it in ``_prepare_dataset``: SFT, DPO,
    KTO) and ``trainer_init_s`` (the rest of the trainer's set-up: the reference model's load among it).
    """
    started = time.perf_counter()
    from datasets import Dataset

    from .. import models

    spec = method_spec(method)
    _, trainer_cls = spec.trl()
    if timings is not None:
        _import_model_class(model_path)
        mark = time.perf_counter()
        add_time(timings, "import_s", mark - started)
    tok = chat_tokenizer(model_path, chat_template)
    if method == "sft" and settings["assistant_only_loss"]:
        training_template = models.training_chat_template(tok)
        if training_template:
            tok.chat_template = training_template  # renders the same; saved checkpoints carry it
    args = trainer_args(method, settings, output_dir)
    kwargs: dict[str, Any] = {}
    if spec.reference_model:
        kwargs["ref_model"] = None  # a copy of the starting model (or the adapters switched off)
        if args.precompute_ref_log_probs:
            trainer_cls = _precompute_on_every_rank(trainer_cls)
    peft_config = _peft_config(settings.get("lora"))
    if peft_config is not None:
        kwargs["peft_config"] = peft_config
    model = _load_model(model_path, settings["use_gpu"], lora=peft_config is not None)
    if timings is not None:
        trainer_cls = _timed_tokenization(trainer_cls, timings)
        add_time(timings, "load_s", time.perf_counter() - mark)
        mark = time.perf_counter()
        tokenized = timings.get("tokenize_s", 0.0)
    trainer = trainer_cls(
        model=model, args=args,
        train_dataset=Dataset.from_list(method_dataset(rows, method)),
        eval_dataset=Dataset.from_list(method_dataset(eval_rows, method)) if eval_rows else None,
        processing_class=tok, **kwargs,
    )
    if timings is not None:
        add_time(timings, "trainer_init_s", time.perf_counter() - mark - (timings.get("tokenize_s", 0.0) - tokenized))
    trainer.add_callback(throughput_callback(TokenCounter(trainer.model)))
    trainer.add_callback(finite_guard(method))  # after the TensorBoard and throughput callbacks: they log first
    return trainer


def _import_model_class(model_path: str) -> None:
    """Imports transformers' model class of the checkpoint at ``model_path`` (its modeling module, and what that
    imports: a few seconds in a fresh process), as its first load would; nothing where it cannot tell the class."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(model_path))]
    except Exception:  # noqa: BLE001 - a remote-code or unknown architecture: its load imports it
        pass


def _timed_tokenization(trainer_cls, timings: dict[str, float]):
    """``trainer_cls`` adding the seconds of its ``_prepare_dataset`` (its rows' tokenization) to
    ``timings['tokenize_s']``; the class itself where it has no such method."""
    if not hasattr(trainer_cls, "_prepare_dataset"):
        return trainer_cls

    class TimedTokenization(trainer_cls):
        def _prepare_dataset(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return super()._prepare_dataset(*args, **kwargs)
            finally:
                add_time(timings, "tokenize_s", time.perf_counter() - started)

    TimedTokenization.__name__ = TimedTokenization.__qualname__ = trainer_cls.__name__
    return TimedTokenization


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
