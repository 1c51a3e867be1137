"""Deita's scorers on vLLM through Ray Data LLM (``ray.data.llm``), for GPU clusters (the ``vllm`` extra).

Each conversation is exploded into one prompt row per turn (carrying the conversation with it); a vLLM
processor generates one token per prompt with ``logprobs`` top log-probabilities; the expected score over
"1".."6" is read from them (a score token missing from them is a failure with its reason, never a default);
the turn rows are grouped back into one row per conversation. Complexity runs first, then quality.
The pure parts (:func:`explode`, :func:`postprocess`, :func:`assemble`) run and are tested without vLLM.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..rows import ScorerError
from .deita import deita_prompts, evol_score, expected_score_from_logprobs, score_token_ids

if TYPE_CHECKING:
    from ...config import DeitaConfig

KEY = "_deita_key"
SKIP = "\x00skip"  # a row that failed validation rides along as one tiny prompt and is not scored


def _none(v: Any) -> Any:
    """pandas turns nulls into NaN on the way through a group: back to None."""
    return None if isinstance(v, float) and v != v else v


def _key(row: dict[str, Any]) -> str:
    return json.dumps([row["source"], row["row"], row["id"]])


def explode(row: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """One prompt row per turn for ``kind`` ("complexity" or "quality"), each carrying the whole row."""
    base = {**row, KEY: _key(row)}
    if row.get("error") is not None:
        return [{**base, "_turn": 0, "_turns": 1, "_prompt": SKIP, "_fail": None}]
    try:
        c, q = deita_prompts(row["messages"])
    except ValueError as e:
        return [{**base, "_turn": 0, "_turns": 1, "_prompt": SKIP, "_fail": f"deita: {e}"}]
    prompts = c if kind == "complexity" else q
    return [{**base, "_turn": t, "_turns": len(prompts), "_prompt": p, "_fail": None} for t, p in enumerate(prompts)]


def postprocess(row: dict[str, Any], ids: list[int], carry: list[str]) -> dict[str, Any]:
    """The processor's output row -> the carried columns plus ``_score`` and ``_reason``."""
    out = {c: row.get(c) for c in carry}
    if row["_prompt"] == SKIP:
        out.update(_score=None, _reason=row.get("_fail"))
        return out
    logprobs = row.get("logprobs") or []
    score, reason = expected_score_from_logprobs(logprobs[0] if logprobs else None, ids)
    out.update(_score=score, _reason=reason)
    return out


def assemble(group: Any, kind: str) -> Any:
    """All turn rows of one conversation (pandas) -> one row with the per-turn list (and, after quality, evol)."""
    import pandas as pd

    g = group.sort_values("_turn")
    first = {k: _none(v) for k, v in g.iloc[0].to_dict().items()}
    row = {k: v for k, v in first.items() if not k.startswith("_") and k not in ("prompt", "sampling_params")}
    row.pop("__inference_error__", None)
    if first["_prompt"] == SKIP:
        scores, why = None, first.get("_fail")
    else:
        scores, why = [], []
        for _, r in g.iterrows():
            err = r.get("__inference_error__") if "__inference_error__" in g.columns else None
            err = _none(err)
            s = None if err else _none(r["_score"])
            scores.append(None if s is None else float(s))
            reason = f"vLLM error: {err}" if err else _none(r["_reason"])
            if reason:
                why.append(f"deita {kind}, turn {int(r['_turn']) + 1}: {reason}")
        why = "; ".join(why) or None
    row[f"deita_{kind}"] = scores
    if kind == "quality":
        c = row.get("deita_complexity")
        row["score_deita_evol"] = evol_score(list(c), scores) if c is not None and scores is not None else None
    row["score_error"] = "; ".join(x for x in (row.get("score_error"), why) if isinstance(x, str) and x) or None
    return pd.DataFrame([row])


def _score_ids(model_path: str) -> list[int]:
    from transformers import AutoTokenizer

    from ... import models

    return score_token_ids(AutoTokenizer.from_pretrained(models.materialize(model_path)))


def add_deita_vllm(ds: Any, d: DeitaConfig, complexity_model: str, quality_model: str, columns: list[str]) -> Any:
    """Chain the two vLLM scoring passes onto a dataset of normalised rows with these ``columns``."""
    try:
        import vllm  # noqa: F401
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    except ImportError as e:
        raise ScorerError("select.deita.backend=vllm needs the vllm extra: pip install 'alignment[vllm]'") from e
    from ... import models

    for kind, model in (("complexity", complexity_model), ("quality", quality_model)):
        ids = _score_ids(model)
        carry = columns + [KEY, "_turn", "_turns", "_prompt", "_fail"]
        config = vLLMEngineProcessorConfig(
            model_source=models.engine_source(model),  # a cloud URI is fetched on each GPU node
            engine_kwargs={"max_logprobs": d.logprobs, "max_model_len": d.max_length + 8, **d.vllm_engine_kwargs},
            concurrency=d.num_actors, batch_size=d.batch_size,
            chat_template_stage=False, should_continue_on_error=True,
        )
        processor = build_processor(
            config,
            preprocess=lambda r: {"prompt": r["_prompt"] if r["_prompt"] != SKIP else "1",
                                  "sampling_params": {"temperature": 0.0, "max_tokens": 1, "logprobs": d.logprobs}},
            postprocess=lambda r, ids=ids, carry=carry: postprocess(r, ids, carry),
        )
        ds = (processor(ds.flat_map(lambda r, kind=kind: explode(r, kind)))
              .groupby(KEY).map_groups(lambda g, kind=kind: assemble(g, kind), batch_format="pandas"))
        columns = [*dict.fromkeys([*columns, f"deita_{kind}", "score_error"])]
    return ds
