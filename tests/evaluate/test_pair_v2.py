"""FastChat's pair-v2 judge: the prompts read from FastChat's own judge_prompts.jsonl, requests byte-identical to
its template filled in, verdicts parsed and aggregated by FastChat's rules (common.py's run_judge_pair and
play_a_match_pair, show_result.py's display_result_pairwise), end to end on the Vicuna set against a local
endpoint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import chat_completion, shared, write_jsonl

from alignment import pipeline
from alignment.config import ConfigError, ExperimentConfig, JudgeConfig, load_config
from alignment.evaluate import JUDGES, pair_v2
from alignment.evaluate.fastchat import JudgePrompt, JudgePromptError, load_judge_prompts
from alignment.formats import normalise_eval_prompt


@pytest.fixture(scope="module")
def prompts_file() -> Path:
    return shared("eval_prompts", "fastchat_judge_prompts.jsonl")


@pytest.fixture(scope="module")
def raw_pair_v2(prompts_file) -> dict:
    """pair-v2's line of FastChat's file, read here with json alone (not through the loader under test)."""
    (row,) = [r for r in map(json.loads, prompts_file.read_text().splitlines()) if r["name"] == "pair-v2"]
    return row


def fastchat_request(raw: dict, question: str, answer_a: str, answer_b: str) -> list[dict]:
    """What FastChat's run_judge_pair sends an OpenAI judge: the system prompt, then the template filled in."""
    user = raw["prompt_template"].format(question=question, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "system", "content": raw["system_prompt"]}, {"role": "user", "content": user}]


# ------------------------------------------------------------------------------------------ the prompts file


def test_the_loader_reads_fastchats_file(prompts_file, raw_pair_v2):
    prompts = load_judge_prompts(prompts_file)
    assert {"pair-v2", "pair-v2-multi-turn", "single-v1", "single-math-v1"} <= set(prompts)
    assert prompts["pair-v2"] == JudgePrompt(**raw_pair_v2)
    assert pair_v2.load_prompt(prompts_file) == prompts["pair-v2"]


@pytest.mark.parametrize(("line", "match"), [
    ("not json", r"line 2: not JSON"),
    ('["a list"]', r"line 2: a JSON object was expected"),
    ('{"name": "x"}', r"line 2: field 'type' is missing"),
    ("FIELD:system_prompt=7", r"line 2: field 'system_prompt' must be a string"),
    ("DUPLICATE", r"line 2: field 'name': prompt 'pair-v2' appears twice"),
])
def test_a_bad_line_names_the_file_the_line_and_the_field(tmp_path, raw_pair_v2, line, match):
    if line.startswith("FIELD:"):
        line = json.dumps({**raw_pair_v2, "name": "other", "system_prompt": 7})
    elif line == "DUPLICATE":
        line = json.dumps(raw_pair_v2)
    path = write_jsonl(tmp_path / "judge_prompts.jsonl", [json.dumps(raw_pair_v2), line])
    with pytest.raises(JudgePromptError, match=rf"{path}, {match}"):
        load_judge_prompts(path)


def test_a_file_without_pair_v2_is_an_error_naming_it(tmp_path, prompts_file, raw_pair_v2):
    others = [line for line in prompts_file.read_text().splitlines() if json.loads(line)["name"] != "pair-v2"]
    path = write_jsonl(tmp_path / "judge_prompts.jsonl", others)
    with pytest.raises(JudgePromptError, match=rf"{path} has no prompt 'pair-v2'"):
        pair_v2.load_prompt(path)
    with pytest.raises(JudgePromptError, match=r"does not exist"):
        load_judge_prompts(tmp_path / "missing.jsonl")
    # A pair-v2 this parser cannot read (another output format) is refused, not parsed as if it were [[A]].
    path = write_jsonl(tmp_path / "other_format.jsonl", [json.dumps({**raw_pair_v2, "output_format": "[[rating]]"})])
    with pytest.raises(JudgePromptError, match=r"prompt 'pair-v2', field 'output_format'"):
        pair_v2.load_prompt(path)


