"""Training: every method on a tiny model (TRL trainers without Ray), the data splits, the method-parameter
checks, and on local Ray the worker-count invariance and the resume of a run whose worker is killed."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import SETTINGS

from alignment import train
from alignment.config import ConfigError, ResourcesConfig, load_config
from alignment.methods import METHODS

SFT = {**SETTINGS, "max_steps": 12, "assistant_only_loss": True, "packing": False}


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_sft_masks_everything_but_assistant_tokens_and_learns(tiny_model, sft_rows, tmp_path):
    trainer = train.build_trainer("sft", sft_rows, str(tiny_model), SFT, str(tmp_path))
    batch = next(iter(trainer.get_train_dataloader()))
    tok = trainer.processing_class
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        trained = tok.decode([i for i, lab in zip(ids.tolist(), labels.tolist()) if lab != -100])
        assert "user" not in trained and "<|im_start|>" not in trained
        assert trained.endswith("<|im_end|>") or "<|im_end|>" in trained
    trainer.train()
    loss = losses(trainer)
    assert len(loss) == 12 and loss[-1] < loss[0] * 0.8
    logged = [h for h in trainer.state.log_history if "loss" in h]
    # tokens/s per logging step, from the real (unpadded) tokens fed to the model
    assert all(h.get("tokens_per_second", 0) > 0 for h in logged), [(h["step"], h.get("tokens_per_second"))
                                                                     for h in logged]
    assert logged[-1]["tokens"] > 12 * 4 * 5  # 12 steps of 4 rows of at least 5 tokens each
    assert list((tmp_path / train.TB_DIR).rglob("events.out.tfevents.*")), "no TensorBoard event file"


def test_packing_and_activation_checkpointing(tiny_model, sft_rows, tmp_path):
    trainer = train.build_trainer("sft", sft_rows, str(tiny_model), {**SFT, "packing": True, "max_steps": 6,
                                                                 "gradient_checkpointing": True},
                                  str(tmp_path))
    batch = next(iter(trainer.get_train_dataloader()))
    # several rows per sequence: position ids restart inside a packed row
    assert int((batch["position_ids"][0] == 0).sum()) > 1
    trainer.train()
    assert trainer.model.is_activation_checkpointing  # the Trainer turns it on when training starts
    assert losses(trainer)[-1] < losses(trainer)[0]
    assert all(h["tokens_per_second"] > 0 for h in trainer.state.log_history if "loss" in h)


def test_lora_trains_adapters_only_and_its_checkpoint_loads_merged(tiny_model, sft_rows, tmp_path, monkeypatch):
    import torch

    from alignment import models

    monkeypatch.setenv("ALIGNMENT_CACHE", str(tmp_path / "cache"))
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    trainer = train.build_trainer("sft", sft_rows, str(tiny_model), {**SFT, "lora": lora}, str(tmp_path / "out"))
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    assert losses(trainer)[-1] < losses(trainer)[0]
    trainer.save_model(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "adapter_config.json").is_file() and not (tmp_path / "ckpt" / "config.json").exists()
    merged = models.materialize(str(tmp_path / "ckpt"))
    assert merged.startswith(str(tmp_path / "cache")) and models.materialize(str(tmp_path / "ckpt")) == merged
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 9, 3]])
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model))(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(base, want, atol=1e-3)


# Each method with its defaults, and DPO variants: another loss, precomputed reference log-probs, RPO (DPO plus
# the NLL of chosen answers, weighted), WPO weighting with LD-DPO's length discount, f-DPO, TR-DPO.
DPO = METHODS["dpo"].params
PARAMS = {**{name: m.params for name, m in METHODS.items()},
          "dpo-hinge": {**DPO, "loss_type": "hinge"},
          "dpo-precomputed": {**DPO, "precompute_ref_log_probs": True},
          "dpo-rpo": {**DPO, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
          "dpo-wpo": {**DPO, "use_weighting": True, "ld_alpha": 0.5},
          "dpo-fdpo": {**DPO, "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
          "dpo-trdpo": {**DPO, "sync_ref_model": True, "ref_model_mixup_alpha": 0.5, "ref_model_sync_steps": 4},
          "kto-apo": {**METHODS["kto"].params, "loss_type": "apo_zero_unpaired"},
          "cpo-hinge": {**METHODS["cpo"].params, "loss_type": "hinge"},
          "simpo-alphapo": {**METHODS["simpo"].params, "alphapo_alpha": 0.25}}
TRL_NAMES = {"gamma": "simpo_gamma", "lambda": "beta", "alphapo_alpha": "alpha"}  # the config's name -> TRL's


@pytest.mark.parametrize("variant", list(PARAMS))
def test_each_preference_method_learns(tiny_model, pref_pairs, tmp_path, variant):
    method = variant.split("-")[0]
    settings = {**SETTINGS, "params": PARAMS[variant]}
    trainer = train.build_trainer(method, pref_pairs, str(tiny_model), settings, str(tmp_path))
    # Every parameter reaches TRL's config as it was set (DPOConfig holds loss_type as a list).
    given = {TRL_NAMES.get(name, name): value for name, value in PARAMS[variant].items()}
    if method == "dpo" and isinstance(given["loss_type"], str):
        given["loss_type"] = [given["loss_type"]]
    assert {name: getattr(trainer.args, name) for name in given} == given
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 10 and logs[-1]["loss"] < logs[0]["loss"]
    assert all(h["tokens_per_second"] > 0 and "learning_rate" in h for h in logs)
    if method != "kto":  # paired methods log the chosen/rejected reward margin and accuracy
        assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
        if method != "cpo":  # CPO's reward is the summed log-prob: the longer chosen answers start far behind
            assert logs[-1]["rewards/accuracies"] >= 0.75, [(h["rewards/accuracies"], h["rewards/margins"])
                                                            for h in logs]
    else:
        assert "rewards/chosen" in logs[-1] and "kl" in logs[-1]


def test_dpo_variants_train_differently_from_dpo_as_their_losses_say(tiny_model, pref_pairs, tmp_path):
    """At step 1 the policy is its reference, so DPO's loss is ln 2 and its margin 0. RPO adds half the chosen
    answers' NLL; WPO weights each pair below 1; f-DPO (alpha divergence) agrees at step 1 and not after;
    TR-DPO follows DPO until its reference is mixed towards the policy after step 4, which shrinks the margin."""
    import math

    def run(variant: str, steps: int = 6, **over) -> list[dict]:
        trainer = train.build_trainer("dpo", pref_pairs, str(tiny_model), {
            **SETTINGS, "max_steps": steps, "params": {**PARAMS[variant], **over}}, str(tmp_path / f"{variant}{over}"))
        trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h]

    dpo, rpo, wpo, fdpo, trdpo = (run(v) for v in ("dpo", "dpo-rpo", "dpo-wpo", "dpo-fdpo", "dpo-trdpo"))
    rpo_whole_nll = run("dpo-rpo", 1, loss_weights=[1.0, 1.0])
    assert abs(dpo[0]["loss"] - math.log(2)) < 1e-4 and dpo[0]["rewards/margins"] == 0
    nll = rpo_whole_nll[0]["loss"] - math.log(2)
    assert nll > 1 and abs(rpo[0]["loss"] - (math.log(2) + 0.5 * nll)) < 1e-4  # loss_weights [1, 0.5]
    assert abs(wpo[0]["loss"] - math.log(2)) > 1e-3
    assert abs(fdpo[0]["loss"] - math.log(2)) < 1e-4 and abs(fdpo[1]["loss"] - dpo[1]["loss"]) > 1e-3
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(dpo[:4], trdpo[:4])) < 1e-5
    assert trdpo[4]["rewards/margins"] < dpo[4]["rewards/margins"] - 0.1


def test_kto_from_unpaired_rows_and_paired_methods_refuse_them(tiny_model, pref_pairs, tmp_path):
    unpaired = [{"id": f"u{i}", "prompt": p["prompt"], "completion": p["chosen" if i % 2 else "rejected"],
                 "label": bool(i % 2)} for i, p in enumerate(pref_pairs)]
    assert train.method_dataset(pref_pairs[:3], "kto")[1]["label"] is False  # a pair: desirable + undesirable
    assert len(train.method_dataset(pref_pairs[:3], "kto")) == 6
    trainer = train.build_trainer("kto", unpaired, str(tiny_model), {**SETTINGS, "params": PARAMS["kto"]},
                                  str(tmp_path))
    trainer.train()
    assert losses(trainer)[-1] < losses(trainer)[0]
    with pytest.raises(train.TrainError, match="dpo trains on pairs.*only kto"):
        train.method_dataset(unpaired, "dpo")


def test_gpu_workers_keep_float32_weights_and_attention_off_cudnn(tiny_model, monkeypatch):
    # cuDNN attention rebuilds its plan for every batch shape (benchmarks/gpu_train.py --profile); a GPU worker
    # switches it off when it loads the model. Trained weights stay float32 (bf16 is the Trainer's autocast);
    # a LoRA base is frozen and loads in bf16. No GPU here: CUDA is made to look available.
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        train.trainer._load_model(str(tiny_model), use_gpu=False)
        assert torch.backends.cuda.cudnn_sdp_enabled()
        model = train.trainer._load_model(str(tiny_model), use_gpu=True)
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert next(model.parameters()).dtype == torch.float32
        lora_base = train.trainer._load_model(str(tiny_model), use_gpu=True, lora=True)
        assert next(lora_base.parameters()).dtype == torch.bfloat16
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_subsets_are_seeded_nested_and_disjoint_from_the_eval_rows():
    rows = [{"id": f"r{i}"} for i in range(50)]
    small, held = train.split_rows(rows, seed=3, eval_rows=5, num_rows=10)
    large, held2 = train.split_rows(list(reversed(rows)), seed=3, eval_rows=5, num_rows=30)
    ids = lambda rs: {r["id"] for r in rs}  # noqa: E731
    assert ids(held) == ids(held2) and len(held) == 5
    assert ids(small) < ids(large) and not ids(large) & ids(held)
    assert ids(train.split_rows(rows, seed=4, eval_rows=5, num_rows=10)[0]) != ids(small)
    with pytest.raises(train.TrainError, match="num_pairs=60 but only 45 rows"):
        train.split_rows(rows, seed=3, eval_rows=5, num_rows=60)


@pytest.mark.parametrize("override,message", [
    ("pref.gamma=0.5", "pref.gamma does not apply to method dpo; it is a parameter of simpo"),
    ("pref.loss_type=hinge pref.method=ipo",
     "pref.loss_type does not apply to method ipo; it is a parameter of dpo, kto, cpo"),
    ("pref.lambda=0.2 pref.method=simpo", "pref.lambda does not apply to method simpo; it is a parameter of orpo"),
    ("pref.desirable_weight=2 search.method=[dpo,cpo]", "does not apply to method dpo / cpo; it is a parameter of kto"),
    ("resources.strategy=fsdp", "fsdp needs GPU workers"),
    ("pref.start_from=instruct", "needs model.instruct"),
    ("pref.loss_type=[sigmoid,sft] pref.loss_weights=[1,2,3]", "3 weights for 2 loss types"),
    ("pref.loss_type=bco_pair pref.f_divergence_type=js_divergence", "js_divergence works with the loss types"),
    ("pref.loss_type=[sigmoid,aot] pref.use_weighting=true", "does not work with the aot losses"),
    ("pref.ref_model_sync_steps=8", "no effect unless pref.sync_ref_model is true"),
    ("pref.f_alpha_divergence_coef=0.2 pref.f_divergence_type=forward_kl", "unless pref.f_divergence_type is alpha"),
    ("pref.sync_ref_model=true pref.precompute_ref_log_probs=true", "cannot be precomputed"),
    ("pref.sync_ref_model=true pref.lora.r=8", "with pref.lora the reference"),
    ("pref.method=cpo pref.ld_alpha=0.5", "ld_alpha does not apply to method cpo; it is a parameter of dpo"),
    ("pref.method=kto pref.loss_type=hinge", "'hinge' is not a loss of kto; choose one of kto, apo_zero"),
    ("search.method=[dpo,cpo] pref.loss_type=robust", "'robust' is not a loss of cpo"),
    ("pref.method=cpo pref.loss_type=[sigmoid,hinge]", "only dpo sums several losses, not cpo"),
    ("pref.method=kto pref.sync_ref_model=true pref.precompute_ref_log_probs=true", "cannot be precomputed"),
])
def test_a_parameter_for_another_method_is_a_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override.split())


def test_checkpoint_paths_from_ray_become_uris_of_their_storage():
    # Ray Train reports a checkpoint on cloud storage by its path on that file system (scheme and options gone).
    assert train.storage_uri("s3://b/runs/sft?region=x", "b/runs/sft/checkpoint_1") == \
        "s3://b/runs/sft/checkpoint_1?region=x"
    assert train.storage_uri("gs://b/p", "b/p/ck") == "gs://b/p/ck"
    assert train.storage_uri("hdfs://namenode:8020/runs", "/runs/ck") == "hdfs://namenode:8020/runs/ck"
    assert train.storage_uri("/local/runs", "/local/runs/ck") == "/local/runs/ck"
    assert train.storage_uri("file:///local/runs", "/local/runs/ck") == "/local/runs/ck"


def test_method_params_take_the_methods_defaults():
    cfg = load_config(None, ["pref.method=simpo", "pref.beta=2.5"])
    assert cfg.pref.method_params() == {"beta": 2.5, "gamma": 1.0, "alphapo_alpha": 0.0}
    assert load_config(None, ["pref.method=orpo", "pref.lambda=0.3"]).pref.method_params() == {"lambda": 0.3}
    grid = load_config(None, ["search.method=[dpo,kto]", "search.num_pairs=[4,8]", "pref.beta=0.2"]).search_grid()
    assert [(p["method"], p["num_pairs"]) for p in grid] == [("dpo", 4), ("dpo", 8), ("kto", 4), ("kto", 8)]


# ------------------------------------------------------------------------------------------ on local Ray

RES = ResourcesConfig(num_workers=1, use_gpu=False, cpus_per_worker=1.0)


def sft_settings(**over) -> dict:
    s = {k: v for k, v in SFT.items() if k != "use_gpu"}
    return {**s, "learning_rate": 2e-3, **over}


def _fsdp_worker(tmp_path: Path, name: str, spec: dict, ranks: int) -> dict:
    """Run tests/train/fsdp_worker.py on ``ranks`` processes (torchrun) or alone; its rank 0's result."""
    import subprocess
    import sys

    out = tmp_path / name
    out.mkdir()
    (out / "spec.json").write_text(json.dumps({**spec, "out": str(out)}))
    worker = str(Path(__file__).with_name("fsdp_worker.py"))
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
              if ranks > 1 else [sys.executable])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launch, worker, str(out / "spec.json")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {**json.loads((out / "result.json").read_text()), "final": out / "final"}


