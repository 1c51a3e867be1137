"""The ``rating`` scorer (the quality baseline of Long Is More): an LLM rates each row on a 1-5 Likert scale,
a local model in Ray Data actors or an OpenAI-compatible endpoint (URL and key from the environment, never
logged). The first standalone digit 1-5 of the answer's first line is the score; anything else is unparsed (a
null score with the reason), never guessed.

The endpoint's answers are stored by the driver as they come (``rating_responses.jsonl`` in the stage's
directory: tasks may run on other nodes), so that a re-run of a failed stage sends only the failed rows'
requests; :func:`keep_answers` and :func:`failure` are the driver's part.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ...endpoints import Endpoint, Retry, cache_line, complete_openai, failure_message
from ...ray_env import actor_pool, actor_threads
from ..rows import merge_errors, scatter, valid

if TYPE_CHECKING:
    from ...config import RatingConfig, SelectConfig
    from . import Context

# This wording is ours; select.rating.prompt replaces it ({instruction} and {response} are filled in).
RATING_PROMPT = (
    "Rate the quality of the assistant's response to the instruction on a scale from 1 (very poor) to 5 "
    "(excellent), considering helpfulness, accuracy, relevance and level of detail.\n\n"
    "[Instruction]\n{instruction}\n\n[Response]\n{response}\n\n"
    "Reply with the rating only, a single digit from 1 to 5."
)


def rating_prompt(messages: list[dict], template: str = RATING_PROMPT) -> str:
    """The rating request for one conversation: the last assistant turn rated against what came before it."""
    turns = [m for m in messages if m["role"] != "system"]
    last = max(i for i, m in enumerate(turns) if m["role"] == "assistant")
    before = turns[:last]
    if len(before) == 1:
        instruction = before[0]["content"]
    else:
        instruction = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in before)
    return template.format(instruction=instruction, response=turns[last]["content"])


_RATING = re.compile(r"(?<![\d.])([1-5])(?![\d.])")


def parse_rating(text: str) -> tuple[float | None, str | None]:
    """The first standalone digit 1-5 of the first non-empty line; anything else is unparsed, never guessed."""
    line = next((ln.strip() for ln in (text or "").splitlines() if ln.strip()), "")
    m = _RATING.search(line)
    if not m:
        return None, f"unparsed rating: {line[:80]!r}"
    return float(m.group(1)), None


def _template(r: RatingConfig) -> str:
    return r.prompt or RATING_PROMPT


class LocalRater:
    """Ray Data actor: a local chat model rates each row 1-5 (greedy; an unparsed answer is a null score)."""

    def __init__(self, r: RatingConfig, model_path: str):
        import torch

        from ... import models

        torch.set_num_threads(actor_threads(r))
        self.model, self.tok = models.load_for_generation(model_path, r.gpus_per_actor > 0)
        self.template, self.max_new_tokens = _template(r), r.max_new_tokens

    def __call__(self, table: pa.Table) -> pa.Table:
        from ... import models

        ok = valid(table)
        msgs = [m for m, good in zip(table["messages"].to_pylist(), ok) if good]
        convs = [[{"role": "user", "content": rating_prompt(m, self.template)}] for m in msgs]
        answers = models.greedy_generate(self.model, self.tok, convs, self.max_new_tokens)[0] if convs else []
        return _rated(table, ok, answers, [None] * len(answers))


# What the rating endpoint's task tells the driver per row, which the driver reads and drops
# (:func:`keep_answers`): the request's key and a newly received answer (to store), and the request's
# outcome: cached, answered, or the kind of failure.
RATING_KEY, RATING_ANSWER, RATING_STATUS = "_rating_key", "_rating_answer", "_rating_status"
CACHED, ANSWERED = "cached", "answered"


def rate_openai_batch(table: pa.Table, r: RatingConfig, endpoint: Endpoint,
                      cache: dict[str, dict] | None = None) -> pa.Table:
    """Ray Data UDF: an OpenAI-compatible endpoint rates each row 1-5; a row whose request has an answer in
    ``cache`` (from an earlier run of the stage) is not sent again."""
    ok = valid(table)
    rows = [(i, m) for i, m, good in zip(table["id"].to_pylist(), table["messages"].to_pylist(), ok) if good]
    template = _template(r)
    requests = [{"id": i, "messages": [{"role": "user", "content": rating_prompt(m, template)}]} for i, m in rows]
    out = complete_openai(requests, r.model, endpoint, r.max_new_tokens, r.timeout_s, r.concurrency,
                          Retry(r.max_retries, r.retry_backoff_s), cache)
    new = [not o["cached"] and not o["error"] for o in out]
    status = [CACHED if o["cached"] else o["error_kind"] or ANSWERED for o in out]
    rated = _rated(table, ok, [o["answer"] for o in out], [o["error"] and f"endpoint {o['error']}" for o in out])
    return (rated.append_column(RATING_KEY, pa.array(scatter([o["key"] if n else None for o, n in zip(out, new)], ok),
                                                     pa.string()))
            .append_column(RATING_ANSWER, pa.array(scatter([o["answer"] if n else None for o, n in zip(out, new)], ok),
                                                   pa.string()))
            .append_column(RATING_STATUS, pa.array(scatter(status, ok), pa.string())))


def _rated(table: pa.Table, ok: list[bool], answers: list[str], failures: list[str | None]) -> pa.Table:
    """``score_rating`` from the answers of the valid rows; a row whose request failed (``failures``: the
    reason, ``endpoint <kind>: ...``) or whose answer is unparsed gets a null score and the reason."""
    scores, reasons = [], []
    for a, failed in zip(answers, failures):
        score, why = (None, failed) if failed else parse_rating(a)
        scores.append(score)
        reasons.append(why)
    return merge_errors(
        table.append_column("score_rating", pa.array(scatter(scores, ok), pa.float64())),
        scatter(reasons, ok),
    )


def uses_endpoint(s: SelectConfig) -> bool:
    return "rating" in s.scorers and s.rating.backend == "openai"


def models(s: SelectConfig) -> dict[str, str]:
    """The transformers backend's rater is a local model; the openai backend names the endpoint's."""
    return {"rating_model": "select.rating.model"} if s.rating.backend == "transformers" else {}


def endpoint(s: SelectConfig) -> str | None:
    return "rating" if s.rating.backend == "openai" else None


def add(ds: Any, s: SelectConfig, ctx: Context) -> Any:
    """Actors holding the local rater, or tasks sending the endpoint's requests."""
    r = s.rating
    if r.backend == "openai":
        import ray

        return ds.map_batches(
            rate_openai_batch, fn_kwargs={"r": r, "endpoint": Endpoint(r.api_base_env, r.api_key_env),
                                          "cache": ctx.rating_cache},
            batch_size=r.batch_size * r.concurrency, batch_format="pyarrow",
            # Requests in flight are bounded in all, not per task: tasks x concurrency.
            compute=ray.data.TaskPoolStrategy(size=r.tasks))
    return ds.map_batches(LocalRater, fn_constructor_kwargs={"r": r, "model_path": ctx.resolved.rating_model},
                          batch_size=r.batch_size, batch_format="pyarrow", **actor_pool(r))


