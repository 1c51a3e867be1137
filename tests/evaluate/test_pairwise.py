"""Config validation and the pairwise judge's parsing and aggregation rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignment.evaluate import pairwise as judge
from alignment.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["quickstart.yaml", "cluster_example.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    points = cfg.search_grid()
    assert points and all(set(p) == {"k", "sft_step", "method", "num_pairs"} for p in points)


def test_unknown_key_names_the_key_and_file(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("sft:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "sft.max_stepz: unknown key" in str(e.value)


def test_bad_value_names_the_key(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("select:\n  k: -3\npref:\n  loss_type: dpo_plus\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "select.k" in msg and "pref.loss_type" in msg and "unknown loss_type 'dpo_plus'" in msg


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("sft:\n  max_steps: 10\n  save_steps: 5\n")
    cfg = load_config(p, ["sft.max_steps=20", "search.k=[8,16]", "pref.sft_step=10"])
    assert cfg.sft.max_steps == 20 and cfg.search.k == [8, 16] and cfg.sft.checkpoint_steps() == [5, 10, 15, 20]
    with pytest.raises(ConfigError, match="sft.max_steps"):
        load_config(p, ["sft.max_steps=zero"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(p, ["sft.max_steps"])


def test_dpo_from_a_step_that_is_never_saved_is_an_error(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("sft:\n  max_steps: 10\n  save_at: [4, 10]\nsearch:\n  sft_step: [4, 7]\n")
    with pytest.raises(ConfigError, match="SFT step 7 is never saved"):
        load_config(p)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("does/not/exist.yaml")


@pytest.mark.parametrize("text,expected", [
    ("8 7\nAssistant 1 is better.", (8.0, 7.0)),
    ("  9, 3", (9.0, 3.0)),
    ("Scores: 8/10 6/10", (8.0, 6.0)),
    ("\n10 9.5\n", (10.0, 9.5)),
    ("**7 7**", (7.0, 7.0)),
    ("Assistant 1 is better", None),
    ("8\n7", None),
    ("11 3", None),
    ("", None),
])
def test_parse_scores(text, expected):
    assert judge.parse_scores(text) == expected


@pytest.mark.parametrize("o1,o2,strict,summed", [
    (1, 1, "win", "win"), (-1, -1, "loss", "loss"), (1, -1, "tie", "tie"),
    (1, 0, "tie", "win"), (0, -1, "tie", "loss"), (0, 0, "tie", "tie"),
])
def test_strict_and_sum_rules(o1, o2, strict, summed):
    assert judge.combine(o1, o2, "strict") == strict
    assert judge.combine(o1, o2, "sum") == summed


def test_score_swaps_orders_and_counts_unparsed_as_invalid():
    questions = [{"id": q, "messages": [{"role": "user", "content": f"question {q}"}]} for q in "abcd"]
    reqs = judge.build_requests(questions, {q: f"T{q}" for q in "abcd"}, {q: f"B{q}" for q in "abcd"})
    assert [r["order"] for r in reqs[:2]] == [1, 2]
    assert "Tb" not in reqs[0]["messages"][-1]["content"] and "Ta" in reqs[0]["messages"][-1]["content"]
    first = reqs[1]["messages"][-1]["content"]
    assert first.index("Ba") < first.index("Ta")  # order 2: the target's answer is Assistant 2
    outs = [
        {"answer": "8 5"}, {"answer": "5 8"},  # a: target wins both orders
        {"answer": "8 5"}, {"answer": "8 5"},  # b: position bias -> orders disagree
        {"answer": "7 7"}, {"answer": "I think"},  # c: second order unparsed -> invalid
        {"answer": "3 9"}, {"answer": "9 3"},  # d: target loses both
    ]
    verdicts, s = judge.score(reqs, outs, "strict")
    assert [v["verdict"] for v in verdicts] == ["win", "tie", "invalid", "loss"]
    assert (s["win"], s["tie"], s["loss"], s["invalid"], s["valid"]) == (1, 1, 1, 1, 3)
    assert s["unparsed_judgements"] == 1 and s["win_rate"] == pytest.approx(1 / 3)
    assert s["order_disagreement_rate"] == pytest.approx(1 / 3) and s["rule"] == "strict"
    # sum: (+1, -1) is still a tie, the others as before
    assert [v["verdict"] for v in judge.score(reqs, outs, "sum")[0]] == ["win", "tie", "invalid", "loss"]


def test_an_endpoint_error_is_never_guessed():
    questions = [{"id": "a", "messages": [{"role": "user", "content": "q"}]}]
    reqs = judge.build_requests(questions, {"a": "t"}, {"a": "b"})
    outs = [{"answer": "", "error": "URLError: refused"}, {"answer": "5 8"}]
    verdicts, s = judge.score(reqs, outs, "sum")
    assert verdicts[0]["verdict"] == "invalid" and verdicts[0]["error"] == "URLError: refused"
    assert s["win_rate"] is None and s["valid"] == 0


def test_report_plot_names_only_what_the_search_varied(tmp_path):
    from alignment import report

    point = {"win": 2, "tie": 1, "loss": 1, "invalid": 0, "win_rate": 0.5, "method": "dpo", "num_pairs": 64}
    grid = [{**point, "k": k, "sft_step": s} for k in (16, 48) for s in (3, 6)]
    assert report.bar_labels(grid, "\n") == ["k=16\nstep=3", "k=16\nstep=6", "k=48\nstep=3", "k=48\nstep=6"]
    wider = [{**r, "method": m} for r in grid for m in ("dpo", "kto")]
    assert report.bar_labels(wider, ", ")[:2] == ["k=16, step=3, method=dpo", "k=16, step=3, method=kto"]
    png = report.plot(wider, "win_rate", tmp_path / "winrate.png")  # eight bars: on their side
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("uri,which", [("s3://AKIA:hunter2@bucket/runs", "user:password@"),
                                       ("s3://bucket/runs?region=eu-west-1&secret_key=hunter2", "secret_key")])
def test_credentials_in_the_storage_uri_are_refused_and_never_echoed(uri, which):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"resources.storage_path={uri}", "run_dir=/tmp/x"])
    assert f"credentials in the URI ({which})" in str(e.value) and "hunter2" not in str(e.value)
    assert "resources.storage_path" in str(e.value)
    assert load_config(None, ["resources.storage_path=s3://bucket/runs?region=eu-west-1"]).resources.storage_path
