"""The ``alpaca_eval`` judge: AlpacaEval 2's default annotator, ``weighted_alpaca_eval_gpt4_turbo``, through the
alpaca_eval package itself (Li et al. 2023, "AlpacaEval: An Automatic Evaluator of Instruction-following Models";
Dubois et al. 2024, "Length-Controlled AlpacaEval: A Simple Way to Debias Automatic Evaluators").

Everything the annotator computes comes from the installed package (the ``eval`` extra), never retyped here:

- the prompt: the annotator's template (``alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt``, read from the package's
  files), filled by its ``make_prompts`` with the instruction, ``output_1`` (the baseline, alpaca_eval's
  ``generator_1``) and ``output_2`` (the model evaluated), and turned into chat messages by ``prompt_to_chatml``
  after the strip its ``openai_completions`` does;
- the output order: randomised per instruction as its ``PairwiseAnnotator`` does (the annotator's
  ``RandomSwitchTwoColumnsProcessor``, seeded by the instruction and the annotator's seed 0), and undone on the
  preference (``3 - p``) by the same processor's ``postprocess``;
- the judgement: one request per prompt, 1 token, the top 5 log-probabilities of that token (the annotator's
  ``max_tokens``, ``logprobs``, ``top_logprobs``; checked against the installed config). The preference is its
  ``logprob_parser``'s ``2 - P(m) / (P(m) + P(M))`` over the tokens ``m`` and ``M``, compared exactly (no strip),
  between 1 (the baseline is better) and 2 (the model is): 2 means the model evaluated wins. Two identical answers
  are 1.5, as alpaca_eval's ``PairwiseAnnotator`` sets them without asking the judge (the request is sent all the
  same, every prompt having one here, and its answer is not read);
- the rates: ``alpaca_eval.metrics.get_winrate`` (the weighted win rate, its standard error, the discrete win rate
  and the win/tie/loss counts) and ``get_length_controlled_winrate`` (``length_controlled_v1``, with
  ``save_weights_dir=None``: nothing is written into the package).

The temperature is the endpoint judge's 0 (the annotator sends 1, which, its config says, "should make no effect":
the log-probabilities are the model's, before sampling). A judgement without log-probabilities for ``m`` or ``M``
among the top 5 (the parser's NaN), or without log-probabilities at all, is counted as unparsed and its prompt is
invalid, never guessed; a failed request likewise, as failed. Every rate, the GLM's too, is over the valid prompts:
alpaca_eval keeps the unparsed ones in its GLM's length scale and in the mean of its predictions.

The summary's numbers, all over the valid prompts:

- ``win_rate``: the weighted win rate as a fraction in 0..1, this project's convention for every judge's rates;
- ``alpaca_win_rate``, ``alpaca_standard_error``, ``discrete_win_rate``: alpaca_eval's ``win_rate``,
  ``standard_error`` and ``discrete_win_rate``, in percent as alpaca_eval reports them;
- ``lc_win_rate``, ``lc_standard_error`` (percent): alpaca_eval's length-controlled win rate and its standard error,
  from ``get_length_controlled_winrate``. Its GLM reads ``df_gamed.csv`` of the Hugging Face dataset
  ``tatsu-lab/alpaca_eval`` (downloaded once by ``huggingface_hub``, offline read from its cache,
  ``alpaca_eval.constants.DEFAULT_CACHE_DIR``) and each prompt's position in the 805-row AlpacaEval set (its
  instruction difficulty). The position is the row number of the prompt in an AlpacaEval file: AlpacaEval's rows
  (``{dataset, instruction, output, generator}``) have no id, so ``formats.row_id`` names each ``<file>:<row>``;
  the prompts must all come from one file whose name holds ``alpaca_eval`` (``alpaca_eval.json``,
  ``alpaca_eval_gpt4_1106_preview_reference.json``, ...), rows 0-804;
- when the file cannot be had, the prompts are not AlpacaEval rows, or the GLM fails: ``lc_win_rate`` and
  ``lc_standard_error`` are None, ``lc_win_rate_reason`` says why, and ``lc_win_rate_estimate`` (percent) is computed
  instead, named apart because it is not AlpacaEval's number: the GLM ``length_controlled_minimal`` of alpaca_eval's
  ``GLM_INFO`` (the length term alone, no instruction difficulty and no regularisation towards the gamed models),
  built and fitted with the package's ``make_dmatrix_for_model`` and ``fit_LogisticRegressionCV``, predicted at
  zero length difference as ``get_length_controlled_winrate`` predicts (it is the same for every prompt: no
  standard error). Its 5-fold cross-validation needs 5 valid prompts at least;
- ``avg_length``, ``baseline_avg_length``: the mean length in characters of the model's and the baseline's answers
  (alpaca_eval's leaderboard ``avg_length`` shows the model's, its integer part).

The GLM of ``length_controlled_v1`` is regularised towards gamed models judged against alpaca_eval's baseline,
``gpt4_1106_preview``: with another baseline (``judge.baseline``) the number is computed the same way, and compares
with the leaderboard's only as far as the baseline does.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import warnings
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .pair_v2 import question_text

if TYPE_CHECKING:
    from ..config import JudgeConfig

log = logging.getLogger("alignment")

ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"  # AlpacaEval 2's default annotator (alpaca_eval.constants)
# What the annotator asks of the judge (its configs.yaml; checked against the installed package by check_config).
TOP_LOGPROBS = 5
MAX_TOKENS = 1
GENERATORS = ("baseline", "target")  # alpaca_eval's generator_1 (output_1) and generator_2 (output_2)
LC_GLM = "length_controlled_v1"  # get_length_controlled_winrate's default, AlpacaEval 2's leaderboard
ESTIMATE_GLM = "length_controlled_minimal"
HUB_DATASET, HUB_FILE = "tatsu-lab/alpaca_eval", "df_gamed.csv"
SET_SIZE = 805  # the rows of the AlpacaEval set
SWITCHED = "is_switched_outputs"  # the switch column of the annotator's RandomSwitchTwoColumnsProcessor
_ROW_ID = re.compile(r"^(?P<file>.+):(?P<row>\d+)$")  # formats.row_id's fallback id: <file label>:<row>


class AlpacaEvalError(InputError, ValueError):
    """alpaca_eval is missing or its annotator is not the one this judge reads, or a prompt it cannot judge."""


def _package():
    try:
        import alpaca_eval
    except ImportError as e:
        raise AlpacaEvalError("judge.protocol alpaca_eval computes everything with the alpaca_eval package: "
                              f"pip install 'alignment[eval]' (alpaca-eval==0.6.6) ({type(e).__name__}: {e})") from None
    return alpaca_eval


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version("alpaca-eval")
    except PackageNotFoundError:
        return getattr(_package(), "__version__", "unknown")


@functools.lru_cache(maxsize=1)
def annotator() -> Any:
    """alpaca_eval's ``PairwiseAnnotator`` for the annotator, as ``alpaca_eval evaluate`` builds it (seed 0), with
    no cache file (``caching_path=None``: it writes nothing). It never sends a request here: only its formatting,
    randomisation, parsing and postprocessing are used."""
    _package()
    from alpaca_eval.annotators import PairwiseAnnotator

    return PairwiseAnnotator(annotators_config=ANNOTATOR, caching_path=None)


def _single() -> Any:
    return annotator().annotators[ANNOTATOR]


def check_config() -> None:
    """The installed annotator asks what this judge sends and reads: 1 token, its top 5 log-probabilities, the
    ``logprob_parser`` of m against M, one example per prompt."""
    single = _single()
    kw = single.completions_kwargs
    parser = single.fn_completion_parser
    got = {"max_tokens": kw.get("max_tokens"), "logprobs": kw.get("logprobs"), "top_logprobs": kw.get("top_logprobs"),
           "parser": getattr(parser.func, "__name__", None), "batch_size": single.batch_size}
    want = {"max_tokens": MAX_TOKENS, "logprobs": True, "top_logprobs": TOP_LOGPROBS, "parser": "logprob_parser",
            "batch_size": 1}
    if got != want:
        diff = ", ".join(f"{k}: {got[k]!r} (expected {want[k]!r})" for k in want if got[k] != want[k])
        raise AlpacaEvalError(f"alpaca_eval {version()}'s annotator {ANNOTATOR} is not the one this judge sends and "
                              f"parses: {diff}; install alpaca-eval==0.6.6")


def instruction(q: dict) -> str:
    """An AlpacaEval prompt's instruction: its one user turn (the annotator shows the judge nothing else)."""
    return question_text(q, "alpaca_eval", AlpacaEvalError)


