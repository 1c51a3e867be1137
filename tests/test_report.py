"""The report's labels and plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignment import report


def test_report_plot_names_only_what_the_search_varied(tmp_path):
    point = {"win": 2, "tie": 1, "loss": 1, "invalid": 0, "win_rate": 0.5, "method": "dpo", "num_pairs": 64}
    grid = [{**point, "k": k, "sft_step": s} for k in (16, 48) for s in (3, 6)]
    assert report.bar_labels(grid, "\n") == ["k=16\nstep=3", "k=16\nstep=6", "k=48\nstep=3", "k=48\nstep=6"]
    wider = [{**r, "method": m} for r in grid for m in ("dpo", "kto")]
    assert report.bar_labels(wider, ", ")[:2] == ["k=16, step=3, method=dpo", "k=16, step=3, method=kto"]
    png = report.plot(wider, "win_rate", tmp_path / "winrate.png")  # eight bars: on their side
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------- alignment evaluate's report

PNG = b"\x89PNG\r\n\x1a\n"


def _pairwise_summary(outputs: list[tuple[str, str]]) -> dict:
    """The vicuna_pairwise judge's own summary of judge outputs (order 1, order 2) per question."""
    from alignment.config import JudgeConfig
    from alignment.evaluate import JUDGES

    judge, j = JUDGES["vicuna_pairwise"], JudgeConfig(rule="strict")
    questions = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"question {i}"}]}
                 for i in range(len(outputs))]
    reqs = judge.build(questions, {q["id"]: "target answer" for q in questions},
                       {q["id"]: "baseline answer" for q in questions}, j)
    return judge.score(reqs, [{"answer": a} for pair in outputs for a in pair], j)[1]


def _pair_v2_summary(outputs: list[tuple[str, str]]) -> dict:
    from alignment.evaluate import pair_v2

    reqs = [{"id": f"q{i}|{o}", "qid": f"q{i}", "order": o} for i in range(len(outputs)) for o in (1, 2)]
    return pair_v2.score(reqs, [{"answer": a} for pair in outputs for a in pair])[1]


def _mt_bench_summary(ratings: dict[str, list[tuple[str, str, int, int]]]) -> dict:
    """The mt_bench judge's summary of ratings per model: (category, question, turn, rating) per graded turn."""
    from alignment.evaluate import mt_bench

    reqs, outs = [], []
    for model, graded in ratings.items():
        for category, qid, turn, rating in graded:
            reqs.append({"id": f"{qid}|{model}|{turn}", "qid": qid, "model": model, "turn": turn,
                         "category": category, "prompt_name": "single-v1"})
            outs.append({"answer": f"Fine. Rating: [[{rating}]]"})
    return mt_bench.score(reqs, outs)[1]


def _answers(n: int, tokens: float) -> dict:
    return {"counts": {"prompts_answered": n, "empty_answers": 0}, "metrics": {"mean_new_tokens": tokens,
                                                                              "mean_chars": 4 * tokens}}