def test_judge_prompts_is_required_by_pair_v2_and_made_absolute(tmp_path, monkeypatch, prompts_file):
    with pytest.raises(ConfigError, match=r"judge\.prompts: judge\.protocol pair_v2 reads its prompts"):
        load_config(None, ["judge.protocol=pair_v2"])
    monkeypatch.chdir(prompts_file.parent)
    cfg = load_config(None, ["judge.protocol=pair_v2", f"judge.prompts={prompts_file.name}"])
    assert cfg.judge.prompts == str(prompts_file.resolve())


def test_preflight_reads_the_prompts_before_ray_starts(tmp_path, prompts_file):
    lacking = write_jsonl(tmp_path / "judge_prompts.jsonl", ['{"name": "pair-v2"}'])
    cfg = ExperimentConfig.model_validate({"run_dir": str(tmp_path / "run"),
                                           "judge": {"protocol": "pair_v2", "prompts": str(lacking)}})
    with pytest.raises(JudgePromptError, match=rf"judge\.prompts: {lacking}, line 1: field 'type' is missing"):
        pipeline.preflight(cfg, "judge")
    # A search objective the protocol does not report would leave every trial without a metric.
    cfg = ExperimentConfig.model_validate({"run_dir": str(tmp_path / "run"), "search": {"metric": "score"},
                                           "judge": {"protocol": "pair_v2", "prompts": str(prompts_file)}})
    with pytest.raises(ConfigError, match=r"search\.metric: score is not a metric of judge\.protocol pair_v2"):
        pipeline.preflight(cfg, "search")


# ------------------------------------------------------------------------------------------ requests


def test_requests_are_fastchats_template_filled_in_both_orders(prompts_file, raw_pair_v2):
    j = JudgeConfig(protocol="pair_v2", prompts=str(prompts_file))
    # Braces and template words inside answers stay as they are (format fills the template once).
    qs = [{"id": "7", "messages": [{"role": "user", "content": "Write {question} in Python."}]}]
    target, baseline = {"7": "def f():\n    return {answer_b}\n"}, {"7": "I can't."}
    reqs = JUDGES["pair_v2"].build(qs, target, baseline, j)
    assert [(r["id"], r["qid"], r["order"]) for r in reqs] == [("7|1", "7", 1), ("7|2", "7", 2)]
    assert reqs[0]["messages"] == fastchat_request(raw_pair_v2, "Write {question} in Python.", target["7"], "I can't.")
    assert reqs[1]["messages"] == fastchat_request(raw_pair_v2, "Write {question} in Python.", "I can't.", target["7"])


def test_a_multi_turn_prompt_is_refused_naming_it(prompts_file):
    j = JudgeConfig(protocol="pair_v2", prompts=str(prompts_file))
    qs = [{"id": "q9", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}]
    with pytest.raises(pair_v2.QuestionError, match=r"question q9: pair_v2 judges single-turn prompts.*system, user"):
        JUDGES["pair_v2"].build(qs, {"q9": "a"}, {"q9": "b"}, j)


# ------------------------------------------------------------------------------------------ FastChat's rules


def fastchat_winner(judgement: str | None) -> str:
    """common.py's run_judge_pair for output_format "[[A]]" (a failed request: its "$ERROR$" output)."""
    if judgement is None:
        return "error"
    if "[[A]]" in judgement:
        return "A"
    if "[[B]]" in judgement:
        return "B"
    if "[[C]]" in judgement:
        return "tie"
    return "error"


def fastchat_game(g1: str | None, g2: str | None) -> dict:
    """play_a_match_pair's record with model_1 the target: game 1 shows it as A, game 2 as B."""
    g1_map, g2_map = {"A": "model_1", "B": "model_2"}, {"A": "model_2", "B": "model_1"}
    w1, w2 = fastchat_winner(g1), fastchat_winner(g2)
    return {"model_1": "target", "model_2": "baseline", "g1_winner": g1_map.get(w1, w1),
            "g2_winner": g2_map.get(w2, w2)}


