"""MT-Bench as FastChat's llm_judge runs it: answers to both turns at the category's temperature, single-answer
grading with FastChat's prompts and references, ratings parsed and averaged by FastChat's rules (show_result)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import chat_completion, shared

from alignment import formats, pipeline
from alignment.config import ConfigError, ExperimentConfig, GenerateConfig, JudgeConfig, load_config
from alignment.evaluate import JUDGES, mt_bench
from alignment.evaluate.generate import GenerationError, HFGenerator, _generate_vllm, _sampling, turn_seed

# FastChat's temperature_config (fastchat/llm_judge/common.py), typed here from its source.
FASTCHAT_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                         "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}


def prompts_file() -> str:
    return str(shared("eval_prompts", "fastchat_judge_prompts.jsonl"))


def refs_file() -> str:
    return str(shared("eval_prompts", "mt_bench_reference_gpt4.jsonl"))


def questions_file() -> str:
    return str(shared("eval_prompts", "mt_bench_questions.jsonl"))


def raw_prompts() -> dict[str, dict]:
    with open(prompts_file()) as f:
        return {r["name"]: r for r in map(json.loads, f)}


def raw_questions() -> list[dict]:
    with open(questions_file()) as f:
        return [json.loads(line) for line in f if line.strip()]


def raw_refs() -> dict[str, list[str]]:
    with open(refs_file()) as f:
        return {str(r["question_id"]): r["choices"][0]["turns"] for r in map(json.loads, f)}


def answer_rows(label: str) -> dict[str, dict]:
    """Answer rows of the 80 questions as the generate stage writes them, each answer naming model, id and turn."""
    rows = {}
    for q in raw_questions():
        qid = str(q["question_id"])
        turns = [f"{label}-answer-{qid}-{t + 1}" for t in range(len(q["turns"]))]
        rows[qid] = {"id": qid, "messages": [{"role": "user", "content": q["turns"][0]}], "answer": turns[0],
                     "category": q["category"], "question_turns": q["turns"], "turns": turns}
    return rows


def judge(**kw) -> JudgeConfig:
    return JudgeConfig(protocol="mt_bench", prompts=prompts_file(), references=refs_file(), **kw)


# ------------------------------------------------------------------------------------------ the judge prompts


def test_the_prompts_are_fastchats_templates_filled_in():
    """Every request is byte for byte what FastChat's run_judge_single sends: the template's system prompt, the
    template filled with the question, the answers and, for math, reasoning and coding, the reference."""
    raw, refs = raw_prompts(), raw_refs()
    target, baseline = answer_rows("target"), answer_rows("baseline")
    reqs = mt_bench.requests_for(list(target.values()), target, baseline, judge())
    assert len(reqs) == 80 * 2 * 2
    by_q = {str(q["question_id"]): q for q in raw_questions()}
    for r in reqs:
        q, a = by_q[r["qid"]], (target if r["model"] == "target" else baseline)[r["qid"]]["turns"]
        math = q["category"] in ("math", "reasoning", "coding")
        name = ("single-math-v1" if math else "single-v1") + ("-multi-turn" if r["turn"] == 2 else "")
        p = raw[name]
        kw = {"ref_answer_1": refs[r["qid"]][0], "ref_answer_2": refs[r["qid"]][1]} if math else {}
        if r["turn"] == 1:
            user = p["prompt_template"].format(question=q["turns"][0], answer=a[0], **kw)
        else:
            user = p["prompt_template"].format(question_1=q["turns"][0], question_2=q["turns"][1], answer_1=a[0],
                                               answer_2=a[1], **kw)
        assert r["prompt_name"] == name
        assert r["messages"] == [{"role": "system", "content": p["system_prompt"]}, {"role": "user", "content": user}]
    # The reference reaches the math prompts: question 111's first reference turn, shown to both models' graders.
    math_1 = [r for r in reqs if r["qid"] == "111" and r["turn"] == 1]
    assert len(math_1) == 2 and all(refs["111"][0] in r["messages"][1]["content"] for r in math_1)
    assert sum(r["prompt_name"].startswith("single-math") for r in reqs) == 30 * 2 * 2


def test_a_reference_answer_missing_is_an_error_naming_the_file_and_question(tmp_path):
    target, baseline = answer_rows("target"), answer_rows("baseline")
    lines = [line for line in open(refs_file()) if json.loads(line)["question_id"] != 111]
    partial = tmp_path / "refs.jsonl"
    partial.write_text("".join(lines))
    j = JudgeConfig(protocol="mt_bench", prompts=prompts_file(), references=str(partial))
    with pytest.raises(mt_bench.MTBenchError, match=rf"{re.escape(str(partial))} has no reference answer for "
                       r"question 111 \(math\)"):
        mt_bench.requests_for(list(target.values()), target, baseline, j)
    with pytest.raises(mt_bench.MTBenchError, match=r"judge\.references is not set"):
        mt_bench.requests_for(list(target.values()), target, baseline,
                              JudgeConfig(protocol="mt_bench", prompts=prompts_file()))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "choices": []}\n')
    with pytest.raises(mt_bench.MTBenchError, match=r"bad\.jsonl, line 1: field 'choices\[0\]\.turns'"):
        mt_bench.load_references(bad)


def test_answers_without_turns_and_config_keys_are_refused():
    target = answer_rows("target")
    old = {i: {k: v for k, v in r.items() if k != "turns"} for i, r in target.items()}
    with pytest.raises(mt_bench.MTBenchError, match=r"prompt 81: the baseline's answers hold no per-turn answers"):
        mt_bench.requests_for(list(target.values()), target, old, judge())
    with pytest.raises(ConfigError, match=r"judge\.references has no effect with judge\.protocol vicuna_pairwise"):
        load_config(None, [f"judge.references={refs_file()}"])
    with pytest.raises(ConfigError, match=r"judge\.prompts"):
        load_config(None, ["judge.protocol=mt_bench"])


# ------------------------------------------------------------------------------------------ ratings and averages

RATINGS = [
    ("The answer is good.\n\nRating: [[8]]", 8),
    ("Rating: [[8.5]]", 8.5),
    ("Rating: [[10]]", 10),
    ("Rating: [[7.]]", 7.0),
    ("Rating: [7]", 7),  # FastChat's backup pattern
    ("It cites [3] but rates [[6]]", 6),  # the double brackets first, wherever they are
    ("[[4]] at first, then [[9]]", 4),  # the first match
    ("Rating: [[ 8 ]]", -1),
    ("Rating: 8/10", -1),
    ("Rating: [[eight]]", -1),
    ("", -1),
]


@pytest.mark.parametrize(("judgment", "rating"), RATINGS)
def test_ratings_parse_as_fastchat_parses_them(judgment, rating):
    got = mt_bench.parse_rating(judgment)
    assert got == rating and type(got) is type(rating)


def show_result(rows: list[dict]) -> dict:
    """FastChat's show_result.display_result_single on judgment rows ``{model, score, turn, category}``: rows
    with score -1 dropped, then means per model and turn and per model; and per model and category."""
    df = pd.DataFrame(rows)
    df = df[df["score"] != -1]
    turn = df.groupby(["model", "turn"])["score"].mean()
    overall = df.groupby(["model"])["score"].mean()
    category = df.groupby(["model", "category"])["score"].mean()
    return {"turn": turn.to_dict(), "overall": overall.to_dict(), "category": category.to_dict()}


def check_summary(s: dict, expected: dict) -> None:
    for model, prefix in (("target", "mt_bench"), ("baseline", "mt_bench_baseline")):
        assert s[prefix] == pytest.approx(expected["overall"][model])
        for t in (1, 2):
            assert s[f"{prefix}_turn_{t}"] == pytest.approx(expected["turn"].get((model, t)))
        cats = {c: m for (mod, c), m in expected["category"].items() if mod == model}
        assert s["mt_bench_categories"][model] == pytest.approx(cats)
    assert s["mt_bench_delta"] == pytest.approx(expected["overall"]["target"] - expected["overall"]["baseline"])


def test_averages_follow_show_result_and_a_failed_rating_is_left_out():
    target, baseline = answer_rows("target"), answer_rows("baseline")
    qs = [target[i] for i in ("81", "82", "101", "111")]
    reqs = mt_bench.requests_for(qs, target, baseline, judge())
    outs, rows = [], []
    for n, r in enumerate(reqs):
        if n % 7 == 3:
            out, score = {"answer": "no rating here"}, -1
        elif n % 11 == 5:
            out, score = {"answer": "", "error": "http 500"}, -1
        else:
            score = [3, 8.5, 6, 10, 1][n % 5]
            out = {"answer": f"Reasons.\n\nRating: [[{score}]]"}
        outs.append(out)
        rows.append({"model": r["model"], "score": score, "turn": r["turn"], "category": r["category"]})
    verdicts, s = mt_bench.score(reqs, outs)
    check_summary(s, show_result(rows))
    assert s["unparsed_judgements"] == sum(n % 7 == 3 for n in range(len(reqs)))
    assert s["failed_judgements"] == sum(n % 11 == 5 and n % 7 != 3 for n in range(len(reqs)))
    assert s["rated_judgements"] == sum(r["score"] != -1 for r in rows) and s["judgements"] == 16
    assert [v["id"] for v in verdicts] == ["81", "82", "101", "111"]
    assert {v["verdict"] for v in verdicts} <= {"rated", "partial"} and s["partial"] >= 1
    assert s["valid"] == 4 and s["invalid"] == 0


# ------------------------------------------------------------------------------------------ generation


def test_eval_rows_keep_every_turn_and_the_category():
    good, bad = formats.read_rows(questions_file(), "eval")
    assert not bad and len(good) == 80
    first = good[0]
    assert first["messages"] == [{"role": "user", "content": raw_questions()[0]["turns"][0]}]
    assert first["question_turns"] == raw_questions()[0]["turns"] and first["category"] == "writing"
    single, _ = formats.read_rows(str(shared("eval_prompts", "vicuna_test_set.jsonl")), "eval")
    assert "question_turns" not in single[0] and "category" not in single[0]
    with pytest.raises(formats.RowError, match="category"):
        formats.eval_prompt_turns({"turns": ["a", "b"]})


def test_turn_2_is_asked_after_the_models_own_turn_1_answer(tmp_path, monkeypatch):
    """The generate stage on the 80 questions: turn 2 in the same conversation, after the model's own answer;
    each category at FastChat's temperature; seeds per prompt and turn; both turns stored."""
    calls = []

    def fake(model, prompts, g):
        calls.append(prompts)
        return [{"id": p["id"], "answer": f"answer {len(calls)} to {p['id']}", "num_new_tokens": len(calls)}
                for p in prompts]

    monkeypatch.setattr(pipeline, "generate", fake)
    cfg = ExperimentConfig.model_validate({"run_dir": str(tmp_path / "run"), "seed": 3,
                                           "data": {"eval_prompts": questions_file()}})
    done = pipeline.generate_stage(cfg, "some/model", "target")
    assert len(calls) == 2 and len(calls[0]) == len(calls[1]) == 80
    qs = {str(q["question_id"]): q for q in raw_questions()}
    for p in calls[0]:
        assert p["messages"] == [{"role": "user", "content": qs[p["id"]]["turns"][0]}]
        assert p["temperature"] == FASTCHAT_TEMPERATURES[qs[p["id"]]["category"]]
    for p in calls[1]:
        q = qs[p["id"]]
        assert p["messages"] == [{"role": "user", "content": q["turns"][0]},
                                 {"role": "assistant", "content": f"answer 1 to {p['id']}"},
                                 {"role": "user", "content": q["turns"][1]}]
        assert p["temperature"] == FASTCHAT_TEMPERATURES[q["category"]]
    seeds = [p["seed"] for c in calls for p in c]
    assert len(set(seeds)) == len(seeds)  # each prompt and turn its own draws
    rows = [json.loads(line) for line in open(done["outputs"]["answers"])]
    assert rows[0]["turns"] == ["answer 1 to 81", "answer 2 to 81"] and rows[0]["answer"] == "answer 1 to 81"
    assert rows[0]["turns_new_tokens"] == [1, 2] and rows[0]["category"] == "writing"
    assert turn_seed(3, "81", 1) == calls[0][0]["seed"] != turn_seed(4, "81", 1)


