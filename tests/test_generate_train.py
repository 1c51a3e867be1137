"""Generation backends and the TRL trainers on a tiny model (the trainers without Ray)."""

from __future__ import annotations

import json

import pytest

from alignment import endpoints, generate, train

GEN = {"backend": "transformers", "max_new_tokens": 6, "batch_size": 4, "num_actors": 1, "cpus_per_actor": 1.0,
       "gpus_per_actor": 0.0}


def test_openai_compatible_endpoint(fake_endpoint):
    prompts = [{"id": "a", "messages": [{"role": "user", "content": "hi"}]},
               {"id": "b", "messages": [{"role": "user", "content": "please fail"}]}]
    out = endpoints.complete_openai(prompts, "judge-model", endpoints.Endpoint("TEST_JUDGE_URL", "TEST_JUDGE_KEY"),
                                    max_tokens=16)
    assert [o["id"] for o in out] == ["a", "b"]
    assert out[0]["answer"].startswith("8 3") and out[0]["num_new_tokens"] == 5 and out[0]["error"] is None
    assert out[1]["answer"] == "" and "500" in out[1]["error"]  # an error, never a made-up answer
    req = fake_endpoint[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-secret-123"
    assert req["body"]["temperature"] == 0.0 and req["body"]["max_tokens"] == 16
    assert "sk-secret-123" not in json.dumps(out)


def test_openai_endpoint_url_must_be_set(monkeypatch):
    monkeypatch.delenv("NO_SUCH_URL_VAR", raising=False)
    with pytest.raises(generate.GenerationError, match="export NO_SUCH_URL_VAR"):
        endpoints.complete_openai([{"id": "a", "messages": []}], "m", endpoints.Endpoint("NO_SUCH_URL_VAR", "K"), 4)


def test_transformers_backend_on_ray_data_keeps_order(ray_local, tiny_model):
    prompts = [{"id": f"q{i}", "messages": [{"role": "user", "content": "the answer " * (i + 1)}]} for i in range(6)]
    out = generate.generate(str(tiny_model), prompts, GEN)
    assert [o["id"] for o in out] == [p["id"] for p in prompts]
    assert all(isinstance(o["answer"], str) and 0 < o["num_new_tokens"] <= 6 for o in out)
    # greedy: the same prompt gives the same answer whatever its batch
    again = generate.generate(str(tiny_model), prompts[2:3], GEN)
    assert again[0]["answer"] == out[2]["answer"]


def test_unknown_backend_and_duplicate_ids(tiny_model):
    p = [{"id": "a", "messages": [{"role": "user", "content": "x"}]}]
    with pytest.raises(generate.GenerationError, match="not unique"):
        generate.generate(str(tiny_model), p * 2, GEN)
    with pytest.raises(generate.GenerationError, match="unknown generation backend"):
        generate.generate(str(tiny_model), p, {**GEN, "backend": "tgi"})


SFT = {"max_steps": 12, "per_device_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 5e-3,
       "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "logging_steps": 1, "max_length": 128,
       "assistant_only_loss": True, "save_only_model": True, "seed": 0, "use_gpu": False}


def test_sft_masks_everything_but_assistant_tokens_and_learns(tiny_model, sft_rows, tmp_path):
    trainer = train.build_sft_trainer(sft_rows, str(tiny_model), SFT, str(tmp_path))
    batch = next(iter(trainer.get_train_dataloader()))
    tok = trainer.processing_class
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        trained = tok.decode([i for i, lab in zip(ids.tolist(), labels.tolist()) if lab != -100])
        assert "user" not in trained and "<|im_start|>" not in trained
        assert trained.endswith("<|im_end|>") or "<|im_end|>" in trained
    history = trainer.train() and trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 12 and losses[-1] < losses[0] * 0.8


PREF = {"max_steps": 10, "per_device_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 5e-3,
        "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "logging_steps": 1, "max_length": 128,
        "beta": 0.1, "loss_type": "sigmoid", "save_only_model": True, "seed": 0, "use_gpu": False}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_learns_the_preference(tiny_model, pref_pairs, tmp_path, loss_type):
    trainer = train.build_pref_trainer(pref_pairs, str(tiny_model), {**PREF, "loss_type": loss_type}, str(tmp_path))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert logs[-1]["rewards/margins"] > 0 and logs[-1]["rewards/accuracies"] >= 0.75
