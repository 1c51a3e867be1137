"""Errors reach the user as one `error:` line with the right exit code: config, data and model errors are
found before Ray starts, errors raised inside Ray tasks, workers and trials are unwrapped, and no error
repeats a credential."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from alignment import cli, models
from alignment.errors import AlignmentError, unwrap
from alignment.formats import DataError
from alignment.select import ScorerError, SelectError
from alignment.train import TrainError, TrainRunError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "data"
BIN = Path(sys.executable).parent
SECRET = "hunter2-not-a-real-secret"


def experiment(tmp_path: Path, **extra) -> Path:
    """A small experiment on the sample data; lengths in characters, so no model is loaded to select."""
    exp = {"run_dir": str(tmp_path / "run"), "model": {"base": "smollm2-135m-instruct"},
           "data": {"sft": [str(EXAMPLES / "sft_alpaca.jsonl")], "preferences": [str(EXAMPLES / "preferences.jsonl")],
                    "eval_prompts": str(EXAMPLES / "eval_prompts.jsonl")},
           "select": {"k": 4, "length_unit": "chars"}, **extra}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


@pytest.fixture()
def no_ray(monkeypatch):
    """Fails the test if the command gets as far as starting Ray; returns the calls made."""
    calls = []
    monkeypatch.setattr("alignment.ray_env.ensure_ray", lambda *a, **k: calls.append(a))
    return calls


def run_cli(capsys, *argv: str) -> tuple[int, list[str]]:
    rc = cli.main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, [line for line in err.splitlines() if line.strip()]


def one_error_line(lines: list[str]) -> str:
    assert len(lines) >= 1 and lines[0].startswith("error: "), lines
    return "\n".join(lines)


# ------------------------------------------------------------------------------- before Ray starts


def test_an_override_that_is_not_yaml_is_a_config_error(tmp_path, capsys, no_ray):
    rc, lines = run_cli(capsys, "select", "--config", str(experiment(tmp_path)), "select.k=[1,")
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: override select.k: the value is not valid YAML")
    assert not no_ray


def test_an_unknown_model_name_offline_fails_fast_before_ray(tmp_path):
    cfg = experiment(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    started = time.time()
    out = subprocess.run([str(BIN / "alignment"), "select", "--config", str(cfg), "model.base=no-such-model-xyz",
                          "select.length_unit=tokens"], env=env, capture_output=True, text=True, timeout=120)
    took = time.time() - started
    assert out.returncode == 2 and took < 10, (took, out.stderr)
    (line,) = out.stderr.splitlines()
    assert line.startswith("error: model.base: no-such-model-xyz is not a local path, not a registry name (known: ")
    assert "the Hugging Face hub cannot be reached" in line and "Ray" not in out.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unknown_model_name_with_the_hub_out_of_reach(tmp_path):
    """Not offline, but the hub (HF_ENDPOINT: a closed port on the loopback) does not answer: one try."""
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HOME": str(tmp_path / "hf")}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAY_ADDRESS"):
        env.pop(name, None)
    out = subprocess.run([str(BIN / "alignment"), "sft", "--config", str(experiment(tmp_path)),
                          "model.base=no-such-org/no-such-model"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith("error: model.base: no-such-org/no-such-model is not a local path")
    assert "the Hugging Face hub cannot be reached" in line


class _Hub(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path.startswith("/api/models/org/known"):
            body = json.dumps({"id": "org/known", "modelId": "org/known"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
        else:
            body = json.dumps({"error": "Repository not found"}).encode()
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_model_the_hub_does_not_have_and_one_it_has(monkeypatch, tmp_path):
    from huggingface_hub import constants

    server = HTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read when huggingface_hub was imported
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        models.check("org/known")
        with pytest.raises(models.ModelError, match="the Hugging Face hub has no model of that name"):
            models.check("org/missing")
    finally:
        server.shutdown()


def test_a_model_in_the_local_cache_passes_offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--org--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--cached" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--cached" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.check("org/cached")
    with pytest.raises(models.ModelError, match="offline: HF_HUB_OFFLINE is set"):
        models.check("org/not-cached")


@pytest.mark.parametrize("override,key,named", [
    ("data.sft=/no/such/file.jsonl", "data.sft", "data file not found: /no/such/file.jsonl"),
    ("data.preferences=[/no/such/dir/*.jsonl]", "data.preferences", "glob /no/such/dir/*.jsonl matched no files"),
    ("data.eval_prompts=/no/such/prompts.jsonl", "data.eval_prompts", "/no/such/prompts.jsonl"),
    ("model.chat_template=/no/such/template.jinja", "model.chat_template", "/no/such/template.jinja"),
    ("judge.model=./no/such/judge", "judge.model", "model path not found: "),
])
def test_missing_files_and_models_are_found_before_ray_starts(tmp_path, capsys, no_ray, tiny_model, override, key,
                                                              named):
    rc, lines = run_cli(capsys, "run", "--config", str(experiment(tmp_path)), f"model.base={tiny_model}",
                        "judge.model=" + str(tiny_model), override)
    msg = one_error_line(lines)
    assert rc == 2 and len(lines) == 1 and msg.startswith(f"error: {key}") and named in msg, msg
    assert not no_ray


def test_a_data_key_the_command_needs_is_not_set(tmp_path, capsys, no_ray):
    rc, lines = run_cli(capsys, "select", "--config", str(experiment(tmp_path)), "data.sft=[]")
    assert rc == 2 and lines == ["error: data.sft is not set, and this command reads it"] and not no_ray


def test_an_openai_judge_without_its_url_is_a_config_error(tmp_path, capsys, no_ray, tiny_model, monkeypatch):
    monkeypatch.delenv("NO_SUCH_URL_VAR", raising=False)
    rc, lines = run_cli(capsys, "judge", "--config", str(experiment(tmp_path)), f"model.base={tiny_model}",
                        "judge.backend=openai", "judge.api_base_env=NO_SUCH_URL_VAR")
    assert rc == 2 and "judge.backend is openai" in one_error_line(lines) and "NO_SUCH_URL_VAR" in lines[0]


def test_an_endpoint_key_that_cannot_be_sent_is_refused_before_ray_without_showing_it(tmp_path, capsys, no_ray,
                                                                                      monkeypatch):
    monkeypatch.setenv("TEST_RATER_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("TEST_RATER_KEY", f"sk-{SECRET} pasted twice")
    rc, lines = run_cli(capsys, "select", "--config", str(experiment(tmp_path)), "select.scorers=[rating]",
                        "select.rating.backend=openai", "select.rating.api_base_env=TEST_RATER_URL",
                        "select.rating.api_key_env=TEST_RATER_KEY")
    text = one_error_line(lines)
    assert rc == 2 and text.startswith("error: select.rating: the API key in TEST_RATER_KEY holds")
    assert SECRET not in text and not no_ray


# ------------------------------------------------------------------------------------------ secrets


@pytest.mark.parametrize("override,key", [
    (f"data.sft=s3://AKIAFAKE:{SECRET}@bucket/x.jsonl", "data.sft"),
    (f"data.preferences=[{EXAMPLES / 'preferences.jsonl'}, 'gs://bucket/p.jsonl?access_token={SECRET}']",
     "data.preferences[1]"),
    (f"model.base=s3://bucket/model?secret_key={SECRET}", "model.base"),
    (f"judge.baseline=https://user:{SECRET}@example.com/model", "judge.baseline"),
    (f"select.embedding.model=s3://k:{SECRET}@b/e", "select.embedding.model"),
    (f"run_dir=s3://k:{SECRET}@b/runs", "run_dir"),
    (f"judge.api_key_env=sk-{SECRET}", "judge.api_key_env"),
    ("select.rating.api_key_env=gsk_0a1b2c3d4e5f6a7b8c9d0e1f", "select.rating.api_key_env"),
])
def test_credentials_anywhere_in_the_config_are_refused_by_key(tmp_path, capsys, no_ray, override, key):
    rc, lines = run_cli(capsys, "run", "--config", str(experiment(tmp_path)), override)
    msg = one_error_line(lines)
    assert rc == 2 and f"\n  {key}: " in msg and SECRET not in msg and override.split("=", 1)[1] not in msg, msg
    assert not no_ray


def test_a_cross_field_error_names_its_keys_and_never_dumps_the_config(tmp_path, capsys):
    cfg = experiment(tmp_path, name="distinctive-experiment-name",
                     sft={"max_steps": 10, "save_at": [4, 10]}, search={"sft_step": [4, 7]})
    rc, lines = run_cli(capsys, "run", "--config", str(cfg))
    msg = one_error_line(lines)
    assert rc == 2 and "search.sft_step: SFT step 7 is never saved" in msg
    assert "distinctive-experiment-name" not in msg and "{" not in msg and "(top level)" not in msg
    rc, lines = run_cli(capsys, "run", "--config", str(cfg), "search.sft_step=[4]", "select.scorers=[length, length]")
    msg = one_error_line(lines)
    assert rc == 2 and "select.scorers lists a scorer twice" in msg and "'k':" not in msg


def test_a_config_file_that_is_not_yaml_is_not_echoed(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(f"data:\n  sft: [s3://k:{SECRET}@bucket/x.jsonl\nselect: {{k: 3}}\n")
    rc, lines = run_cli(capsys, "select", "--config", str(path))
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path} is not valid YAML")
    assert SECRET not in lines[0] and "line " in lines[0]


# --------------------------------------------------------------------------- errors from Ray, unwrapped


def _task_error(cause: BaseException, traceback_text: str = "tb"):
    from ray.exceptions import RayTaskError

    return RayTaskError("fn", traceback_text, cause, proctitle="ray::fn", pid=1, ip="127.0.0.1")


def test_unwrap_finds_the_projects_error_inside_rays():
    from ray.exceptions import UserCodeException
    from ray.train import ControllerError, WorkerGroupError

    data = DataError("a.jsonl.gz: cannot read it")
    dual = _task_error(data).as_instanceof_cause()  # what ray.get raises: also an instance of DataError
    assert isinstance(dual, DataError) and unwrap(dual) is data
    train = TrainError("method dpo trains on pairs")
    assert unwrap(WorkerGroupError("rank 0 failed", {0: train})) is train
    assert unwrap(ControllerError(_task_error(data))) is data
    # A Ray Data task: the cause was a UserCodeException whose own cause did not survive pickling.
    text = ("  File \"x.py\", line 1, in f\nalignment.formats.DataError: b.json: not valid JSON\n\nThe above exception "
            "was the direct cause of the following exception:\n\nray.exceptions.UserCodeException: UDF failed to "
            "process a data block.\nFailed to apply UDF transform after 1/1 attempts.")
    found = unwrap(_task_error(UserCodeException("UDF failed to process a data block."), text))
    assert type(found) is DataError and str(found) == "b.json: not valid JSON"
    # A bug raised while handling our error is the bug.
    bug = text.replace("ray.exceptions.UserCodeException", "KeyError: 'x'\nray.exceptions.UserCodeException")
    wrapped = _task_error(UserCodeException("UDF failed"), bug)
    assert unwrap(wrapped) is wrapped
    plain = KeyError("x")
    assert unwrap(plain) is plain


@pytest.mark.parametrize("error,rc", [(SelectError("k too large"), 1), (ScorerError("no single token"), 2),
                                      (TrainError("no rows"), 2), (DataError("x.jsonl: bad"), 2),
                                      (TrainRunError("sft: checkpoints for steps [4] were not reported"), 1)])
def test_every_project_error_is_one_line_with_its_exit_code(tmp_path, capsys, monkeypatch, error, rc):
    def stage(name, cfg):
        raise _task_error(error).as_instanceof_cause()

    monkeypatch.setattr(cli, "_stage", stage)
    got, lines = run_cli(capsys, "select", "--config", str(experiment(tmp_path)))
    assert got == rc and lines == [f"error: {error}"] and isinstance(error, AlignmentError)


def test_verbose_adds_the_traceback(tmp_path, capsys, monkeypatch):
    def stage(name, cfg):
        raise _task_error(DataError("x.jsonl: bad")).as_instanceof_cause()

    monkeypatch.setattr(cli, "_stage", stage)
    assert cli.main(["-v", "select", "--config", str(experiment(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == "error: x.jsonl: bad"


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def stage(name, cfg):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_stage", stage)
    with pytest.raises(KeyError):
        cli.main(["select", "--config", str(experiment(tmp_path))])


@pytest.mark.integration
def test_errors_raised_in_ray_data_and_ray_tasks_reach_the_user_unwrapped(ray_local, tmp_path, capsys, monkeypatch):
    import ray

    def fails_in_a_data_task(name, cfg):
        def udf(batch):  # a local function: shipped to the worker by value
            raise DataError(f"{EXAMPLES / 'sft_alpaca.jsonl'}: row 3: cannot read it")

        return ray.data.range(4).map_batches(udf).take_all()

    monkeypatch.setattr(cli, "_stage", fails_in_a_data_task)
    rc, lines = run_cli(capsys, "select", "--config", str(experiment(tmp_path)))
    assert rc == 2 and lines[-1] == f"error: {EXAMPLES / 'sft_alpaca.jsonl'}: row 3: cannot read it"

    def fails_in_a_task(name, cfg):
        @ray.remote
        def load():
            raise models.ModelError("judge.model: /x is not a model directory (no config.json)")

        return ray.get(load.remote())

    monkeypatch.setattr(cli, "_stage", fails_in_a_task)
    rc, lines = run_cli(capsys, "judge", "--config", str(experiment(tmp_path)))
    assert rc == 2 and lines[-1] == "error: judge.model: /x is not a model directory (no config.json)"


@pytest.mark.integration
def test_a_search_trials_error_is_the_projects_own(ray_local, tmp_path):
    from alignment import search
    from alignment.config import load_config

    def trial(cfg):
        raise DataError(f"{EXAMPLES / 'preferences.jsonl'}: row 7: chosen: missing")

    results, _ = search.run_search(load_config(experiment(tmp_path)), trial, str(tmp_path / "tune"))
    assert [r["error"] for r in results] == [f"{EXAMPLES / 'preferences.jsonl'}: row 7: chosen: missing"]
    assert [r["exit_code"] for r in results] == [2]


def test_a_search_exits_as_its_failed_trials_did():
    from alignment.pipeline import search_error

    data = {"k": 8, "sft_step": 2, "error": "x.jsonl: bad", "exit_code": 2}
    err = search_error("1 of 2 search trials failed", [data])
    assert err.exit_code == 2 and str(err) == "1 of 2 search trials failed; first: k=8, sft_step=2: x.jsonl: bad"
    assert search_error("2 of 2 search trials failed", [data, {**data, "exit_code": 1}]).exit_code == 1


# ------------------------------------------------------------------------------------------ the sweep


def _files_holding(roots: list[Path], secrets: list[str]) -> list[str]:
    found = []
    for root in roots:
        for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            try:
                data = f.read_bytes()
            except OSError:
                continue
            found += [f"{f}: secret {i}" for i, s in enumerate(secrets) if s.encode() in data]
    return found


@pytest.mark.integration
def test_no_secret_reaches_the_run_directory_ray_logs_or_the_output(tmp_path, tiny_model, fake_endpoint):
    """A run with an endpoint key (with a trailing newline, as pasted from a file), tokens in the environment,
    and a data URI with a password given on the command line (refused): none of them appears in any file of
    the run directory, in Ray's session directory (logs included) or in what the commands printed."""
    import uuid

    from conftest import stop_head, tiny_experiment

    tag = uuid.uuid4().hex[:12]
    key, uri_password, hf_token, aws_secret = (f"sk-sweep-{tag}", f"uripass-{tag}", f"hf_sweep{tag}",
                                               f"awssweep{tag}")
    secrets = [key, uri_password, hf_token, aws_secret]
    exp = tiny_experiment(tmp_path, tiny_model)
    endpoint = {"backend": "openai", "api_base_env": "TEST_JUDGE_URL", "api_key_env": "TEST_JUDGE_KEY"}
    exp["select"] = {"k": 8, "scorers": ["rating"], "rating": endpoint}
    exp["judge"] = {**endpoint, "model": "judge-model", "rule": "sum", "max_new_tokens": 6}
    exp["search"] = {"k": [8], "sft_step": [2]}
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump(exp))
    temp = Path("/tmp") / f"rsw-{os.getpid()}"  # short: Ray's socket paths have a length limit
    env = {**os.environ, "TEST_JUDGE_KEY": key + "\n", "HF_TOKEN": hf_token, "AWS_SECRET_ACCESS_KEY": aws_secret,
           "RAY_TMPDIR": str(temp)}
    env.pop("RAY_ADDRESS", None)
    printed = []
    try:
        refused = subprocess.run([str(BIN / "alignment"), "run", "--config", str(cfg),
                                  f"data.sft=s3://AKIAFAKE:{uri_password}@bucket/x.jsonl"],
                                 env=env, capture_output=True, text=True, timeout=120)
        printed += [refused.stdout, refused.stderr]
        assert refused.returncode == 2 and "data.sft: credentials in the URI" in refused.stderr, refused.stderr
        run = subprocess.run([str(BIN / "alignment"), "run", "--config", str(cfg)], env=env, capture_output=True,
                             text=True, timeout=1200)
        printed += [run.stdout, run.stderr]
        assert run.returncode == 0, run.stderr[-3000:]
    finally:
        stop_head(temp)
    try:
        assert fake_endpoint and {r["auth"] for r in fake_endpoint} == {f"Bearer {key}"}  # sent, stripped
        leaks = _files_holding([Path(exp["run_dir"]), temp], secrets)
        leaks += [f"output {i}: secret {j}" for i, text in enumerate(printed) for j, s in enumerate(secrets)
                  if s in text]
        assert not leaks, leaks
        assert list(temp.rglob("session_*/logs/*")), "Ray's session logs were not where the sweep looked"
    finally:
        import shutil

        shutil.rmtree(temp, ignore_errors=True)