@pytest.mark.integration
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_fsdp2_across_two_ranks_shards_saves_and_matches_one_process(tiny_model, sft_rows, pref_pairs, tmp_path,
                                                                     method):
    """The FSDP2 arguments GPU workers get, run on 2 CPU ranks over gloo (accelerate's GPU-only gate lifted in
    the worker processes: see tests/train/fsdp_worker.py): each rank holds half of every weight, the loss follows a
    single process on the same global batches, DPO's reference model works sharded, and the collective save
    writes a whole checkpoint that transformers loads. What this cannot check is NCCL on several GPUs."""
    import torch
    from transformers import AutoModelForCausalLM

    rows, settings = (sft_rows, SFT) if method == "sft" else (pref_pairs, {**SETTINGS, "params": METHODS["dpo"].params})
    spec = {"method": method, "rows": rows[4:], "eval_rows": rows[:4], "model": str(tiny_model), "save_at": [4]}
    one = _fsdp_worker(tmp_path, "one", {**spec, "settings": {**settings, "per_device_batch_size": 4}}, 1)
    two = _fsdp_worker(tmp_path, "two", {**spec, "settings": {**settings, "per_device_batch_size": 2}}, 2)
    assert one["facts"]["strategy"] == "single-process" and one["placements"] == ["plain"]
    assert {k: two["facts"][k] for k in ("strategy", "world_size", "backend", "device")} == \
        {"strategy": "fsdp2", "world_size": 2, "backend": "gloo", "device": "cpu"}
    assert two["placements"] == ["(Shard(dim=0),)"]  # every parameter a DTensor sharded over the 2 ranks
    assert two["local_elements"] * 2 == one["local_elements"]
    assert len(two["losses"]) == len(one["losses"]) == settings["max_steps"]
    assert len(one["eval_losses"]) == len(two["eval_losses"]) == 1  # evaluated at the step-4 checkpoint, sharded
    # Eval losses are per-batch means averaged (batches of 4 rows on one process, 2 a rank on two): close, not equal.
    assert abs(one["eval_losses"][0] - two["eval_losses"][0]) < 1e-3 * abs(one["eval_losses"][0])
    assert two["losses"][-1] < two["losses"][0]
    # Same global batches, so the same curve up to float32 reduction order (seen: 1e-6).
    assert max(abs(a - b) for a, b in zip(one["losses"], two["losses"])) < 1e-4, (one["losses"], two["losses"])
    a = AutoModelForCausalLM.from_pretrained(one["final"]).state_dict()
    b = AutoModelForCausalLM.from_pretrained(two["final"]).state_dict()
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model)).state_dict()
    assert max((base[k] - b[k]).abs().max().item() for k in a) > 1e-3  # it trained
    assert all(v.dtype == torch.float32 for v in b.values())


