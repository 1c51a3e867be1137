"""Benchmark: judge throughput against an OpenAI-compatible endpoint, through the project's own client.

    .venv/bin/python benchmarks/judge_throughput.py [--n 1000] [--concurrency 32] [--latency-ms 200]

The endpoint: a threaded ``http.server`` on 127.0.0.1 that answers every chat completion after a fixed delay
(``--latency-ms``) with a well-formed vicuna_pairwise judgement, so the wall time is the client's: how many
requests it keeps in flight, and what each costs it beyond the endpoint's delay. The requests: the judge's own
(``alignment.evaluate.pairwise.build_requests``, both orders) over the Vicuna questions
(../shared/data/eval_prompts/vicuna_test_set.jsonl), with made-up answers that differ from round to round, so
that every request is distinct (no two share a cache key), up to ``--n``. They go through
``alignment.endpoints.complete_openai`` (the URL and key in environment variables, read by ``Endpoint``, as the
judge stage does), with ``--concurrency`` requests in flight; then, in the same process, at
``--baseline-concurrency`` (8: the old fixed default) on the first ``--baseline-n`` requests, the wall time
extrapolated to ``--n`` if fewer. The ideal is ``n * latency / concurrency``. Target: under 10 s for 1,000
judgements at 32 in flight and 200 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibration import calibration_line  # noqa: E402  (benchmarks/calibration.py)

from alignment import endpoints, formats  # noqa: E402
from alignment.evaluate import pairwise  # noqa: E402

PROMPTS = ROOT.parent / "shared" / "data" / "eval_prompts" / "vicuna_test_set.jsonl"
URL_ENV, KEY_ENV = "BENCH_JUDGE_URL", "BENCH_JUDGE_KEY"
TARGET_S = 10.0


class SlowEndpoint(ThreadingHTTPServer):
    """Answers every POST after ``latency`` seconds with a chat completion holding a two-score judgement."""

    daemon_threads = True
    request_queue_size = 256  # the listen backlog (socketserver's default is 5): every request in flight connects

    def __init__(self, latency: float):
        self.latency, self.served = latency, 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: SlowEndpoint

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        time.sleep(self.server.latency)
        answer = {"id": "bench", "object": "chat.completion", "model": body.get("model"),
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": "8 6\nAssistant 1 is more detailed."}}],
                  "usage": {"prompt_tokens": 0, "completion_tokens": 9, "total_tokens": 9}}
        raw = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)
        with self.server.lock:
            self.server.served += 1

    def log_message(self, *args) -> None:  # one line a request would swamp the figures
        pass


def judge_requests(n: int) -> list[dict]:
    """``n`` vicuna_pairwise requests (both orders of each question), every one distinct: round ``r`` gives the
    questions ids ``r<r>-<id>`` and answers that name the round."""
    questions, _ = formats.read_rows(str(PROMPTS), "eval")
    reqs: list[dict] = []
    r = 0
    while len(reqs) < n:
        qs = [{**q, "id": f"r{r}-{q['id']}"} for q in questions]
        target = {q["id"]: f"Round {r}: a detailed answer to '{q['messages'][-1]['content']}', step by step."
                  for q in qs}
        baseline = {q["id"]: f"Round {r}: a short answer." for q in qs}
        reqs += pairwise.build_requests(qs, target, baseline)
        r += 1
    return reqs[:n]


def timed(reqs: list[dict], endpoint: endpoints.Endpoint, concurrency: int, max_tokens: int) -> tuple[float, list]:
    start = time.perf_counter()
    outs = endpoints.complete_openai(reqs, "bench-judge", endpoint, max_tokens, workers=concurrency)
    return time.perf_counter() - start, outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="judgements")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    ap.add_argument("--latency-ms", type=float, default=200.0, help="the endpoint's delay before each answer")
    ap.add_argument("--baseline-concurrency", type=int, default=8, help="the baseline's requests in flight")
    ap.add_argument("--baseline-n", type=int, default=None, help="the baseline's requests (default: --n)")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens sent (judge.max_new_tokens' default)")
    args = ap.parse_args()

    print(calibration_line())
    latency = args.latency_ms / 1000
    server = SlowEndpoint(latency)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ[URL_ENV] = f"http://127.0.0.1:{server.server_address[1]}/v1"
    os.environ[KEY_ENV] = "bench-key"
    endpoint = endpoints.Endpoint(URL_ENV, KEY_ENV)
    try:
        reqs = judge_requests(args.n)
        keys = {endpoints.request_key("bench-judge", r["messages"], args.max_tokens) for r in reqs}
        assert len(keys) == len(reqs), "two requests share a cache key"

        wall, outs = timed(reqs, endpoint, args.concurrency, args.max_tokens)
        errors = sum(bool(o["error"]) for o in outs)
        _, summary = pairwise.score(reqs, outs, "strict")
        ideal = args.n * latency / args.concurrency
        print(f"judgements {args.n} ({len(keys)} distinct requests, {errors} failed; scored: {summary['valid']} "
              f"of {summary['prompts']} questions valid), concurrency {args.concurrency}, "
              f"latency {args.latency_ms:.0f} ms")
        print(f"wall {wall:.2f} s, {args.n / wall:.1f} judgements/s; ideal (n * latency / concurrency) {ideal:.2f} s, "
              f"wall/ideal {wall / ideal:.3f}; target < {TARGET_S:.0f} s: {'met' if wall < TARGET_S else 'MISSED'}")

        bn = min(args.baseline_n or args.n, args.n)
        b_wall, b_outs = timed(reqs[:bn], endpoint, args.baseline_concurrency, args.max_tokens)
        b_errors = sum(bool(o["error"]) for o in b_outs)
        b_full = b_wall * args.n / bn
        b_ideal = args.n * latency / args.baseline_concurrency
        what = f"{bn} judgements" if bn == args.n else f"{bn} judgements, extrapolated to {args.n}"
        print(f"baseline: concurrency {args.baseline_concurrency} ({what}, {b_errors} failed): wall {b_full:.2f} s, "
              f"{args.n / b_full:.1f} judgements/s (ideal {b_ideal:.2f} s, wall/ideal {b_full / b_ideal:.3f}); "
              f"speed-up {b_full / wall:.2f}x")
        print(f"endpoint served {server.served} requests")
    finally:
        server.shutdown()
        server.server_close()
    return 0 if wall < TARGET_S and errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