def show_result(games: list[dict]) -> dict:
    """show_result.py's display_result_pairwise with --baseline-model baseline, for the target's row."""
    import pandas as pd

    df_all = pd.DataFrame(games)
    df_all = df_all[(df_all["g1_winner"] != "error") & (df_all["g2_winner"] != "error")]
    res = []
    for _, row in df_all.iterrows():
        if row["g1_winner"] == "tie" or row["g1_winner"] != row["g2_winner"]:
            res += [{"model": row["model_1"], "win": 0, "loss": 0, "tie": 1},
                    {"model": row["model_2"], "win": 0, "loss": 0, "tie": 1}]
        else:
            winner, loser = (("target", "baseline") if row["g1_winner"] == "model_1" else ("baseline", "target"))
            res += [{"model": winner, "win": 1, "loss": 0, "tie": 0}, {"model": loser, "win": 0, "loss": 1, "tie": 0}]
    if not res:
        return {"win": 0, "tie": 0, "loss": 0}
    df = pd.DataFrame(res).groupby(["model"]).sum()
    df = df[df.index != "baseline"]
    total = df["win"] + df["loss"] + df["tie"]
    df["win_rate"] = df["win"] / total
    df["loss_rate"] = df["loss"] / total
    df["win_rate_adjusted"] = (df["win"] + 0.5 * df["tie"]) / total
    return {k: float(v) for k, v in df.loc["target"].items()}


# (order 1's judgement, order 2's judgement; None: the request failed) -> the question's verdict
CASES = [
    ("A is better. [[A]]", "B is better. [[B]]", "win"),  # both orders prefer the target
    ("[[B]]", "[[A]]", "loss"),  # both prefer the baseline
    ("[[C]]", "[[C]]", "tie"),  # both a tie
    ("[[A]]", "[[A]]", "tie"),  # position bias: the first answer both times, inconsistent
    ("[[B]]", "[[B]]", "tie"),
    ("[[C]]", "[[B]]", "tie"),  # a first-order tie is a tie whatever the second says
    ("[[A]]", "[[C]]", "tie"),  # disagreement
    ("[[C]] at first, but on reflection [[A]]", "[[C]]? No: [[B]]", "win"),  # looked up as A, then B, then C
    ("[[B]] then [[A]]", "[[B]]", "win"),  # [[A]] anywhere wins the lookup, not the first verdict in the text
    ("Assistant A wins.", "[[B]]", "invalid"),  # no verdict: unparsed, never guessed
    ("[A]", "[B]", "invalid"),  # single brackets are no verdict
    ("[[a]]", "[[B]]", "invalid"),  # nor lower case
    (None, "[[B]]", "invalid"),  # the request failed
    ("[[A]]", None, "invalid"),
]


def test_verdicts_and_aggregates_follow_fastchats_code(prompts_file):
    j = JudgeConfig(protocol="pair_v2", prompts=str(prompts_file))
    qs = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"question {i}"}]} for i in range(len(CASES))]
    reqs = JUDGES["pair_v2"].build(qs, {q["id"]: "t" for q in qs}, {q["id"]: "b" for q in qs}, j)
    by_id = {f"q{i}|{order}": case[order - 1] for i, case in enumerate(CASES) for order in (1, 2)}
    outs = [{"answer": "", "error": "http 500"} if by_id[r["id"]] is None else {"answer": by_id[r["id"]]}
            for r in reqs]
    verdicts, s = JUDGES["pair_v2"].score(reqs, outs, j)
    assert [v["verdict"] for v in verdicts] == [c[2] for c in CASES]
    games = [fastchat_game(g1, g2) for g1, g2, _ in CASES]
    expected = show_result(games)
    for key in ("win", "tie", "loss", "win_rate", "loss_rate", "win_rate_adjusted"):
        assert s[key] == pytest.approx(expected[key]), key
    kept = [g for g in games if "error" not in (g["g1_winner"], g["g2_winner"])]
    assert s["valid"] == len(kept) == 9 and s["invalid"] == 5 and s["prompts"] == len(CASES)
    assert (s["unparsed_judgements"], s["failed_judgements"], s["judgements"]) == (4, 2, 2 * len(CASES))
    inconsistent = sum(g["g1_winner"] != g["g2_winner"] for g in kept)
    assert s["order_disagreement_rate"] == pytest.approx(inconsistent / len(kept))
    assert s["tie_rate"] == pytest.approx(expected["tie"] / len(kept)) and s["judge_prompt"] == "pair-v2"


# ------------------------------------------------------------------------------------------ end to end, Vicuna