@pytest.mark.integration
def test_fsdp2_across_two_ranks_resumes_without_repeating_or_losing_steps(tiny_model, sft_rows, tmp_path):
    """A 2-rank FSDP2 run resumed from its step-6 checkpoint (sharded optimizer state included) runs steps 7-12
    only, with the losses of the run that was not interrupted."""
    spec = {"method": "sft", "rows": sft_rows, "model": str(tiny_model),
            "settings": {**SFT, "per_device_batch_size": 2, "save_only_model": False}}
    full = _fsdp_worker(tmp_path, "full", {**spec, "save_at": [6]}, 2)
    resumed = _fsdp_worker(tmp_path, "resumed", {**spec, "resume": str(tmp_path / "full" / "checkpoint-6")}, 2)
    assert full["steps_run"] == list(range(1, 13)) and resumed["steps_run"] == list(range(7, 13))
    assert max(abs(a - b) for a, b in zip(full["losses"][6:], resumed["losses"][6:])) < 1e-5
    assert len(resumed["losses"]) == 12


@pytest.mark.integration
def test_fsdp2_with_lora_saves_the_whole_adapter_and_resumes(tiny_model, sft_rows, tmp_path):
    """LoRA under FSDP2 on 2 ranks in a GPU worker's dtypes (bf16 autocast, the frozen base in bf16, float32
    adapters, activation checkpointing): the saved adapter holds every LoRA weight (FSDP's checkpoint wrapper had
    made peft save an empty one) and loads onto the base; the loss follows one process; a run resumed from the
    step-6 checkpoint runs steps 7-12 with the same losses."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    spec = {"method": "sft", "rows": sft_rows, "model": str(tiny_model), "as_gpu": True,
            "settings": {**SFT, "lora": lora, "learning_rate": 2e-2, "save_only_model": False}}
    one = _fsdp_worker(tmp_path, "one", {**spec, "settings": {**spec["settings"], "per_device_batch_size": 4}}, 1)
    spec["settings"]["per_device_batch_size"] = 2
    two = _fsdp_worker(tmp_path, "two", {**spec, "save_at": [6]}, 2)
    resumed = _fsdp_worker(tmp_path, "resumed", {**spec, "resume": str(tmp_path / "two" / "checkpoint-6")}, 2)
    assert {k: two["facts"][k] for k in ("strategy", "world_size", "dtype", "weights", "lora")} == \
        {"strategy": "fsdp2", "world_size": 2, "dtype": "bf16", "weights": "float32", "lora": True}
    assert two["placements"] == ["(Shard(dim=0),)"] and two["local_elements"] * 2 == one["local_elements"]
    a = load_file(one["final"] / "adapter_model.safetensors")
    b = load_file(two["final"] / "adapter_model.safetensors")
    assert len(a) == 28 and b.keys() == a.keys()  # lora_A and lora_B of 7 projections in 2 layers
    assert all(v.abs().max() > 0 for k, v in b.items() if "lora_B" in k)  # trained (lora_B starts at zero)
    assert max(abs(x - y) for x, y in zip(one["losses"], two["losses"])) < 1e-3, (one["losses"], two["losses"])
    assert resumed["steps_run"] == list(range(7, 13))
    assert max(abs(x - y) for x, y in zip(two["losses"][6:], resumed["losses"][6:])) < 1e-4
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)), str(two["final"]))


@pytest.mark.integration
@pytest.mark.parametrize("method,strategy", [("dpo", "ddp"), ("kto", "fsdp")])
def test_precomputed_reference_log_probs_on_two_ranks_train_as_the_live_reference(tiny_model, pref_pairs, tmp_path,
                                                                                  method, strategy):
    """With ``precompute_ref_log_probs`` on two ranks (the CPU workers' DDP, and the FSDP2 arguments of GPU
    workers) every rank gets the reference log-probs of every row, and training follows the same two ranks with
    the live reference model, step for step and at the evaluated checkpoint. TRL alone had rank 0 write them
    to a file in its own temporary directory, which the other rank failed to open (FileNotFoundError)."""
    params = METHODS[method].params
    spec = {"method": method, "rows": pref_pairs[4:], "eval_rows": pref_pairs[:4], "model": str(tiny_model),
            "save_at": [3], "strategy": strategy,
            "settings": {**SETTINGS, "max_steps": 6, "per_device_batch_size": 2, "params": params}}
    live = _fsdp_worker(tmp_path, "live", spec, 2)
    precomputed = {**spec["settings"], "params": {**params, "precompute_ref_log_probs": True}}
    pre = _fsdp_worker(tmp_path, "pre", {**spec, "settings": precomputed}, 2)
    assert {k: pre["facts"][k] for k in ("strategy", "world_size")} == \
        {"strategy": {"ddp": "ddp", "fsdp": "fsdp2"}[strategy], "world_size": 2}
    assert len(pre["losses"]) == 6 and len(pre["eval_losses"]) == 1
    assert pre["losses"][-1] < pre["losses"][0]
    assert max(abs(a - b) for a, b in zip(live["losses"], pre["losses"])) < 1e-4, (live["losses"], pre["losses"])
    assert abs(live["eval_losses"][0] - pre["eval_losses"][0]) < 1e-4


@pytest.mark.integration
def test_two_workers_reach_the_loss_of_one(ray_local, tiny_model, sft_rows, tmp_path):
    """DDP over 2 CPU workers with 2 rows each per step sees the same global batches as 1 worker with 4."""
    one = train.fit("sft", sft_rows, str(tiny_model), sft_settings(per_device_batch_size=4, max_steps=8), [8],
                    str(tmp_path / "one"), RES)
    two = train.fit("sft", sft_rows, str(tiny_model), sft_settings(per_device_batch_size=2, max_steps=8,
                                                                   save_only_model=False), [8],
                    str(tmp_path / "two"), RES.model_copy(update={"num_workers": 2}))
    assert one["facts"]["strategy"] == "single-process" and one["facts"]["world_size"] == 1
    assert two["facts"] == {**two["facts"], "strategy": "ddp", "world_size": 2, "device": "cpu", "backend": "gloo"}
    l1 = [h["loss"] for h in one["history"] if "loss" in h]
    l2 = [h["loss"] for h in two["history"] if "loss" in h]
    assert len(l1) == len(l2) == 8 and l1[-1] < l1[0]
    # Per-token means are taken per worker and then averaged, so the losses differ slightly: 2% at most.
    assert all(abs(a - b) <= 0.02 * a for a, b in zip(l1, l2)), (l1, l2)
    assert all(h["tokens_per_second"] > 0 for h in two["history"] if "loss" in h)
    # Each worker's checkpoint files are merged into the one reported checkpoint: both ranks' random states.
    files = {p.name for p in Path(two["checkpoints"][-1]["path"]).iterdir()}
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "alignment_metrics.json"} <= files, files


def _kill_the_worker_once(storage: Path, killed: dict) -> None:
    """When the first checkpoint reaches storage, SIGKILL the Ray Train worker process (as a node loss would)."""
    import psutil

    deadline = time.time() + 300
    while time.time() < deadline and not killed:
        if list(storage.rglob("checkpoint_*")):
            for proc in psutil.process_iter(["cmdline"]):
                if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed["checkpoints"] = len(list(storage.rglob("checkpoint_*")))
                    killed["pid"] = proc.pid
            return
        time.sleep(0.02)


@pytest.mark.integration
def test_a_killed_worker_resumes_from_its_latest_checkpoint(ray_local, tiny_model, sft_rows, tmp_path):
    storage = tmp_path / "ray"
    killed: dict = {}
    watcher = threading.Thread(target=_kill_the_worker_once, args=(storage, killed), daemon=True)
    watcher.start()
    steps = [10, 20, 30, 40, 50, 60]
    run = train.fit("sft", sft_rows, str(tiny_model), sft_settings(max_steps=60, save_only_model=False), steps,
                    str(storage), RES, max_failures=1)
    watcher.join()
    assert killed.get("pid") and killed["checkpoints"] < len(steps), killed  # killed mid-run
    assert [c["step"] for c in run["checkpoints"]] == steps
    assert all(Path(c["path"], "model.safetensors").is_file() for c in run["checkpoints"])
    logged = [h["step"] for h in run["history"] if "loss" in h]
    assert logged == list(range(1, 61)), "a step was repeated or lost"
    # the resumed run continued the killed run's TensorBoard history
    assert list(Path(run["tensorboard"]).rglob("events.out.tfevents.*"))


def test_a_checkpoint_moved_into_storage_merges_each_ranks_files_and_leaves_nothing_behind(tmp_path):
    from alignment.train.callbacks import _move_tree

    def tree(root: Path, files: dict[str, str]) -> Path:
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        return root

    rank0 = tree(tmp_path / "rank0" / "checkpoint-2", {"model.safetensors": "w", "rng_state_0.pth": "r0",
                                                       "tensorboard/events.1": "e"})
    rank1 = tree(tmp_path / "rank1" / "checkpoint-2", {"rng_state_1.pth": "r1", "tensorboard/events.2": "e2"})
    dest = tmp_path / "storage" / "checkpoint_0"
    _move_tree(rank0, dest)
    _move_tree(rank1, dest)
    got = {p.relative_to(dest).as_posix(): p.read_text() for p in dest.rglob("*") if p.is_file()}
    assert got == {"model.safetensors": "w", "rng_state_0.pth": "r0", "rng_state_1.pth": "r1",
                   "tensorboard/events.1": "e", "tensorboard/events.2": "e2"}
    assert not rank0.exists() and not rank1.exists()


def _actor_classes() -> list[str]:
    import ray._private.state

    return [a["ActorClassName"] for a in ray._private.state.actors().values()]


@pytest.mark.integration
def test_fit_scores_the_heldout_pairs_in_its_worker_as_a_task_after_it_would(ray_local, tiny_model, pref_pairs,
                                                                           tmp_path):
    """``heldout_rows``: rank 0 scores them once training is done, with the same call on the same files as a task
    after ``fit`` (the pref stage's), so the same numbers. The checkpoints are whole in local storage (moved there),
    the run's phases are in its facts, and the run started no actor that serves nothing on the embedded Ray: no
    DatasetManager (no Ray Data datasets), preemption watcher (one node) or placement-group cleaner (no dashboard)."""
    from collections import Counter

    from alignment.evaluate import heldout

    settings = {**{k: v for k, v in SETTINGS.items() if k != "use_gpu"}, "max_steps": 2,
                "params": METHODS["dpo"].params}
    held = pref_pairs[:4]
    before = _actor_classes()
    run = train.fit("dpo", pref_pairs[4:], str(tiny_model), settings, [1, 2], str(tmp_path / "ray"), RES,
                    heldout_rows=held, heldout_fn=heldout.heldout)
    started = list((Counter(_actor_classes()) - Counter(before)).elements())
    assert any("RayTrainWorker" in c for c in started), started  # the check sees the run's actors
    assert not [c for c in started if any(n in c for n in ("DatasetManager", "PreemptionWatcher",
                                                            "PlacementGroupCleaner"))], started
    want = heldout.heldout(run["checkpoints"][-1]["path"], str(tiny_model), held, settings["max_length"], None,
                           False, RES.cpus_per_worker)
    assert run["heldout"] == want and want["heldout_pairs"] == 4 and want["pref_margin"] != 0
    for c in run["checkpoints"]:
        files = {p.name for p in Path(c["path"]).iterdir()}
        assert {"model.safetensors", "trainer_state.json", "alignment_metrics.json"} <= files, files
    timings = run["facts"]["timings"]
    assert set(train.run.PHASES) - {"eval_s"} <= set(timings) and timings["fit_s"] > 0, timings
