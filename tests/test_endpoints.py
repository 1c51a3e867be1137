"""OpenAI-compatible endpoints that are flaky or down: retries, failed (not finished) stages, re-runs that send
only what failed, failures counted by kind, and a key that never reaches a stored text."""

from __future__ import annotations

import email.utils
import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from alignment import endpoints, pipeline, select
from alignment.config import ExperimentConfig, SelectConfig
from alignment.manifest import read_manifest

FAST = endpoints.Retry(max_retries=3, backoff_s=0.001)
KEY = "sk-test-0123456789abcdef"


class FakeEndpoint:
    """A chat-completions endpoint on the loopback whose answer to each request is ``respond(hit, text, auth)``
    -> ``(status, headers, body)`` (``hit``: the request's number from 1, ``text``: the last message's content;
    a body of None drops the connection without an answer). ``hits`` lists (text, auth) of every request."""

    def __init__(self, respond):
        self.respond, self.hits, self.lock = respond, [], threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text, auth = body["messages"][-1]["content"], self.headers.get("Authorization")
                with outer.lock:
                    outer.hits.append((text, auth))
                    n = len(outer.hits)
                status, headers, reply = outer.respond(n, text, auth)
                if reply is None:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                data = reply.encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def ok(text: str = "4\nfine") -> tuple[int, dict, str]:
    return 200, {"Content-Type": "application/json"}, json.dumps(
        {"choices": [{"message": {"content": text}}], "usage": {"completion_tokens": 3}})


def status(code: int, body: str = "", **headers: str) -> tuple[int, dict, str]:
    return code, {k.replace("_", "-"): v for k, v in headers.items()}, body


@pytest.fixture()
def serve(monkeypatch):
    """Start a :class:`FakeEndpoint` and point TEST_EP_URL / TEST_EP_KEY at it."""
    started = []

    def start(respond, key: str = KEY) -> FakeEndpoint:
        ep = FakeEndpoint(respond)
        started.append(ep)
        monkeypatch.setenv("TEST_EP_URL", ep.url)
        monkeypatch.setenv("TEST_EP_KEY", key)
        return ep

    yield start
    for ep in started:
        ep.stop()


