"""The generate stage: answers to chat prompts from a local model, behind one interface.

Backends (``GenerateConfig.backend``):
- ``transformers`` (default, CPU or GPU): Ray Data actors each holding one model, batched greedy ``generate``;
- ``vllm`` (optional extra, GPU): Ray Data LLM's ``vLLMEngineProcessorConfig`` + ``build_processor``.

Every backend takes ``[{"id", "messages"}]`` and returns ``[{"id", "answer", "num_new_tokens"}]`` in the
input order. Decoding is greedy, unless a prompt carries a ``temperature`` above 0 and its ``seed``: then it is
sampled at that temperature, seeded per prompt, so a re-run gives the same answers whatever the batches.
:func:`generate_turns` answers multi-turn prompts (MT-Bench), one generation call per turn, through ``generate`` or
the ``generate_fn`` it is given. An OpenAI-compatible endpoint is not a backend here: the judge's ``openai``
backend and a served model (``alignment.evaluate.sources.served_answers``, as ``generate_turns``' ``generate_fn``)
send their requests through ``alignment.endpoints.complete_openai``.

:func:`next_token_logprobs` is the local judge of a protocol that reads log-probabilities (alpaca_eval's): the top-k
log-probabilities of the first answer token, after the model's chat template with the generation prompt, as an
endpoint returns them (``[{"token", "logprob"}]``, the token as its decoded text), with the same two backends.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

from ..config import GenerateConfig, GenerationConfig
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
        greedy = [r for r in rows if not r["temperature"]]
        answers, counts = models.greedy_generate(self.model, self.tok, [r["messages"] for r in greedy],
                                                 self.max_new_tokens) if greedy else ([], [])
        out = dict(zip([r["id"] for r in greedy], zip(answers, counts, strict=True), strict=True))
        for r in rows:
            if r["temperature"]:
                out[r["id"]] = sample_one(self.model, self.tok, r["messages"], self.max_new_tokens, r["temperature"],
                                          r["seed"])
        return pa.table({"id": [r["id"] for r in rows], "answer": [out[r["id"]][0] for r in rows],
                         "num_new_tokens": [out[r["id"]][1] for r in rows]})


def sample_one(model, tok, messages: list[dict], max_new_tokens: int, temperature: float,
               seed: int) -> tuple[str, int]:
    """One sampled answer, as FastChat's gen_model_answer samples (``do_sample`` at ``temperature``, the model's
    other generation defaults), with the torch RNG seeded by ``seed`` alone. One prompt a call: in a batch,
    a prompt's draws would depend on the prompts beside it."""
    import torch

    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tok([text], return_tensors="pt", add_special_tokens=False).to(model.device)
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                             pad_token_id=tok.pad_token_id)
    ids = out[0, enc["input_ids"].shape[1]:].tolist()
    n = len(ids)
    for stop in (tok.eos_token_id, tok.pad_token_id):
        if stop is not None and stop in ids:
            n = min(n, ids.index(stop) + 1)
    return tok.decode(ids[:n], skip_special_tokens=True).strip(), n


def _sampling(p: dict) -> dict:
    """A prompt's sampling columns: ``temperature`` (0: greedy) and the ``seed`` a sampled prompt must carry."""
    temperature = float(p.get("temperature") or 0.0)
    if temperature < 0:
        raise GenerationError(f"prompt {p['id']}: temperature {temperature} is negative")
    if temperature and not isinstance(p.get("seed"), int):
        raise GenerationError(f"prompt {p['id']}: temperature {temperature} needs an integer seed (a re-run must "
                              "give the same answers)")
    return {"temperature": temperature, "seed": int(p.get("seed") or 0)}


def _ordered(prompts: list[dict], out: list[dict]) -> list[dict]:
    by_id = {r["id"]: r for r in out}
    missing = [p["id"] for p in prompts if p["id"] not in by_id]
    if missing:
        raise GenerationError(f"{len(missing)} prompts got no answer (first: {missing[:3]})")
    return [by_id[p["id"]] for p in prompts]