class Judging:
    """How the fake endpoint (the ``fake_endpoint`` fixture) judges, by a hash of the request: [[A]], [[B]], [[C]],
    an explanation without a verdict, or a persistent 500."""

    @staticmethod
    def reply(body: dict) -> dict | int:
        text = Judging.judgement(body["messages"])
        return 500 if text is None else chat_completion(text, completion_tokens=9)

    @staticmethod
    def judgement(messages: list[dict]) -> str | None:
        h = int(hashlib.sha256(messages[-1]["content"].encode()).hexdigest(), 16) % 40
        if h == 0:
            return None
        if h < 4:
            return "Both answers are fine; I cannot choose."
        return f"Comparing the two answers.\n\n{('[[A]]', '[[B]]', '[[C]]', '[[A]]', '[[B]]')[h % 5]}"


def test_the_vicuna_set_judged_end_to_end_gives_show_results_numbers(tmp_path, fake_endpoint, prompts_file,
                                                                     raw_pair_v2):
    rows = [json.loads(line) for line in shared("eval_prompts", "vicuna_test_set.jsonl").read_text().splitlines()]
    assert len(rows) == 80
    questions = [{"id": str(r["question_id"]), "messages": normalise_eval_prompt(r)} for r in rows]
    answers = {"target": {q["id"]: f"A careful answer to question {q['id']}." for q in questions},
               "baseline": {q["id"]: f"Another answer ({q['id']})." for q in questions}}
    stages = []
    for label in ("target", "baseline"):
        path = write_jsonl(tmp_path / label / "answers.jsonl",
                           [{**q, "answer": answers[label][q["id"]]} for q in questions])
        stages.append({"outputs": {"answers": str(path)}, "dir": str(path.parent), "label": label})
    fake_endpoint.reply = Judging.reply
    cfg = ExperimentConfig.model_validate({"run_dir": str(tmp_path / "run"), "judge": {
        "protocol": "pair_v2", "prompts": str(prompts_file), "backend": "openai", "model": "gpt-4",
        "api_base_env": "TEST_JUDGE_URL", "api_key_env": "TEST_JUDGE_KEY", "max_retries": 1, "retry_backoff_s": 0.001,
        "max_failed_fraction": 0.2, "max_new_tokens": 2048}})
    done = pipeline.judge_stage(cfg, *stages)

    # Every request is FastChat's: pair-v2's system prompt and template, the target as A, then as B.
    expected = {}
    for q in questions:
        text, t, b = q["messages"][-1]["content"], answers["target"][q["id"]], answers["baseline"][q["id"]]
        expected[q["id"]] = (fastchat_request(raw_pair_v2, text, t, b), fastchat_request(raw_pair_v2, text, b, t))
    sent = {json.dumps(r["body"]["messages"]) for r in fake_endpoint}
    assert sent == {json.dumps(m) for pair in expected.values() for m in pair}

    # The aggregates, by show_result's rules from the same judgements (a failed request is FastChat's error).
    games = [fastchat_game(Judging.judgement(m1), Judging.judgement(m2)) for m1, m2 in expected.values()]
    want = show_result(games)
    m = done["metrics"]
    for key in ("win", "tie", "loss", "win_rate", "loss_rate", "win_rate_adjusted"):
        assert m[key] == pytest.approx(want[key]), key
    kept = [g for g in games if "error" not in (g["g1_winner"], g["g2_winner"])]
    assert m["valid"] == len(kept) and m["invalid"] == 80 - len(kept) and m["prompts"] == 80
    assert m["order_disagreement_rate"] == pytest.approx(sum(g["g1_winner"] != g["g2_winner"] for g in kept)
                                                         / len(kept))
    failed = sum(Judging.judgement(x) is None for pair in expected.values() for x in pair)
    unparsed = sum(fastchat_winner(Judging.judgement(x)) == "error" for pair in expected.values() for x in pair)
    assert 0 < failed and 0 < unparsed - failed and 0 < m["invalid"] < 80 and m["win"] and m["loss"] and m["tie"]
    assert (m["failed_judgements"], m["unparsed_judgements"]) == (failed, unparsed - failed)
    verdicts = [json.loads(line) for line in Path(done["outputs"]["verdicts"]).read_text().splitlines()]
    assert len(verdicts) == 80 and sum(v["verdict"] == "invalid" for v in verdicts) == m["invalid"]
    assert fake_endpoint.key not in "".join(p.read_text() for p in Path(done["dir"]).iterdir() if p.is_file())
