"""The judges' table: the config's Literals agree with it, every entry keeps the contract (parses a well-formed
judgement, refuses to guess), and the local judge generates with its own settings."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
from conftest import shared, write_jsonl

from alignment import pipeline
from alignment.config import ConfigError, ExperimentConfig, JudgeConfig, SearchConfig, SearchMetric, load_config
from alignment.evaluate import COUNTS, JUDGES, METRICS, SUMMARY_KEYS, heldout

# One well-formed judge output per protocol: a new judge adds its own here (the first test checks).
WELL_FORMED = {"vicuna_pairwise": "8 3\nAssistant 1 answers the question.",
               "pair_v2": "Assistant A answers the question; B does not.\n\n[[A]]",
               "mt_bench": "The answer is helpful and correct.\n\nRating: [[8]]",
               # A judge that reads log-probabilities (Judge.logprobs): the whole answer, its first token's top ones.
               "alpaca_eval": {"answer": "M", "top_logprobs": [{"token": "M", "logprob": -0.2},
                                                               {"token": "m", "logprob": -1.8},
                                                               {"token": "Both", "logprob": -9.0}]}}
UNPARSABLE = "I cannot decide which answer is better."


def well_formed(protocol: str) -> dict:
    """A well-formed judge output of ``protocol``: its text, or the whole output where it is more than a text."""
    w = WELL_FORMED[protocol]
    return w if isinstance(w, dict) else {"answer": w}


def judge_config(protocol: str) -> JudgeConfig:
    """The judge section of ``protocol``, with the files it needs (pair_v2: FastChat's judge prompts)."""
    files = {"pair_v2": lambda: {"prompts": str(shared("eval_prompts", "fastchat_judge_prompts.jsonl"))},
             "mt_bench": lambda: {"prompts": str(shared("eval_prompts", "fastchat_judge_prompts.jsonl")),
                                  "references": str(shared("eval_prompts", "mt_bench_reference_gpt4.jsonl"))}}
    return JudgeConfig(protocol=protocol, **files.get(protocol, dict)())


def test_the_protocol_literal_is_the_table():
    assert set(get_args(JudgeConfig.model_fields["protocol"].annotation)) == set(JUDGES)
    assert JudgeConfig().protocol in JUDGES
    assert set(WELL_FORMED) == set(JUDGES)


def test_every_search_metric_is_a_judge_metric():
    assert set(get_args(SearchMetric)) <= set(METRICS) | set(heldout.METRICS)
    assert SearchConfig().metric in METRICS


def questions(kind=None, n: int = 3) -> tuple[list[dict], dict, dict]:
    """Two-turn MT-Bench-shaped questions and the two models' answers: texts by id, or answer rows (per-turn
    answers) for a judge that takes them (``Judge.answer_rows``)."""
    qs = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"question {i}"}], "category": "writing",
           "question_turns": [f"question {i}", f"follow-up {i}"]} for i in range(n)]
    if kind is not None and kind.answer_rows:
        return qs, *({q["id"]: {**q, "answer": f"{m} on {q['id']}", "turns": [f"{m} on {q['id']}", f"{m} again"]}
                      for q in qs} for m in ("target", "baseline"))
    return qs, {q["id"]: f"target on {q['id']}" for q in qs}, {q["id"]: f"baseline on {q['id']}" for q in qs}


@pytest.mark.parametrize("protocol", sorted(JUDGES))
def test_a_judge_declares_what_its_summary_holds(protocol):
    kind, j = JUDGES[protocol], judge_config(protocol)
    assert set(COUNTS) <= set(kind.counts) and {k for k, _ in kind.columns} <= set(SUMMARY_KEYS)
    reqs = kind.build(*questions(kind), j)
    ids = [r["id"] for r in reqs]
    assert len(set(ids)) == len(ids) and all(r["messages"] for r in reqs)
    _, summary = kind.score(reqs, [well_formed(protocol) for _ in reqs], j)
    assert set(kind.settings) | set(kind.counts) | set(kind.metrics) <= set(summary)
    assert isinstance(kind.describe(j.model_dump()), str) and kind.note