def _evaluate_results() -> dict:
    # sft: win, win, tie (the orders disagree), loss, invalid (order 1 unparsed); dpo: nothing parsed.
    vicuna_sft = _pairwise_summary([("8 3", "3 8"), ("8 3", "3 8"), ("8 3", "8 3"), ("3 8", "8 3"), ("oops", "3 8")])
    vicuna_dpo = _pairwise_summary([("oops", "oops"), ("no", "scores")])
    pair_sft = _pair_v2_summary([("[[A]]", "[[B]]"), ("[[A]]", "[[A]]"), ("[[B]]", "[[A]]")])
    mt_sft = _mt_bench_summary({"target": [("writing", "81", 1, 8), ("writing", "81", 2, 6), ("math", "111", 1, 4)],
                                "baseline": [("writing", "81", 1, 5), ("writing", "81", 2, 5), ("math", "111", 1, 2)]})
    # The alpaca_eval judge's summary keys (alignment.evaluate.alpaca_eval.score), numbers in percent.
    alpaca_sft = {"prompts": 5, "valid": 5, "invalid": 0, "win_rate": 0.6, "alpaca_win_rate": 60.0,
                  "alpaca_standard_error": 12.0, "lc_win_rate": None,
                  "lc_win_rate_reason": "too few prompts for the length-controlled fit", "lc_win_rate_estimate": 55.0,
                  "avg_length": 812, "baseline_avg_length": 640}

    def suite(protocol: str, models: dict[str, dict]) -> dict:
        return {"protocol": protocol, "prompts": "prompts.jsonl", "baseline": "base", "judge": f"{protocol} judge",
                "models": {m: {"metrics": s, "dir": f"judge/{m}", "answers": _answers(5, 30.5)}
                           for m, s in models.items()}}

    bench = {"model": "/ckpt/sft", "settings": {"model_type": "hf", "dtype": "float32", "limit": 8,
                                                 "apply_chat_template": True, "fewshot_as_multiturn": False},
             "tasks": {"arc_easy": {"metrics": {"acc": {"value": 0.4375, "stderr": 0.128},
                                                "acc_norm": {"value": 0.5, "stderr": None}},
                                    "settings": {"apply_chat_template": True, "num_fewshot": 5}}}}
    return {"suites": {"vicuna": suite("vicuna_pairwise", {"sft": vicuna_sft, "dpo": vicuna_dpo}),
                       "pair v2": suite("pair_v2", {"sft": pair_sft}),
                       "mt-bench": suite("mt_bench", {"sft": mt_sft}),
                       "alpaca": suite("alpaca_eval", {"sft": alpaca_sft})},
            "benchmarks": {"sft": bench}}


