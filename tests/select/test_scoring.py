"""Scorers: Deita's expected score and evol score, random, LLM rating; the scorers inside the select stage."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from alignment import formats, select
from alignment.config import SelectConfig
from alignment.select.scorers import deita, deita_vllm
from alignment.select.scorers.random import random_scores
from alignment.select.scorers.rating import parse_rating, rating_prompt


def conv(*turns: str, system: str | None = None) -> list[dict]:
    roles = ["user", "assistant"]
    out = [{"role": "system", "content": system}] if system else []
    return out + [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def test_expected_score_on_known_logits():
    logits = np.array([
        [0, 0, 0, 0, 0, 0],            # uniform: the mean of 1..6
        [0, 0, 0, 0, 0, 50],           # all mass on "6"
        [math.log(1), math.log(3), -1e9, -1e9, -1e9, -1e9],  # p = (1/4, 3/4): 1/4 + 2 * 3/4
        [1000, 1000, 1000, 1000, 1000, 1000],  # large logits stay finite
    ])
    np.testing.assert_allclose(deita.expected_scores(logits), [3.5, 6.0, 1.75, 3.5], atol=1e-9)


def test_deita_turns_and_prompts():
    messages = conv("q1", "a1", "q2", "a2", "q3", system="be nice")
    assert deita.deita_turns(messages) == [("q1", "a1"), ("q2", "a2"), ("q3", "")]  # trailing user: empty reply
    c, q = deita.deita_prompts(conv("What is 2+2?", "4"))
    assert c == ["You are a helpful assistant. Please identify the complexity score of the following user query. \n"
                 "##Query: What is 2+2?  \n##Complexity: "]
    assert q == ["You are a helpful assistant. Please identify the quality score of the Response corresponding to "
                 "the Question. \n #Question#:\nWhat is 2+2?\n#Response#:\n4 \n##Quality: "]
    with pytest.raises(ValueError, match="two user turns"):
        deita.deita_turns([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="without a user turn"):
        deita.deita_turns([{"role": "assistant", "content": "a"}])


class _FakeScorer:
    """Scores a prompt by a number found in it, or fails on prompts that contain "FAIL"."""

    def score(self, prompts):
        scores, reasons = [], []
        for p in prompts:
            if "FAIL" in p:
                scores.append(None)
                reasons.append("prompt of 9999 tokens > max_length 2048")
            else:
                scores.append(float(len(p) % 5 + 1))
                reasons.append(None)
        return scores, reasons


def test_evol_score_on_multi_turn_rows():
    f = _FakeScorer()
    rows = [conv("q1", "a1", "question two", "answer two"), conv("FAIL q", "a"),
            [{"role": "assistant", "content": "x"}]]
    out = deita.deita_scores(rows, f, f)
    c_prompts, q_prompts = deita.deita_prompts(rows[0])
    c = [float(len(p) % 5 + 1) for p in c_prompts]
    q = [float(len(p) % 5 + 1) for p in q_prompts]
    assert out[0]["deita_complexity"] == c and out[0]["deita_quality"] == q
    assert out[0]["score_deita_evol"] == pytest.approx(c[0] * q[0] + c[1] * q[1]) and out[0]["error"] is None
    # a turn that cannot be scored: a null score and the reason, never a default
    assert out[1]["score_deita_evol"] is None and out[1]["deita_complexity"] == [None]
    assert "deita complexity, turn 1: prompt of 9999 tokens" in out[1]["error"]
    assert out[2]["score_deita_evol"] is None and "without a user turn" in out[2]["error"]


def test_score_token_ids_come_from_the_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = deita.score_token_ids(tok)
    assert [tok.decode([i]) for i in ids] == ["1", "2", "3", "4", "5", "6"]


def test_batched_scorer_matches_the_reference_generate(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scorer = deita.CausalLMScorer(str(tiny_model), max_length=200, batch_size=3)
    prompts = [deita.complexity_prompt("the model " * n) for n in (1, 7, 3, 12, 2)]
    prompts += [deita.quality_prompt("explain data", "long answer " * 9)]
    fast, reasons = scorer.score(prompts)
    assert reasons == [None] * len(prompts) and all(1 <= s <= 6 for s in fast)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ref = [deita.reference_expected_score(model, tok, p, scorer.ids) for p in prompts]
    np.testing.assert_allclose(fast, ref, atol=1e-4)
    assert len(set(np.round(fast, 6))) > 1  # the prompts really score differently

    short = deita.CausalLMScorer(str(tiny_model), max_length=20, batch_size=3)
    s, r = short.score([prompts[0], prompts[3]])
    assert s[0] is None and r[0].startswith("prompt of ") and "> max_length 20" in r[0]

    # A token budget per batch: long prompts go in smaller batches (alone when over it), same scores.
    assert scorer.batch_tokens == deita.CPU_BATCH_TOKENS  # the CPU default
    budget = deita.CausalLMScorer(str(tiny_model), max_length=200, batch_size=3, batch_tokens=250)
    encoded = [budget.encode(p) for p in prompts]
    group = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    chunks = list(budget._chunks(group, encoded, 0))
    assert sorted(i for c in chunks for i in c) == list(range(len(prompts)))
    assert all(len(c) == 1 or len(c) * len(encoded[c[0]]) <= 250 for c in chunks)
    assert any(len(c) == 1 for c in chunks) and max(len(c) for c in chunks) > 1
    np.testing.assert_allclose(budget.score(prompts)[0], fast, atol=1e-5)


def test_random_scores_are_seeded_per_id():
    ids = [f"row-{i}" for i in range(500)]
    a = random_scores(ids, seed=1)
    assert a == random_scores(ids[:200], 1) + random_scores(ids[200:], 1)  # batching-independent
    assert a != random_scores(ids, seed=2)
    assert all(0 <= x < 1 for x in a) and 0.4 < float(np.mean(a)) < 0.6


def test_parse_rating_never_guesses():
    assert parse_rating("4") == (4.0, None)
    assert parse_rating("\n Rating: 5/5 because...") == (5.0, None)
    assert parse_rating("8 3\nbecause") == (3.0, None)
    for text in ("", "excellent!", "7", "4.5", "10"):
        score, why = parse_rating(text)
        assert score is None and why.startswith("unparsed rating")
    prompt = rating_prompt(conv("Name a tree.", "Oak."))
    assert "[Instruction]\nName a tree.\n\n[Response]\nOak." in prompt


def test_expected_score_from_vllm_logprobs():
    ids = [11, 12, 13, 14, 15, 16]
    top = {str(i): {"logprob": 0.0, "rank": 1} for i in ids}  # keys as strings, as after Arrow
    top["99"] = {"logprob": -0.1}
    assert deita.expected_score_from_logprobs(top, ids) == (pytest.approx(3.5), None)
    del top["16"]
    score, why = deita.expected_score_from_logprobs(top, ids)
    assert score is None and "['6'] not among" in why
    assert deita.expected_score_from_logprobs(None, ids) == (None, "no logprobs returned")


def test_vllm_path_explode_postprocess_assemble_without_vllm():
    """The ray.data.llm path's own logic, with the vLLM stage simulated by logprobs from a known table."""
    ids = [1, 2, 3, 4, 5, 6]
    rows = [{"id": "a", "source": "f", "row": 0, "messages": conv("q1", "a1", "q2", "a2"), "field": None,
             "error": None},
            {"id": "b", "source": "f", "row": 1, "messages": None, "field": "output", "error": "empty"}]
    carry = list(rows[0]) + [deita_vllm.KEY, "_turn", "_turns", "_prompt", "_fail"]
    out = {}
    for kind in ("complexity", "quality"):
        exploded = [e for r in rows for e in deita_vllm.explode(r, kind)]
        assert len(exploded) == 3
        processed = []
        for e in exploded:
            # turn 1 puts all mass on "6"; turn 2 is uniform
            top = {str(i): {"logprob": (50.0 if i == 6 else 0.0) if e["_turn"] == 0 else 0.0} for i in ids}
            processed.append(deita_vllm.postprocess({**e, "logprobs": [top]}, ids, carry))
        df = pd.DataFrame(processed)
        rows = [deita_vllm.assemble(g, kind).iloc[0].to_dict() for _, g in df.groupby(deita_vllm.KEY, sort=True)]
        carry = list(rows[0]) + [deita_vllm.KEY, "_turn", "_turns", "_prompt", "_fail"]
        out = {r["id"]: r for r in rows}
    a, b = out["a"], out["b"]
    np.testing.assert_allclose(a["deita_complexity"], [6.0, 3.5], atol=1e-9)
    np.testing.assert_allclose(a["deita_quality"], [6.0, 3.5], atol=1e-9)
    assert a["score_deita_evol"] == pytest.approx(36 + 12.25) and a["score_error"] is None
    assert b["score_deita_evol"] is None and b["deita_complexity"] is None and b["error"] == "empty"


