"""The generate stage: answers to chat prompts from a local model, behind one interface.

Backends (``GenerateConfig.backend``):
- ``transformers`` (default, CPU or GPU): Ray Data actors each holding one model, batched greedy ``generate``;
- ``vllm`` (optional extra, GPU): Ray Data LLM's ``vLLMEngineProcessorConfig`` + ``build_processor``.

Every backend takes ``[{"id", "messages"}]`` and returns ``[{"id", "answer", "num_new_tokens"}]`` in the
input order. Decoding is greedy. An OpenAI-compatible endpoint is not a backend here: the judge's ``openai``
backend sends its requests through ``alignment.endpoints.complete_openai``.
"""

from __future__ import annotations

import logging

from ..config import GenerateConfig
from ..endpoints import GenerationError
from ..ray_env import actor_pool, actor_threads

log = logging.getLogger("alignment")


class HFGenerator:
    """Ray Data actor: one model, greedy batched generation with left padding."""

    def __init__(self, model_path: str, max_new_tokens: int, threads: int, use_gpu: bool):
        import torch

        from .. import models

        torch.set_num_threads(threads)
        self.model, self.tok = models.load_for_generation(model_path, use_gpu)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch):
        import pyarrow as pa

        from .. import models

        rows = batch.to_pylist()
        answers, counts = models.greedy_generate(self.model, self.tok, [r["messages"] for r in rows],
                                                 self.max_new_tokens)
        return pa.table({"id": [r["id"] for r in rows], "answer": answers, "num_new_tokens": counts})


def _ordered(prompts: list[dict], out: list[dict]) -> list[dict]:
    by_id = {r["id"]: r for r in out}
    missing = [p["id"] for p in prompts if p["id"] not in by_id]
    if missing:
        raise GenerationError(f"{len(missing)} prompts got no answer (first: {missing[:3]})")
    return [by_id[p["id"]] for p in prompts]


def _generate_transformers(model: str, prompts: list[dict], g: GenerateConfig) -> list[dict]:
    import ray

    # Similar lengths together: less padding per batch.
    order = sorted(prompts, key=lambda p: sum(len(m["content"]) for m in p["messages"]))
    ds = ray.data.from_items([{"id": p["id"], "messages": p["messages"]} for p in order])
    ds = ds.map_batches(
        HFGenerator,
        fn_constructor_kwargs={"model_path": model, "max_new_tokens": g.max_new_tokens,
                               "threads": actor_threads(g), "use_gpu": g.gpus_per_actor > 0},
        batch_size=g.batch_size,
        batch_format="pyarrow",
        **actor_pool(g),
    )
    return _ordered(prompts, ds.take_all())


def _generate_vllm(model: str, prompts: list[dict], g: GenerateConfig) -> list[dict]:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from .. import models

    config = vLLMEngineProcessorConfig(
        model_source=models.engine_source(model),  # a cloud URI is fetched on each GPU node
        engine_kwargs={"enable_prefix_caching": True, **g.vllm_engine_kwargs},
        concurrency=g.num_actors,
        batch_size=g.batch_size,
    )
    max_tokens = g.max_new_tokens
    processor = build_processor(
        config,
        preprocess=lambda row: {"id": row["id"], "messages": row["messages"],
                                "sampling_params": {"temperature": 0.0, "max_tokens": max_tokens}},
        postprocess=lambda row: {"id": row["id"], "answer": row["generated_text"].strip(),
                                 "num_new_tokens": int(row.get("num_generated_tokens") or 0)},
    )
    ds = ray.data.from_items([{"id": p["id"], "messages": p["messages"]} for p in prompts])
    return _ordered(prompts, processor(ds).take_all())


def generate(model: str, prompts: list[dict], g: GenerateConfig) -> list[dict]:
    """Answers of ``model`` for ``prompts`` (``[{"id", "messages"}]``) with ``g``'s backend, in input order."""
    if not prompts:
        return []
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        raise GenerationError("prompt ids are not unique")
    backend = g.backend
    if backend == "transformers":
        return _generate_transformers(model, prompts, g)
    if backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise GenerationError("backend vllm (generate.backend or judge.generate.backend) needs the vllm extra: "
                                  "pip install 'alignment[vllm]'") from e
        return _generate_vllm(model, prompts, g)
    raise GenerationError(f"unknown generation backend {backend!r}")