def set_position(qid: str) -> tuple[str, int] | None:
    """``(file label, row)`` of a prompt id that :func:`alignment.formats.row_id` made from a row without an id."""
    m = _ROW_ID.match(qid)
    return (m["file"], int(m["row"])) if m else None


def build_requests(questions: list[dict], target: dict[str, str], baseline: dict[str, str]) -> list[dict]:
    """One request per question, in the questions' order: alpaca_eval's prompt of the instruction, the baseline's
    answer as ``output_1`` and the target's as ``output_2``, in the order its annotator randomises them to, as
    chat messages. Each request keeps the texts (``instruction``, ``output_1``, ``output_2``, unswitched), whether
    the outputs were switched, and whether they are identical (alpaca_eval's 1.5 without a judgement)."""
    if not questions:
        return []
    import pandas as pd
    from alpaca_eval import utils

    check_config()
    pa, single = annotator(), _single()
    rows = [{"instruction": instruction(q), "output_1": baseline[q["id"]], "output_2": target[q["id"]],
             pa.annotator_column: ANNOTATOR} for q in questions]
    df = pd.DataFrame(rows)[pa.available_fields_to_format]
    # The single annotator's preprocessing: its processors (the output switch) and its shuffle; then its prompts.
    prompts, sent = single._make_prompts(single._preprocess(df))
    prompt_of = dict(zip(sent.index, prompts, strict=True))
    switched = dict(zip(sent.index, sent[SWITCHED], strict=True))
    reqs = []
    for i, (q, r) in enumerate(zip(questions, rows, strict=True)):
        # openai_completions strips the prompt, then a chat model gets it as ChatML messages.
        reqs.append({"id": q["id"], "qid": q["id"], "messages": utils.prompt_to_chatml(prompt_of[i].strip()),
                     "instruction": r["instruction"], "output_1": r["output_1"], "output_2": r["output_2"],
                     "switched": bool(switched[i]), "same_outputs": r["output_1"] == r["output_2"]})
    return reqs