def test_deita_and_random_scorers_in_the_select_stage(ray_local, tmp_path, tiny_model):
    rows = [{"id": f"r{i}", "conversations": [{"from": "human", "value": "explain data " * (i % 5 + 1)},
                                              {"from": "gpt", "value": "the answer " * (i % 7 + 1)},
                                              {"from": "human", "value": "and then?"},
                                              {"from": "gpt", "value": "more " * (i % 3 + 1)}]} for i in range(12)]
    rows.append({"id": "too-long", "conversations": [{"from": "human", "value": "long " * 300},
                                                     {"from": "gpt", "value": "ok"}]})
    rows.append({"id": "bad", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]})
    src = write_jsonl(tmp_path / "pool.jsonl", rows)
    models = {"complexity_model": str(tiny_model), "quality_model": str(tiny_model)}
    s = SelectConfig(k=5, scorers=["deita", "random", "length"], rank_by={"deita": 1.0}, length_unit="words",
                     deita={**models, "max_length": 250, "batch_size": 4, "num_actors": 1, "cpus_per_actor": 1.0},
                     batch_size=6)
    out = tmp_path / "deita"
    out.mkdir()
    r = select.run_select(s, select.Resolved(files=(str(src),), format="auto", seed=7, **models), out)
    c = r["counts"]
    assert (c["rows_read"], c["rows_kept"], c["rows_invalid"], c["rows_unscored"]) == (14, 12, 1, 1)
    assert c["rows_read"] == c["rows_kept"] + c["rows_set_aside"]
    aside = {a["id"]: a for a in map(json.loads, open(r["outputs"]["set_aside"]))}
    assert aside["too-long"]["field"] == "score_deita_evol"
    assert "deita complexity, turn 1: prompt of" in aside["too-long"]["error"]
    assert any(k.startswith("score_deita_evol: deita complexity, turn N") for k in c["set_aside_reasons"])

    pool = pq.read_table(r["outputs"]["scored"]).to_pylist()
    for p in pool:
        assert len(p["deita_complexity"]) == len(p["deita_quality"]) == 2
        evol = sum(x * y for x, y in zip(p["deita_complexity"], p["deita_quality"]))
        assert p["score_deita_evol"] == pytest.approx(evol)
        assert p["score"] == p["score_deita_evol"] and 0 <= p["score_random"] < 1
    # the scores are the ones the scorer gives to these prompts, one at a time
    scorer = deita.CausalLMScorer(str(tiny_model), max_length=250, batch_size=8)
    first = pool[0]
    messages = [m for m in formats.read_rows(str(src), "sft")[0] if m["id"] == first["id"]][0]["messages"]
    assert first["deita_complexity"] == pytest.approx(scorer.score(deita.deita_prompts(messages)[0])[0], abs=1e-5)
    assert "messages" not in first  # top_k's scored pool: ids and scores only
    sel = pq.read_table(r["outputs"]["selected"]).to_pylist()
    best = sorted(pool, key=lambda p: (-p["score"], p["id"]))[:5]
    assert [s["id"] for s in sel] == [b["id"] for b in best]

    # random selection: the same twice with the same seed, another with another seed
    def pick(seed: int, name: str) -> list[str]:
        d = tmp_path / name
        d.mkdir()
        res = select.run_select(SelectConfig(k=6, scorers=["random"], batch_size=5),
                                select.Resolved(files=(str(src),), format="auto", seed=seed), d)
        return pq.read_table(res["outputs"]["selected"])["id"].to_pylist()

    assert pick(3, "a") == pick(3, "b") != pick(4, "c")


