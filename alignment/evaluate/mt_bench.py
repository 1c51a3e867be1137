"""The ``mt_bench`` judge: MT-Bench single-answer grading, as FastChat's llm_judge runs it (Zheng et al. 2023,
"Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena").

Both the target's and the baseline's answers are graded, each on its own, 1-10 per turn:

- turn 1 with FastChat's ``single-v1`` prompt, or ``single-math-v1`` with the reference answer for the categories
  that need one (math, reasoning, coding);
- turn 2 (questions of two turns, as FastChat's ``make_match_single``) with the ``-multi-turn`` variants, which
  show the whole conversation: both questions and the model's own two answers (and both reference turns).

The prompt texts come from FastChat's judge_prompts.jsonl (``judge.prompts``), filled in as ``run_judge_single``
fills them; the reference answers from a FastChat ``model_answer`` file (``judge.references``). The rating is
FastChat's: the first ``[[x]]`` of the judgement, else the first ``[x]``; none is -1. A -1 (unparsed, or a request
that failed) is counted and left out of every mean, as FastChat's ``show_result`` drops it; never guessed. The
means: per model over all rated turns (the MT-Bench score), per turn, and per category (both turns).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .fastchat import JudgePrompt, json_objects, judge_prompt, load_judge_prompts

if TYPE_CHECKING:
    from ..config import JudgeConfig

# FastChat's NEED_REF_CATS: the categories graded against a reference answer.
NEED_REF_CATS = ("math", "reasoning", "coding")
# FastChat's one_score_pattern and its backup (fastchat/llm_judge/common.py).
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
FAILED = -1
MODELS = ("target", "baseline")


class MTBenchError(InputError, ValueError):
    """MT-Bench input that cannot be graded: a prompt without its turns, a missing answer or reference answer."""


def parse_rating(judgment: str) -> float | int:
    """The rating as FastChat's ``run_judge_single`` reads it: ``[[x]]``, else ``[x]``, else -1. Not clipped to
    1-10, as FastChat does not."""
    match = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    return ast.literal_eval(match.groups()[0]) if match else FAILED


def load_references(path: str | Path) -> dict[str, list[str]]:
    """Reference answers by question id (as text) from a FastChat model_answer JSONL file
    (``{question_id, choices: [{turns: [...]}]}``); a bad line is an error naming the file, line and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise MTBenchError(f"judge.references: {path} cannot be read: {e}") from None
    refs: dict[str, list[str]] = {}
    for where, row in json_objects(text, path, MTBenchError):
        if "question_id" not in row:
            raise MTBenchError(f"{where}: field 'question_id' is missing")
        try:
            turns = row["choices"][0]["turns"]
        except (KeyError, IndexError, TypeError):
            raise MTBenchError(f"{where}: field 'choices[0].turns' is missing") from None
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise MTBenchError(f"{where}: field 'choices[0].turns' must be a list of strings")
        qid = str(row["question_id"])
        if qid in refs:
            raise MTBenchError(f"{where}: field 'question_id': question {qid} appears twice")
        refs[qid] = turns
    return refs


def _prompt(p: JudgePrompt, **fields: str) -> list[dict[str, str]]:
    # run_judge_single: the template's system prompt as the system message, the filled template as the user's.
    return [{"role": "system", "content": p.system_prompt},
            {"role": "user", "content": p.prompt_template.format(**fields)}]


def _turns_of(q: dict, answers: dict[str, dict[str, Any]]) -> tuple[list[str], dict[str, list[str]]]:
    qid = q["id"]
    if "question_turns" not in q or "category" not in q:
        raise MTBenchError(f"prompt {qid}: mt_bench grades MT-Bench-format prompts ({{question_id, category, "
                           "turns}}); this one has no turns or category (data.eval_prompts)")
    turns = q["question_turns"]
    got = {}
    for model in MODELS:
        row = answers[model].get(qid)
        if row is None or not isinstance(row.get("turns"), list):
            raise MTBenchError(f"prompt {qid}: the {model}'s answers hold no per-turn answers (field 'turns' of its "
                               "answers.jsonl); run the generate stage again")
        if len(row["turns"]) != len(turns):
            raise MTBenchError(f"prompt {qid}: the {model} answered {len(row['turns'])} of {len(turns)} turns")
        got[model] = row["turns"]
    return turns, got