def _top(out: dict) -> list[dict] | None:
    """The judgement's top log-probabilities of its first token, ``[{"token", "logprob"}]``, or None."""
    top = out.get("top_logprobs")
    if not isinstance(top, list) or not top:
        return None
    ok = all(isinstance(t, dict) and isinstance(t.get("token"), str) and isinstance(t.get("logprob"), int | float)
             for t in top)
    return [{"token": t["token"], "logprob": float(t["logprob"])} for t in top] if ok else None


def _num(x: Any) -> float | None:
    """A number of alpaca_eval's as a plain float; NaN (e.g. a standard error of one item) as None."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def preferences(requests: list[dict], outputs: list[dict]) -> tuple[dict[str, float | None], dict[str, str]]:
    """Each question's preference (1..2, 2: the target wins) as alpaca_eval's annotator gets it from the judge's
    log-probabilities, in the sent order parsed and then switched back; None where unparsed or failed. Also the
    status of each question: ``judged``, ``same`` (identical answers, 1.5), ``unparsed`` or ``failed``."""
    import pandas as pd

    single = _single()
    prefs: dict[str, float | None] = {}
    status: dict[str, str] = {}
    parsed = []
    for req, out in zip(requests, outputs, strict=True):
        qid = req["qid"]
        if req["same_outputs"]:
            prefs[qid], status[qid] = 1.5, "same"
            continue
        if out.get("error"):
            prefs[qid], status[qid] = None, "failed"
            continue
        top = _top(out)
        value = None
        if top is not None:
            # The completion as alpaca_eval's openai decoder hands it to the parser: the first token's top_logprobs.
            completion = {"logprobs": {"content": [{"token": out.get("answer", ""), "top_logprobs": top}]}}
            annotations, _ = single._parse_completions([completion])
            value = _num(annotations[0])
        if value is None:
            prefs[qid], status[qid] = None, "unparsed"
            continue
        o1, o2 = (req["output_2"], req["output_1"]) if req["switched"] else (req["output_1"], req["output_2"])
        parsed.append({"qid": qid, "instruction": req["instruction"], "output_1": o1, "output_2": o2,
                       SWITCHED: req["switched"], single.annotation_column: value})
        status[qid] = "judged"
    if parsed:
        df = pd.DataFrame(parsed)
        # The annotator's postprocessing: the processors undone in reverse order (a switched preference is 3 - p).
        back = single._postprocess(df)
        for qid, p in zip(back["qid"], back[single.annotation_column], strict=True):
            prefs[qid] = float(p)
    return prefs, status


def _verdict(p: float) -> str:
    """alpaca_eval's counts: a win above 1.5 (n_wins), a loss below (n_wins_base), a tie at 1.5 (n_draws)."""
    return "win" if p > 1.5 else "loss" if p < 1.5 else "tie"


