"""The generate stage: answers to chat prompts, from a model or an endpoint, behind one interface.

Backends:
- ``transformers`` (default, CPU or GPU): Ray Data actors each holding one model, batched greedy ``generate``;
- ``vllm`` (optional extra, GPU): Ray Data LLM's ``vLLMEngineProcessorConfig`` + ``build_processor``;
- ``openai``: any OpenAI-compatible chat-completions endpoint (URL and key from the environment).

Every backend takes ``[{"id", "messages"}]`` and returns ``[{"id", "answer", "num_new_tokens"}]`` in the
input order. Decoding is greedy.
"""

from __future__ import annotations

import json
import logging
import math
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("alignment")


class GenerationError(RuntimeError):
    pass


class HFGenerator:
    """Ray Data actor: one model, greedy batched generation with left padding."""

    def __init__(self, model_path: str, max_new_tokens: int, threads: int, use_gpu: bool):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from . import models

        torch.set_num_threads(threads)
        path = models.materialize(model_path)
        self.device = "cuda" if use_gpu else "cpu"
        self.tok = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        dtype = torch.bfloat16 if use_gpu else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch):
        import pyarrow as pa
        import torch

        rows = batch.to_pylist()
        texts = [self.tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) for r in rows]
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        answers, counts = [], []
        for seq in new:
            ids = seq.tolist()
            n = len(ids)
            for stop in (self.tok.eos_token_id, self.tok.pad_token_id):
                if stop is not None and stop in ids:
                    n = min(n, ids.index(stop) + 1)
            counts.append(n)
            answers.append(self.tok.decode(ids[:n], skip_special_tokens=True).strip())
        return pa.table({"id": [r["id"] for r in rows], "answer": answers, "num_new_tokens": counts})


def _ordered(prompts: list[dict], out: list[dict]) -> list[dict]:
    by_id = {r["id"]: r for r in out}
    missing = [p["id"] for p in prompts if p["id"] not in by_id]
    if missing:
        raise GenerationError(f"{len(missing)} prompts got no answer (first: {missing[:3]})")
    return [by_id[p["id"]] for p in prompts]


def _generate_transformers(model: str, prompts: list[dict], g: dict[str, Any]) -> list[dict]:
    import ray

    # Similar lengths together: less padding per batch.
    order = sorted(prompts, key=lambda p: sum(len(m["content"]) for m in p["messages"]))
    ds = ray.data.from_items([{"id": p["id"], "messages": p["messages"]} for p in order])
    ds = ds.map_batches(
        HFGenerator,
        fn_constructor_kwargs={"model_path": model, "max_new_tokens": g["max_new_tokens"],
                               "threads": max(1, math.ceil(g["cpus_per_actor"])), "use_gpu": g["gpus_per_actor"] > 0},
        batch_size=g["batch_size"],
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=g["num_actors"]),
        num_cpus=g["cpus_per_actor"],
        num_gpus=g["gpus_per_actor"] or None,
    )
    return _ordered(prompts, ds.take_all())


def _generate_vllm(model: str, prompts: list[dict], g: dict[str, Any]) -> list[dict]:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from . import models

    config = vLLMEngineProcessorConfig(
        model_source=models.materialize(model),
        engine_kwargs={"enable_prefix_caching": True, **g.get("vllm_engine_kwargs", {})},
        concurrency=g["num_actors"],
        batch_size=g["batch_size"],
    )
    max_tokens = g["max_new_tokens"]
    processor = build_processor(
        config,
        preprocess=lambda row: {"id": row["id"], "messages": row["messages"],
                                "sampling_params": {"temperature": 0.0, "max_tokens": max_tokens}},
        postprocess=lambda row: {"id": row["id"], "answer": row["generated_text"].strip(),
                                 "num_new_tokens": int(row.get("num_generated_tokens") or 0)},
    )
    ds = ray.data.from_items([{"id": p["id"], "messages": p["messages"]} for p in prompts])
    return _ordered(prompts, processor(ds).take_all())


def _post_json(url: str, payload: dict, api_key: str | None, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def complete_openai(prompts: list[dict], model: str, base_url_env: str, api_key_env: str, max_tokens: int,
                    timeout: float = 120.0, workers: int = 8) -> list[dict]:
    """Greedy chat completions from an OpenAI-compatible endpoint. The key is read here and never stored."""
    base = os.environ.get(base_url_env)
    if not base:
        raise GenerationError(f"the endpoint URL is not set: export {base_url_env}=https://.../v1")
    api_key = os.environ.get(api_key_env)
    url = base.rstrip("/") + "/chat/completions"

    def one(p: dict) -> dict:
        payload = {"model": model, "messages": p["messages"], "temperature": 0.0, "max_tokens": max_tokens}
        try:
            body = _post_json(url, payload, api_key, timeout)
            text = body["choices"][0]["message"]["content"] or ""
            n = int((body.get("usage") or {}).get("completion_tokens") or 0)
            return {"id": p["id"], "answer": text.strip(), "num_new_tokens": n, "error": None}
        except (urllib.error.URLError, TimeoutError, KeyError, IndexError, ValueError) as e:
            # Never guessed: the caller counts an error as an unparsed answer. The key never appears in it.
            return {"id": p["id"], "answer": "", "num_new_tokens": 0, "error": f"{type(e).__name__}: {e}"}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, prompts))


def generate(model: str, prompts: list[dict], g: dict[str, Any]) -> list[dict]:
    """Answers for ``prompts`` (``[{"id", "messages"}]``) with the configured backend, in input order."""
    if not prompts:
        return []
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        raise GenerationError("prompt ids are not unique")
    backend = g["backend"]
    if backend == "transformers":
        return _generate_transformers(model, prompts, g)
    if backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise GenerationError("generate.backend=vllm needs the vllm extra: pip install 'alignment[vllm]'") from e
        return _generate_vllm(model, prompts, g)
    raise GenerationError(f"unknown generation backend {backend!r}")