def test_single_turn_prompts_are_asked_once_greedily(tmp_path, monkeypatch):
    calls = []

    def fake(model, prompts, g):
        calls.append(prompts)
        return [{"id": p["id"], "answer": "a", "num_new_tokens": 1} for p in prompts]

    monkeypatch.setattr(pipeline, "generate", fake)
    cfg = ExperimentConfig.model_validate({"run_dir": str(tmp_path / "run"), "data": {
        "eval_prompts": str(shared("eval_prompts", "vicuna_test_set.jsonl")), "max_eval_prompts": 5}})
    done = pipeline.generate_stage(cfg, "some/model", "target")
    assert len(calls) == 1 and all(p["temperature"] == 0.0 for p in calls[0])
    row = json.loads(open(done["outputs"]["answers"]).readline())
    assert set(row) == {"id", "messages", "answer", "num_new_tokens"}


def test_a_sampled_prompt_gives_the_same_answer_whatever_its_batch(tiny_model):
    """The transformers backend's actor: a sampled prompt draws from its own seed alone; greedy ones as before."""
    import pyarrow as pa

    actor = HFGenerator(str(tiny_model), 8, 1, False)
    msgs = [{"role": "user", "content": "write a long answer about the river"}]
    rows = [{"id": "s", "messages": msgs, "temperature": 0.7, "seed": 11},
            {"id": "g", "messages": msgs, "temperature": 0.0, "seed": 0}]
    both = actor(pa.Table.from_pylist(rows)).to_pylist()
    alone = actor(pa.Table.from_pylist(rows[:1])).to_pylist()
    assert both[0]["answer"] == alone[0]["answer"] and both[0]["id"] == "s"
    others = {actor(pa.Table.from_pylist([{**rows[0], "seed": s}])).to_pylist()[0]["answer"] for s in range(12, 20)}
    assert len(others | {both[0]["answer"]}) > 1  # the seed, not the prompt alone, sets the draws
    greedy = actor(pa.Table.from_pylist(rows[1:])).to_pylist()[0]
    assert greedy["answer"] == both[1]["answer"]


