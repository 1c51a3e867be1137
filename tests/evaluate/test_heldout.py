"""Held-out preference accuracy and margin: the implicit reward log pi - log ref over the answer's tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import make_tiny_model

from alignment import models
from alignment.evaluate import heldout


def one_by_one(model, tok, prompt: list[dict], answer: str, max_length: int) -> float:
    """The answer's log-probability, one sequence at a time, without padding: what the batched path must equal."""
    import torch

    ids, start = heldout.encode(tok, prompt, answer, max_length)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))


def test_the_answer_starts_after_the_templated_prompt(tiny_model):
    tok = models.tokenizer(str(tiny_model))
    prompt = [{"role": "user", "content": "the question"}]
    ids, start = heldout.encode(tok, prompt, "the answer", 512)
    assert tok.decode(ids[start:]).startswith("the answer")
    assert not tok.decode(ids[:start]).endswith("the answer")
    cut, _ = heldout.encode(tok, prompt, "the answer " * 50, start + 3)
    assert len(cut) == start + 3  # cut at max_length, three answer tokens left


def test_batched_margins_equal_the_one_by_one_computation(tiny_model, tmp_path, pref_pairs):
    tok = models.tokenizer(str(tiny_model))
    policy, _ = models.load_for_generation(str(tiny_model), False)
    reference, _ = models.load_for_generation(str(make_tiny_model(tmp_path / "ref", seed=3)), False)
    pairs = pref_pairs[:6]
    got = heldout.margins(policy, reference, tok, pairs, max_length=256, batch_size=4)  # uneven last batch

    def reward(p: dict, key: str) -> float:
        return (one_by_one(policy, tok, p["prompt"], p[key], 256)
                - one_by_one(reference, tok, p["prompt"], p[key], 256))

    want = np.array([reward(p, "chosen") - reward(p, "rejected") for p in pairs])
    assert np.allclose(got, want, atol=1e-4), (got, want)
    assert np.abs(want).max() > 1e-3  # two different models: the check compares real numbers


def test_a_policy_equal_to_its_reference_has_no_margin_and_no_accuracy(tiny_model, pref_pairs):
    out = heldout.heldout(str(tiny_model), str(tiny_model), pref_pairs[:4], max_length=64)
    assert out["heldout_pairs"] == 4 and out["pref_margin"] == 0.0
    assert out["pref_accuracy"] == 0.0  # a zero margin is not a success


def test_accuracy_counts_positive_margins_and_no_pair_is_a_null_with_its_reason():
    s = heldout.summary(np.array([0.5, -1.0, 2.0, 0.0]))
    assert s["pref_accuracy"] == 0.5 and s["pref_margin"] == pytest.approx(0.375)
    empty = heldout.summary(np.zeros(0))
    assert empty["pref_accuracy"] is None and "pref.eval_rows" in empty["heldout_reason"]
    unpaired = heldout.heldout("never-loaded", "never-loaded", [{"prompt": [], "completion": "x", "label": True}], 64)
    assert unpaired["pref_accuracy"] is None and unpaired["heldout_unpaired"] == 1
    assert "unpaired" in unpaired["heldout_reason"]
    bad = heldout.summary(np.array([1.0, math.nan]))
    assert bad["pref_accuracy"] is None and "not finite" in bad["heldout_reason"]


def test_a_models_log_probabilities_are_computed_once_per_cache(tiny_model, tmp_path, pref_pairs, monkeypatch):
    import shutil

    import torch

    other = str(tmp_path / "other")  # the same tokenizer, other weights
    shutil.copytree(tiny_model, other)
    model, _ = models.load_for_generation(other, False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(other)
    loaded = []
    load = models.load_for_generation
    monkeypatch.setattr(models, "load_for_generation", lambda path, gpu: loaded.append(path) or load(path, gpu))
    cache = str(tmp_path / "logprobs")
    want = heldout.heldout(other, str(tiny_model), pref_pairs[:4], 64)
    assert loaded == [other, str(tiny_model)]
    first = heldout.heldout(other, str(tiny_model), pref_pairs[:4], 64, cache_dir=cache)
    assert first == want and len(list((tmp_path / "logprobs").glob("*.npy"))) == 2
    loaded.clear()
    # The same reference against another policy, then the same policy on other pairs: only what is new is loaded.
    again = heldout.heldout(str(tiny_model), str(tiny_model), pref_pairs[:4], 64, cache_dir=cache)
    assert loaded == [] and again["pref_margin"] == 0.0
    more = heldout.heldout(other, str(tiny_model), pref_pairs[:6], 64, cache_dir=cache)
    assert loaded == [other, str(tiny_model)] and more["heldout_pairs"] == 6
    assert len(list((tmp_path / "logprobs").glob("*.npy"))) == 4
