"""The ``pair_v2`` judge: FastChat's pairwise protocol, the ``pair-v2`` prompt, in both orders.

MT-Bench's pairwise comparison (Zheng et al. 2023, "Judging LLM-as-a-judge with MT-Bench and Chatbot Arena";
FastChat's ``fastchat/llm_judge``). The judge gets pair-v2's system prompt and its template filled with the
question and the two answers, once with the target model's answer as assistant A and once as B, and ends its
explanation with ``[[A]]``, ``[[B]]`` or ``[[C]]`` (a tie). The prompt texts come from FastChat's own
``judge_prompts.jsonl`` (``judge.prompts``), never from this repository.

FastChat's rules, kept exactly (``common.py``'s ``run_judge_pair`` and ``play_a_match_pair``, ``show_result.py``'s
``display_result_pairwise``):

- a judgement holding ``[[A]]`` names A, else ``[[B]]`` B, else ``[[C]]`` a tie, looked up in that order anywhere
  in the text; none of the three is an error (here: an unparsed judgement), never a guess;
- a question with an error in either order is left out (here: *invalid*, counted);
- a tie in the first order, or two orders that name different winners (FastChat's "inconsistent"), is a tie;
  otherwise the winner both orders name wins;
- ``win_rate_adjusted = (win + 0.5 tie) / (win + tie + loss)``, over the questions left.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .fastchat import JudgePrompt, JudgePromptError, judge_prompt, load_judge_prompts
from .pairwise import tally

if TYPE_CHECKING:
    from ..config import JudgeConfig

PROMPT = "pair-v2"  # the prompt's name in FastChat's judge_prompts.jsonl
OUTPUT_FORMAT = "[[A]]"  # the output format FastChat parses as below; another would need another parser
VERDICTS = (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie"))  # FastChat's order of lookup


class QuestionError(InputError, ValueError):
    """A question pair-v2 cannot show the judge as it is, naming the question."""


def load_prompt(path: str | Path) -> JudgePrompt:
    """pair-v2 from FastChat's judge prompts file, checked to be the pairwise ``[[A]]`` prompt this parser reads
    and to take exactly the question and the two answers."""
    p = judge_prompt(load_judge_prompts(path), PROMPT, path)
    if p.type != "pairwise":
        raise JudgePromptError(f"{path}: prompt {PROMPT!r}, field 'type': expected 'pairwise', got {p.type!r}")
    if p.output_format != OUTPUT_FORMAT:
        raise JudgePromptError(f"{path}: prompt {PROMPT!r}, field 'output_format': expected {OUTPUT_FORMAT!r} "
                               f"(the verdict FastChat parses for pair-v2), got {p.output_format!r}")
    try:
        p.prompt_template.format(question="", answer_a="", answer_b="")
    except (KeyError, IndexError, ValueError) as e:
        raise JudgePromptError(f"{path}: prompt {PROMPT!r}, field 'prompt_template': takes {{question}}, "
                               f"{{answer_a}} and {{answer_b}} only ({type(e).__name__}: {e})") from None
    return p


def judge_messages(prompt: JudgePrompt, question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    """The judge's conversation as FastChat sends it to an OpenAI model: the system prompt, then the template."""
    user = prompt.prompt_template.format(question=question, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "system", "content": prompt.system_prompt}, {"role": "user", "content": user}]


def question_text(q: dict, protocol: str = "pair_v2", error: type[Exception] = QuestionError) -> str:
    """The question of a single-turn prompt: its one user turn. pair-v2 (and AlpacaEval's annotator) shows the
    judge one question, so a prompt with any other turn (a system turn, an earlier exchange) would be judged without
    what the model saw: ``error`` naming the prompt and ``protocol``."""
    msgs = q["messages"]
    if len(msgs) != 1 or msgs[0]["role"] != "user":
        roles = ", ".join(m["role"] for m in msgs)
        raise error(f"question {q['id']}: {protocol} judges single-turn prompts (one user turn), this one has "
                    f"turns {roles}")
    return msgs[0]["content"]


