"""Where answers come from besides a model loaded here: a served endpoint, and a file of answers.

A served model (:func:`served_answers`) answers through an OpenAI-compatible endpoint, with bounded concurrency and
retries (``alignment.endpoints``); every answer is kept in the stage's ``responses.jsonl`` as it arrives, so a
re-run after a failure sends only the requests still unanswered.

A file of answers (:func:`read_answers`, :func:`match`) is read in one of three formats, told apart by each row's keys:

- AlpacaEval's ``[{instruction, output, generator}]`` (``alpaca_eval --model_outputs``), matched to a prompt by
  its instruction text, as alpaca_eval matches outputs to its set;
- FastChat's ``model_answer`` JSON lines ``{question_id, model_id, choices: [{turns: [...]}]}``, matched by
  question id, one answer per turn (the first choice, as FastChat's judges read it);
- this project's ``answers.jsonl`` rows ``{id, answer}`` (a generate stage's output), matched by id.

Every prompt of the suite needs an answer (and an MT-Bench question one per turn): a missing one is an error
naming the file and the prompts, never a gap filled in. An answer the suite does not ask for is counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import endpoints
from ..errors import InputError
from ..formats import BadJSON, iter_raw, plan_shards

if TYPE_CHECKING:
    from ..config import ServedConfig


class AnswersError(InputError, ValueError):
    """An answers file cannot serve a suite: it names the file, and the row, field or prompts."""


def _answer(row: Any, path: str, i: int) -> tuple[str, str, list[str]]:
    """``(match kind, match key, answer per turn)`` of one row."""
    where = f"{path}: row {i}"
    if isinstance(row, BadJSON):
        raise AnswersError(f"{where}: {row.message}")
    if not isinstance(row, dict):
        raise AnswersError(f"{where}: a JSON object was expected, got {type(row).__name__}")
    if "choices" in row:
        choices = row["choices"]
        if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)
                and isinstance(choices[0].get("turns"), list)):
            raise AnswersError(f"{where}: field choices: FastChat's [{{turns: [...]}}] was expected")
        turns, key, kind, field = choices[0]["turns"], row.get("question_id"), "id", "question_id"
        names = [f"choices[0].turns[{t}]" for t in range(len(turns))]
    elif "instruction" in row:
        turns, key, kind, names = [row.get("output")], row["instruction"], "instruction", ["output"]
        field = "instruction"
    elif "answer" in row:  # a generate stage's answers.jsonl: every turn where the row has them (MT-Bench)
        turns, key, kind, field = row.get("turns") or [row["answer"]], row.get("id"), "id", "id"
        names = [f"turns[{t}]" for t in range(len(turns))] if row.get("turns") else ["answer"]
    else:
        raise AnswersError(f"{where}: neither AlpacaEval's {{instruction, output}}, FastChat's {{question_id, "
                           f"choices}} nor {{id, answer}} (keys: {', '.join(sorted(row)) or 'none'})")
    if key is None or str(key) == "":
        raise AnswersError(f"{where}: field {field} is missing")
    for name, text in zip(names, turns, strict=True):
        if not isinstance(text, str):
            got = "missing" if text is None else f"{type(text).__name__}, not text"
            raise AnswersError(f"{where}: field {name} is {got}")
    return kind, str(key), turns


def _asked(row: Any) -> str | None:
    """The prompt an answers.jsonl row answered (its last user turn), where it says."""
    msgs = row.get("messages") if isinstance(row, dict) else None
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and isinstance(msgs[-1].get("content"), str):
        return msgs[-1]["content"]
    return None


def read_answers(path: str) -> dict[str, dict[str, list[str]]]:
    """The answers of a file, ``{"id": {key: turns}, "instruction": {text: turns}, "asked": {id: prompt}}``
    (``asked``: the prompt an answers.jsonl row says it answered); a key answered twice is an error (which answer
    is meant cannot be known)."""
    out: dict[str, dict[str, Any]] = {"id": {}, "instruction": {}, "asked": {}}
    rows = 0
    for shard in plan_shards([path]):
        for i, row in iter_raw(shard):
            kind, key, turns = _answer(row, path, i)
            if key in out[kind]:
                raise AnswersError(f"{path}: row {i}: {kind} {key[:80]!r} is answered twice")
            out[kind][key] = turns
            if kind == "id" and _asked(row) is not None:
                out["asked"][key] = (_asked(row), i)
            rows += 1
    if not rows:
        raise AnswersError(f"{path}: no answers in the file")
    return out


def match(prompts: list[dict], answers: dict[str, dict[str, list[str]]], path: str) -> tuple[list[dict], int]:
    """Per prompt (eval rows: ``id``, ``messages``, and ``question_turns`` for MT-Bench) the answers as
    :func:`~alignment.evaluate.generate.generate_turns` returns them (``turns``; ``num_new_tokens`` unknown:
    None), and the number of answers in the file no prompt asked for."""
    out, missing, short = [], [], []
    used: set[tuple[str, str]] = set()
    for p in prompts:
        key = ("id", str(p["id"]))
        if key[1] not in answers["id"]:
            key = ("instruction", p["messages"][-1]["content"])
        turns = answers[key[0]].get(key[1])
        if turns is None:
            missing.append(str(p["id"]))
            continue
        asked = answers.get("asked", {}).get(key[1]) if key[0] == "id" else None
        if asked is not None and asked[0] != p["messages"][-1]["content"]:
            raise AnswersError(f"{path}: row {asked[1]}: id {key[1]} answers another prompt than the suite's "
                               f"{key[1]} ({asked[0][:60]!r}); answers from another prompt set?")
        need = len(p.get("question_turns") or [None])
        if len(turns) < need:
            short.append(f"{p['id']} ({len(turns)} of {need} turns)")
            continue
        used.add(key)
        out.append({"id": p["id"], "turns": turns[:need], "num_new_tokens": [None] * need})
    if missing:
        raise AnswersError(f"{path}: no answer for {len(missing)} of the {len(prompts)} prompts (ids "
                           f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); an answer is matched by "
                           "id (question_id) or by its instruction text")
    if short:
        raise AnswersError(f"{path}: too few turns for {len(short)} prompts: {', '.join(short[:5])}")
    unused = len(answers["id"]) + len(answers["instruction"]) - len(used)
    return out, unused


def served_answers(model: str, prompts: list[dict], served: ServedConfig, max_new_tokens: int,
                   cache_path: Path) -> list[dict]:
    """``model``'s answers from the endpoint ``served`` names, in the prompts' order (``[{"answer",
    "num_new_tokens"}]``); answers stored in ``cache_path`` by an earlier try are not asked again. A request that
    still failed after its retries fails the whole call, naming the first error (the key never shows)."""
    outs = endpoints.complete_cached(prompts, model, endpoints.Endpoint(served.api_base_env, served.api_key_env),
                                     max_new_tokens, cache_path, timeout=served.timeout_s, workers=served.concurrency,
                                     retry=endpoints.Retry(served.max_retries, served.retry_backoff_s))
    failed = [o for o in outs if o["error"]]
    if failed:
        raise endpoints.GenerationError(
            f"{model}: {len(failed)} of {len(outs)} requests to the endpoint in {served.api_base_env} failed after "
            f"their retries (first: {failed[0]['error']}); the {len(outs) - len(failed)} answered are kept in "
            f"{cache_path}, and a re-run asks only for the rest")
    return [{"answer": o["answer"], "num_new_tokens": o["num_new_tokens"]} for o in outs]
