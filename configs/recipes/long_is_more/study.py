"""Long Is More (Zhao et al., ICML 2024) as one command: select and fine-tune each selection, then judge them.

    python configs/recipes/long_is_more/study.py --config configs/recipes/long_is_more/llama2_7b.yaml [key=value ...]
    ray job submit --address $HEAD --working-dir . -- python configs/recipes/long_is_more/study.py \
        --config configs/recipes/long_is_more/llama2_7b.yaml run_dir=/mnt/shared/runs/long-is-more-llama2-7b

The study is supervised fine-tuning only (no preference tuning), so it is not a search: for each selection of
``STRATEGIES`` (the config as it is: the k longest; then random, quality and diversity, as overrides of it) and for
the full set (``--full-config``, by default ``<config>_full.yaml`` beside it) it runs the select and sft stages,
then ``alignment evaluate`` with every k-row model in ``evaluate.models`` and the full-data model as the baseline of
every suite that has none (the five pairwise sets and MT-Bench), and once more for the full-data model alone on the
suites with a baseline of their own (AlpacaEval 2, in ``<run_dir>/full_model/``). Every stage is the pipeline's,
in the config's run directory: a finished one is skipped, so running the command again resumes the study.
``<run_dir>/study/summary.md`` (and ``.json``) puts the numbers side by side: per selection, win/tie/loss against
the full-data model on each set and on the five together, MT-Bench, AlpacaEval 2.

Overrides (``key=value``, as for ``alignment``) apply to both configs; ``--random-seeds 1 2 3`` trains one random
selection per seed (``select.seed``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root (ray job's working dir)

from alignment import pipeline  # noqa: E402
from alignment.config import ConfigError, EvalModelConfig, ExperimentConfig, load_config  # noqa: E402
from alignment.errors import AlignmentError, unwrap  # noqa: E402
from alignment.manifest import write_json  # noqa: E402

log = logging.getLogger("alignment")

# The selections of the study, each the config with these overrides: the longest responses (the config itself),
# random rows, the rows an LLM rates best (1-5) and rows spread evenly over k-means clusters of the trained model's
# mean hidden states (random within each cluster).
STRATEGIES: dict[str, list[str]] = {
    "longest": [],
    "random": ["select.scorers=[random]"],
    "quality": ["select.scorers=[rating]"],
    "diversity": ["select.scorers=[random]", "select.selector=kmeans"],
}
FULL = "full"
PAIRWISE = ("vicuna_pairwise", "pair_v2")


def strategies(seeds: list[int] | None, only: list[str] | None = None) -> dict[str, list[str]]:
    """The selections to train: ``STRATEGIES`` (those named in ``only``, if given), with one random selection per
    seed where seeds are given."""
    unknown = sorted(set(only or []) - set(STRATEGIES))
    if unknown:
        raise ConfigError(f"--only: unknown selection {', '.join(unknown)}; the study's are {', '.join(STRATEGIES)}")
    out: dict[str, list[str]] = {}
    for name, extra in STRATEGIES.items():
        if only and name not in only:
            continue
        if name == "random" and seeds:
            out.update({f"random-seed{s}" if len(seeds) > 1 else "random": [*extra, f"select.seed={s}"]
                        for s in seeds})
        else:
            out[name] = extra
    return out


def _checkpoint(sft: dict[str, Any]) -> str:
    return sft["outputs"]["checkpoints"][-1]["path"]


def train(config: ExperimentConfig) -> dict[str, Any]:
    """The select and sft stages of ``config``: ``{select, sft, checkpoint}`` (manifests, the last checkpoint)."""
    sel = pipeline.select_stage(config)
    sft = pipeline.sft_stage(config)
    return {"select": sel, "sft": sft, "checkpoint": _checkpoint(sft)}


def evaluation(cfg: ExperimentConfig, trained: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``alignment evaluate`` on the k-row models against the full-data model, then the full-data model on the
    suites with a baseline of their own: ``{"selections": results.json, "full": results.json}``."""
    ev = cfg.model_copy(deep=True)
    full = EvalModelConfig(name=trained[FULL]["checkpoint"], label=FULL)
    ev.evaluate.models = [EvalModelConfig(name=t["checkpoint"], label=name)
                          for name, t in trained.items() if name != FULL]
    for suite in ev.evaluate.suites.values():
        if suite.baseline is None:
            suite.baseline = full
    pipeline.evaluate_models(ev)
    out = {"selections": json.loads((Path(ev.run_dir) / "evaluate" / "results.json").read_text())}
    own = {name: s for name, s in cfg.evaluate.suites.items() if s.baseline is not None}
    if own or cfg.evaluate.benchmarks.tasks:
        fe = cfg.model_copy(deep=True)
        fe.run_dir = str(Path(cfg.run_dir) / "full_model")
        fe.evaluate.suites = own
        fe.evaluate.models = [full]
        pipeline.evaluate_models(fe)
        out["full"] = json.loads((Path(fe.run_dir) / "evaluate" / "results.json").read_text())
    return out


def _rates(counts: dict[str, int]) -> dict[str, Any]:
    valid = counts["valid"]
    return {**counts, **{f"{k}_rate": (counts[k] / valid if valid else None) for k in ("win", "tie", "loss")}}