def test_a_sampled_prompt_without_a_seed_is_refused():
    with pytest.raises(GenerationError, match="prompt x: temperature 0.7 needs an integer seed"):
        _sampling({"id": "x", "temperature": 0.7})


def test_vllm_gets_each_rows_temperature_and_seed(monkeypatch):
    import ray.data
    import ray.data.llm

    asked = []

    def build_processor(cfg, preprocess, postprocess):
        def run(rows):
            asked.extend(preprocess(r) for r in rows)
            return SimpleNamespace(take_all=lambda: [postprocess({"id": r["id"], "generated_text": "x",
                                                                  "num_generated_tokens": 1}) for r in asked])
        return run

    monkeypatch.setattr(ray.data.llm, "vLLMEngineProcessorConfig", lambda **kw: kw)
    monkeypatch.setattr(ray.data.llm, "build_processor", build_processor)
    monkeypatch.setattr(ray.data, "from_items", list)
    monkeypatch.setattr("alignment.models.engine_source", lambda m: m)
    g = GenerateConfig(backend="vllm", max_new_tokens=5)
    prompts = [{"id": "w", "messages": [], "temperature": 0.7, "seed": 9}, {"id": "m", "messages": []}]
    _generate_vllm("m", prompts, g)
    assert [a["sampling_params"] for a in asked] == [{"temperature": 0.7, "max_tokens": 5, "seed": 9},
                                                    {"temperature": 0.0, "max_tokens": 5}]


