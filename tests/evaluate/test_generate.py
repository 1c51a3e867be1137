"""Generation backends on a tiny model, and the OpenAI-compatible endpoint client."""

from __future__ import annotations

import json

import pytest

from alignment import endpoints
from alignment.evaluate import generate

GEN = {"backend": "transformers", "max_new_tokens": 6, "batch_size": 4, "num_actors": 1, "cpus_per_actor": 1.0,
       "gpus_per_actor": 0.0}


def test_openai_compatible_endpoint(fake_endpoint):
    prompts = [{"id": "a", "messages": [{"role": "user", "content": "hi"}]},
               {"id": "b", "messages": [{"role": "user", "content": "please fail"}]}]
    out = endpoints.complete_openai(prompts, "judge-model", endpoints.Endpoint("TEST_JUDGE_URL", "TEST_JUDGE_KEY"),
                                    max_tokens=16, retry=endpoints.Retry(max_retries=1, backoff_s=0.0))
    assert [o["id"] for o in out] == ["a", "b"]
    assert out[0]["answer"].startswith("8 3") and out[0]["num_new_tokens"] == 5 and out[0]["error"] is None
    # an error, never a made-up answer, after its one retry (a 500 may pass on a second try)
    assert out[1]["answer"] == "" and out[1]["error_kind"] == "http 500" and "500" in out[1]["error"]
    assert sum("please fail" in r["body"]["messages"][-1]["content"] for r in fake_endpoint) == 2
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