@pytest.mark.parametrize("protocol", sorted(JUDGES))
def test_a_judge_parses_a_well_formed_judgement(protocol):
    kind, j = JUDGES[protocol], judge_config(protocol)
    reqs = kind.build(*questions(kind), j)
    verdicts, s = kind.score(reqs, [well_formed(protocol) for _ in reqs], j)
    assert len(verdicts) == s["prompts"] == 3 and all(v["verdict"] != "invalid" for v in verdicts)
    assert (s["valid"], s["invalid"], s["unparsed_judgements"], s["failed_judgements"]) == (3, 0, 0, 0)
    assert all(isinstance(s[m], float) for m in kind.metrics if m not in kind.optional)
    assert all(s[m] is None or isinstance(s[m], float) for m in kind.optional)


@pytest.mark.parametrize("protocol", sorted(JUDGES))
@pytest.mark.parametrize("bad", ["unparsed", "failed"])
def test_a_judge_refuses_to_guess(protocol, bad):
    """An unparsable or failed judgement is counted, and its item is invalid, left out of every rate: never a
    win, a loss or a tie; the other items keep their verdicts."""
    kind, j = JUDGES[protocol], judge_config(protocol)
    reqs = kind.build(*questions(kind), j)
    wrong = {"answer": UNPARSABLE} if bad == "unparsed" else {"answer": "", "error": "URLError: refused"}
    # Every judgement of q0 goes wrong, the others are well formed.
    outs = [wrong if r["id"].startswith("q0") else well_formed(protocol) for r in reqs]
    n_wrong = sum(r["id"].startswith("q0") for r in reqs)
    verdicts, s = kind.score(reqs, outs, j)
    assert [v["verdict"] == "invalid" for v in verdicts] == [True, False, False]
    assert (s["valid"], s["invalid"]) == (2, 1)
    assert (s["unparsed_judgements"], s["failed_judgements"]) == ((n_wrong, 0) if bad == "unparsed" else (0, n_wrong))
    _, none = kind.score(reqs, [wrong for _ in reqs], j)
    assert none["valid"] == 0 and none["invalid"] == 3 and all(none[m] is None for m in kind.metrics)


# ------------------------------------------------------------------------------------------ the judge's generation


def judge_inputs(tmp_path: Path) -> tuple[dict, dict]:
    stages = []
    for label in ("target", "baseline"):
        rows = [{"id": q, "messages": [{"role": "user", "content": f"question {q}"}], "answer": f"{label} on {q}"}
                for q in ("q1", "q2")]
        path = write_jsonl(tmp_path / label / "answers.jsonl", rows)
        stages.append({"outputs": {"answers": str(path)}, "dir": str(path.parent), "label": label})
    return stages[0], stages[1]


@pytest.fixture
def judged(monkeypatch):
    """Runs the local judge with a fake ``generate``; returns the settings each call got."""
    calls = []

    def fake(model, prompts, g):
        calls.append((model, g))
        return [{"id": p["id"], "answer": "8 3", "num_new_tokens": 2} for p in prompts]

    monkeypatch.setattr(pipeline, "generate", fake)
    return calls


def test_the_local_judge_follows_the_generate_section_by_default(tmp_path, judged):
    cfg = ExperimentConfig.model_validate({
        "run_dir": str(tmp_path / "run"),
        "generate": {"backend": "transformers", "batch_size": 5, "num_actors": 2, "max_new_tokens": 300},
        "judge": {"model": "org/judge", "max_new_tokens": 33}})
    done = pipeline.judge_stage(cfg, *judge_inputs(tmp_path))
    ((model, g),) = judged
    assert model == "org/judge" and (g.backend, g.batch_size, g.num_actors) == ("transformers", 5, 2)
    assert g.max_new_tokens == 33 and cfg.generate.max_new_tokens == 300  # the judge's own length, generate's kept
    assert done["metrics"]["valid"] == 2 and done["counts"] == {c: done["metrics"][c] for c in COUNTS}