def first_token_top_logprobs(model, tok, conversations: list[list[dict]], k: int) -> list[list[dict]]:
    """The top-``k`` log-probabilities of the first answer token of each conversation, best first, from one
    left-padded forward pass: ``[{"token", "logprob"}]`` per conversation, the token as ``tok.decode`` gives its
    text (what an endpoint's ``top_logprobs`` names it, unstripped). The position ids follow the padding, as
    ``generate`` sets them, so a padded row gets the log-probabilities it gets alone."""
    import torch

    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    mask = enc["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions,
                       logits_to_keep=1).logits[:, -1, :]
    values, ids = torch.log_softmax(logits.float(), dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
    return [[{"token": tok.decode([i]), "logprob": float(v)} for v, i in zip(vs, is_, strict=True)]
            for vs, is_ in zip(values.tolist(), ids.tolist(), strict=True)]


class HFNextToken(HFGenerator):
    """Ray Data actor: one model (loaded as the generate actor loads it), the top-k log-probabilities of each
    prompt's first answer token."""

    def __init__(self, model_path: str, top_k: int, threads: int, use_gpu: bool):
        super().__init__(model_path, 1, threads, use_gpu)
        self.top_k = top_k

    def __call__(self, batch):
        import pyarrow as pa

        rows = batch.to_pylist()
        tops = first_token_top_logprobs(self.model, self.tok, [r["messages"] for r in rows], self.top_k)
        top_type = pa.list_(pa.struct([("token", pa.string()), ("logprob", pa.float64())]))
        return pa.table({"id": [r["id"] for r in rows], "answer": [t[0]["token"] for t in tops],
                         "num_new_tokens": [1] * len(rows), "top_logprobs": pa.array(tops, type=top_type)})


def vllm_top_logprobs(row: dict, k: int) -> dict:
    """A ray.data.llm vLLM output row (``logprobs``: per generated token, ``{token_id: {"logprob", "rank",
    "decoded_token"}}``; after Arrow the ids may be strings and absent ids None) -> ``{"id", "answer",
    "num_new_tokens", "top_logprobs"}``: the first token's ``k`` best, best first, named by vLLM's decoded text.
    vLLM adds the sampled token when it is not among them (it is, greedy); None where there are none."""
    positions = row.get("logprobs") or []
    first = positions[0] if len(positions) else None
    top = None
    if first:
        entries = [{"token": v.get("decoded_token"), "logprob": v.get("logprob")} for v in first.values()
                   if isinstance(v, dict) and v.get("logprob") is not None]
        entries = [e for e in entries if isinstance(e["token"], str)]
        top = sorted(entries, key=lambda e: -float(e["logprob"]))[:k] or None
        top = [{"token": e["token"], "logprob": float(e["logprob"])} for e in top] if top else None
    return {"id": row["id"], "answer": str(row.get("generated_text") or ""),
            "num_new_tokens": int(row.get("num_generated_tokens") or 0), "top_logprobs": top}


def _next_token_transformers(model: str, prompts: list[dict], top_k: int, g: GenerationConfig) -> list[dict]:
    import ray

    order = sorted(prompts, key=lambda p: sum(len(m["content"]) for m in p["messages"]))
    ds = ray.data.from_items([{"id": p["id"], "messages": p["messages"]} for p in order])
    ds = ds.map_batches(
        HFNextToken,
        fn_constructor_kwargs={"model_path": model, "top_k": top_k, "threads": actor_threads(g),
                               "use_gpu": g.gpus_per_actor > 0},
        batch_size=g.batch_size,
        batch_format="pyarrow",
        **actor_pool(g),
    )
    return _ordered(prompts, ds.take_all())


def _next_token_vllm(model: str, prompts: list[dict], top_k: int, g: GenerationConfig) -> list[dict]:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from .. import models

    config = vLLMEngineProcessorConfig(
        model_source=models.engine_source(model),
        engine_kwargs={"enable_prefix_caching": True, "max_logprobs": max(top_k, 20), **g.vllm_engine_kwargs},
        concurrency=g.num_actors,
        batch_size=g.batch_size,
    )
    processor = build_processor(
        config,
        preprocess=lambda row: {"id": row["id"], "messages": row["messages"],
                                "sampling_params": {"temperature": 0.0, "max_tokens": 1, "logprobs": top_k}},
        postprocess=lambda row: vllm_top_logprobs(row, top_k),
    )
    ds = ray.data.from_items([{"id": p["id"], "messages": p["messages"]} for p in prompts])
    return _ordered(prompts, processor(ds).take_all())


def next_token_logprobs(model: str, prompts: list[dict], top_k: int, g: GenerationConfig) -> list[dict]:
    """The top-``top_k`` log-probabilities of the first answer token of ``model`` for each of ``prompts``
    (``[{"id", "messages"}]``), with ``g``'s backend, in input order: ``{"id", "answer"`` (that token's text),
    ``"num_new_tokens"`` (1), ``"top_logprobs"``: ``[{"token", "logprob"}]``, best first}``."""
    if not prompts:
        return []
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        raise GenerationError("prompt ids are not unique")
    if top_k < 1:
        raise GenerationError(f"top_k {top_k}: at least one log-probability")
    if g.backend == "transformers":
        return _next_token_transformers(model, prompts, top_k, g)
    if g.backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise GenerationError("backend vllm (generate.backend or judge.generate.backend) needs the vllm extra: "
                                  "pip install 'alignment[vllm]'") from e
        return _next_token_vllm(model, prompts, top_k, g)
    raise GenerationError(f"unknown generation backend {g.backend!r}")


def _generate_transformers(model: str, prompts: list[dict], g: GenerateConfig) -> list[dict]:
    import ray

    # Similar lengths together: less padding per batch.
    order = sorted(prompts, key=lambda p: sum(len(m["content"]) for m in p["messages"]))
    ds = ray.data.from_items([{"id": p["id"], "messages": p["messages"], **_sampling(p)} for p in order])
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

    def params(row: dict) -> dict:
        # vLLM seeds each sampled request on its own: the same answers whatever the batches.
        if not row["temperature"]:
            return {"temperature": 0.0, "max_tokens": max_tokens}
        return {"temperature": row["temperature"], "max_tokens": max_tokens, "seed": row["seed"]}

    processor = build_processor(
        config,
        preprocess=lambda row: {"id": row["id"], "messages": row["messages"], "sampling_params": params(row)},
        postprocess=lambda row: {"id": row["id"], "answer": row["generated_text"].strip(),
                                 "num_new_tokens": int(row.get("num_generated_tokens") or 0)},
    )
    ds = ray.data.from_items([{"id": p["id"], "messages": p["messages"], **_sampling(p)} for p in prompts])
    return _ordered(prompts, processor(ds).take_all())


def generate(model: str, prompts: list[dict], g: GenerateConfig) -> list[dict]:
    """Answers of ``model`` for ``prompts`` (``[{"id", "messages"}]``, optionally ``temperature`` and ``seed``)
    with ``g``'s backend, in input order."""
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


# ------------------------------------------------------------------------------------------ MT-Bench generation

# FastChat's temperature_config (fastchat/llm_judge/common.py): the sampling temperature of an MT-Bench category,
# 0 meaning greedy; gen_model_answer.py samples at 0.7 a category not in it.
MT_BENCH_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                         "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
OTHER_CATEGORY_TEMPERATURE = 0.7


def category_temperature(category: str) -> float:
    return MT_BENCH_TEMPERATURES.get(category, OTHER_CATEGORY_TEMPERATURE)


def turn_seed(seed: int, prompt_id: str, turn: int) -> int:
    """The sampling seed of one turn of one prompt: a hash of the experiment's seed, the id and the turn."""
    digest = hashlib.sha256(f"{seed}\0{prompt_id}\0{turn}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def generate_turns(model: str, rows: list[dict], g: GenerateConfig, seed: int,
                   generate_fn: Callable[[str, list[dict], GenerateConfig], list[dict]] | None = None) -> list[dict]:
    """Answers to every user turn of ``rows``, in input order: ``[{"id", "turns": [answer per turn],
    "num_new_tokens": [per turn]}]``. A row is ``{"id", "messages"}`` (turn 1's prompt), with ``next_turns``
    (the later user turns' texts) and ``temperature`` (default greedy) where it has them.

    As FastChat's gen_model_answer: turn k is asked in the same conversation, after the model's own answers to
    turns 1..k-1, at the row's temperature. One ``generate`` call per turn, over the rows that have that turn,
    each turn seeded by :func:`turn_seed`. ``generate_fn``: the generation function (default :func:`generate`).
    """
    run = generate_fn or generate
    asked: dict[str, list[dict]] = {r["id"]: r["messages"] for r in rows}
    answers: dict[str, list[str]] = {r["id"]: [] for r in rows}
    tokens: dict[str, list[int]] = {r["id"]: [] for r in rows}
    turn, todo = 1, rows
    while todo:
        prompts = [{"id": r["id"], "messages": asked[r["id"]], "temperature": r.get("temperature", 0.0),
                    "seed": turn_seed(seed, r["id"], turn)} for r in todo]
        for p, out in zip(prompts, run(model, prompts, g), strict=True):
            answers[p["id"]].append(out["answer"])
            tokens[p["id"]].append(out["num_new_tokens"])
        todo = [r for r in todo if len(r.get("next_turns", ())) >= turn]
        for r in todo:
            asked[r["id"]] = [*asked[r["id"]], {"role": "assistant", "content": answers[r["id"]][-1]},
                              {"role": "user", "content": r["next_turns"][turn - 1]}]
        turn += 1
    return [{"id": r["id"], "turns": answers[r["id"]], "num_new_tokens": tokens[r["id"]]} for r in rows]
