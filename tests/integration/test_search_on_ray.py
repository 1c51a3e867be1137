"""The search's machinery on local Ray with a stand-in for the pipeline's point (a function of the point, so the
expected results are known): Optuna with ASHA and two trials at once, the random baseline, the results table,
MLflow, and a driver killed mid-search that the same command restores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, stop_head
from ray import cloudpickle as ray_cloudpickle

from alignment import pipeline, search
from alignment.config import load_config

pytestmark = pytest.mark.integration
# Ray's workers cannot import this test module: its functions travel by value.
ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])

METHOD_VALUE = {"dpo": 1.0, "ipo": 0.2, "cpo": 0.6}


def stand_in(cfg) -> dict:
    """What run_point returns, as a function of the point: larger k and later steps score higher; a random
    selection scores half. It starts a task of one CPU, more than a trial holds: not trapped in its bundle."""
    import ray

    assert ray.get(ray.remote(lambda: 1).options(num_cpus=1).remote(), timeout=120) == 1
    step = cfg.pref.sft_step
    value = METHOD_VALUE[cfg.pref.method] + cfg.select.k / 100 + step / 10
    if cfg.select.scorers == ["random"]:
        value /= 2
    return {"k": cfg.select.k, "sft_step": step, "method": cfg.pref.method, "num_pairs": cfg.pref.num_pairs,
            "beta": cfg.pref.beta, "start_from": "sft", "metric": value, "pref_margin": value,
            "sft_metric": value / 3, "select_seed": cfg.select.seed}


def best_first(cfg) -> dict:
    """The stand-in, reporting the better points sooner at the first SFT step: ASHA (rung cutoff: the median of the
    results recorded there before) stops a trial only if a better one reached the rung first, and two trials at once
    would otherwise arrive in any order (in ascending order of metric, none is stopped)."""
    out = stand_in(cfg)
    if cfg.pref.sft_step == 2 and cfg.select.scorers != ["random"]:
        time.sleep(3 * max(0.0, 1.6 - out["metric"]))
    return out


def _config(tmp_path: Path, *overrides: str):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", "name=machinery", "sft.max_steps=6",
                              "sft.save_at=[2,4]", "pref.eval_rows=4", "search.metric=pref_margin",
                              "search.sft_step=[2,4,6]", "resources.cpus_per_trial=0.5", *overrides])


def test_optuna_with_asha_stops_trials_early_two_at_a_time_beside_a_random_baseline(ray_local, tmp_path):
    cfg = _config(tmp_path, "search.k=[8,32]", "search.sft_step=[2,4]", "search.method=[dpo,ipo,cpo]",
                  "search.algorithm=optuna",
                  "search.num_samples=5", "search.scheduler=asha", "search.baseline_selection=random",
                  "search.baseline_seeds=[7]", "resources.max_concurrent_trials=2",
                  f"search.mlflow_tracking_uri=file:{tmp_path / 'mlruns'}")
    storage = str(tmp_path / "run" / "search")
    refreshed: list[int] = []
    rows, timings = search.run_search(cfg, best_first, storage, on_rows=lambda r: refreshed.append(len(r)))
    own = [r for r in rows if not r["baseline"]]
    trials = {r["trial_id"] for r in own}
    assert len(trials) == 5 and not any(r.get("error") for r in rows)
    # Every row is the stand-in's value at its point: the trial walked the SFT steps in order.
    for r in rows:
        expected = stand_in(cfg.at(r))
        assert r["metric"] == pytest.approx(expected["metric"]) and r["sft_metric"] == expected["sft_metric"]
    by_trial = {t: sorted(r["sft_step"] for r in own if r["trial_id"] == t) for t in trials}
    stopped = {t for t, steps in by_trial.items() if steps != [2, 4]}
    assert stopped, "ASHA stopped no trial"
    assert all(by_trial[t] == [2] for t in stopped)
    assert {t for t in trials if any(r["stopped_early"] for r in own if r["trial_id"] == t)} == stopped
    # The baseline: every k x seed, every step, random selection at the configured method.
    base = [r for r in rows if r["baseline"]]
    assert sorted({(r["k"], r["selection_seed"]) for r in base}) == [(8, 7), (32, 7)]
    assert len(base) == 2 * 2 and {r["selection"] for r in base} == {"random"}
    assert {r["method"] for r in base} == {"dpo"} and {r["selection"] for r in own} == {"length"}
    assert refreshed and refreshed[-1] == len(rows) and timings["baseline_seconds"] > 0
    # The results as JSON, Parquet and CSV, and the best over every step of every trial.
    path = pipeline.write_search_results(cfg, rows, timings)
    saved = json.loads(path.read_text())
    assert saved["best"]["metric"] == max(r["metric"] for r in own)
    assert saved["counts"]["stopped_early"] == len(stopped) and saved["counts"]["baseline_trials"] == 2
    table = pd.read_parquet(path.with_suffix(".parquet"))
    assert len(table) == len(rows) and np.allclose(sorted(table["metric"]), sorted(r["metric"] for r in rows))
    assert len(pd.read_csv(path.with_suffix(".csv"))) == len(rows)
    # MLflow: a run per trial of the search, with its point and its metric, in the local file store.
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    import mlflow

    client = mlflow.tracking.MlflowClient(f"file:{tmp_path / 'mlruns'}")
    exp = client.get_experiment_by_name(search.experiment_name(cfg))
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 5 and all("metric" in r.data.metrics for r in runs)


SCRIPT = """
import json, os, sys, time
sys.path[:0] = [{tests!r}, {tests!r} + "/.."]
from alignment import search
from alignment.config import load_config
import test_search_on_ray as test_search
from ray import cloudpickle
cloudpickle.register_pickle_by_value(test_search)
stand_in = test_search.stand_in