def test_rating_scorer_through_an_endpoint(ray_local, tmp_path, fake_endpoint):
    rows = [{"id": "ok", "instruction": "Name a tree.", "output": "Oak."},
            {"id": "down", "instruction": "please fail", "output": "x"}]
    src = write_jsonl(tmp_path / "pool.jsonl", rows)
    # One row of two failing is over the default max_failed_fraction (tests/test_endpoints.py): allowed here.
    rating = {"backend": "openai", "model": "rater", "api_base_env": "TEST_JUDGE_URL", "api_key_env": "TEST_JUDGE_KEY",
              "max_failed_fraction": 0.5, "max_retries": 1, "retry_backoff_s": 0.0}
    r = select.run_select(SelectConfig(k=1, scorers=["rating"], rating=rating),
                          select.Resolved(files=(str(src),), format="auto", seed=0), tmp_path)
    sel = pq.read_table(r["outputs"]["selected"]).to_pylist()
    assert [(s["id"], s["score_rating"]) for s in sel] == [("ok", 3.0)]  # "8 3" -> the first digit in 1..5
    aside = [json.loads(line) for line in open(r["outputs"]["set_aside"])]
    assert aside[0]["id"] == "down" and aside[0]["field"] == "score_rating" and "500" in aside[0]["error"]
    assert r["counts"]["set_aside_reasons"] == {"score_rating: endpoint http 500": 1}
    assert r["counts"]["rating_requests"] == {"rows": 2, "answered_earlier": 0, "failed": {"http 500": 1}}
    assert "sk-secret-123" not in json.dumps(r) + open(r["outputs"]["set_aside"]).read()
    assert any("Name a tree." in r["body"]["messages"][0]["content"] for r in fake_endpoint)