@pytest.fixture()
def down_url(monkeypatch) -> str:
    """TEST_EP_URL pointing at a loopback port nothing listens on (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setenv("TEST_EP_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setenv("TEST_EP_KEY", KEY)
    return f"http://127.0.0.1:{port}/v1"


def prompts(*texts: str) -> list[dict]:
    return [{"id": f"p{i}", "messages": [{"role": "user", "content": t}]} for i, t in enumerate(texts)]


def complete(ps: list[dict], retry: endpoints.Retry = FAST, workers: int = 1, **kw) -> list[dict]:
    return endpoints.complete_openai(ps, "m", endpoints.Endpoint("TEST_EP_URL", "TEST_EP_KEY"), 8, timeout=5.0,
                                     workers=workers, retry=retry, **kw)


# ------------------------------------------------------------------------------------------ the client


def test_429_on_every_second_request_all_succeed_after_retries(serve):
    ep = serve(lambda n, text, auth: status(429, "slow down", Retry_After="0") if n % 2 == 0 else ok())
    t0 = time.perf_counter()
    # A long backoff: only the endpoint's Retry-After: 0 keeps this fast.
    out = complete(prompts(*"abcde"), endpoints.Retry(max_retries=2, backoff_s=30.0))
    assert time.perf_counter() - t0 < 10
    assert [o["error"] for o in out] == [None] * 5 and [o["answer"] for o in out] == ["4\nfine"] * 5
    assert len(ep.hits) == 9  # four of the five were sent twice


def test_503_then_success_and_a_timeout_are_retried(serve):
    ep = serve(lambda n, text, auth: status(503, "busy") if n == 1 else ok())
    (out,) = complete(prompts("a"))
    assert out["error"] is None and len(ep.hits) == 2

    def slow_first(n, text, auth):
        if n == 1:
            time.sleep(1.5)
        return ok()

    ep2 = serve(slow_first)
    (out,) = endpoints.complete_openai(prompts("a"), "m", endpoints.Endpoint("TEST_EP_URL", "TEST_EP_KEY"), 8,
                                       timeout=0.5, retry=FAST)
    assert out["error"] is None and len(ep2.hits) == 2


def test_other_4xx_and_a_bad_response_are_not_retried(serve):
    ep = serve(lambda n, text, auth: status(400, '{"error": "no such model"}') if "a" in text else
               (200, {}, "<html>proxy error</html>"))
    bad_request, bad_body = complete(prompts("a", "b"))
    assert bad_request["error_kind"] == "http 400" and "no such model" in bad_request["error"]
    assert bad_body["error_kind"] == "bad response" and bad_body["answer"] == ""
    assert len(ep.hits) == 2  # one try each


def test_endpoint_down_is_a_connection_failure_and_the_rest_is_not_sent(down_url):
    out = complete(prompts(*"abcdef"), endpoints.Retry(max_retries=1, backoff_s=0.001, give_up_after=2))
    assert [o["error_kind"] for o in out] == ["connection"] * 2 + [endpoints.NOT_SENT] * 4
    assert "refused" in out[0]["error"].lower() and "refused" in out[5]["error"].lower()


def test_retry_after_and_backoff_are_bounded():
    now = time.time()
    assert endpoints.retry_after_s("7", now) == 7.0
    assert endpoints.retry_after_s(email.utils.formatdate(now + 30, usegmt=True), now) == pytest.approx(30, abs=1.5)
    assert endpoints.retry_after_s("soon", now) is None and endpoints.retry_after_s(None, now) is None
    r, rng = endpoints.Retry(max_retries=9, backoff_s=1.0, cap_s=10.0), random.Random(0)
    assert r.delay(0, 3600.0, rng) == 10.0  # a Retry-After of an hour waits the cap
    delays = [r.delay(a, None, rng) for a in range(9) for _ in range(50)]
    assert max(delays) <= 10.0 and min(delays) >= 0.0
    assert max(r.delay(2, None, rng) for _ in range(200)) <= 4.0  # full jitter under backoff * 2**attempt


def test_cached_answers_are_not_sent_and_new_ones_are_reported_as_they_arrive(serve):
    ep = serve(lambda n, text, auth: ok(f"answer {text}"))
    ps = prompts("a", "b")
    cache = {endpoints.request_key("m", ps[0]["messages"], 8): {"answer": "kept", "num_new_tokens": 1}}
    seen = []
    out = complete(ps, cache=cache, on_result=seen.append)
    assert [o["answer"] for o in out] == ["kept", "answer b"] and [o["cached"] for o in out] == [True, False]
    assert [h[0] for h in ep.hits] == ["b"] and [s["id"] for s in seen] == ["p1"]


# ------------------------------------------------------------------------------------------ the key


def test_a_key_ending_in_a_newline_is_stripped(serve):
    ep = serve(lambda n, text, auth: ok(), key=KEY + "\n")
    (out,) = complete(prompts("a"))
    assert out["error"] is None and ep.hits[0][1] == f"Bearer {KEY}"


@pytest.mark.parametrize("bad", ["sk-test 0123456789", "sk-test\n0123456789", "sk-test\u20140123456789"])
def test_a_key_with_whitespace_inside_is_refused_without_showing_it(monkeypatch, bad):
    monkeypatch.setenv("TEST_EP_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("TEST_EP_KEY", bad)
    with pytest.raises(endpoints.GenerationError, match="TEST_EP_KEY") as e:
        endpoints.Endpoint("TEST_EP_URL", "TEST_EP_KEY")
    assert "sk-test" not in str(e.value) and "0123456789" not in str(e.value)


@pytest.mark.parametrize("url,why", [("https://user:pw-0123456789@example.invalid/v1", "carries a credential"),
                                     ("https://example.invalid/v1?api_key=pw-0123456789", "carries a credential"),
                                     ("example.invalid/v1", "not an http(s)://host"),
                                     ("localhost:8000/v1", "not an http(s)://host")])
def test_an_endpoint_url_with_a_credential_or_without_a_scheme_is_refused(monkeypatch, url, why):
    monkeypatch.setenv("TEST_EP_URL", url)
    monkeypatch.setenv("TEST_EP_KEY", KEY)
    with pytest.raises(endpoints.GenerationError, match="TEST_EP_URL") as e:
        endpoints.Endpoint("TEST_EP_URL", "TEST_EP_KEY")
    assert why in str(e.value) and "pw-0123456789" not in str(e.value)


def test_an_error_text_never_holds_the_key(serve):
    # An endpoint (or proxy) that echoes the request's Authorization header in its error body.
    serve(lambda n, text, auth: status(401, f"invalid credentials: {auth}"), key=KEY + "\n")
    (out,) = complete(prompts("a"))
    assert out["error_kind"] == "http 401" and KEY not in out["error"] and "***" in out["error"]
    assert endpoints.scrub(f"x Bearer {KEY}\n and {KEY}", KEY) == "x Bearer ***\n and ***"


# ------------------------------------------------------------------------------------------ the judge stage


def judge_setup(tmp_path: Path, **judge: object) -> tuple[ExperimentConfig, dict, dict]:
    cfg = ExperimentConfig.model_validate({
        "run_dir": str(tmp_path / "run"),
        "judge": {"backend": "openai", "model": "judge-m", "api_base_env": "TEST_EP_URL", "api_key_env": "TEST_EP_KEY",
                  "max_retries": 1, "retry_backoff_s": 0.001, **judge}})
    stages = []
    for label in ("target", "baseline"):
        rows = [{"id": q, "messages": [{"role": "user", "content": f"question {q}"}], "answer": f"{label} on {q}"}
                for q in ("q1", "q2")]
        path = write_jsonl(tmp_path / label / "answers.jsonl", rows)
        stages.append({"outputs": {"answers": str(path)}, "dir": str(path.parent), "label": label})
    return cfg, stages[0], stages[1]


def stored_texts(stage_dir: Path) -> str:
    """Every file the stage wrote (parquet too), as text."""
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in Path(stage_dir).iterdir() if p.is_file())


def test_judge_endpoint_down_fails_the_stage_and_a_rerun_completes(tmp_path, down_url, serve):
    cfg, target, baseline = judge_setup(tmp_path)
    with pytest.raises(pipeline.PipelineError) as e:
        pipeline.judge_stage(cfg, target, baseline)
    msg = str(e.value)
    assert "failed 4 of 4 requests (connection: 4)" in msg and "refused" in msg.lower()
    assert "judge.max_failed_fraction=0.0" in msg and "run again" in msg
    (stage_dir,) = (Path(cfg.run_dir) / "judge").iterdir()
    assert read_manifest(stage_dir)["status"] == "failed"  # not finished: the next run does it again
    assert KEY not in stored_texts(stage_dir) + msg

    ep = serve(lambda n, text, auth: ok("8 3\nreasons"))
    done = pipeline.judge_stage(cfg, target, baseline)
    assert done["status"] == "complete" and done["dir"] == str(stage_dir) and len(ep.hits) == 4
    assert done["metrics"]["valid"] == 2 and done["metrics"]["failed_judgements"] == 0
    again = pipeline.judge_stage(cfg, target, baseline)
    assert again["skipped"] and len(ep.hits) == 4


def test_judge_rerun_sends_only_the_failed_requests(tmp_path, serve):
    cfg, target, baseline = judge_setup(tmp_path)
    up = {"q2": False}
    ep = serve(lambda n, text, auth: ok("8 3") if "question q1" in text or up["q2"] else status(502, "bad gateway"),
               key=KEY + "\n")
    with pytest.raises(pipeline.PipelineError, match=r"failed 2 of 4 requests \(http 502: 2\).*bad gateway"):
        pipeline.judge_stage(cfg, target, baseline)
    assert len(ep.hits) == 2 + 2 * 2  # q1's two orders; q2's two orders, each tried twice
    up["q2"] = True
    done = pipeline.judge_stage(cfg, target, baseline)
    sent = [text for text, _ in ep.hits[6:]]
    assert len(sent) == 2 and all("question q2" in t for t in sent)  # only what had failed
    assert done["counts"]["endpoint_requests"] == {"requests": 4, "answered_earlier": 2, "failed": {}}
    assert done["metrics"]["valid"] == 2
    assert KEY not in stored_texts(Path(done["dir"]))


def test_judge_failures_under_the_fraction_finish_with_the_counts(tmp_path, serve):
    cfg, target, baseline = judge_setup(tmp_path, max_failed_fraction=0.5)
    serve(lambda n, text, auth: ok("8 3") if "question q1" in text else status(500, "oops"))
    done = pipeline.judge_stage(cfg, target, baseline)
    assert done["status"] == "complete" and done["counts"]["endpoint_requests"]["failed"] == {"http 500": 2}
    assert done["metrics"]["failed_judgements"] == 2 and done["metrics"]["unparsed_judgements"] == 0
    assert done["metrics"]["invalid"] == 1 and done["metrics"]["valid"] == 1


# ------------------------------------------------------------------------------------------ the rating scorer


def rating(**kw: object) -> dict:
    return {"backend": "openai", "model": "rater", "api_base_env": "TEST_EP_URL", "api_key_env": "TEST_EP_KEY",
            "max_retries": 2, "retry_backoff_s": 0.001, "concurrency": 1, "tasks": 1, **kw}


def pool(tmp_path: Path, *ids: str) -> str:
    rows = [{"id": i, "instruction": f"task {i}", "output": "x"} for i in ids]
    return str(write_jsonl(tmp_path / "pool.jsonl", rows))


def rate(src: str, k: int, out: Path, allow_fewer: bool = False, **kw: object) -> dict:
    """The select stage on ``src`` with the rating scorer (its endpoint settings ``kw``)."""
    s = SelectConfig(k=k, scorers=["rating"], rating=rating(**kw), allow_fewer=allow_fewer)
    return select.run_select(s, select.Resolved(files=(src,), format="auto", seed=0), out)


def test_rating_retries_429s_and_selects_from_every_row(ray_local, tmp_path, serve):
    # Today's failure: one try per request, so 2 of 5 rows were set aside and the selection made from 3.
    serve(lambda n, text, auth: status(429, "", Retry_After="0") if n % 2 == 0 else ok("5"))
    r = rate(pool(tmp_path, *"abcde"), 5, tmp_path)
    assert r["counts"]["rows_selected"] == 5 and r["counts"]["rows_set_aside"] == 0
    assert r["counts"]["rating_requests"] == {"rows": 5, "answered_earlier": 0, "failed": {}}


def test_rating_failures_are_counted_by_kind_and_never_hold_the_key(ray_local, tmp_path, serve):
    def respond(n, text, auth):
        if "task busy" in text:
            return status(429, "rate limited", Retry_After="0")
        if "task drop" in text:
            return 0, {}, None  # the connection closes without an answer
        if "task echo" in text:
            return status(400, f"bad request from {auth}")
        return ok("no digit here") if "task garbled" in text else ok("4")

    ep = serve(respond, key=KEY + "\n")
    src = pool(tmp_path, "ok1", "ok2", "busy", "drop", "echo", "garbled")
    r = rate(src, 2, tmp_path, max_failed_fraction=1.0)
    assert r["counts"]["set_aside_reasons"] == {
        "score_rating: endpoint http 429": 1, "score_rating: endpoint connection": 1,
        "score_rating: endpoint http 400": 1, "score_rating: unparsed rating": 1}
    assert r["counts"]["rating_requests"]["failed"] == {"http 429": 1, "connection": 1, "http 400": 1}
    assert sorted(pq.read_table(r["outputs"]["selected"])["id"].to_pylist()) == ["ok1", "ok2"]
    assert all(auth == f"Bearer {KEY}" for _, auth in ep.hits)
    assert KEY not in stored_texts(tmp_path) + json.dumps(r)


def test_rating_over_the_fraction_fails_and_a_rerun_sends_only_the_failed_rows(ray_local, tmp_path, serve):
    up = {"now": False}
    ep = serve(lambda n, text, auth: ok("3") if "task ok" in text or up["now"] else status(503, "overloaded"))
    src = pool(tmp_path, "ok1", "ok2", "ok3", "ok4", "f1", "f2")
    with pytest.raises(select.SelectError) as e:
        rate(src, 4, tmp_path)
    msg = str(e.value)
    assert "rating endpoint failed 2 of 6 requests (http 503: 2)" in msg and "overloaded" in msg
    assert "select.rating.max_failed_fraction=0.01" in msg and "larger than the pool" not in msg
    assert len(ep.hits) == 4 + 2 * 3  # the failed rows were tried three times each
    up["now"] = True
    r = rate(src, 4, tmp_path)  # the same directory, as a failed stage's re-run
    assert sorted(text.split("task ")[1][:2] for text, _ in ep.hits[10:]) == ["f1", "f2"]
    assert r["counts"]["rating_requests"] == {"rows": 6, "answered_earlier": 4, "failed": {}}
    assert r["counts"]["rows_selected"] == 4


def test_every_rating_failing_names_the_endpoint_error(ray_local, tmp_path, down_url):
    with pytest.raises(select.SelectError) as e:
        rate(pool(tmp_path, *"abc"), 2, tmp_path, max_retries=0)
    assert "(connection: 3)" in str(e.value) and "refused" in str(e.value).lower()
    assert "larger than the pool" not in str(e.value) and KEY not in str(e.value)


def test_zero_selected_rows_is_an_error_even_with_allow_fewer(ray_local, tmp_path, serve):
    serve(lambda n, text, auth: ok("I cannot rate this"))
    with pytest.raises(select.SelectError, match=r"no rows to select.*score_rating: unparsed rating \(3\)"):
        rate(pool(tmp_path, *"abc"), 2, tmp_path, allow_fewer=True)


def test_a_select_rerun_with_a_raised_fraction_keeps_its_directory_and_stored_answers(ray_local, tmp_path, serve):
    ep = serve(lambda n, text, auth: ok("3") if "task ok" in text else status(503, "overloaded"))
    src = pool(tmp_path, "ok1", "ok2", "ok3", "f1")
    exp = {"run_dir": str(tmp_path / "run"), "data": {"sft": [src]},
           "select": {"k": 3, "scorers": ["rating"], "rating": rating()}}
    with pytest.raises(select.SelectError, match="select.rating.max_failed_fraction=0.01"):
        pipeline.select_stage(ExperimentConfig.model_validate(exp))
    (stage_dir,) = (Path(exp["run_dir"]) / "select").iterdir()
    exp["select"]["rating"] = rating(max_failed_fraction=0.5, max_retries=0, tasks=2)
    done = pipeline.select_stage(ExperimentConfig.model_validate(exp))
    assert done["status"] == "complete" and done["dir"] == str(stage_dir)
    assert [text.split("task ")[1][:2] for text, _ in ep.hits[4 + 2:]] == ["f1"]  # the answered rows: not sent
    assert done["counts"]["rating_requests"] == {"rows": 4, "answered_earlier": 3, "failed": {"http 503": 1}}
