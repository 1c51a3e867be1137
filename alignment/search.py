"""The search: Ray Tune over the selection size k, the SFT step preference tuning starts from, the preference
method, the preference training-set size and beta; the grid, random points or Optuna's TPE; every trial to its
end, or ASHA stopping the unpromising ones early. A random-selection baseline at every k runs beside it.

A trial is a point ``{k, method, num_pairs, beta}`` and one SFT step, or with ASHA every SFT step in order (the
cheap axis: the SFT run that saved them is shared): at each it calls ``trial_fn(cfg.at(point))`` (the pipeline's
``run_point``) and reports, so a trial yields one result per step and ASHA compares trials at the same step.
Trials with the same k share one selection and one SFT run through the stage manifests; with several trials at
once, a file lock per stage makes the later trial wait for the earlier one's result.

The experiment's name comes from the config (:func:`experiment_name`; ``-random`` after it for the baseline) and
its state lives under ``resources.storage_path`` (or the run directory): the same command run again restores it,
finished trials are not re-run, and a trial that was running resumes through its stages' manifests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .config import ConfigError, ExperimentConfig, config_dict
from .errors import RUN_FAILED, AlignmentError, unwrap
from .evaluate import SUMMARY_KEYS
from .evaluate.heldout import KEYS as HELDOUT_KEYS
from .manifest import digest

log = logging.getLogger("alignment")

# What a result row keeps from a trial's report (plus every ``*_rate`` and suite metric): the point, and every
# judge's settings, counts and metrics as the judges' table declares them (a new judge adds its own there).
_KEEP = ("k", "sft_step", "method", "num_pairs", "beta", "start_from", "metric", *SUMMARY_KEYS, *HELDOUT_KEYS,
         "sft_eval_loss", "sft_eval_loss_reason", "sft_metric", "sft_metric_reason", "model", "judge_dir",
         "selection", "selection_seed", "baseline")

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


@dataclass(frozen=True)
class Space:
    """The values of each axis (as listed, k and the SFT steps in order), whether a trial walks the SFT steps,
    and the baseline's seeds when this is the random-selection baseline's space."""

    k: tuple[int, ...]
    steps: tuple[int | str, ...]
    method: tuple[str, ...]
    num_pairs: tuple[int | None, ...]
    beta: tuple[float, ...]
    walk: bool
    selection_seeds: tuple[int, ...] = ()

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> Space:
        s = cfg.search
        return cls(k=tuple(sorted(set(s.k or [cfg.select.k]))), steps=tuple(cfg.search_steps()),
                   method=tuple(s.method or [cfg.pref.method]), num_pairs=tuple(s.num_pairs or [cfg.pref.num_pairs]),
                   beta=tuple(sorted(set(s.beta or [cfg.pref.beta]))), walk=s.scheduler == "asha")

    def baseline(self, cfg: ExperimentConfig) -> Space:
        """The random baseline's space: every k and SFT step of this one at the configured downstream settings
        (pref.method, pref.num_pairs, pref.beta), one selection per seed."""
        return Space(k=self.k, steps=self.steps, method=(cfg.pref.method,), num_pairs=(cfg.pref.num_pairs,),
                     beta=(cfg.pref.beta,), walk=self.walk,
                     selection_seeds=tuple(cfg.search.baseline_seeds or [cfg.seed]))

    def _axes(self) -> dict[str, tuple]:
        axes = {"k": self.k, "method": self.method, "num_pairs": self.num_pairs, "beta": self.beta}
        if not self.walk:
            axes["sft_step"] = self.steps
        if self.selection_seeds:
            axes["selection_seed"] = self.selection_seeds
        return axes

    def param_space(self, algorithm: str) -> dict[str, Any]:
        """Ray Tune's param_space for grid and random (Optuna's space is :meth:`optuna_space`)."""
        from ray import tune

        out: dict[str, Any] = {}
        for name, values in self._axes().items():
            if len(values) == 1:
                out[name] = values[0]
            elif algorithm == "grid":
                out[name] = tune.grid_search(list(values))
            elif name == "beta":
                out[name] = tune.loguniform(min(values), max(values))
            else:
                out[name] = tune.choice(list(values))
        return out

    def optuna_space(self) -> dict[str, Any]:
        """Optuna's distributions over the axes that vary: k and the SFT step as ordinals (the index into their
        sorted values), method and pairs categorical, beta log-uniform."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        out: dict[str, Any] = {}
        for name, values in self._axes().items():
            if len(values) == 1:
                continue
            if name in ("k", "sft_step"):
                out[f"{name}_index"] = IntDistribution(0, len(values) - 1)
            elif name == "beta":
                out[name] = FloatDistribution(min(values), max(values), log=True)
            else:
                out[name] = CategoricalDistribution(list(values))
        return out

    def point(self, config: dict[str, Any]) -> dict[str, Any]:
        """A trial's Tune config as its point: every axis's value (an axis that does not vary: its one value)."""
        out = {}
        for name, values in self._axes().items():
            if f"{name}_index" in config:
                out[name] = values[config[f"{name}_index"]]
            else:
                out[name] = config.get(name, values[0])
        if self.selection_seeds:
            out["selection"] = "random"
        return out

    def optuna_params(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """An earlier result's point as Optuna's parameters, or None where it lies outside this space."""
        out: dict[str, Any] = {}
        for name, values in self._axes().items():
            value = row.get(name)
            if len(values) == 1:
                if value != values[0]:
                    return None
            elif name == "beta":
                if value is None or not min(values) <= value <= max(values):
                    return None
                out[name] = value
            elif value not in values:
                return None
            else:
                out[f"{name}_index" if name in ("k", "sft_step") else name] = (
                    values.index(value) if name in ("k", "sft_step") else value)
        return out


def _finite(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _logged(trial_fn: Callable, cfg: ExperimentConfig) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return trial_fn(cfg)


def _trial(config: dict[str, Any], cfg_json: dict[str, Any], space_json: dict[str, Any], trial_fn: Callable) -> None:
    import ray
    from ray import tune

    cfg = ExperimentConfig.model_validate(cfg_json)
    space = Space(**{k: tuple(v) if isinstance(v, list) else v for k, v in space_json.items()})
    point = space.point(config)
    # Tune places what a trial starts inside the trial's own small bundle; the point runs in a task placed as any
    # other (DEFAULT, no CPU held), so that its training workers, actors and tasks get their own placement.
    run = ray.remote(_logged).options(num_cpus=0, scheduling_strategy="DEFAULT", max_retries=0)
    best = float("nan")
    for step in (space.steps if space.walk else [point["sft_step"]]):
        result = ray.get(run.remote(trial_fn, cfg.at({**point, "sft_step": step})))
        metric = _finite(result.get("metric"))
        best = float(np.nanmax([best, metric])) if not (math.isnan(best) and math.isnan(metric)) else best
        # sft_step is ASHA's time attribute; best_metric (the best over the steps so far) is Optuna's objective.
        tune.report({**result, **point, "sft_step": step, "metric": metric, "best_metric": best})


def _row(reported: dict[str, Any], cfg: ExperimentConfig) -> dict[str, Any]:
    row = {k: v for k, v in reported.items()
           if k in _KEEP or k.endswith("_rate") or k.partition("/")[0] in cfg.search.suites}
    metric = row.get("metric")
    row["metric"] = None if metric is None or (isinstance(metric, float) and math.isnan(metric)) else metric
    return row


def selection_name(cfg: ExperimentConfig) -> str:
    """How the search's own selection ranks rows: its scorers (those rank_by weighs), joined with '+'."""
    return "+".join(cfg.select.rank_by or cfg.select.scorers[:1])


def _read_reports(filesystem: Any, path: str | None) -> list[dict[str, Any]]:
    """Every result a trial reported, from its ``result.json`` under ``path`` in the experiment's storage (a
    pyarrow filesystem: local or cloud)."""
    try:
        with filesystem.open_input_stream(f"{path}/result.json") as f:
            text = f.read().decode()
    except (FileNotFoundError, OSError):
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _rows(grid: Any, space: Space, cfg: ExperimentConfig, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per step each trial reported; a failed trial adds a row with its error at the step it failed."""
    rows = []
    for r in grid:
        point = space.point(r.config)
        reported = sorted(_read_reports(r.filesystem, r.path), key=lambda x: x.get("training_iteration", 0))
        trial_id = reported[0]["trial_id"] if reported else (r.metrics or {}).get("trial_id")
        planned = list(space.steps) if space.walk else [point["sft_step"]]
        done = [_row(x, cfg) for x in reported]
        for row in done:
            row.update(extra, trial_id=trial_id, stopped_early=not r.error and len(done) < len(planned))
        rows.extend({**point, **row} for row in done)
        if r.error:
            known = unwrap(r.error)  # the project's error the trial raised, without Ray's wrapping
            lines = [ln for ln in str(known).splitlines() if ln.strip()]
            text = str(known) if isinstance(known, AlignmentError) else (lines[-1] if lines else "")
            rows.append({**point, **extra, "sft_step": planned[min(len(done), len(planned) - 1)],
                         "trial_id": trial_id, "metric": None, "error": (text or type(r.error).__name__)[:500],
                         "exit_code": known.exit_code if isinstance(known, AlignmentError) else RUN_FAILED,
                         "error_file": f"{r.path}/error.txt" if r.path else None})
    order = {k: i for i, k in enumerate(space.k)}
    rows.sort(key=lambda x: (order.get(x["k"], 0), str(x.get("method")), str(x.get("num_pairs")),
                             _finite(x.get("beta")), x.get("selection_seed") or 0, str(x.get("sft_step"))))
    return rows


def _concurrency(cfg: ExperimentConfig) -> int:
    """resources.max_concurrent_trials, or: GPUs the cluster can scale to over the GPUs a trial's training takes;
    1 on CPU."""
    res = cfg.resources
    if res.max_concurrent_trials is not None:
        return res.max_concurrent_trials
    if not res.use_gpu:
        return 1
    import ray

    gpus = res.max_gpus if res.max_gpus is not None else int(ray.cluster_resources().get("GPU", 0))
    return max(1, gpus // res.num_workers)


def experiment_name(cfg: ExperimentConfig) -> str:
    """The search's Tune experiment name: the config's name and a digest of what it runs (not where or how: no
    resources, tracking or warm start). The same config restores the same experiment; a changed one starts its
    own (finished stages are still reused through their manifests)."""
    d = config_dict(cfg)
    d.pop("resources", None)
    for key in ("mlflow_tracking_uri", "warm_start"):
        d["search"].pop(key, None)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", cfg.name).strip("-") or "experiment"
    return f"{slug}-{digest(d)[:8]}"


def _earlier(paths: list[str], space: Space) -> tuple[list[dict], list[float]]:
    """Optuna's warm start from earlier results: each trial's point and its best metric over its steps."""
    from pathlib import Path

    points, rewards, skipped = [], [], 0
    for p in paths:
        path = Path(p) / "search" / "results.json" if Path(p).is_dir() else Path(p)
        if not path.is_file():
            raise ConfigError(f"search.warm_start: no search results at {path}")
        best: dict[str, tuple[dict, float]] = {}
        saved = json.loads(path.read_text())
        for i, row in enumerate(saved.get("rows", saved.get("trials", []))):  # "trials": before result rows
            if row.get("baseline") or row.get("metric") is None:
                continue
            key = row.get("trial_id") or f"row{i}"
            if key not in best or row["metric"] > best[key][1]:
                best[key] = (row, row["metric"])
        for row, value in best.values():
            params = space.optuna_params(row)
            if params is None:
                skipped += 1
                continue
            points.append(params)
            rewards.append(value)
    if skipped:
        log.info("search.warm_start: %d earlier trials lie outside this search's space and do not inform it",
                 skipped)
    log.info("search.warm_start: Optuna starts from %d earlier trials", len(points))
    return points, rewards


# Who is told the rows of a running experiment, by the experiment's name, in this process (run_search sets it).
# Tune pickles an experiment's callbacks into its state and a restored experiment runs the pickled ones: they look
# their listener up here, so a restored search refreshes the restoring driver's report, not the first driver's.
_LISTENERS: dict[str, Callable[[list[dict]], None]] = {}


def _progress(name: str, space: Space, cfg: ExperimentConfig, extra: dict[str, Any]) -> Any:
    """A Tune callback: every row reported so far (those of trials a restored experiment had finished read from
    its storage), handed to experiment ``name``'s listener whenever a trial ends."""
    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self) -> None:
            self.rows: dict[tuple[str, int], dict] = {}
            self.seen: set[str] = set()

        def add(self, trial: Any, result: dict) -> None:
            row = {**space.point(trial.config), **_row(result, cfg), **extra, "trial_id": trial.trial_id}
            self.rows[(trial.trial_id, result.get("training_iteration", 0))] = row
            self.seen.add(trial.trial_id)

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            self.add(trial, result)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            from alignment import search  # this process's module (the class may have been pickled by value)

            for t in trials:  # finished before a restore: they report nothing again
                if t.status == "TERMINATED" and t.trial_id not in self.seen:
                    for result in _read_reports(t.storage.storage_filesystem, t.path):
                        self.add(t, result)
            try:
                search._LISTENERS.get(name, lambda rows: None)(list(self.rows.values()))
            except Exception as e:  # noqa: BLE001 - a report that fails to refresh must not stop the search
                log.warning("the report could not be refreshed: %s", e)

        on_trial_error = on_trial_complete

    return Progress()


def _tuner(cfg: ExperimentConfig, space: Space, name: str, storage: str, trial_fn: Callable,
           extra: dict[str, Any]) -> Any:
    """The Tune experiment ``name`` under ``storage``: restored where it exists, else new."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    s = cfg.search
    seed = cfg.seed if s.seed is None else s.seed
    trial_resources = {"CPU": cfg.resources.cpus_per_trial, **cfg.resources.trial_custom_resources}
    trainable = tune.with_resources(
        tune.with_parameters(_trial, cfg_json=cfg.model_dump(mode="json"), space_json=asdict(space),
                             trial_fn=trial_fn),
        tune.PlacementGroupFactory([trial_resources]),
    )
    baseline = bool(space.selection_seeds)
    algorithm = "grid" if baseline else s.algorithm
    search_alg = scheduler = None
    if algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        points, rewards = _earlier(s.warm_start, space)
        search_alg = OptunaSearch(space=space.optuna_space(), metric="best_metric", mode="max", seed=seed,
                                  points_to_evaluate=points or None, evaluated_rewards=rewards or None)
    elif algorithm == "random":
        from ray.tune.search import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=seed)
    if space.walk and not baseline:  # the baseline walks every step of every k: nothing to stop
        steps = [int(x) for x in space.steps]
        scheduler = ASHAScheduler(time_attr="sft_step", metric="metric", mode="max", max_t=max(steps),
                                  grace_period=min(steps), reduction_factor=s.reduction_factor)
    callbacks = [_progress(name, space, cfg, extra)]
    if s.mlflow_tracking_uri:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        if s.mlflow_tracking_uri.startswith("file:") or "://" not in s.mlflow_tracking_uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for an opt-in to file stores
        callbacks.append(MLflowLoggerCallback(tracking_uri=s.mlflow_tracking_uri, experiment_name=name))
    path = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        log.info("restoring the search %s from %s", name, path)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, restart_errored=True)
    return tune.Tuner(
        trainable,
        param_space=space.param_space(algorithm) if algorithm != "optuna" else {},
        tune_config=tune.TuneConfig(num_samples=1 if algorithm == "grid" else s.num_samples, search_alg=search_alg,
                                    scheduler=scheduler, max_concurrent_trials=_concurrency(cfg)),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1, callbacks=callbacks),
    )


def run_search(cfg: ExperimentConfig, trial_fn: Callable, storage: str,
               on_rows: Callable[[list[dict]], None] = lambda rows: None) -> tuple[list[dict[str, Any]], dict]:
    """Every result row of the search (one per SFT step a trial reached; a failed trial's error in its row), then
    the random baseline's where search.baseline_selection asks for it, and the search's timings. ``storage``
    holds the Tune experiments; ``on_rows`` gets the rows so far whenever a trial ends."""
    if cfg.pref.start_from != "sft" and len(cfg.search.sft_step or []) > 1:
        log.warning("pref.start_from=%s: search.sft_step has no effect", cfg.pref.start_from)
    started = time.time()
    space = Space.of(cfg)
    name = experiment_name(cfg)
    own = {"selection": selection_name(cfg), "selection_seed": None, "baseline": False}
    _LISTENERS[name] = on_rows
    try:
        with _hidden(TUNE_COPIES):
            rows = _rows(_tuner(cfg, space, name, storage, trial_fn, own).fit(), space, cfg, own)
            timings = {"search_seconds": round(time.time() - started, 3)}
            if cfg.search.baseline_selection == "random":
                base = space.baseline(cfg)
                extra = {"selection": "random", "baseline": True}
                _LISTENERS[f"{name}-random"] = lambda r: on_rows(rows + r)
                rows += _rows(_tuner(cfg, base, f"{name}-random", storage, trial_fn, extra).fit(), base, cfg, extra)
                timings["baseline_seconds"] = round(time.time() - started - timings["search_seconds"], 3)
    finally:
        _LISTENERS.pop(name, None)
        _LISTENERS.pop(f"{name}-random", None)
    timings["seconds"] = round(time.time() - started, 3)
    return rows, timings

