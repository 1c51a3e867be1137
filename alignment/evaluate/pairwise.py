"""The ``vicuna_pairwise`` judge: pairwise comparison of two models' answers, in both orders.

The Vicuna evaluation's pairwise prompt as Long Is More uses it (Zhao et al. 2024, "Long Is More for
Alignment"; the position-bias remedy of Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and
Chatbot Arena"). The judge scores two answers 1-10 on the first line of its output; it is asked twice, with
the target model's answer first and then second. The two orders combine by one of two rules, named in every
report (the README's judge part):

- ``strict`` (Long Is More's paper, MT-Bench's pairwise rule): a win if the target is preferred in both
  orders, a loss if the other is preferred in both, a tie otherwise;
- ``sum`` (Long Is More's released code): each order gives +1 / 0 / -1; a sum >= 1 wins, <= -1 loses, 0 ties.

A judgement whose first line does not hold two scores is counted as unparsed, never guessed; a request
that failed at the endpoint is counted as failed; a prompt with an unparsed or failed order is left out of
the rates and counted as invalid.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import JudgeConfig

# The pairwise prompt of the Vicuna evaluation, as used by Long Is More: two scores on the first line.
PAIR_PROMPT = (
    "[Question]\n{question}\n\n"
    "[The Start of Assistant 1's Answer]\n{answer_1}\n[The End of Assistant 1's Answer]\n\n"
    "[The Start of Assistant 2's Answer]\n{answer_2}\n[The End of Assistant 2's Answer]\n\n"
    "[System]\n"
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above.\n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space. In the subsequent line, please provide a comprehensive "
    "explanation of your evaluation, avoiding any potential bias and ensuring that the order in which the responses "
    "were presented does not affect your judgment."
)
JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."

_NUMBER = r"(10(?:\.0+)?|[1-9](?:\.\d+)?)"
_SCORES = re.compile(rf"^\s*(?:scores?\s*[:=]?\s*)?{_NUMBER}\s*(?:,|\s|/10\s*,?|and)\s*{_NUMBER}(?:/10)?\s*$",
                     re.IGNORECASE)


# One worked exchange that shows the output format; small local judges copy formats from it.
FORMAT_EXAMPLE = [
    {"role": "user", "content": PAIR_PROMPT.format(question="Name a primary color.", answer_1="Red is a primary color.",
                                                   answer_2="Dogs are animals.")},
    {"role": "assistant", "content": "9 2\nAssistant 1 answers the question; Assistant 2 does not."},
]


# The verbosity check (judge.verbosity_check): Long Is More re-ran its judge with a length penalty in the prompt and
# found 94.17% agreement with the plain judge. The paper does not print its wording: this sentence is this
# project's, inserted after the scale's line so that the format instruction stays last.
LENGTH_PENALTY = ("Do not prefer an answer for its length: penalize an answer that is longer than the question "
                  "needs, verbose, repetitive or padded.")
_SCALE = "where a higher score indicates better overall performance.\n"
assert PAIR_PROMPT.count(_SCALE) == 1


def pair_messages(question: str, answer_1: str, answer_2: str, format_example: bool = False,
                  length_penalty: bool = False) -> list[dict[str, str]]:
    shot = FORMAT_EXAMPLE if format_example else []
    prompt = PAIR_PROMPT.replace(_SCALE, _SCALE + LENGTH_PENALTY + "\n") if length_penalty else PAIR_PROMPT
    return [{"role": "system", "content": JUDGE_SYSTEM}, *shot,
            {"role": "user", "content": prompt.format(question=question, answer_1=answer_1, answer_2=answer_2)}]


def parse_scores(text: str) -> tuple[float, float] | None:
    """The two scores on the first non-empty line (``8 7``, ``8, 7``, ``Scores: 8/10 7/10``), else None."""
    for line in text.splitlines():
        if line.strip():
            m = _SCORES.match(line.strip().strip("*").strip())
            return (float(m.group(1)), float(m.group(2))) if m else None
    return None


def build_requests(questions: list[dict], target: dict[str, str], baseline: dict[str, str],
                   format_example: bool = False, verbosity_check: bool = False) -> list[dict]:
    """Two judge requests per question: ``order`` 1 puts the target first, ``order`` 2 second; with
    ``verbosity_check``, two more with the length-penalty instruction (``variant`` ``length_penalty``)."""
    reqs = []
    for variant in ("", "length_penalty") if verbosity_check else ("",):
        for q in questions:
            text = q["messages"][-1]["content"]
            t, b = target[q["id"]], baseline[q["id"]]
            for order, (a1, a2) in ((1, (t, b)), (2, (b, t))):
                reqs.append({"id": f"{q['id']}|{order}" + (f"|{variant}" if variant else ""), "qid": q["id"],
                             "order": order, "messages": pair_messages(text, a1, a2, format_example, bool(variant)),
                             **({"variant": variant} if variant else {})})
    return reqs


def order_outcome(scores: tuple[float, float], order: int) -> int:
    """+1 if the target scored higher in this order, -1 if lower, 0 if equal."""
    target, other = (scores[0], scores[1]) if order == 1 else (scores[1], scores[0])
    return (target > other) - (target < other)


def combine(o1: int, o2: int, rule: str) -> str:
    if rule == "strict":
        return "win" if o1 == o2 == 1 else "loss" if o1 == o2 == -1 else "tie"
    if rule == "sum":
        s = o1 + o2
        return "win" if s >= 1 else "loss" if s <= -1 else "tie"
    raise ValueError(f"unknown rule {rule!r}; choose strict or sum")


def score(requests: list[dict], outputs: list[dict], rule: str) -> tuple[list[dict], dict[str, Any]]:
    """Per-question verdicts and a summary from the judge's outputs (aligned with ``requests``). Requests of the
    verbosity check (``variant`` ``length_penalty``) are scored apart: each verdict gets its
    ``verdict_length_penalty``, and the summary the penalised judge's win rate and ``verbosity_agreement``, the
    share of the questions valid under both judges whose verdicts are the same (None without the check)."""
    plain = [(r, o) for r, o in zip(requests, outputs, strict=True) if not r.get("variant")]
    penalised = [(r, o) for r, o in zip(requests, outputs, strict=True) if r.get("variant") == "length_penalty"]
    verdicts, summary = _score([r for r, _ in plain], [o for _, o in plain], rule)
    summary.update(verbosity_check=bool(penalised), length_penalty_win_rate=None, verbosity_agreement=None,
                   verbosity_compared=0)
    if not penalised:
        return verdicts, summary
    pv, ps = _score([r for r, _ in penalised], [o for _, o in penalised], rule)
    other = {v["id"]: v["verdict"] for v in pv}
    both = [v for v in verdicts if v["verdict"] != "invalid" and other[v["id"]] != "invalid"]
    for v in verdicts:
        v["verdict_length_penalty"] = other[v["id"]]
    summary.update(length_penalty_win_rate=ps["win_rate"], verbosity_compared=len(both),
                   verbosity_agreement=(sum(other[v["id"]] == v["verdict"] for v in both) / len(both)
                                        if both else None),
                   **{k: summary[k] + ps[k] for k in ("judgements", "unparsed_judgements", "failed_judgements")})
    if not ps["valid"]:
        summary["length_penalty_win_rate_reason"] = "no prompt valid under the length-penalty judge"
    if not both:
        summary["verbosity_agreement_reason"] = "no prompt valid under both judges"
    return verdicts, summary


def _score(requests: list[dict], outputs: list[dict], rule: str) -> tuple[list[dict], dict[str, Any]]:
    by_q: dict[str, dict[int, dict]] = {}
    for req, out in zip(requests, outputs, strict=True):
        parsed = parse_scores(out["answer"]) if not out.get("error") else None
        by_q.setdefault(req["qid"], {})[req["order"]] = {"raw": out["answer"], "scores": parsed,
                                                         "error": out.get("error")}
    verdicts = []
    unparsed = failed = disagree = 0
    for qid, orders in by_q.items():
        s1, s2 = orders[1]["scores"], orders[2]["scores"]
        for o in orders.values():
            failed += bool(o["error"])
            unparsed += o["scores"] is None and not o["error"]
        if s1 is None or s2 is None:
            verdict, o1, o2 = "invalid", None, None
        else:
            o1, o2 = order_outcome(s1, 1), order_outcome(s2, 2)
            verdict = combine(o1, o2, rule)
            disagree += o1 != o2
        verdicts.append({"id": qid, "verdict": verdict, "outcome_order_1": o1, "outcome_order_2": o2,
                         "scores_order_1": s1, "scores_order_2": s2,
                         "judge_order_1": orders[1]["raw"], "judge_order_2": orders[2]["raw"],
                         "error": orders[1]["error"] or orders[2]["error"]})
    counts, rates = tally([v["verdict"] for v in verdicts], disagree)
    summary = {"rule": rule, "prompts": len(by_q), **counts, "judgements": 2 * len(by_q),
               "unparsed_judgements": unparsed, "failed_judgements": failed, **rates}
    return verdicts, summary


def tally(outcomes: list[str], disagree: int, score_key: str = "score") -> tuple[dict[str, int], dict[str, Any]]:
    """Per-question outcomes (``win``, ``tie``, ``loss``, ``invalid``) counted, and their rates over the valid
    ones (a win, tie or loss), as both pairwise protocols summarise them: the counts ``valid``, ``win``, ``tie``,
    ``loss``, ``invalid``; the rates ``win_rate``, ``tie_rate``, ``loss_rate``, ``score_key`` ((win + tie / 2)
    / valid: this judge's ``score``, pair-v2's ``win_rate_adjusted``) and ``order_disagreement_rate``
    (``disagree`` questions whose orders named different winners, over the valid ones). No valid question: every
    rate is None."""
    counts = dict.fromkeys(("win", "tie", "loss", "invalid"), 0)
    for outcome in outcomes:
        counts[outcome] += 1
    valid = counts["win"] + counts["tie"] + counts["loss"]

    def rate(x: float) -> float | None:
        return x / valid if valid else None

    rates = {"win_rate": rate(counts["win"]), "tie_rate": rate(counts["tie"]), "loss_rate": rate(counts["loss"]),
             score_key: rate(counts["win"] + 0.5 * counts["tie"]), "order_disagreement_rate": rate(disagree)}
    return {"valid": valid, **counts}, rates


# ------------------------------------------------------------------------------------------ the JUDGES entry's parts


def requests_for(questions: list[dict], target: dict[str, str], baseline: dict[str, str],
                 j: JudgeConfig) -> list[dict]:
    """:func:`build_requests` as the judge section says (``judge.format_example``, ``judge.verbosity_check``)."""
    return build_requests(questions, target, baseline, j.format_example, j.verbosity_check)


def score_for(requests: list[dict], outputs: list[dict], j: JudgeConfig) -> tuple[list[dict], dict[str, Any]]:
    """:func:`score` by the judge section's rule (``judge.rule``)."""
    return score(requests, outputs, j.rule)


def describe(j: dict[str, Any]) -> str:
    """How the judge section (a dict, as the report reads it) judges, for the report's intro."""
    shot = " with a format example" if j.get("format_example") else ""
    check = "; asked again with a length penalty (the verbosity check)" if j.get("verbosity_check") else ""
    return f"both orders, aggregation rule **{j['rule']}**{shot}{check}"