def test_judgements_are_cached_across_stages_by_judge_and_full_prompt(tmp_path, judged):
    base = {"run_dir": str(tmp_path / "run"), "judge": {"model": "org/judge", "max_new_tokens": 33, "rule": "sum"}}
    first = pipeline.judge_stage(ExperimentConfig.model_validate(base), *judge_inputs(tmp_path))
    assert len(judged) == 1
    assert "verbosity_check" not in first["config"]  # off: the key judge stages had before the option existed
    # Another stage (another rule: the same prompts; an evaluate suite's directory): nothing is judged again.
    strict = ExperimentConfig.model_validate({**base, "judge": {**base["judge"], "rule": "strict"}})
    again = pipeline.judge_stage(strict, *judge_inputs(tmp_path), stage="evaluate/suite")
    assert not again["skipped"] and again["dir"] != first["dir"] and len(judged) == 1
    assert again["outputs"]["judgements"] == first["outputs"]["judgements"]
    assert again["metrics"]["judgements"] == first["metrics"]["judgements"] == 4
    # Another prompt (the format example shown first) or another answer length is another request.
    shown = ExperimentConfig.model_validate({**base, "judge": {**base["judge"], "format_example": True}})
    pipeline.judge_stage(shown, *judge_inputs(tmp_path))
    longer = ExperimentConfig.model_validate({**base, "judge": {**base["judge"], "max_new_tokens": 34}})
    pipeline.judge_stage(longer, *judge_inputs(tmp_path))
    assert len(judged) == 3
    lines = Path(first["outputs"]["judgements"]).read_text().splitlines()
    assert len(lines) == 12  # 4 requests, asked three ways


def test_a_judge_generate_section_reaches_the_judges_generation(tmp_path, judged):
    base = {"run_dir": str(tmp_path / "run"), "generate": {"batch_size": 5},
            "judge": {"model": "org/judge", "max_new_tokens": 33}}
    first = pipeline.judge_stage(ExperimentConfig.model_validate(base), *judge_inputs(tmp_path))
    own = {"backend": "vllm", "batch_size": 2, "num_actors": 3, "gpus_per_actor": 1.0,
           "vllm_engine_kwargs": {"max_model_len": 4096}}
    cfg = ExperimentConfig.model_validate({**base, "judge": {**base["judge"], "generate": own}})
    done = pipeline.judge_stage(cfg, *judge_inputs(tmp_path))
    _, g = judged[-1]
    assert (g.backend, g.batch_size, g.num_actors, g.gpus_per_actor) == ("vllm", 2, 3, 1.0)
    assert g.vllm_engine_kwargs == {"max_model_len": 4096} and g.max_new_tokens == 33
    assert cfg.generate.backend == "transformers" and cfg.generate.batch_size == 5  # the generate stage's untouched
    # Another backend may answer otherwise: another stage directory. A batch size alone does not change answers.
    assert done["dir"] != first["dir"]
    smaller = ExperimentConfig.model_validate({**base,
                                               "judge": {**base["judge"], "generate": {**own, "batch_size": 1}}})
    again = pipeline.judge_stage(smaller, *judge_inputs(tmp_path))
    assert again["skipped"] and again["dir"] == done["dir"] and len(judged) == 2


def test_the_judges_answer_length_is_one_key():
    with pytest.raises(ConfigError, match=r"judge\.generate\.max_new_tokens: unknown key"):
        load_config(None, ["judge.generate={max_new_tokens: 99}"])
    cfg = load_config(None, ["judge.generate={backend: vllm, batch_size: 3}", "judge.max_new_tokens=20"])
    assert cfg.judge.generation(cfg.generate).max_new_tokens == 20
    # A search trial gets the config dumped and validated again, at its point: the section survives both.
    again = ExperimentConfig.model_validate(cfg.model_dump(mode="json")).at(cfg.search_grid()[0])
    assert again.judge.generation(again.generate) == cfg.judge.generation(cfg.generate)
    assert again.judge.generate.batch_size == 3