# ------------------------------------------------------------------------------------------ end to end


class Rating:
    """How the fake endpoint (the ``fake_endpoint`` fixture) grades, by the answer markers in the prompt: the graded
    turn's answer is the last marker; some judgements hold no rating, some requests are refused (400)."""

    MARK = re.compile(r"(target|baseline)-answer-(\d+)-(\d)")

    def __init__(self, requests: list[dict]):
        self.table: dict[tuple[str, str, int], float] = {}  # (model, qid, turn) -> the score FastChat records
        self.seen = requests

    @property
    def requests(self) -> list[dict]:
        return [r["body"] for r in self.seen]

    def __call__(self, body: dict) -> dict | tuple[int, dict]:
        model, qid, turn = self.MARK.findall(body["messages"][-1]["content"])[-1]
        key, n = (model, qid, int(turn)), int(qid) * 3 + int(turn) + (model == "baseline")
        if n % 19 == 0:
            self.table[key] = -1
            return 400, {"error": {"message": "refused"}}
        text = "I cannot rate this." if n % 13 == 0 else f"Explanation.\n\nRating: [[{n % 10 + 1}]]"
        self.table[key] = -1 if n % 13 == 0 else n % 10 + 1
        return chat_completion(text, completion_tokens=9)


@pytest.fixture()
def rating_endpoint(fake_endpoint):
    fake_endpoint.reply = Rating(fake_endpoint)
    return fake_endpoint.reply


