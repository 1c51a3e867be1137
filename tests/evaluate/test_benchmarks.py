"""Benchmarks through lm-eval: BIG-bench JSON tasks offline, custom task YAMLs, the preset, the Ray edge."""

from __future__ import annotations

import gzip
import json

import pytest
import yaml
from conftest import shared, write_jsonl

from alignment import models
from alignment.config import BENCHMARK_PRESETS, BenchmarksConfig, ConfigError, load_config
from alignment.evaluate import benchmarks
from alignment.evaluate.benchmarks import BenchmarkError, bigbench_task, run_lm_eval


def bigbench_file(*parts: str):
    return shared("eval_tasks", "bigbench", *parts)


def custom_task(tmp_path):
    """A custom lm-eval task as a user writes one: a local JSONL and a multiple-choice YAML."""
    rows = [{"q": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)], "label": 0}
            for a, b in [(1, 2), (2, 2), (3, 1), (4, 4), (5, 2), (6, 1)]]
    data = write_jsonl(tmp_path / "custom" / "sums.jsonl", rows)
    files = {"data_files": {"test": str(data)}, "cache_dir": str(tmp_path / "hf-datasets")}  # not in the home
    task = {"task": "sums_custom", "dataset_path": "json", "dataset_kwargs": files,
            "test_split": "test", "fewshot_split": "test", "output_type": "multiple_choice",
            "doc_to_text": "Question: {{q}}\nAnswer:", "doc_to_choice": "{{choices}}", "doc_to_target": "label",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    (tmp_path / "custom" / "sums.yaml").write_text(yaml.safe_dump(task))
    return "sums_custom", tmp_path / "custom"


def test_bigbench_causal_judgment_as_an_lm_eval_task(tmp_path):
    src = bigbench_file("causal_judgment.json.gz")
    published = json.loads(gzip.decompress(src.read_bytes()))
    name, d = bigbench_task(src, tmp_path)
    assert name == "bigbench_json_causal_judgment" and d.parent == tmp_path / "lm_eval_tasks"
    rows = [json.loads(line) for line in (d / f"{name}.jsonl").read_text().splitlines()]
    assert len(rows) == len(published["examples"]) == 190
    assert all(r["choices"] == ["Yes", "No"] for r in rows)
    for r, ex in zip(rows, published["examples"]):
        assert r["input"] == "\nQ: " + ex["input"] + "\nA: "  # no choices listed: append_choices_to_input false
        assert [r["choices"][i] for i in r["gold"]] == [c for c, s in ex["target_scores"].items() if s == 1]
        assert r["answer"] == r["choices"][r["gold"][0]]
    assert sum(r["gold"] == [0] for r in rows) == sum(ex["target_scores"]["Yes"] for ex in published["examples"])
    spec = yaml.safe_load((d / f"{name}.yaml").read_text())
    assert spec["description"] == published["task_prefix"] and spec["output_type"] == "multiple_choice"
    assert spec["target_delimiter"] == "" and spec["fewshot_delimiter"] == "\n"
    # written once: the same content is the same directory, untouched
    before = (d / f"{name}.jsonl").stat().st_mtime_ns
    assert bigbench_task(src, tmp_path) == (name, d) and (d / f"{name}.jsonl").stat().st_mtime_ns == before

    # lm-eval reads it offline, and builds BIG-bench's prompt: prefix once, shots from other examples, then Q/A
    from lm_eval.tasks import TaskManager

    task = TaskManager(include_path=str(d), include_defaults=False).load([name])["tasks"][name]
    docs = list(task.test_docs())
    assert len(docs) == 190 and task.doc_to_choice(docs[0]) == ["Yes", "No"] and task.doc_to_target(docs[0]) == [0]
    task.set_fewshot_seed(1234)
    ctx = task.fewshot_context(docs[5], num_fewshot=2)
    assert ctx.startswith(published["task_prefix"] + "\nQ: ") and ctx.count("\nQ: ") == 3
    assert ctx.endswith("\nQ: " + published["examples"][5]["input"] + "\nA: ")
    shots = ctx[len(published["task_prefix"]):-len(docs[5]["input"])].split("\nA: ")[1:]
    assert [s.split("\n")[0] for s in shots] in (["Yes", "Yes"], ["Yes", "No"], ["No", "Yes"], ["No", "No"])


@pytest.mark.parametrize("content, where", [
    (b"{not json", "not a BIG-bench JSON task"),
    ({"name": "x"}, r"field 'examples' must be a non-empty list of examples \(missing\)"),
    ({"examples": [{"input": "a", "target_scores": {"y": 1, "n": 0}}, {"input": "b"}]},
     r"bad\.json\.gz: example 1: field 'target_scores' must map .* \(missing: only multiple-choice"),
    ({"examples": [{"input": 3, "target_scores": {"y": 1, "n": 0}}]}, r"example 0: field 'input' must be a string"),
    ({"examples": [{"input": "a", "target_scores": {"y": 0.5, "n": 0}}]}, r"example 0: .*'y' the score 0\.5"),
    ({"examples": [{"input": "a", "target_scores": {"y": 0, "n": 0}}]}, r"example 0: .*no choice scored 1"),
    ({"task_prefix": 1, "examples": []}, r"field 'task_prefix' must be a str"),
])
def test_a_malformed_bigbench_file_is_an_error_naming_file_example_and_field(tmp_path, content, where):
    path = tmp_path / "bad.json.gz"
    path.write_bytes(gzip.compress(content if isinstance(content, bytes) else json.dumps(content).encode()))
    with pytest.raises(BenchmarkError, match=where) as e:
        bigbench_task(path, tmp_path / "cache")
    assert str(path) in str(e.value)
    assert not (tmp_path / "cache").exists()  # nothing half-written


def test_config_section_and_presets():
    assert tuple(benchmarks.PRESETS) == BENCHMARK_PRESETS
    cfg = load_config(None, ["evaluate.benchmarks.tasks=[preset:open_llm_v1, 'bigbench:rel/task.json']",
                             "evaluate.benchmarks.include_path=[tasks]"])
    bench = cfg.evaluate.benchmarks
    assert bench.tasks[0] == "preset:open_llm_v1" and bench.tasks[1].startswith("bigbench:/")
    assert bench.include_path[0].startswith("/") and bench.limit is None and bench.apply_chat_template is False
    for bad, msg in [("evaluate.benchmarks.tasks=[preset:nope]", "unknown preset 'nope'"),
                     ("evaluate.benchmarks.model_args={dtype: float16}", "dtype has its own key"),
                     ("evaluate.benchmarks.limit=0", "evaluate.benchmarks.limit")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [bad])
    runs = benchmarks.resolve_tasks(["preset:alignment_studies"], BenchmarksConfig())
    assert [(r.name, r.num_fewshot, r.metric) for r in runs[:6]] == [
        ("arc_challenge", 25, "acc_norm"), ("hellaswag", 10, "acc_norm"), ("mmlu", 5, "acc"),
        ("truthfulqa_mc2", 0, "acc"), ("winogrande", 5, "acc"), ("gsm8k", 5, "exact_match,strict-match")]
    assert len(runs) == 10 and runs[6].name == "openbookqa"
    # a task named twice runs once; the same name with another few-shot count is an error, not a silent pick
    assert len(benchmarks.resolve_tasks(["preset:bbh", "preset:alignment_studies"], BenchmarksConfig())) == 10
    with pytest.raises(BenchmarkError, match="'openbookqa' comes from both 'preset:openbookqa' and 'openbookqa'"):
        benchmarks.resolve_tasks(["preset:openbookqa", "openbookqa"], BenchmarksConfig())


def test_preset_tasks_exist_in_the_installed_lm_eval_and_unknown_names_are_errors():
    names = [p.task for p in benchmarks.PRESETS["alignment_studies"]]
    # one index of lm-eval's registry (seconds): every preset name must pass before the misspelt one fails
    with pytest.raises(BenchmarkError, match=r"unknown lm-eval task 'arc_challange'; near: arc_challenge"):
        benchmarks.task_manager([], [*names, "arc_challange"])


@pytest.mark.slow
def test_smollm2_bigbench_and_custom_task_match_simple_evaluate(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    smollm2 = str(models.prepare("smollm2-135m-instruct"))
    custom, custom_dir = custom_task(tmp_path)
    settings = BenchmarksConfig(include_path=[str(custom_dir)], num_fewshot=2, limit=6, apply_chat_template=True,
                                dtype="float32", batch_size=8)
    sports = bigbench_file("sports_understanding.json.gz")
    ours = run_lm_eval(smollm2, [f"bigbench:{sports}", custom], settings, cache_dir=tmp_path)

    bb_name, bb_dir = bigbench_task(sports, tmp_path)
    direct = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": smollm2, "dtype": "float32"}, tasks=[bb_name, custom], num_fewshot=2,
        limit=6, apply_chat_template=True, fewshot_as_multiturn=True, batch_size=8, device="cpu",
        task_manager=TaskManager(include_path=[str(bb_dir), str(custom_dir)], include_defaults=False))
    assert set(ours["tasks"]) == {bb_name, custom}
    for name, metrics in [(bb_name, ["acc"]), (custom, ["acc", "acc_norm"])]:
        got = ours["tasks"][name]
        assert sorted(got["metrics"]) == metrics
        for m in metrics:
            assert got["metrics"][m]["value"] == direct["results"][name][f"{m},none"]
            assert got["metrics"][m]["stderr"] == direct["results"][name][f"{m}_stderr,none"]
        s = got["settings"]
        assert (s["num_fewshot"], s["limit"], s["apply_chat_template"], s["fewshot_as_multiturn"], s["dtype"]) == (
            2, 6, True, True, "float32")
        assert s["fewshot_seed"] == 1234 and s["lm_eval"] and got["samples"]["effective"] == 6
    assert ours["tasks"][bb_name]["spec"] == f"bigbench:{sports}" and ours["tasks"][bb_name]["metric"] == "acc"


@pytest.mark.integration
def test_benchmark_remote_runs_a_ray_task_per_model(tmp_path, tiny_model, ray_local):
    custom, custom_dir = custom_task(tmp_path)
    section = BenchmarksConfig(tasks=[custom, f"bigbench:{bigbench_file('sports_understanding.json.gz')}"],
                               include_path=[str(custom_dir)], limit=4, dtype="float32", num_cpus=1)
    local = run_lm_eval(str(tiny_model), section.tasks, section, cache_dir=tmp_path)
    out = benchmarks.benchmark_remote([str(tiny_model)], section, cache_dir=tmp_path)
    assert list(out) == [str(tiny_model)]
    remote = out[str(tiny_model)]
    assert {n: t["metrics"] for n, t in remote["tasks"].items()} == {n: t["metrics"] for n, t in local["tasks"].items()}
    assert remote["tasks"][custom]["settings"]["num_fewshot"] == 0 and remote["settings"]["device"] == "cpu"
    # the project's own error raised inside the Ray task reaches the caller as itself
    bad = section.model_copy(update={"include_path": [str(tmp_path / "no-such-dir")]})
    with pytest.raises(BenchmarkError, match="no-such-dir is not a directory"):
        benchmarks.evaluate(str(tiny_model), bad, cache_dir=tmp_path)


@pytest.mark.integration
def test_alignment_evaluate_runs_each_model_once_into_its_stage_directory(tmp_path, tiny_model, ray_local, capsys):
    from alignment import cli

    custom, custom_dir = custom_task(tmp_path)
    exp = {"run_dir": str(tmp_path / "run"),
           "evaluate": {"models": [str(tiny_model)],
                        "benchmarks": {"tasks": [custom], "include_path": [str(custom_dir)], "limit": 4,
                                       "dtype": "float32", "num_cpus": 1}}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    assert cli.main(["evaluate", "-c", str(path)]) == 0
    (first,) = json.loads(capsys.readouterr().out)
    assert first["stage"] == "evaluate/benchmarks" and not first["skipped"]
    results = json.loads(open(first["outputs"]["results"]).read())
    assert results["tasks"][custom]["settings"]["limit"] == 4
    assert first["metrics"][f"{custom}/acc"] == results["tasks"][custom]["metrics"]["acc"]["value"]
    assert cli.main(["evaluate", "-c", str(path)]) == 0
    (again,) = json.loads(capsys.readouterr().out)
    assert again["skipped"] and again["dir"] == first["dir"]  # the same model and settings: finished, skipped
    assert cli.main(["evaluate", "-c", str(path), "evaluate.benchmarks.limit=3"]) == 0
    (fewer,) = json.loads(capsys.readouterr().out)
    assert not fewer["skipped"] and fewer["dir"] != first["dir"]  # another setting: another stage
    # Nothing to evaluate, or a BIG-bench file that is not there: a config error before Ray work starts.
    assert cli.main(["evaluate", "-c", str(path), "evaluate.models=[]"]) == 2
    assert "evaluate.models is empty" in capsys.readouterr().err
    assert cli.main(["evaluate", "-c", str(path), f"evaluate.benchmarks.tasks=[bigbench:{tmp_path}/nope.json]"]) == 2
    assert "file not found" in capsys.readouterr().err