def build_requests(questions: list[dict], target: dict[str, str], baseline: dict[str, str],
                   prompt: JudgePrompt) -> list[dict]:
    """Two requests per question: ``order`` 1 shows the target as assistant A, ``order`` 2 as B."""
    reqs = []
    for q in questions:
        text, t, b = question_text(q), target[q["id"]], baseline[q["id"]]
        for order, (a, b_) in ((1, (t, b)), (2, (b, t))):
            reqs.append({"id": f"{q['id']}|{order}", "qid": q["id"], "order": order,
                         "messages": judge_messages(prompt, text, a, b_)})
    return reqs


def parse_verdict(judgement: str) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` as FastChat's ``run_judge_pair`` reads ``[[A]]``/``[[B]]``/``[[C]]``; None
    where it finds none (FastChat's ``"error"``)."""
    for token, verdict in VERDICTS:
        if token in judgement:
            return verdict
    return None


def winner(verdict: str, order: int) -> str:
    """The order's winner by model, ``"target"``, ``"baseline"`` or ``"tie"`` (FastChat's g1/g2 maps)."""
    if verdict == "tie":
        return "tie"
    return "target" if (verdict == "A") == (order == 1) else "baseline"


def combine(g1: str, g2: str) -> str:
    """show_result's rule: a first-order tie or two orders that disagree is a tie, else the agreed winner."""
    if g1 == "tie" or g1 != g2:
        return "tie"
    return "win" if g1 == "target" else "loss"


def score(requests: list[dict], outputs: list[dict], prompt_name: str = PROMPT) -> tuple[list[dict], dict[str, Any]]:
    """Per-question verdicts and the summary from the judge's outputs (aligned with ``requests``)."""
    by_q: dict[str, dict[int, dict]] = {}
    for req, out in zip(requests, outputs, strict=True):
        parsed = None if out.get("error") else parse_verdict(out["answer"])
        by_q.setdefault(req["qid"], {})[req["order"]] = {"raw": out["answer"], "verdict": parsed,
                                                         "error": out.get("error")}
    verdicts = []
    unparsed = failed = disagree = 0
    for qid, orders in by_q.items():
        for o in orders.values():
            failed += bool(o["error"])
            unparsed += o["verdict"] is None and not o["error"]
        v1, v2 = orders[1]["verdict"], orders[2]["verdict"]
        if v1 is None or v2 is None:
            verdict, g1, g2 = "invalid", None, None
        else:
            g1, g2 = winner(v1, 1), winner(v2, 2)
            verdict = combine(g1, g2)
            disagree += g1 != g2  # FastChat's "inconsistent"
        verdicts.append({"id": qid, "verdict": verdict, "winner_order_1": g1, "winner_order_2": g2,
                         "judge_order_1": orders[1]["raw"], "judge_order_2": orders[2]["raw"],
                         "error": orders[1]["error"] or orders[2]["error"]})
    # show_result's win_rate_adjusted: (win + 0.5 tie) / (win + tie + loss), over the questions left
    counts, rates = tally([v["verdict"] for v in verdicts], disagree, score_key="win_rate_adjusted")
    summary = {"judge_prompt": prompt_name, "prompts": len(by_q), **counts, "judgements": 2 * len(by_q),
               "unparsed_judgements": unparsed, "failed_judgements": failed, **rates}
    return verdicts, summary


# ------------------------------------------------------------------------------------------ the JUDGES entry's parts


def requests_for(questions: list[dict], target: dict[str, str], baseline: dict[str, str],
                 j: JudgeConfig) -> list[dict]:
    """:func:`build_requests` with pair-v2 read from ``judge.prompts``."""
    if not j.prompts:
        raise JudgePromptError("judge.prompts: pair_v2 reads its prompt from FastChat's judge_prompts.jsonl; set it")
    try:
        prompt = load_prompt(j.prompts)
    except JudgePromptError as e:
        raise JudgePromptError(f"judge.prompts: {e}") from None
    return build_requests(questions, target, baseline, prompt)


def check(j: JudgeConfig) -> None:
    """pair-v2 can be read from ``judge.prompts`` (the preflight's check, before Ray starts)."""
    requests_for([], {}, {}, j)


def score_for(requests: list[dict], outputs: list[dict], j: JudgeConfig) -> tuple[list[dict], dict[str, Any]]:
    return score(requests, outputs)


def describe(j: dict[str, Any]) -> str:
    """How the judge section (a dict, as the report reads it) judges, for the report's intro."""
    return (f"FastChat's **{PROMPT}** prompt (from `{Path(j['prompts']).name}`), both orders; orders that "
            "disagree are a tie")