def test_the_judge_stage_on_the_80_questions_equals_show_result(tmp_path, monkeypatch, rating_endpoint):
    """Generate (faked) both models' answers to the 80 questions, judge them against a local endpoint, and compare
    the stage's summary with FastChat's show_result rules applied to what the endpoint answered."""

    def fake(model, prompts, g):
        return [{"id": p["id"], "answer": f"{model}-answer-{p['id']}-{(len(p['messages']) + 1) // 2}",
                 "num_new_tokens": 1} for p in prompts]

    monkeypatch.setattr(pipeline, "generate", fake)
    cfg = ExperimentConfig.model_validate({
        "run_dir": str(tmp_path / "run"), "data": {"eval_prompts": questions_file()},
        "judge": {"protocol": "mt_bench", "prompts": prompts_file(), "references": refs_file(), "backend": "openai",
                  "model": "judge-m", "api_base_env": "TEST_JUDGE_URL", "api_key_env": "TEST_JUDGE_KEY",
                  "max_retries": 1, "retry_backoff_s": 0.001, "max_failed_fraction": 0.1, "max_new_tokens": 2048}})
    target = pipeline.generate_stage(cfg, "target", "target")
    baseline = pipeline.generate_stage(cfg, "baseline", "baseline")
    done = pipeline.judge_stage(cfg, target, baseline)
    ep = rating_endpoint
    assert len(ep.table) == 320 and done["status"] == "complete"
    cats = {str(q["question_id"]): q["category"] for q in raw_questions()}
    rows = [{"model": m, "score": s, "turn": t, "category": cats[q]} for (m, q, t), s in ep.table.items()]
    s = done["metrics"]
    check_summary(s, show_result(rows))
    assert s["failed_judgements"] == done["counts"]["failed_judgements"] > 0 and s["unparsed_judgements"] > 0
    assert s["rated_judgements"] == sum(r["score"] != -1 for r in rows)
    assert s["prompts"] == 80 and s["judgements"] == 320
    # Math, reasoning and coding prompts carry their reference answers.
    refs = raw_refs()
    math = [b["messages"][-1]["content"] for b in ep.requests if "Start of Reference Answer" in
            b["messages"][-1]["content"]]
    assert len(math) == 120 and all(any(ts[0] in text for ts in refs.values()) for text in math)
    verdicts = [json.loads(line) for line in open(done["outputs"]["verdicts"])]
    assert len(verdicts) == 80 and sum(v["verdict"] == "invalid" for v in verdicts) == s["invalid"]
    assert JUDGES["mt_bench"].answer_rows