calls = {calls!r}

def slow(cfg):
    with open(calls, "a") as f:
        f.write(f"start {{cfg.select.k}} {{cfg.pref.sft_step}}\\n")
    time.sleep(600 if os.environ.get("SLOW") and cfg.select.k == 32 else 2)
    out = stand_in(cfg)
    with open(calls, "a") as f:
        f.write(f"done {{cfg.select.k}} {{cfg.pref.sft_step}}\\n")
    return out

import ray
ray.init(num_cpus=2, include_dashboard=False, _temp_dir={temp!r})  # its own temp dir: stop_head finds it
cfg = load_config({config!r})
refreshed = sys.argv[1]  # a file of its own per driver: the report refresh must be this driver's

def refresh(rows):
    with open(refreshed, "w") as f:
        json.dump(sorted([r["k"], r["sft_step"]] for r in rows), f)

rows, _ = search.run_search(cfg, slow, {storage!r}, on_rows=refresh)
json.dump(rows, open({out!r}, "w"))
"""


def test_a_killed_search_restores_without_rerunning_its_finished_trials(tmp_path):
    """The driver (with its embedded Ray) is killed while the k=32 trial runs; the same command restores the
    experiment: the finished trial is not run again, the killed one runs from its start, and the results equal
    the stand-in's at every point."""
    cfg = _config(tmp_path, "search.k=[8,32]", "search.sft_step=[2]", "resources.max_concurrent_trials=1")
    config = tmp_path / "exp.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    calls, out, temp = tmp_path / "calls.log", tmp_path / "rows.json", Path("/tmp") / f"rt{os.getpid()}"
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(SCRIPT.format(
        tests=str(ROOT / "tests" / "integration"), calls=str(calls), temp=str(temp), config=str(config),
        storage=str(tmp_path / "run" / "search"), out=str(out))))
    env = {**os.environ, "SLOW": "1", "PYTHONPATH": str(ROOT)}
    err = open(tmp_path / "driver.err", "w")
    driver = subprocess.Popen([sys.executable, str(script), str(tmp_path / "refreshed-1.json")], env=env,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            log = calls.read_text() if calls.is_file() else ""
            if "start 32" in log:
                break
            assert driver.poll() is None, (tmp_path / "driver.err").read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail("the k=32 trial never started")
        time.sleep(15)  # Tune saves the experiment's state at least every 10 s
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        stop_head(temp)
    before = calls.read_text().splitlines()
    done = {tuple(map(int, line.split()[1:])) for line in before if line.startswith("done")}
    assert done and (32, 2) not in done and not out.exists()
    env.pop("SLOW")
    try:
        again = subprocess.run([sys.executable, str(script), str(tmp_path / "refreshed-2.json")], env=env, timeout=600,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    finally:
        stop_head(temp)
    assert again.returncode == 0, again.stderr[-3000:]
    # The restored run ran exactly the points that had not finished, the killed one among them, once each.
    rerun = [tuple(map(int, line.split()[1:])) for line in calls.read_text().splitlines()[len(before):]
             if line.startswith("done")]
    points = {(8, 2), (32, 2)}
    assert sorted(rerun) == sorted(points - done)
    rows = json.loads(out.read_text())
    assert sorted((r["k"], r["sft_step"]) for r in rows) == sorted(points)
    for r in rows:
        assert r["metric"] == pytest.approx(stand_in(cfg.at(r))["metric"])
    # The restored search refreshed its own driver's report, with the rows of the trial finished before the kill.
    assert json.loads((tmp_path / "refreshed-2.json").read_text()) == [[8, 2], [32, 2]]