def lc_positions(requests: list[dict]) -> tuple[dict[str, int] | None, str | None]:
    """Each question's row in the AlpacaEval set (its id's row number), or None and why not."""
    where = {r["qid"]: set_position(r["qid"]) for r in requests}
    bad = [q for q, w in where.items() if w is None]
    if bad:
        return None, (f"the prompt ids are not AlpacaEval rows (<file>:<row>, as an AlpacaEval file's rows without "
                      f"ids are named): {len(bad)} are not, first {bad[0]!r}")
    files = sorted({w[0] for w in where.values() if w})
    if len(files) != 1 or "alpaca_eval" not in files[0].lower():
        return None, (f"the prompts come from {', '.join(files)}, not one AlpacaEval file (a name holding "
                      "'alpaca_eval', e.g. alpaca_eval.json): their rows are not positions in the AlpacaEval set")
    rows = {q: w[1] for q, w in where.items() if w}
    over = [q for q, n in rows.items() if n >= SET_SIZE]
    if over:
        return None, f"{len(over)} prompts lie past the {SET_SIZE} rows of the AlpacaEval set (first {over[0]!r})"
    return rows, None


def _annotations(items: list[dict]) -> Any:
    """The valid items as alpaca_eval's annotations (a DataFrame): its columns, our two generators' names."""
    import pandas as pd

    df = pd.DataFrame([{k: it[k] for k in ("instruction", "output_1", "output_2", "preference")} for it in items])
    df["generator_1"], df["generator_2"], df["annotator"] = GENERATORS[0], GENERATORS[1], ANNOTATOR
    return df


def length_controlled(items: list[dict], positions: dict[str, int] | None,
                      why_not: str | None) -> tuple[dict[str, Any], list[float] | None]:
    """alpaca_eval's length-controlled win rate of the valid ``items`` (``qid``, texts, ``preference``), or the
    minimal GLM's estimate and why the former is not there; and each item's GLM preference (None for the
    estimate)."""
    out: dict[str, Any] = {"lc_glm": None, "lc_win_rate_reason": None, "lc_win_rate": None, "lc_standard_error": None,
                           "lc_win_rate_estimate": None}
    if not items:
        return out, None
    from alpaca_eval.metrics import get_length_controlled_winrate

    reason = why_not
    if positions is not None:
        df = _annotations(items)
        df["index"] = [positions[it["qid"]] for it in items]  # the row in the set: its instruction difficulty
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # sklearn's deprecation notices about alpaca_eval's own calls
                m = get_length_controlled_winrate(df, glm_name=LC_GLM, save_weights_dir=None,
                                                  is_add_glm_preference_inplace=True)
            out.update(lc_glm=LC_GLM, lc_win_rate=_num(m["length_controlled_winrate"]),
                       lc_standard_error=_num(m["lc_standard_error"]))
            return out, [float(x) for x in df["glm_preference"]]
        except Exception as e:  # the hub's errors are many kinds; any failure leaves the rate out, with its reason
            text = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
            hub = type(e).__module__.split(".")[0] in ("huggingface_hub", "requests", "httpx", "urllib3")
            reason = (f"alpaca_eval's {HUB_FILE} (Hugging Face dataset {HUB_DATASET}) cannot be had: {text}; fetch "
                      "it once online, or put it in the Hugging Face cache" if hub or isinstance(e, OSError)
                      else f"alpaca_eval's get_length_controlled_winrate failed: {text}")
    estimate, why = minimal_estimate(items)
    out.update(lc_win_rate_reason=reason if why is None else f"{reason}; the estimate too: {why}",
               lc_win_rate_estimate=estimate, lc_glm=ESTIMATE_GLM if estimate is not None else None)
    return out, None


def minimal_estimate(items: list[dict]) -> tuple[float | None, str | None]:
    """The length-controlled win rate (percent) of alpaca_eval's ``length_controlled_minimal`` GLM, without the hub
    file: the features of ``_get_featurized_data`` less the instruction difficulty (which needs the file), fitted
    and predicted at zero length difference as ``get_length_controlled_winrate`` does. None and why, with too few
    items for its 5 folds or answers all of one length difference."""
    import pandas as pd
    from alpaca_eval.metrics.glm_winrate import GLM_INFO, fit_LogisticRegressionCV, make_dmatrix_for_model

    info = GLM_INFO[ESTIMATE_GLM]
    folds = info["kwargs"].get("n_splits", 5)
    if len(items) < folds:
        return None, f"{len(items)} valid prompts, fewer than the GLM's {folds} cross-validation folds"
    df = _annotations(items)
    delta = df["output_1"].str.len() - df["output_2"].str.len()
    if not delta.std() > 0:
        return None, "every answer pair has the same length difference: the length term cannot be fitted"
    train = pd.DataFrame({"preference": df["preference"].astype(float).replace({0.0: 1.5}) - 1,
                          "std_delta_len": delta / delta.std(), "not_gamed_baseline": True})
    test = train[["not_gamed_baseline"]].copy()
    test["std_delta_len"] = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            xy, x_test = make_dmatrix_for_model(train, test, formula=info["formula"])
            model = fit_LogisticRegressionCV(xy, "preference", is_ytrue_proba=True, **info["kwargs"])
            predicted = model.predict_proba(x_test)[:, 1]
    except ValueError as e:
        return None, f"the GLM could not be fitted: {type(e).__name__}: {e}"[:300]
    return float(predicted.mean() * 100), None