def build_requests(questions: list[dict], target: dict[str, dict], baseline: dict[str, dict],
                   prompts: dict[str, JudgePrompt], prompts_path: str, references: dict[str, list[str]] | None,
                   references_path: str | None) -> list[dict]:
    """One request per model, question and graded turn: turn 1 always, turn 2 for questions of two turns."""
    names = {(False, False): "single-v1", (True, False): "single-math-v1", (False, True): "single-v1-multi-turn",
             (True, True): "single-math-v1-multi-turn"}
    chosen = {key: judge_prompt(prompts, name, prompts_path) for key, name in names.items()}
    reqs = []
    for q in questions:
        turns, answers = _turns_of(q, {"target": target, "baseline": baseline})
        ref_based = q["category"] in NEED_REF_CATS
        graded = [1, 2] if len(turns) == 2 else [1]
        ref: dict[str, str] = {}
        if ref_based:
            if references is None:
                raise MTBenchError(f"prompt {q['id']} ({q['category']}) is graded against a reference answer, and "
                                   "judge.references is not set (FastChat's reference_answer/gpt-4.jsonl)")
            if q["id"] not in references:
                raise MTBenchError(f"{references_path} has no reference answer for question {q['id']} "
                                   f"({q['category']}), which is graded against one")
            if len(references[q["id"]]) < len(graded):
                raise MTBenchError(f"{references_path}: question {q['id']}'s reference answer has "
                                   f"{len(references[q['id']])} turns, {len(graded)} are graded")
            ref = {f"ref_answer_{i + 1}": t for i, t in enumerate(references[q["id"]][:2])}
        for model in MODELS:
            a = answers[model]
            for turn in graded:
                p = chosen[(ref_based, turn == 2)]
                if turn == 1:
                    msgs = _prompt(p, question=turns[0], answer=a[0], **ref)
                else:
                    msgs = _prompt(p, question_1=turns[0], question_2=turns[1], answer_1=a[0], answer_2=a[1], **ref)
                reqs.append({"id": f"{q['id']}|{model}|{turn}", "qid": q["id"], "model": model, "turn": turn,
                             "category": q["category"], "prompt_name": p.name, "messages": msgs})
    return reqs


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def score(requests: list[dict], outputs: list[dict]) -> tuple[list[dict], dict[str, Any]]:
    """Per-question verdicts and the summary: ``rated`` (every turn of both models has a rating), ``partial``
    (some), ``invalid`` (none); the means follow FastChat's show_result over the rated judgements."""
    by_q: dict[str, list[dict]] = {}
    unparsed = failed = 0
    for req, out in zip(requests, outputs, strict=True):
        error = out.get("error")
        rating = FAILED if error else parse_rating(out["answer"])
        failed += bool(error)
        unparsed += rating == FAILED and not error
        by_q.setdefault(req["qid"], []).append({"model": req["model"], "turn": req["turn"],
                                                "category": req["category"], "prompt_name": req["prompt_name"],
                                                "rating": rating, "judgment": out["answer"], "error": error})
    verdicts, counts = [], {"rated": 0, "partial": 0, "invalid": 0}
    for qid, js in by_q.items():
        n_rated = sum(j["rating"] != FAILED for j in js)
        verdict = "rated" if n_rated == len(js) else "partial" if n_rated else "invalid"
        counts[verdict] += 1
        verdicts.append({"id": qid, "verdict": verdict, "category": js[0]["category"],
                         "ratings": {m: [j["rating"] for j in js if j["model"] == m] for m in MODELS},
                         "judgements": js})
    rated = [j for js in by_q.values() for j in js if j["rating"] != FAILED]

    def mean(model: str, **where: Any) -> float | None:
        return _mean([j["rating"] for j in rated if j["model"] == model
                      and all(j[k] == v for k, v in where.items())])

    categories = list(dict.fromkeys(j["category"] for js in by_q.values() for j in js))
    t, b = mean("target"), mean("baseline")
    summary = {
        "grading": "single", "prompts": len(by_q), "valid": counts["rated"] + counts["partial"], **counts,
        "judgements": len(requests), "rated_judgements": len(rated), "unparsed_judgements": unparsed,
        "failed_judgements": failed,
        "mt_bench": t, "mt_bench_turn_1": mean("target", turn=1), "mt_bench_turn_2": mean("target", turn=2),
        "mt_bench_baseline": b, "mt_bench_baseline_turn_1": mean("baseline", turn=1),
        "mt_bench_baseline_turn_2": mean("baseline", turn=2),
        "mt_bench_delta": t - b if t is not None and b is not None else None,
        "mt_bench_categories": {m: {c: mean(m, category=c) for c in categories} for m in MODELS},
    }
    return verdicts, summary


# ------------------------------------------------------------------------------------------ the JUDGES entry's parts


def requests_for(questions: list[dict], target: dict[str, dict], baseline: dict[str, dict],
                 j: JudgeConfig) -> list[dict]:
    """:func:`build_requests` with the judge section's files (``judge.prompts``, ``judge.references``)."""
    if not j.prompts:  # the config refuses this already; a section built around validation gets it here
        raise MTBenchError("judge.prompts: mt_bench reads its prompts from FastChat's judge_prompts.jsonl")
    refs = load_references(j.references) if j.references else None
    return build_requests(questions, target, baseline, load_judge_prompts(j.prompts), j.prompts, refs, j.references)


def check(j: JudgeConfig) -> None:
    """The four prompts can be read from ``judge.prompts`` and the references file, if set, from
    ``judge.references`` (the preflight's check, before Ray starts)."""
    requests_for([], {}, {}, j)


def score_for(requests: list[dict], outputs: list[dict], j: JudgeConfig) -> tuple[list[dict], dict[str, Any]]:
    return score(requests, outputs)


def describe(j: dict[str, Any]) -> str:
    refs = Path(j["references"]).name if j.get("references") else "none"
    return ("MT-Bench single-answer grading of both models (FastChat's single-v1 / single-math-v1 and their "
            f"multi-turn variants; reference answers: {refs})")
