"""Nothing broken handed on by training: rows that cannot train are set aside before it, a non-finite loss or
gradient norm stops it (logged as NaN, never 0.0), and non-finite weights never reach training or generation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import SETTINGS, shared

from alignment import formats, models, pipeline, train
from alignment.config import load_config
from alignment.manifest import run_stage
from alignment.methods import METHODS

HH = ("preferences", "hh_rlhf_harmless_base_test.jsonl.gz")


@pytest.fixture(scope="module")
def hh_pairs() -> list[dict]:
    rows, _ = formats.read_rows(str(shared(*HH)), "preference")
    return rows[:48]


def test_rows_without_a_completion_token_empty_or_identical_answers_are_set_aside(tiny_model, pref_pairs):
    tok = models.tokenizer(str(tiny_model))
    long_prompt = [{"role": "user", "content": "explain " * 200}]
    rows = [*pref_pairs[:4],
            {"id": "long", "prompt": long_prompt, "chosen": "yes", "rejected": "no"},
            {"id": "empty", "prompt": pref_pairs[0]["prompt"], "chosen": "  ", "rejected": "no"},
            {"id": "same", "prompt": pref_pairs[0]["prompt"], "chosen": "yes thank you", "rejected": "yes thank you "},
            {"id": "kto-empty", "prompt": pref_pairs[0]["prompt"], "completion": "", "label": True}]
    for method in ("dpo", "kto", "simpo", "orpo"):
        kept, aside = train.trainable_rows(method, rows, tok, 128)
        assert [r["id"] for r in kept] == [r["id"] for r in pref_pairs[:4]]
        why = {a["id"]: (a["field"], a["error"]) for a in aside}
        assert set(why) == {"long", "empty", "same", "kto-empty"}
        assert why["long"][0] == "prompt" and why["long"][1].startswith("no completion token within max_length=128")
        assert why["empty"] == ("chosen", "empty answer") and why["kto-empty"] == ("completion", "empty answer")
        assert why["same"][0] == "rejected" and "same answer" in why["same"][1]
    sft = [{"id": "ok", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
           {"id": "cut", "messages": [*long_prompt, {"role": "assistant", "content": "hello"}]}]
    kept, aside = train.trainable_rows("sft", sft, tok, 128)
    assert [r["id"] for r in kept] == ["ok"] and aside[0]["id"] == "cut" and aside[0]["field"] == "messages"


def test_the_rows_kept_are_the_rows_trl_trains_on(tiny_model, hh_pairs, tmp_path):
    """The count follows each trainer's own truncation: TRL's DPO drops no kept row (it silently drops a row
    whose prompt fills max_length), and every kept row keeps a completion token in CPO's tokenisation."""
    tok = models.tokenizer(str(tiny_model))
    kept, aside = train.trainable_rows("dpo", hh_pairs, tok, 256)
    assert kept and aside and len(kept) + len(aside) == len(hh_pairs)
    dpo_settings = {**SETTINGS, "max_length": 256, "params": METHODS["dpo"].params}
    dpo = train.build_trainer("dpo", kept, str(tiny_model), dpo_settings, str(tmp_path / "d"))
    assert len(dpo.train_dataset) == len(kept)
    kept, _ = train.trainable_rows("simpo", hh_pairs, tok, 256)
    simpo = train.build_trainer("simpo", kept, str(tiny_model), {**SIMPO, "max_length": 256}, str(tmp_path / "s"))
    for row in simpo.train_dataset:
        assert any(x != -100 for x in row["chosen_labels"]) and any(x != -100 for x in row["rejected_labels"])


SIMPO = {**SETTINGS, "max_steps": 4, "learning_rate": 1e-3, "max_length": 128,
         "params": METHODS["simpo"].params}


def test_a_non_finite_loss_stops_training_at_that_step_and_is_logged_as_nan(tiny_model, hh_pairs, tmp_path):
    # Every pair's prompt fills max_length: SimPO averages log-probs over zero completion tokens (0/0).
    trainer = train.build_trainer("simpo", hh_pairs[:8], str(tiny_model), SIMPO, str(tmp_path / "out"))
    with pytest.raises(train.NonFiniteError, match=r"simpo: non-finite .*at step 1 of 4") as err:
        trainer.train()
    e = err.value
    assert e.step == 1 and set(e.metrics) & {"loss", "grad_norm"}
    assert all(math.isnan(v) for v in e.metrics.values())
    logged = [h for h in e.history if "loss" in h]
    assert len(logged) == 1 and math.isnan(logged[0]["loss"])  # NaN, not the Trainer's 0.0
    assert trainer.state.global_step == 1  # no step after it
    # Its TensorBoard events hold the NaN too.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train.write_tensorboard(e.history, tmp_path / "tb")
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert math.isnan(acc.Scalars("train/loss")[0].value)


def test_the_same_rows_set_aside_first_train_with_finite_values(tiny_model, hh_pairs, tmp_path):
    tok = models.tokenizer(str(tiny_model))
    kept, _ = train.trainable_rows("orpo", hh_pairs, tok, 256)
    orpo = {**SIMPO, "max_length": 256, "params": METHODS["orpo"].params}
    trainer = train.build_trainer("orpo", kept, str(tiny_model), orpo, str(tmp_path))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4 and all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in logged)


