"""`alignment evaluate` on judged suites: answers from a model loaded here, a served endpoint and an answers file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from alignment import cli, formats, pipeline
from alignment.config import EvalModelConfig, ExperimentConfig, load_config
from alignment.endpoints import GenerationError
from alignment.evaluate import sources
from alignment.evaluate.generate import category_temperature, turn_seed
from tests.conftest import chat_completion, shared

ALPACA = shared("eval_prompts", "alpaca_eval_gpt4_1106_preview_reference.json")
MT_QUESTIONS = shared("eval_prompts", "mt_bench_questions.jsonl")
MT_REFERENCES = shared("eval_prompts", "mt_bench_reference_gpt4.jsonl")
VICUNA = shared("eval_prompts", "vicuna_test_set.jsonl")


def test_alpaca_eval_outputs_match_the_805_prompts_by_instruction():
    prompts, bad = formats.read_rows(str(ALPACA), "eval")
    assert not bad and len(prompts) == 805
    out, unused = sources.match(prompts, sources.read_answers(str(ALPACA)), str(ALPACA))
    reference = json.loads(ALPACA.read_text())
    assert unused == 0
    assert [o["turns"] for o in out] == [[r["output"]] for r in reference]
    assert all(o["num_new_tokens"] == [None] for o in out)  # a file does not say


def test_fastchat_answers_give_every_turn_and_a_missing_question_is_an_error_naming_it():
    prompts, _ = formats.read_rows(str(MT_QUESTIONS), "eval")
    answers = sources.read_answers(str(MT_REFERENCES))
    # The references answer the math, reasoning and coding questions only (ids 101-130 among them).
    with_ref = [p for p in prompts if p["id"] in answers["id"]]
    assert len(with_ref) == 30
    out, unused = sources.match(with_ref, answers, str(MT_REFERENCES))
    first = json.loads(MT_REFERENCES.read_text().splitlines()[0])
    got = next(o for o in out if o["id"] == str(first["question_id"]))
    assert got["turns"] == first["choices"][0]["turns"] and len(got["turns"]) == 2
    assert unused == 0
    with pytest.raises(sources.AnswersError, match=r"no answer for 50 of the 80 prompts \(ids 81, 82, 83, 84, 85"):
        sources.match(prompts, answers, str(MT_REFERENCES))


def test_a_one_turn_answer_to_a_two_turn_question_is_an_error(tmp_path):
    prompts, _ = formats.read_rows(str(MT_QUESTIONS), "eval")
    f = tmp_path / "one_turn.json"
    f.write_text(json.dumps([{"instruction": p["messages"][-1]["content"], "output": "x"} for p in prompts]))
    with pytest.raises(sources.AnswersError, match=r"too few turns for 80 prompts: 81 \(1 of 2 turns\)"):
        sources.match(prompts, sources.read_answers(str(f)), str(f))


@pytest.mark.parametrize("rows, message", [
    ([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "c"}],
     r"row 1: instruction 'a' is answered twice"),
    ([{"instruction": "a", "output": None}], r"row 0: field output is missing"),
    ([{"question_id": 1, "choices": [{"turns": ["a", 3]}]}], r"row 0: field choices\[0\].turns\[1\] is int, not text"),
    ([{"question_id": 1, "choices": []}], r"row 0: field choices: FastChat's"),
    ([{"prompt": "a", "response": "b"}], r"row 0: neither AlpacaEval's .* \(keys: prompt, response\)"),
    ([], r"no answers in the file"),
])
def test_a_bad_answers_file_names_file_row_and_field(tmp_path, rows, message):
    f = tmp_path / "answers.json"
    f.write_text(json.dumps(rows))
    with pytest.raises(sources.AnswersError, match=str(f).replace(".", r"\.") + ".*" + message):
        sources.read_answers(str(f))


def _experiment(tmp_path: Path, tiny_model: Path) -> Path:
    prompts, _ = formats.read_rows(str(VICUNA), "eval")
    answers = tmp_path / "reference_outputs.json"
    answers.write_text(json.dumps([{"instruction": p["messages"][-1]["content"], "output": f"reference {i}",
                                    "generator": "ref"} for i, p in enumerate(prompts[:4])]))
    endpoint = {"api_base_env": "TEST_JUDGE_URL", "api_key_env": "TEST_JUDGE_KEY", "max_retries": 0}
    raw = {
        "run_dir": str(tmp_path / "run"),
        "generate": {"max_new_tokens": 6, "batch_size": 4, "cpus_per_actor": 1.0},
        "judge": {"backend": "openai", "model": "judge-model", **endpoint},
        "evaluate": {
            "models": [str(tiny_model), {"name": "org/served-model", "endpoint": endpoint}],
            "suites": {"vicuna": {"prompts": str(VICUNA), "max_prompts": 3,
                                  "baseline": {"name": "reference", "answers": str(answers)}}},
        },
        "resources": {"num_cpus": 2},
    }
    path = tmp_path / "evaluate.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_alignment_evaluate_judges_a_local_model_and_an_endpoint_against_an_answers_file(
        tmp_path, tiny_model, ray_local, fake_endpoint, capsys):
    path = _experiment(tmp_path, tiny_model)
    assert cli.main(["evaluate", "-c", str(path)]) == 0
    run = tmp_path / "run" / "evaluate"
    results = json.loads((run / "results.json").read_text())
    suite = results["suites"]["vicuna"]
    assert suite["protocol"] == "vicuna_pairwise" and suite["baseline"] == "reference"
    assert set(suite["models"]) == {tiny_model.name, "served-model"}
    for label, entry in suite["models"].items():
        m = entry["metrics"]
        assert m["prompts"] == 3 and m["win"] + m["tie"] + m["loss"] + m["invalid"] == 3, label
        assert entry["answers"]["counts"]["prompts_answered"] == 3
        verdicts = [json.loads(line) for line in (Path(entry["dir"]) / "verdicts.jsonl").read_text().splitlines()]
        assert len(verdicts) == 3 and Path(entry["dir"]).parent == run / "vicuna"
    # The served model answered through the endpoint, at the generate section's length, greedy.
    asked = [s["body"] for s in fake_endpoint if s["body"]["model"] == "org/served-model"]
    assert len(asked) == 3 and all(b["max_tokens"] == 6 and b["temperature"] == 0.0 for b in asked)
    served = next(Path(d) for d in (run / "vicuna" / "answers").iterdir() if d.name.startswith("served-model-"))
    rows = [json.loads(line) for line in (served / "answers.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["8 3\nbecause org/served-model"] * 3
    # The answers file is the baseline: its unused fourth answer is counted, its token counts are unknown.
    ref = next(d for d in (run / "vicuna" / "answers").iterdir() if d.name.startswith("reference-"))
    manifest = json.loads((ref / "manifest.json").read_text())
    assert manifest["counts"]["answers_unused"] == 1 and manifest["metrics"]["mean_new_tokens"] is None
    assert (run / "report.md").is_file()
    # Nothing holds the key.
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".md", ".html"):
            assert "sk-secret-123" not in f.read_text(), f
    # A re-run is skipped stage by stage: nothing is asked of the endpoint again.
    sent = len(fake_endpoint)
    capsys.readouterr()
    assert cli.main(["evaluate", "-c", str(path)]) == 0
    assert len(fake_endpoint) == sent
    assert all(m["skipped"] for m in json.loads(capsys.readouterr().out))


def test_alignment_evaluate_checks_answers_files_and_prompt_shapes_before_ray(tmp_path, tiny_model, capsys,
                                                                             monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_URL", "http://127.0.0.1:9/v1")
    path = _experiment(tmp_path, tiny_model)
    # Five prompts, and the answers file answers four.
    assert cli.main(["evaluate", "-c", str(path), "evaluate.suites.vicuna.max_prompts=5"]) == 2
    err = capsys.readouterr().err
    assert "evaluate.suites.vicuna.baseline on evaluate.suites.vicuna" in err and "no answer for 1 of the 5" in err
    # MT-Bench grading of prompts that are not MT-Bench questions.
    judge_prompts = shared("eval_prompts", "fastchat_judge_prompts.jsonl")
    assert cli.main(["evaluate", "-c", str(path), "evaluate.suites.vicuna.judge.protocol=mt_bench",
                     f"evaluate.suites.vicuna.judge.prompts={judge_prompts}"]) == 2
    assert "judge.protocol mt_bench grades MT-Bench questions" in capsys.readouterr().err
    # Two models with one label.
    assert cli.main(["evaluate", "-c", str(path), f"evaluate.models=[{tiny_model}, a/{tiny_model.name}]"]) == 2
    assert "would share the label" in capsys.readouterr().err
    assert cli.main(["evaluate", "-c", str(path), "evaluate.suites={}"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_a_served_model_answers_mt_bench_turn_by_turn_at_fastchats_temperatures(tmp_path, fake_endpoint):
    endpoint = {"api_base_env": "TEST_JUDGE_URL", "api_key_env": "TEST_JUDGE_KEY", "max_retries": 0}
    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", "generate.max_new_tokens=7",
        f"evaluate.suites={{mt: {{prompts: {MT_QUESTIONS}, max_prompts: 22}}}}"])
    served = EvalModelConfig(name="served", endpoint=endpoint)
    # Turn 1 of question 83 fails after its retries: the stage fails, keeping the answers that came.
    fake_endpoint.reply = lambda body: (500 if body["messages"][-1]["content"].startswith("Imagine you are writing a "
                                        "blog post comparing") else chat_completion(f"answer {len(body['messages'])}"))
    with pytest.raises(GenerationError, match=r"served: 1 of 22 requests .* failed after their retries"):
        pipeline.answers_stage(cfg.suite("mt"), served, "served", "evaluate/mt/answers")
    first = len(fake_endpoint)
    assert first == 22  # turn 1 of every question; turn 2 is never asked after a failed turn 1
    fake_endpoint.reply = lambda body: chat_completion(f"answer {len(body['messages'])}")
    done = pipeline.answers_stage(cfg.suite("mt"), served, "served", "evaluate/mt/answers")
    again = [s["body"] for s in fake_endpoint[first:]]
    assert len(again) == 1 + 22  # the failed turn 1, then every turn 2
    rows = {r["id"]: r for r in map(json.loads, Path(done["outputs"]["answers"]).read_text().splitlines())}
    prompts, _ = formats.read_rows(str(MT_QUESTIONS), "eval")
    for p in prompts[:22]:
        r = rows[p["id"]]
        assert r["turns"] == ["answer 1", "answer 3"]  # turn 2 follows the model's own turn-1 answer
        t = category_temperature(p["category"])
        asked = [b for b in fake_endpoint if b["body"]["messages"][0]["content"] == p["messages"][0]["content"]]
        for body in (s["body"] for s in asked):
            turn = (len(body["messages"]) + 1) // 2
            assert body["temperature"] == t and body["max_tokens"] == 7
            assert body.get("seed") == (turn_seed(cfg.seed, p["id"], turn) if t else None)
    assert {category_temperature(p["category"]) for p in prompts[:22]} == {0.7, 0.0}  # writing, roleplay; reasoning
    assert done["counts"]["empty_answers"] == 0 and done["metrics"]["mean_new_tokens"] == 5


def test_a_single_turn_protocol_refuses_a_conversation_before_ray(tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_URL", "http://127.0.0.1:9/v1")
    path = _experiment(tmp_path, tiny_model)
    convo = tmp_path / "conversations.jsonl"
    convo.write_text(json.dumps({"id": "c1", "messages": [{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": "Hi?"}]}) + "\n")
    assert cli.main(["evaluate", "-c", str(path), f"evaluate.suites.vicuna.prompts={convo}",
                     "evaluate.suites.vicuna.baseline=null", "evaluate.suites.vicuna.judge.protocol=alpaca_eval"]) == 2
    err = capsys.readouterr().err
    assert f"evaluate.suites.vicuna: {convo}: question c1: alpaca_eval judges single-turn" in err


SETS = {"vicuna": ("vicuna_test_set.jsonl", 80), "koala": ("koala_test_set.jsonl", 180),
        "self-instruct": ("sinstruct_test_set.jsonl", 252), "wizardlm": ("wizardlm_test_set.jsonl", 218),
        "lima": ("lima_test.jsonl", 300)}


def _longer_wins(body: dict) -> dict:
    """A judge that prefers the longer answer, in the format of the protocol that asked."""
    text = body["messages"][-1]["content"]
    mark = "A" if "Assistant A's Answer]" in text else "1"
    other = "B" if mark == "A" else "2"
    first, second = (text.split(f"Assistant {x}'s Answer]\n")[1].split(f"\n[The End of Assistant {x}'s")[0]
                     for x in (mark, other))
    if mark == "A":
        return chat_completion("[[A]]" if len(first) > len(second) else "[[B]]")
    return chat_completion("9 2" if len(first) > len(second) else "2 9")


def test_the_pairwise_protocols_on_the_five_prompt_sets_of_long_is_more(tmp_path, fake_endpoint):
    """Every prompt of Vicuna, Koala, Self-Instruct, WizardLM and LIMA judged in both orders by vicuna_pairwise
    and pair_v2 against a fake endpoint judge, from answers files: a model whose answers are longer wins all."""
    long, short, suites = {}, {}, {}
    for name, (file, _) in SETS.items():
        prompts, _ = formats.read_rows(str(shared("eval_prompts", file)), "eval")
        for p in prompts:
            text = p["messages"][-1]["content"]
            long[text], short[text] = f"a long and careful answer to: {text}", "no"
        suites[name] = {"prompts": str(shared("eval_prompts", file))}
        suites[f"{name}-v2"] = {"prompts": str(shared("eval_prompts", file)), "judge": {
            "protocol": "pair_v2", "prompts": str(shared("eval_prompts", "fastchat_judge_prompts.jsonl"))}}
    for path, answers in ((tmp_path / "long.json", long), (tmp_path / "short.json", short)):
        path.write_text(json.dumps([{"instruction": k, "output": v} for k, v in answers.items()]))
    for s in suites.values():
        s["baseline"] = {"name": "short", "answers": str(tmp_path / "short.json")}
    fake_endpoint.reply = _longer_wins
    cfg = ExperimentConfig.model_validate({
        "run_dir": str(tmp_path / "run"),
        "judge": {"backend": "openai", "model": "judge", "api_base_env": "TEST_JUDGE_URL",
                  "api_key_env": "TEST_JUDGE_KEY", "concurrency": 32},
        "evaluate": {"models": [{"name": "long", "answers": str(tmp_path / "long.json")}], "suites": suites}})
    pipeline.evaluate_models(cfg)
    results = json.loads((tmp_path / "run" / "evaluate" / "results.json").read_text())["suites"]
    for name, (_, n) in SETS.items():
        m, v2 = results[name]["models"]["long"]["metrics"], results[f"{name}-v2"]["models"]["long"]["metrics"]
        assert (m["prompts"], m["win"], m["win_rate"], m["order_disagreement_rate"]) == (n, n, 1.0, 0.0), name
        assert (v2["prompts"], v2["win"], v2["win_rate_adjusted"]) == (n, n, 1.0), name
    # A question two sets share (same text, same answers) is the same request: judged once, for both suites.
    earlier = sum(json.loads(p.read_text())["counts"]["endpoint_requests"]["answered_earlier"]
                  for p in (tmp_path / "run" / "evaluate").glob("*/long-*/manifest.json"))
    assert 4 * len(long) <= len(fake_endpoint) == 4 * 1030 - earlier < 4 * 1030


def test_a_generate_stages_answers_serve_mt_bench_and_must_answer_the_same_prompts(tmp_path):
    prompts, _ = formats.read_rows(str(MT_QUESTIONS), "eval")
    rows = [{"id": p["id"], "messages": p["messages"], "answer": f"one {p['id']}",
             "turns": [f"one {p['id']}", f"two {p['id']}"]} for p in prompts]
    f = tmp_path / "answers.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, unused = sources.match(prompts, sources.read_answers(str(f)), str(f))
    assert out[0]["turns"] == ["one 81", "two 81"] and unused == 0
    # The same ids from another prompt set: an error naming the row, not answers to the wrong questions.
    rows[3]["messages"] = [{"role": "user", "content": "Something else entirely"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(sources.AnswersError, match=r"row 3: id 84 answers another prompt than the suite's 84"):
        sources.match(prompts, sources.read_answers(str(f)), str(f))


def test_a_label_names_a_model_whose_path_ends_like_another(tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_URL", "http://127.0.0.1:9/v1")
    path = _experiment(tmp_path, tiny_model)
    twin = tmp_path / "other" / tiny_model.name
    twin.parent.mkdir()
    twin.symlink_to(tiny_model, target_is_directory=True)
    cfg = load_config(str(path), [f"evaluate.models=[{tiny_model}, {{name: {twin}, label: twin}}]"])
    assert [m.title for m in cfg.evaluate.models] == [tiny_model.name, "twin"]
    assert EvalModelConfig(name="runs/x/pref/k16-abc/checkpoint").title == "checkpoint"


def test_a_server_that_reports_no_usage_leaves_token_counts_unknown(tmp_path, fake_endpoint):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}",
                             f"evaluate.suites={{v: {{prompts: {VICUNA}, max_prompts: 2}}}}"])
    served = EvalModelConfig(name="served",
                             endpoint={"api_base_env": "TEST_JUDGE_URL", "api_key_env": "TEST_JUDGE_KEY"})
    fake_endpoint.reply = lambda body: {"choices": [{"message": {"content": "an answer"}}]}  # no "usage"
    done = pipeline.answers_stage(cfg.suite("v"), served, "served", "evaluate/v/answers")
    assert done["metrics"]["mean_new_tokens"] is None and "usage" in done["metrics"]["mean_new_tokens_reason"]
    assert done["metrics"]["mean_chars"] == len("an answer") and done["counts"]["empty_answers"] == 0
