"""The judges: one entry per judging protocol, with what the judge stage, the search and the report need from it.

The judge stage builds the requests with ``build`` (the questions, the target's and the baseline's answers by id:
their texts, or their answers.jsonl rows for an entry with ``answer_rows``; and the judge section), has the judge
model answer them (a local model through ``generate``, or an OpenAI-compatible endpoint), and turns the answers,
aligned with the requests, into per-item verdicts and a summary with ``score``. Every protocol keeps the same
contract, which tests/evaluate/test_judges.py checks on every entry:

- each request is ``{"id", "messages", ...}`` with a unique ``id``; each answer ``{"answer", "error"?}`` (and
  ``top_logprobs`` for an entry with ``logprobs``: the judge's first token's, from the endpoint or the local model);
- a judgement that cannot be parsed, or that failed at the endpoint, is counted (``unparsed_judgements``,
  ``failed_judgements``) and its item's verdict is ``invalid``, left out of every rate: never guessed;
- the summary holds the ``COUNTS`` below and the entry's ``settings``, ``counts`` and ``metrics``.

Adding a judge: its module here (``build`` and ``score`` functions), one entry in ``JUDGES``, and its name in
``JudgeProtocol`` (config.py), whose Literal is written out for readable errors; the tests check the two agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import alpaca_eval, mt_bench, pair_v2, pairwise

if TYPE_CHECKING:
    from ..config import JudgeConfig

# The counts every protocol's summary holds, and the judge stage's manifest counts.
COUNTS = ("prompts", "valid", "invalid", "unparsed_judgements", "failed_judgements")


@dataclass(frozen=True)
class Judge:
    """One judging protocol."""

    # (questions, target answers by id, baseline answers by id, judge section) -> requests
    build: Callable[[list[dict], dict[str, str], dict[str, str], JudgeConfig], list[dict]]
    # (requests, judge outputs aligned with them, judge section) -> (per-item verdicts, summary)
    score: Callable[[list[dict], list[dict], JudgeConfig], tuple[list[dict], dict[str, Any]]]
    metrics: tuple[str, ...]  # the summary's numbers (None without a valid item): search.metric names one
    counts: tuple[str, ...]  # the summary's counts, COUNTS among them
    settings: tuple[str, ...]  # the summary's keys that name how the items were judged (e.g. the rule)
    columns: tuple[tuple[str, str], ...]  # the report's table: (summary key, heading)
    describe: Callable[[dict[str, Any]], str]  # the judge section (a dict) -> how it judges, for the report
    note: str  # the report's line on what the rates are over
    # The judge section -> None, or an InputError naming the key: reads the files the protocol needs (its prompts),
    # run by the pipeline's preflight so that a bad file fails before Ray starts.
    check: Callable[[JudgeConfig], None] | None = None
    # One eval prompt row -> what the protocol reads of it, or an InputError naming the prompt where it cannot read
    # it (a single-turn protocol given a conversation): the preflight runs it on every prompt before Ray starts.
    question: Callable[[dict], Any] | None = None
    # True: ``build`` gets the answers as id -> the generate stage's answers.jsonl row (per-turn answers, category),
    # not id -> answer text; a protocol that grades every turn needs them.
    answer_rows: bool = False
    # > 0: the judgement is the top log-probabilities of the judge's first answer token, this many of them (each
    # answer carries ``top_logprobs``: ``[{"token", "logprob"}]``; the endpoint is asked for one token); 0: a text.
    logprobs: int = 0
    # Metrics that may be None even with valid items (the summary says why), e.g. a rate that needs a file.
    optional: tuple[str, ...] = ()


JUDGES: dict[str, Judge] = {
    "vicuna_pairwise": Judge(
        build=pairwise.requests_for,
        score=pairwise.score_for,
        metrics=("win_rate", "tie_rate", "loss_rate", "score", "order_disagreement_rate", "length_penalty_win_rate",
                 "verbosity_agreement"),
        counts=("prompts", "valid", "win", "tie", "loss", "invalid", "judgements", "unparsed_judgements",
                "failed_judgements", "verbosity_compared"),
        settings=("rule", "verbosity_check"),
        columns=(("win", "win"), ("tie", "tie"), ("loss", "loss"), ("invalid", "invalid"), ("win_rate", "win rate"),
                 ("score", "score"), ("order_disagreement_rate", "orders disagree"),
                 ("length_penalty_win_rate", "win rate, length penalty"),
                 ("verbosity_agreement", "verbosity agreement")),
        describe=pairwise.describe,
        note="Rates are over valid prompts (both orders parsed); *invalid* counts prompts with an unparsed judgement. "
        "With judge.verbosity_check, *verbosity agreement* is the share of prompts valid under both judges whose "
        "verdict is the same with the length-penalty instruction (Long Is More: 94.17%).",
        optional=("length_penalty_win_rate", "verbosity_agreement"),
    ),
    "pair_v2": Judge(
        build=pair_v2.requests_for,
        score=pair_v2.score_for,
        metrics=("win_rate", "tie_rate", "loss_rate", "win_rate_adjusted", "order_disagreement_rate"),
        counts=("prompts", "valid", "win", "tie", "loss", "invalid", "judgements", "unparsed_judgements",
                "failed_judgements"),
        settings=("judge_prompt",),
        columns=(("win", "win"), ("tie", "tie"), ("loss", "loss"), ("invalid", "invalid"), ("win_rate", "win rate"),
                 ("win_rate_adjusted", "win rate adjusted"), ("order_disagreement_rate", "orders disagree")),
        describe=pair_v2.describe,
        note="Rates are over valid prompts (a verdict in both orders, as FastChat's show_result); orders that "
        "disagree are ties; *invalid* counts prompts with an unparsed or failed judgement.",
        check=pair_v2.check,
        question=pair_v2.question_text,
    ),
    "mt_bench": Judge(
        build=mt_bench.requests_for,
        score=mt_bench.score_for,
        metrics=("mt_bench", "mt_bench_turn_1", "mt_bench_turn_2", "mt_bench_baseline", "mt_bench_baseline_turn_1",
                 "mt_bench_baseline_turn_2", "mt_bench_delta"),
        counts=("prompts", "valid", "rated", "partial", "invalid", "judgements", "rated_judgements",
                "unparsed_judgements", "failed_judgements"),
        settings=("grading",),
        columns=(("mt_bench", "MT-Bench"), ("mt_bench_turn_1", "turn 1"), ("mt_bench_turn_2", "turn 2"),
                 ("mt_bench_baseline", "baseline"), ("mt_bench_delta", "delta"), ("invalid", "invalid")),
        describe=mt_bench.describe,
        note="Scores are means of the 1-10 ratings over the rated turns (FastChat's show_result); a judgement "
        "without a rating is counted and left out; *invalid* counts prompts with no rating at all.",
        check=mt_bench.check,
        answer_rows=True,
    ),
    "alpaca_eval": Judge(
        build=alpaca_eval.requests_for,
        score=alpaca_eval.score_for,
        metrics=("win_rate", "alpaca_win_rate", "alpaca_standard_error", "discrete_win_rate", "lc_win_rate",
                 "lc_standard_error", "lc_win_rate_estimate", "avg_length", "baseline_avg_length"),
        counts=("prompts", "valid", "win", "tie", "loss", "invalid", "judgements", "unparsed_judgements",
                "failed_judgements"),
        settings=("annotator", "alpaca_eval_version", "lc_glm", "lc_win_rate_reason"),
        columns=(("win", "win"), ("tie", "tie"), ("loss", "loss"), ("invalid", "invalid"),
                 ("alpaca_win_rate", "win rate %"), ("alpaca_standard_error", "SE"), ("lc_win_rate", "LC win rate %"),
                 ("lc_win_rate_estimate", "LC estimate % (not AlpacaEval's)"), ("avg_length", "avg length"),
                 ("baseline_avg_length", "baseline avg length")),
        describe=alpaca_eval.describe,
        note="AlpacaEval 2's numbers, in percent, over valid prompts (the judge's first token has log-probabilities "
        "for m or M): the win rate is the mean preference for the model, alpaca_eval's weighted win rate; *LC* is "
        "its length-controlled win rate (alpaca_eval's GLM, which needs its df_gamed.csv); where that cannot be "
        "computed, *LC estimate* is the GLM's length term alone (length_controlled_minimal), not AlpacaEval's "
        "number; *invalid* counts prompts with an unparsed or failed judgement.",
        check=alpaca_eval.check,
        question=alpaca_eval.instruction,
        logprobs=alpaca_eval.TOP_LOGPROBS,
        optional=("lc_win_rate", "lc_standard_error", "lc_win_rate_estimate"),
    ),
}

# Every judge's metrics, and every key of a summary a search result keeps, in table order without repeats.
METRICS = tuple(dict.fromkeys(m for j in JUDGES.values() for m in j.metrics))
SUMMARY_KEYS = tuple(dict.fromkeys(k for j in JUDGES.values() for k in (*j.settings, *j.counts, *j.metrics)))
