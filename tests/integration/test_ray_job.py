"""`ray job submit` against a real local head: the experiment runs as a job and writes its outputs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import stop_head, tiny_experiment

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_the_experiment(tmp_path, tiny_model):
    exp = tiny_experiment(tmp_path, tiny_model)
    exp["search"] = {"k": [8], "sft_step": [4]}
    exp["pref"]["sft_step"] = 4
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(exp))

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, agent, agent_grpc, metrics, runtime_env = (free_port() for _ in range(6))
    temp = Path("/tmp") / f"rayjob-{os.getpid()}"  # short: Ray's socket paths have a length limit
    head = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--disable-usage-stats",
         # free ports: the defaults (52365, ...) may be held by the test session's own local Ray
         "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
         "--temp-dir", str(temp), "--include-dashboard", "true"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    try:
        assert head.returncode == 0, head.stderr[-3000:]
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while True:  # right after `ray start` the job server may not have an agent yet
            submit = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
                 "--submission-id", "tiny-experiment", "--",
                 "python", "ray_jobs/run_experiment.py", "--config", str(cfg_path)],
                env=env, capture_output=True, text=True, timeout=900, cwd=ROOT,
            )
            if "No available agent" not in submit.stderr or time.time() > deadline:
                break
            time.sleep(3)
        from ray.job_submission import JobStatus, JobSubmissionClient

        status = JobSubmissionClient(address).get_job_status("tiny-experiment")
        assert status == JobStatus.SUCCEEDED and submit.returncode == 0, (submit.stdout[-4000:], submit.stderr[-4000:])
        run = Path(exp["run_dir"])
        results = json.loads((run / "search" / "results.json").read_text())["rows"]
        assert [(r["k"], r["sft_step"]) for r in results] == [(8, 4)] and "error" not in results[0]
        assert (run / "report" / "report.md").is_file() and (run / "report" / "winrate.png").is_file()
        assert len(list((run / "sft").glob("*/manifest.json"))) == 1
    finally:
        stop_head(temp)
        shutil.rmtree(temp, ignore_errors=True)
