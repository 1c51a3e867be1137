"""The search: a Ray Tune grid over the selection size k, the SFT step that preference tuning starts from,
the preference method and the preference training-set size.

Each trial calls ``trial_fn(cfg.at(point))`` (the pipeline's ``run_point`` on the config at its point
``{k, sft_step, method, num_pairs}``) and reports its metric.
Trials with the same k share one selection and one SFT run through the stage manifests; with several
trials at once, a file lock per stage makes the later trial wait for the earlier one's result.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .config import ExperimentConfig
from .errors import RUN_FAILED, AlignmentError, unwrap
from .evaluate import SUMMARY_KEYS
from .evaluate.heldout import KEYS as HELDOUT_KEYS

log = logging.getLogger("alignment")

# What a trial's result keeps from the point's metrics (plus every ``*_rate``): the point, and every judge's
# settings, counts and metrics as the judges' table declares them (a new judge adds its own there).
_KEEP = ("k", "sft_step", "method", "num_pairs", "start_from", "metric", *SUMMARY_KEYS, *HELDOUT_KEYS,
         "sft_eval_loss", "sft_eval_loss_reason", "model",
         "judge_dir")


# The credentials Ray Tune copies from the driver's environment into each trial's runtime_env, which Ray's
# runtime-env agent then writes, in clear, into its log (runtime_env_agent.log). A trial gets them as any other
# Ray worker does: from the environment an embedded Ray inherits, or from its node (a cluster's IAM role, a
# job's runtime_env).
TUNE_COPIES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


@contextlib.contextmanager
def _hidden(names: tuple[str, ...]) -> Iterator[None]:
    """These environment variables unset in this process for the block, then back."""
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _trial(config: dict[str, Any], cfg_json: dict[str, Any], trial_fn: Callable) -> None:
    from ray import tune

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = ExperimentConfig.model_validate(cfg_json)
    result = trial_fn(cfg.at(config["point"]))
    metric = result.get("metric")
    tune.report({**result, "metric": float("nan") if metric is None else float(metric)})


def run_search(cfg: ExperimentConfig, trial_fn: Callable) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Every grid point's results (the trial's error where one failed) and the search's timings."""
    from ray import tune

    points = cfg.search_grid()
    if cfg.pref.start_from != "sft" and len(cfg.search.sft_step or []) > 1:
        log.warning("pref.start_from=%s: search.sft_step has no effect", cfg.pref.start_from)
    started = time.time()
    trainable = tune.with_resources(
        tune.with_parameters(_trial, cfg_json=cfg.model_dump(mode="json"), trial_fn=trial_fn),
        {"cpu": cfg.resources.cpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"point": tune.grid_search(points)},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.resources.max_concurrent_trials),
        run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=str(Path(cfg.run_dir).resolve() / "search"),
                                  verbose=1),
    )
    with _hidden(TUNE_COPIES):
        grid = tuner.fit()
    results = []
    for r in grid:
        row = dict(r.config["point"])
        if r.error:
            known = unwrap(r.error)  # the project's error the trial raised, without Ray's wrapping
            lines = [ln for ln in str(known).splitlines() if ln.strip()]
            text = str(known) if isinstance(known, AlignmentError) else (lines[-1] if lines else "")
            row["error"] = (text or type(r.error).__name__)[:500]
            row["exit_code"] = known.exit_code if isinstance(known, AlignmentError) else RUN_FAILED
            row["error_file"] = str(Path(r.path) / "error.txt") if r.path else None
            row["metric"] = None
        else:
            m = dict(r.metrics)
            metric = m.get("metric")
            m["metric"] = None if metric is None or (isinstance(metric, float) and math.isnan(metric)) else metric
            row.update({k: v for k, v in m.items()
                        if k in _KEEP or k.endswith("_rate") or k.partition("/")[0] in cfg.search.suites})
        results.append(row)
    order = {json.dumps(p, sort_keys=True): i for i, p in enumerate(points)}
    results.sort(key=lambda r: order.get(json.dumps({k: r[k] for k in points[0]}, sort_keys=True), 0))
    return results, {"seconds": round(time.time() - started, 3)}