def test_non_finite_weights_never_reach_training_or_generation(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    bad = tmp_path / "nan-model"
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(bad)
    assert models.nonfinite_weights(model) == ["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(models.ModelError, match="non-finite weights .* model.layers.1.mlp.down_proj.weight"):
        models.load_for_generation(str(bad), use_gpu=False)
    with pytest.raises(models.ModelError, match="non-finite weights"):
        train.trainer._load_model(str(bad), use_gpu=False)
    # A checkpoint is checked before it is reported: every rank raises if any rank holds a non-finite weight.
    with pytest.raises(train.NonFiniteError, match="non-finite weights at step 3"):
        train.callbacks.check_saved_weights("sft", 3, model, [])
    train.callbacks.check_saved_weights("sft", 3, AutoModelForCausalLM.from_pretrained(tiny_model), [])


def test_too_few_rows_for_one_step_is_an_error_before_any_worker_starts():
    s = {**SETTINGS, "per_device_batch_size": 4, "gradient_accumulation_steps": 2}
    train.check_batch(16, s, 2, "dpo")
    with pytest.raises(train.TrainError, match=r"dpo: 15 training rows left, fewer than one optimizer step takes \(16"):
        train.check_batch(15, s, 2, "dpo")


@pytest.mark.integration
def test_pref_stage_sets_rows_aside_and_a_nan_run_fails_with_its_log(ray_local, tiny_model, hh_pairs, tmp_path):
    from conftest import tiny_experiment, write_config

    exp = tiny_experiment(tmp_path, tiny_model)
    exp["data"]["preferences"] = [str(shared(*HH))]
    exp["pref"] = {"start_from": "base", "method": "simpo", "max_steps": 2, "learning_rate": 1e-3,
                   "per_device_batch_size": 2, "max_length": 256, "num_pairs": 4, "eval_rows": 2}
    cfg = load_config(write_config(tmp_path, exp))
    m = pipeline.pref_stage(cfg)
    c = m["counts"]
    assert c["pairs_read"] == c["pairs_kept"] + c["pairs_set_aside"]
    assert c["pairs_kept"] == c["pairs_used"] + c["pairs_eval"] + c["pairs_unused"]
    assert c["pairs_used"] == 4 and c["pairs_eval"] == 2
    reason = "prompt: no completion token within max_length=N"
    aside = [json.loads(line) for line in Path(m["outputs"]["set_aside"]).read_text().splitlines()]
    assert c["set_aside_reasons"][reason] == sum(a["error"].startswith("no completion") for a in aside) > 0
    assert sum(c["set_aside_reasons"].values()) == c["pairs_set_aside"] == len(aside)
    history = [json.loads(line) for line in Path(m["outputs"]["metrics_log"]).read_text().splitlines()]
    assert all(math.isfinite(h["loss"]) for h in history if "loss" in h)

    # Rows that bypass the check (train.fit directly) make SimPO's loss NaN: the workers stop at step 1 and the
    # driver gets the project's error, not Ray Train's wrapping; the stage's log keeps the NaN.
    res = cfg.resources
    settings = train.train_settings(cfg.pref, cfg.seed, "simpo")
    settings["max_length"] = 128

    def work(d: Path) -> dict:  # a checkpoint is due at the NaN step itself (step 1): it must not be written
        return pipeline._fit(cfg, d, "simpo", hh_pairs[:8], [], str(tiny_model), settings, [1, 2], res)

    with pytest.raises(pipeline.PipelineError, match=r"simpo: non-finite .*at step 1 of 2.*usual causes"):
        run_stage(cfg.run_dir, "pref", "nan", {"case": "nan"}, {}, work)
    (d,) = (Path(cfg.run_dir) / "pref").glob("nan-*")
    logged = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert math.isnan(logged[0]["loss"]) and list((d / "tensorboard").glob("events.out.tfevents.*"))
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "loss=nan" in manifest["error"]
    assert not list(d.rglob("checkpoint_*")), "a checkpoint of the NaN run was kept"


@pytest.mark.integration
def test_a_search_records_a_failed_trial_with_its_reason_and_goes_on(ray_local, tiny_model, tmp_path):
    from conftest import tiny_experiment, write_config

    from alignment import search

    cfg = load_config(write_config(tmp_path, tiny_experiment(tmp_path, tiny_model)))

    def trial(cfg):
        if cfg.pref.sft_step == 2:
            raise pipeline.PipelineError("simpo: non-finite loss=nan at step 1 of 2; training stopped there")
        return {"metric": 0.5, "win_rate": 0.5}

    results, _ = search.run_search(cfg, trial, str(tmp_path / "tune"))
    by_step = {r["sft_step"]: r for r in results}
    assert "non-finite loss=nan at step 1" in by_step[2]["error"] and by_step[2]["metric"] is None
    assert by_step[4].get("error") is None and by_step[4]["metric"] == 0.5