def score(requests: list[dict], outputs: list[dict]) -> tuple[list[dict], dict[str, Any]]:
    """Per-question verdicts and the summary (module docstring) from the judge's outputs (aligned with
    ``requests``)."""
    prefs, status = preferences(requests, outputs)
    items = [{"qid": r["qid"], "instruction": r["instruction"], "output_1": r["output_1"], "output_2": r["output_2"],
              "preference": prefs[r["qid"]]} for r in requests if prefs[r["qid"]] is not None]
    positions, why_not = lc_positions(requests) if items else (None, None)
    summary: dict[str, Any] = {"annotator": ANNOTATOR, "alpaca_eval_version": version()}
    lc, glm = length_controlled(items, positions, why_not)
    summary.update({k: lc[k] for k in ("lc_glm", "lc_win_rate_reason")})
    counts = {"win": 0, "tie": 0, "loss": 0}
    rates: dict[str, Any] = dict.fromkeys(("win_rate", "alpaca_win_rate", "alpaca_standard_error",
                                           "discrete_win_rate", "avg_length", "baseline_avg_length"))
    if items:
        from alpaca_eval.metrics import get_winrate

        w = get_winrate(_annotations(items))
        counts = {"win": int(w["n_wins"]), "tie": int(w["n_draws"]), "loss": int(w["n_wins_base"])}
        rates.update(win_rate=_num(w["win_rate"] / 100), alpaca_win_rate=_num(w["win_rate"]),
                     alpaca_standard_error=_num(w["standard_error"]), discrete_win_rate=_num(w["discrete_win_rate"]),
                     avg_length=sum(len(it["output_2"]) for it in items) / len(items),
                     baseline_avg_length=sum(len(it["output_1"]) for it in items) / len(items))
    glm_of = dict(zip([it["qid"] for it in items], glm, strict=True)) if glm else {}
    verdicts = []
    for req, out in zip(requests, outputs, strict=True):
        qid, p = req["qid"], prefs[req["qid"]]
        verdicts.append({"id": qid, "verdict": "invalid" if p is None else _verdict(p), "preference": p,
                         "status": status[qid], "switched": req["switched"], "glm_preference": glm_of.get(qid),
                         "judge": out.get("answer", ""), "judge_top_logprobs": out.get("top_logprobs"),
                         "error": out.get("error")})
    valid = len(items)
    summary.update({
        "prompts": len(requests), "valid": valid, **counts, "invalid": len(requests) - valid,
        "judgements": len(requests), "unparsed_judgements": sum(s == "unparsed" for s in status.values()),
        "failed_judgements": sum(s == "failed" for s in status.values()),
        **rates, **{k: lc[k] for k in ("lc_win_rate", "lc_standard_error", "lc_win_rate_estimate")},
    })
    if valid and counts["win"] + counts["tie"] + counts["loss"] != valid:  # get_winrate dropped a preference
        raise AlpacaEvalError(f"alpaca_eval's get_winrate counted {sum(counts.values())} of {valid} preferences")
    return verdicts, summary


# ------------------------------------------------------------------------------------------ the JUDGES entry's parts


def requests_for(questions: list[dict], target: dict[str, str], baseline: dict[str, str],
                 j: JudgeConfig) -> list[dict]:
    """:func:`build_requests` (the judge section sets nothing of the annotator's)."""
    return build_requests(questions, target, baseline)


def check(j: JudgeConfig) -> None:
    """alpaca_eval is installed and its annotator is the one this judge reads (the preflight's check)."""
    check_config()


def score_for(requests: list[dict], outputs: list[dict], j: JudgeConfig) -> tuple[list[dict], dict[str, Any]]:
    return score(requests, outputs)


def describe(j: dict[str, Any]) -> str:
    """How the judge section (a dict, as the report reads it) judges, for the report's intro."""
    return (f"AlpacaEval 2's annotator **{ANNOTATOR}** through the alpaca_eval package: its prompt, the two answers "
            f"in its randomised order, the preference from the top-{TOP_LOGPROBS} log-probabilities of the judge's "
            "first token (m against M); win rates in percent, length-controlled by alpaca_eval's GLM")