def new_tally() -> dict[str, Any]:
    """The driver's count of the endpoint's requests (see :func:`keep_answers`)."""
    return {"rated": 0, "cached": 0, "failed": {}, "first_error": None, "batch_failed": False}


def failure(tally: dict[str, Any], r: RatingConfig, cache_path: Path) -> str | None:
    """Why the stage fails when more than ``max_failed_fraction`` of the rows' rating requests failed."""
    return failure_message("rating", tally["failed"], tally["rated"], tally["first_error"],
                           "select.rating.max_failed_fraction", r.max_failed_fraction,
                           tally["rated"] - sum(tally["failed"].values()), cache_path)


def keep_answers(batch: pa.Table, cache: Any, tally: dict[str, Any]) -> pa.Table:
    """The driver's part of the rating endpoint's work on one batch: store the newly received answers in the
    stage's cache file (so that a re-run sends only the failed rows' requests), count the requests by outcome
    in ``tally`` (``rated``, ``cached``, ``failed``: kind -> rows, ``first_error``, ``batch_failed``: whether
    every request of this batch failed), and return the batch without those columns."""
    keys, answers = batch[RATING_KEY].to_pylist(), batch[RATING_ANSWER].to_pylist()
    for key, answer in zip(keys, answers):
        if key is not None:
            cache.write(cache_line(key, answer))
    cache.flush()
    status = batch[RATING_STATUS].to_pylist()
    errors = batch["score_error"].to_pylist()
    sent = failed = 0
    for st, err in zip(status, errors):
        if st is None:  # an invalid row: never sent
            continue
        tally["rated"] += 1
        if st == CACHED:
            tally["cached"] += 1
            continue
        sent += 1
        if st != ANSWERED:
            failed += 1
            tally["failed"][st] = tally["failed"].get(st, 0) + 1
            if tally["first_error"] is None or tally["first_error"].startswith("endpoint not sent"):
                tally["first_error"] = err[err.find("endpoint "):]  # this scorer's reason, not another's
    tally["batch_failed"] = sent > 0 and failed == sent
    return batch.drop_columns([RATING_KEY, RATING_ANSWER, RATING_STATUS])
