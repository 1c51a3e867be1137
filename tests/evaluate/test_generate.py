"""Generation backends on a tiny model, and the OpenAI-compatible endpoint client."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from alignment import endpoints
from alignment.config import ConfigError, GenerateConfig, load_config
from alignment.endpoints import GenerationError
from alignment.evaluate import generate
from alignment.evaluate.generate import _generate_vllm

GEN = GenerateConfig(backend="transformers", max_new_tokens=6, batch_size=4, num_actors=1, cpus_per_actor=1.0,
                     gpus_per_actor=0.0)


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
    with pytest.raises(GenerationError, match="export NO_SUCH_URL_VAR"):
        endpoints.complete_openai([{"id": "a", "messages": []}], "m", endpoints.Endpoint("NO_SUCH_URL_VAR", "K"), 4)


def test_transformers_backend_on_ray_data_keeps_order(ray_local, tiny_model):
    prompts = [{"id": f"q{i}", "messages": [{"role": "user", "content": "the answer " * (i + 1)}]} for i in range(6)]
    out = generate(str(tiny_model), prompts, GEN)
    assert [o["id"] for o in out] == [p["id"] for p in prompts]
    assert all(isinstance(o["answer"], str) and 0 < o["num_new_tokens"] <= 6 for o in out)
    # greedy: the same prompt gives the same answer whatever its batch
    again = generate(str(tiny_model), prompts[2:3], GEN)
    assert again[0]["answer"] == out[2]["answer"]


def test_unknown_backend_and_duplicate_ids(tiny_model):
    p = [{"id": "a", "messages": [{"role": "user", "content": "x"}]}]
    with pytest.raises(GenerationError, match="not unique"):
        generate(str(tiny_model), p * 2, GEN)
    # The config refuses an unknown backend; a section built around validation still gets a clear error.
    with pytest.raises(ConfigError, match="generate.backend"):
        load_config(None, ["generate.backend=tgi"])
    with pytest.raises(GenerationError, match="unknown generation backend"):
        generate(str(tiny_model), p, GEN.model_copy(update={"backend": "tgi"}))


def test_vllm_engine_kwargs_reach_the_engine(monkeypatch):
    """generate.vllm_engine_kwargs (a key the config holds) go into ray.data.llm's engine config, over the
    default; the processor's rows come back in the prompts' order. ray.data.llm is faked: no vLLM here."""
    import ray.data
    import ray.data.llm

    seen = {}

    def config(**kw):
        seen.update(kw)
        return kw

    def build_processor(cfg, preprocess, postprocess):
        def run(rows):
            asked = [preprocess(r) for r in rows]
            seen["sampling_params"] = asked[0]["sampling_params"]
            out = [{"id": r["id"], "generated_text": f" answer {r['id']} ", "num_generated_tokens": 3} for r in asked]
            return SimpleNamespace(take_all=lambda: [postprocess(r) for r in reversed(out)])
        return run

    monkeypatch.setattr(ray.data.llm, "vLLMEngineProcessorConfig", config)
    monkeypatch.setattr(ray.data.llm, "build_processor", build_processor)
    monkeypatch.setattr(ray.data, "from_items", list)
    monkeypatch.setattr("alignment.models.engine_source", lambda m: f"local:{m}")
    g = load_config(None, ["generate.backend=vllm", "generate.num_actors=2", "generate.batch_size=3",
                           "generate.max_new_tokens=7",
                           "generate.vllm_engine_kwargs={tensor_parallel_size: 2, enable_prefix_caching: false}"])
    g = g.generate
    prompts = [{"id": q, "messages": [{"role": "user", "content": q}]} for q in ("a", "b")]
    out = _generate_vllm("m", prompts, g)
    assert [o["id"] for o in out] == ["a", "b"] and out[0] == {"id": "a", "answer": "answer a", "num_new_tokens": 3}
    assert seen["engine_kwargs"] == {"enable_prefix_caching": False, "tensor_parallel_size": 2}
    assert (seen["model_source"], seen["concurrency"], seen["batch_size"]) == ("local:m", 2, 3)
    assert seen["sampling_params"] == {"temperature": 0.0, "max_tokens": 7}