def summarize(cfg: ExperimentConfig, trained: dict[str, dict[str, Any]], results: dict[str, Any]) -> dict[str, Any]:
    """Per model: the selection's size and scorer, win/tie/loss against the full-data model on each pairwise suite
    and on all of them together, MT-Bench and AlpacaEval 2."""
    rows: dict[str, dict[str, Any]] = {}
    for name, t in trained.items():
        s = t["select"]
        rows[name] = {"checkpoint": t["checkpoint"], "rows_selected": s["counts"].get("rows_selected"),
                      "scorers": s["config"]["scorers"], "selector": s["config"]["selector"],
                      "sft_steps": t["sft"]["outputs"]["checkpoints"][-1]["step"], "pairwise": {}}
    every = [*results["selections"]["suites"].items(), *results.get("full", {}).get("suites", {}).items()]
    for suite, entry in every:
        for label, m in entry["models"].items():
            metrics, row = m["metrics"], rows[label]
            if entry["protocol"] in PAIRWISE:
                row["pairwise"][suite] = _rates({k: metrics[k] for k in ("win", "tie", "loss", "valid", "invalid")})
            elif entry["protocol"] == "mt_bench":
                row["mt_bench"] = metrics.get("mt_bench")
                rows[FULL]["mt_bench"] = metrics.get("mt_bench_baseline")  # the baseline, graded beside each
            elif entry["protocol"] == "alpaca_eval":
                row.update(alpaca_win_rate=metrics.get("alpaca_win_rate"), lc_win_rate=metrics.get("lc_win_rate"),
                           lc_win_rate_estimate=metrics.get("lc_win_rate_estimate"))
    for row in rows.values():
        if row["pairwise"]:
            row["pairwise_all"] = _rates({k: sum(p[k] for p in row["pairwise"].values())
                                          for k in ("win", "tie", "loss", "valid", "invalid")})
    return {"name": cfg.name, "run_dir": cfg.run_dir, "baseline": FULL, "rule": cfg.judge.rule, "models": rows,
            "evaluate_reports": [str(Path(cfg.run_dir) / "evaluate" / "report.md")]
            + ([str(Path(cfg.run_dir) / "full_model" / "evaluate" / "report.md")] if "full" in results else [])}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def write_summary(summary: dict[str, Any], out: Path) -> dict[str, str]:
    """``summary.json`` and ``summary.md`` (one table: the selections against the full-data model)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", summary)
    suites = sorted({s for r in summary["models"].values() for s in r["pairwise"]})
    head = ["model", "rows", "selection", *(f"{s} W/T/L %" for s in suites), "all sets W/T/L %", "MT-Bench",
            "AlpacaEval 2 %", "LC %"]
    lines = [f"# {summary['name']}: each selection against the full-data model", "",
             f"Pairwise: win / tie / loss in percent of the valid prompts, judged in both orders (rule "
             f"**{summary['rule']}**), the selection's model first; the full-data model's own row has none. "
             "MT-Bench: mean 1-10 rating over the rated turns. AlpacaEval 2: win rate against GPT-4 Turbo's "
             "answers (LC: length-controlled; `-` where alpaca_eval's hub file was not available).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in summary["models"].items():
        wtl = [" / ".join(_pct(p.get(f"{k}_rate")) for k in ("win", "tie", "loss")) if p else "-"
               for p in (r["pairwise"].get(s) for s in suites)]
        alls = r.get("pairwise_all")
        lines.append("| " + " | ".join([
            name, str(r["rows_selected"]), "+".join(r["scorers"]) + ("" if r["selector"] == "top_k" else
                                                                     f", {r['selector']}"),
            *wtl, " / ".join(_pct(alls.get(f"{k}_rate")) for k in ("win", "tie", "loss")) if alls else "-",
            _num(r.get("mt_bench")), _num(r.get("alpaca_win_rate")), _num(r.get("lc_win_rate"))]) + " |")
    lines += ["", "Every suite's verdicts, per-category MT-Bench and position bias: "
              + ", ".join(f"`{p}`" for p in summary["evaluate_reports"]) + "."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return {"json": str(out / "summary.json"), "markdown": str(out / "summary.md")}


def run_study(config: str | Path, full_config: str | Path | None = None, overrides: list[str] | None = None,
              random_seeds: list[int] | None = None, only: list[str] | None = None) -> dict[str, Any]:
    """The whole study (see the module's docstring), or the selections of ``only`` and the full-data model; returns
    the summary, with ``written`` (its files)."""
    from alignment.ray_env import ensure_ray

    overrides = list(overrides or [])
    config = Path(config)
    full_config = Path(full_config) if full_config else config.with_name(f"{config.stem}_full{config.suffix}")
    cfg = load_config(config, overrides)
    configs = {name: load_config(config, [*overrides, *extra])
               for name, extra in strategies(random_seeds, only).items()}
    configs[FULL] = load_config(full_config, overrides)
    for c in configs.values():
        pipeline.preflight(c, "sft")  # a wrong path or model name fails here, before Ray starts
    ensure_ray(cfg.resources.ray_address, cfg.resources.num_cpus)
    trained = {}
    for name, c in configs.items():
        log.info("study: the %s selection (select, sft)", name)
        trained[name] = train(c)
    results = evaluation(cfg, trained)
    summary = summarize(cfg, trained, results)
    summary["written"] = write_summary(summary, Path(cfg.run_dir) / "study")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "-c", required=True, help="the k-row selections' experiment YAML")
    parser.add_argument("--full-config", help="the full-data model's YAML (default: <config>_full.yaml beside it)")
    parser.add_argument("--random-seeds", type=int, nargs="+", help="one random selection per seed")
    parser.add_argument("--only", nargs="+", choices=list(STRATEGIES),
                        help="train and judge only these selections (and the full-data model)")
    parser.add_argument("overrides", nargs="*", help="key.path=value, applied to both configs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        summary = run_study(args.config, args.full_config, args.overrides, args.random_seeds, args.only)
    except Exception as e:  # noqa: BLE001 - as alignment's own CLI: the project's errors become exit codes
        known = unwrap(e)
        if not isinstance(known, AlignmentError):
            raise
        print(f"error: {known}", file=sys.stderr)
        return known.exit_code
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