def _table(md: str, heading: str, key_cells: int = 1) -> dict[str, dict[str, str]]:
    """The first table after ``heading`` in the Markdown: rows by their first ``key_cells`` cells (joined by a
    space), cells by column heading."""
    lines = md[md.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    head, body = rows[0], rows[2:]
    return {" ".join(r[:key_cells]): dict(zip(head, r, strict=True)) for r in body}


def test_evaluate_report_tables_hold_the_judges_summaries(tmp_path):
    from alignment.evaluate import JUDGES

    paths = report.write_evaluate_report(_evaluate_results(), tmp_path)
    md = (tmp_path / "report.md").read_text()
    vicuna = _table(md, "## Suite vicuna")
    assert {k: vicuna["sft"][k] for k in ("win", "tie", "loss", "invalid", "win rate", "score", "orders disagree")} \
        == {"win": "2", "tie": "1", "loss": "1", "invalid": "1", "win rate": "0.500", "score": "0.625",
            "orders disagree": "0.250"}
    assert vicuna["sft"]["mean new tokens"] == "30.500" and vicuna["sft"]["answered"] == "5"
    # Nothing valid: the rates are n/a, never 0, with the reason beside the table.
    assert vicuna["dpo"]["win rate"] == vicuna["dpo"]["orders disagree"] == "n/a" and vicuna["dpo"]["invalid"] == "2"
    assert "- `dpo`: win rate, score, orders disagree n/a: no valid prompt" in md
    assert JUDGES["vicuna_pairwise"].note in md and "vicuna_pairwise judge" in md
    pair = _table(md, "## Suite pair v2")["sft"]
    assert (pair["win"], pair["tie"], pair["loss"], pair["win rate adjusted"]) == ("1", "1", "1", "0.500")
    mt = _table(md, "## Suite mt-bench")["sft"]
    assert (mt["MT-Bench"], mt["turn 1"], mt["turn 2"], mt["baseline"], mt["delta"]) \
        == ("6.000", "6.000", "6.000", "4.000", "2.000")
    # AlpacaEval: a length-controlled win rate left null is n/a with its reason and the estimate, never 0.
    alpaca = _table(md, "## Suite alpaca")["sft"]
    summary = _evaluate_results()["suites"]["alpaca"]["models"]["sft"]["metrics"]
    heading = dict(report.suite_columns("alpaca_eval", [summary]))
    assert alpaca[heading["alpaca_win_rate"]] == "60.000" and alpaca[heading["lc_win_rate"]] == "n/a"
    assert alpaca[heading["lc_win_rate_estimate"]] == "55.000" and alpaca[heading["avg_length"]] == "812"
    assert "too few prompts for the length-controlled fit" in md
    page = (tmp_path / "report.html").read_text()
    assert "too few prompts for the length-controlled fit" in page and "<td>0.625</td>" in page
    assert page.count("data:image/png;base64,") == len(paths) - 2


def test_evaluate_report_plots_by_protocol(tmp_path):
    paths = report.write_evaluate_report(_evaluate_results(), tmp_path)
    # MT-Bench gets its per-category plot, the pairwise suites their verdict bars; neither the other.
    assert sorted(k for k in paths if ":" in k) == ["categories:mt-bench", "verdicts:pair v2", "verdicts:vicuna"]
    for key in ("markdown", "html", "categories:mt-bench", "verdicts:pair v2", "verdicts:vicuna"):
        assert (tmp_path / paths[key]).stat().st_size > 0
    for key in ("categories:mt-bench", "verdicts:pair v2", "verdicts:vicuna"):
        assert (tmp_path / paths[key]).read_bytes()[:8] == PNG
    md = (tmp_path / "report.md").read_text()
    assert "![mt-bench: MT-Bench per category](mt-bench_categories.png)" in md
    assert "pair_v2_verdicts.png" in md and "mt-bench_verdicts" not in md


def test_evaluate_report_shows_missing_models_and_lm_eval_numbers(tmp_path):
    report.write_evaluate_report(_evaluate_results(), tmp_path)
    md = (tmp_path / "report.md").read_text()
    # dpo was judged on one suite only and has no benchmark: listed as missing everywhere else.
    mt = _table(md, "## Suite mt-bench")
    assert set(mt["dpo"].values()) == {"dpo", "missing"} and "- `dpo`: missing, not judged on this suite." in md
    bench = _table(md, "## Benchmarks", key_cells=2)
    assert bench["arc_easy acc"] == {"task": "arc_easy", "metric": "acc", "few-shot": "5", "chat template": "yes",
                                 "sft": "0.438 ± 0.128", "dpo": "missing"}
    assert "0.500 ± n/a" in md  # acc_norm: no stderr from lm-eval
    assert "- `dpo`: missing (no benchmark results for it)." in md


def test_evaluate_report_without_benchmarks_or_suites(tmp_path):
    paths = report.write_evaluate_report({"suites": {}, "benchmarks": {}}, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "No judge suites." in md and "No lm-eval benchmarks in these results." in md
    assert set(paths) == {"markdown", "html"}


def test_the_plot_scale_knows_fractions_from_percentages():
    assert all(report.is_fraction(m) for m in ("win_rate", "score", "win_rate_adjusted", "pref_accuracy",
                                               "vicuna/win_rate", "order_disagreement_rate", "verbosity_agreement"))
    assert not any(report.is_fraction(m) for m in ("alpaca_win_rate", "lc_win_rate", "alpaca/lc_win_rate",
                                                   "mt_bench", "pref_margin", "mt/mt_bench"))


# ------------------------------------------------------------------- the search's report: ASHA, SFT steps, baseline


def _search_cfg(**search) -> dict:
    from alignment.config import ExperimentConfig, config_dict

    cfg = config_dict(ExperimentConfig())
    cfg["search"].update({"metric": "pref_accuracy", "algorithm": "grid", "scheduler": "fifo", "num_samples": 1,
                          "baseline_selection": None, "baseline_seeds": None, **search})
    return cfg


def _row(trial: str, k: int, step: int, metric: float | None, **kw) -> dict:
    """A search result row as the search writes it (held-out metric, no judge verdicts)."""
    return {"trial_id": trial, "k": k, "sft_step": step, "method": "dpo", "num_pairs": 64, "beta": None,
            "metric": metric, "pref_accuracy": metric, "pref_margin": None if metric is None else 2 * metric,
            "selection": "length", "baseline": False, "selection_seed": None, "stopped_early": False,
            "sft_metric": None if metric is None else metric / 2, "sft_metric_reason": None, **kw}


def _asha_rows() -> list[dict]:
    # tA walks all three steps; tB is stopped by ASHA after step 3; tC peaks at step 6.
    return [_row("tA", 16, 3, 0.2), _row("tA", 16, 6, 0.4), _row("tA", 16, 9, 0.5),
            _row("tB", 48, 3, 0.6, stopped_early=True),
            _row("tC", 48, 3, 0.3), _row("tC", 48, 6, 0.7), _row("tC", 48, 9, 0.65)]


def test_search_report_sft_step_plot_best_line_and_asha_count(tmp_path):
    rows = _asha_rows()
    # A random-baseline row above every selection row: not the best (the manifest's best excludes it too).
    rows.append(_row("tR", 48, 6, 0.9, selection="random", baseline=True, selection_seed=0))
    assert report.best_row(rows) is rows[5]
    assert report.trial_counts(rows) == (1, 4)
    # A baseline trial that happens to share a trial id with the search's is a trial of its own.
    assert report.trial_counts([*rows, _row("tA", 16, 3, 0.1, baseline=True)]) == (1, 5)
    paths = report.write_report(rows, _search_cfg(scheduler="asha"), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "Best: pref_accuracy = 0.700 at k = 48, SFT step = 6, method = dpo, pairs = 64, selection = length " \
           "(trial tC)" in md
    assert "1 of 4 trials stopped early by ASHA." in md
    table = _table(md, "| trial |", key_cells=3)  # a row per trial and SFT step
    assert len(table) == 8
    assert table["tB 48 3"]["stopped early"] == "yes" and table["tC 48 3"]["stopped early"] == "no"
    assert table["tC 48 6"]["pref_accuracy of the SFT checkpoint alone"] == "0.350"
    assert table["tR 48 6"]["selection"] == "random" and table["tR 48 6"]["seed"] == "0"
    # The SFT-step plot: written, in the Markdown and inlined in the HTML, with its caption.
    png = tmp_path / "sft_steps.png"
    assert paths["sft_steps"] == str(png) and png.read_bytes()[:8] == PNG and png.stat().st_size > 20_000
    assert "![pref_accuracy against the SFT step](sft_steps.png)" in md
    assert "dashed the SFT checkpoint alone" in md and "Hollow markers: points of trials the scheduler (ASHA)" in md
    assert "measured against model.base (`smollm2-135m-instruct`)" in md  # a held-out metric: the reference differs
    page = (tmp_path / "report.html").read_text()
    assert page.count("<img ") == 3 and "alt='pref_accuracy against the SFT step'" in page
    # The hollow markers of the stopped trial are drawn: the plot differs without them.
    other = report.plot_sft_steps([{**r, "stopped_early": False} for r in rows], "pref_accuracy",
                                  tmp_path / "unstopped.png")
    assert other.read_bytes() != png.read_bytes()


def test_search_report_selection_against_random_per_k(tmp_path):
    beta = {"beta": 0.1}
    rows = [_row("s1", 16, 3, 0.5, **beta), _row("s1", 16, 6, 0.55, **beta),
            _row("s2", 16, 3, 0.45, beta=0.3), _row("s2", 16, 6, 0.6, beta=0.3),
            _row("s3", 48, 6, 0.7, **beta)]

    def rnd(trial: str, k: int, step: int, value: float, seed: int) -> dict:
        return _row(trial, k, step, value, selection="random", baseline=True, selection_seed=seed, **beta)

    # Each seed's best at k = 16: 0.4, 0.3, 0.5 (mean 0.4, sample std 0.1); at k = 48 one seed so far: 0.55.
    rows += [rnd("r0", 16, 3, 0.2, 0), rnd("r0", 16, 6, 0.4, 0), rnd("r1", 16, 3, 0.3, 1), rnd("r2", 16, 6, 0.5, 2),
             rnd("r3", 48, 6, 0.55, 0)]
    comparison = report.selection_vs_random(rows)
    assert [c["k"] for c in comparison] == [16, 48]
    assert comparison[0]["selection"] == 0.6 and comparison[0]["random_mean"] == pytest.approx(0.4)
    assert comparison[0]["random_std"] == pytest.approx(0.1) and comparison[0]["seeds"] == 3
    assert comparison[0]["difference"] == pytest.approx(0.2)
    assert comparison[1]["random_std"] is None and comparison[1]["difference"] == pytest.approx(0.15)

    paths = report.write_report(rows, _search_cfg(baseline_selection="random", baseline_seeds=[0, 1, 2]), tmp_path)
    md = (tmp_path / "report.md").read_text()
    table = _table(md, "## Selection vs random selection")
    assert table["16"] == {"k": "16", "length (best)": "0.600", "best at": "SFT step = 6, method = dpo, pairs = 64, "
                           "beta = 0.3", "rows": "4", "random (mean over seeds)": "0.400", "difference": "+0.200",
                           "random spread": "std 0.100, n = 3 seeds"}
    assert table["48"]["difference"] == "+0.150" and table["48"]["random spread"] == "one seed (of 3)"
    assert "Search: grid search, scheduler fifo, a random-selection baseline" in md
    assert "stopped early" not in md  # no trial was
    png = tmp_path / "selection_vs_random.png"
    assert paths["selection_vs_random"] == str(png) and png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
    assert "![length vs random selection](selection_vs_random.png)" in md
    assert "alt='length vs random selection'" in (tmp_path / "report.html").read_text()
    # The best line leaves the baseline out: 0.7 at k = 48 is the selection's.
    assert "Best: pref_accuracy = 0.700 at k = 48" in md


def test_search_report_leaves_out_sections_without_their_data(tmp_path):
    # First written with several steps and a baseline, then rewritten from rows at one step without one: the
    # sections and their plots go.
    rows = [*_asha_rows(), _row("tR", 16, 3, 0.1, selection="random", baseline=True, selection_seed=0)]
    report.write_report(rows, _search_cfg(), tmp_path)
    assert (tmp_path / "sft_steps.png").is_file() and (tmp_path / "selection_vs_random.png").is_file()
    one_step = [{k: v for k, v in _row(f"t{k}", k, 6, 0.5).items() if k not in ("trial_id", "stopped_early")}
                for k in (16, 48)]
    paths = report.write_report(one_step, _search_cfg(), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "No SFT-step plot: every row is at SFT step 6." in md
    assert not (tmp_path / "sft_steps.png").exists() and "sft_steps" not in paths
    assert "Selection vs random" not in md and not (tmp_path / "selection_vs_random.png").exists()
    assert "selection_vs_random" not in paths
    assert "stopped early" not in md and "| trial |" not in md and "| seed |" not in md and "| beta |" not in md
    assert (tmp_path / "report.html").read_text().count("<img ") == 1


def test_search_report_renders_partial_and_failed_rows(tmp_path):
    rows = [_row("t1", 16, 3, 0.5, sft_metric=None, sft_metric_reason="no SFT checkpoint at step 3"),
            {**_row("t2", 16, 6, None), "error": "CUDA out of memory in pref", "exit_code": 1},
            {**_row("t3", 48, 3, None), "heldout_reason": "no held-out pairs (pref.eval_rows is 0)"},
            {"trial_id": "t4", "k": 48}]  # a trial that has reported nothing yet
    paths = report.write_report(rows, _search_cfg(metric="pref_margin", scheduler="asha"), tmp_path, partial=True)
    md = (tmp_path / "report.md").read_text()
    assert "The search is still running: 4 rows of 4 trials so far" in md
    assert "Best so far: pref_margin = 0.500 at k = 16, SFT step = 3" in md
    assert "0 of 4 trials stopped early by ASHA." in md
    assert "- k = 16, SFT step = 6, method = dpo, pairs = 64, selection = length failed: CUDA out of memory in " \
           "pref" in md
    assert "- k = 48, SFT step = 3, method = dpo, pairs = 64, selection = length: pref_margin n/a: no held-out pairs " \
           "(pref.eval_rows is 0)" in md
    assert "1 row has no pref_margin and no recorded reason." in md
    assert "SFT checkpoint alone n/a in 1 row: no SFT checkpoint at step 3" in md
    table = _table(md, "| trial |", key_cells=1)
    assert table["t4"]["SFT step"] == "n/a" and table["t2"]["held-out margin"] == "n/a"
    assert Path(paths["html"]).is_file() and Path(paths["sft_steps"]).stat().st_size > 10_000
    # Nothing reported yet at all.
    empty = report.write_report([], _search_cfg(), tmp_path / "empty", partial=True)
    md = Path(empty["markdown"]).read_text()
    assert "No trial has reported yet." in md and "No SFT-step plot: no row has an SFT step yet." in md
