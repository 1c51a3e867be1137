"""Clients for OpenAI-compatible chat-completions endpoints (judges, raters). Keys come from the environment
and never reach logs, manifests or reports: every error text that leaves this module is scrubbed of the key.

A request that failed in a way a later try may not (HTTP 408, 429, 5xx, a timeout, a refused or dropped
connection) is sent again after an exponential, jittered wait (the endpoint's ``Retry-After`` where it sends
one), a bounded number of times; other failures (another 4xx, an answer that is not a chat completion) are
not. A request that still fails comes back with ``error`` (short, scrubbed) and ``error_kind``
(``connection``, ``timeout``, ``http 429``, ``bad response``, ...), never with a made-up answer.

A request may ask for the top log-probabilities of the answer's first token (``top_logprobs``; a judge that reads
them, alpaca_eval's): an answer without them is a failure (``no logprobs``), and an endpoint that answers none of
the requests with them, or refuses them, is an error that says so.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import logging
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import AlignmentError

log = logging.getLogger("alignment")


class GenerationError(AlignmentError, RuntimeError):
    pass


@dataclass(frozen=True)
class Retry:
    """How often, and after how long a wait, a failed request is sent again."""

    max_retries: int = 5  # tries after the first
    backoff_s: float = 1.0  # the first wait is up to this long, each next one up to twice as long (full jitter)
    cap_s: float = 60.0  # no wait is longer, an endpoint's Retry-After included
    # After this many requests in a row failed (each after its retries), the rest of the call is not sent:
    # an endpoint that is down would otherwise cost every request its whole series of waits.
    give_up_after: int = 16

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """The wait before retry ``attempt + 1``: the endpoint's Retry-After, else full jitter."""
        if retry_after is not None:
            return min(self.cap_s, retry_after)
        return rng.uniform(0.0, min(self.cap_s, self.backoff_s * 2 ** attempt))


RETRIED_STATUS = (408, 429)  # and every 5xx
NOT_SENT = "not sent"
NO_LOGPROBS = "no logprobs"  # an answer without the log-probabilities the request asked for
_MAX_ERROR_CHARS = 300


def retry_after_s(value: str | None, now: float) -> float | None:
    """A ``Retry-After`` header in seconds (it holds seconds or an HTTP date); None when absent or unreadable."""
    if not value or not value.strip():
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def scrub(text: str, api_key: str | None) -> str:
    """``text`` with the key and any bearer token replaced by ``***``, cut to a few hundred characters."""
    text = re.sub(r"(?i)bearer\s+\S+", "Bearer ***", text)
    if api_key:
        text = text.replace(api_key, "***")
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "..."


class _Failure(Exception):
    """One failed try: its kind, what went wrong, whether a later try may succeed, the endpoint's Retry-After."""

    def __init__(self, kind: str, text: str, retry: bool, retry_after: float | None = None):
        super().__init__(kind)
        self.kind, self.text, self.retry, self.retry_after = kind, text, retry, retry_after


def _http_failure(e: urllib.error.HTTPError) -> _Failure:
    try:
        body = e.read(500).decode("utf-8", "replace").strip()
    except Exception:  # the body is only a detail of the error: its own failure is not the error
        body = ""
    after = retry_after_s(e.headers.get("Retry-After"), time.time()) if e.headers is not None else None
    return _Failure(f"http {e.code}", f"{e.reason}" + (f": {body}" if body else ""),
                    e.code in RETRIED_STATUS or 500 <= e.code < 600, after)


def _first_top_logprobs(choice: dict) -> list[dict] | None:
    """The first answer token's ``top_logprobs`` of a chat completion's choice (OpenAI's and vLLM's
    ``logprobs.content[0].top_logprobs``) as ``[{"token", "logprob"}]``; None when the choice has none."""
    content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
    if not isinstance(content, list) or not content or not isinstance(content[0], dict):
        return None
    top = content[0].get("top_logprobs")
    if not isinstance(top, list) or not top:
        return None
    return [{"token": str(t["token"]), "logprob": float(t["logprob"])} for t in top]


def _post_once(url: str, payload: dict, api_key: str | None, timeout: float) -> dict:
    """One try: the answer and its token count (and its first token's top log-probabilities, when the payload asks
    for them), or a :class:`_Failure`."""
    try:
        req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except http.client.InvalidURL as e:  # no later try can succeed
        raise _Failure("request", f"{type(e).__name__}: {e}", False) from None
    except urllib.error.HTTPError as e:
        raise _http_failure(e) from None
    except urllib.error.URLError as e:
        timed_out = isinstance(e.reason, TimeoutError)
        raise _Failure("timeout" if timed_out else "connection", str(e.reason), True) from None
    except TimeoutError as e:
        raise _Failure("timeout", str(e) or f"no answer within {timeout} s", True) from None
    except (OSError, http.client.HTTPException) as e:  # reset, dropped or cut-short connections
        raise _Failure("connection", f"{type(e).__name__}: {e}", True) from None
    except ValueError as e:  # a request http.client refuses to send (its text may hold a header: scrubbed)
        raise _Failure("request", f"{type(e).__name__}: {e}", False) from None
    try:
        body = json.loads(raw)
        text = body["choices"][0]["message"]["content"] or ""
        used = (body.get("usage") or {}).get("completion_tokens")
        n = int(used) if used is not None else None  # unknown, not 0, where the server does not report usage
        top = _first_top_logprobs(body["choices"][0]) if payload.get("logprobs") else None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise _Failure("bad response", f"{type(e).__name__}: {e}; body {raw[:200]!r}", False) from None
    if not payload.get("logprobs"):
        return {"answer": text.strip(), "num_new_tokens": n}
    if top is None:
        raise _Failure(NO_LOGPROBS, f"the answer carries no logprobs.content[0].top_logprobs; body {raw[:200]!r}",
                       False)
    return {"answer": text.strip(), "num_new_tokens": n, "top_logprobs": top}


class Endpoint:
    """An endpoint's URL and key, read from the environment in the driver and shipped to Ray workers (whose
    environment is the cluster's, not the driver's). Its repr never shows the key."""

    def __init__(self, base_url_env: str, api_key_env: str):
        from .config import uri_credentials

        base = (os.environ.get(base_url_env) or "").strip()
        if not base:
            raise GenerationError(f"the endpoint URL is not set: export {base_url_env}=https://.../v1")
        # The URL is shown in errors and logs: one that carries a password or a key is refused, without showing it.
        if uri_credentials(base):
            raise GenerationError(f"the endpoint URL in {base_url_env} carries a credential; give the key through "
                                  "the api_key_env variable instead (the URL is not shown)")
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise GenerationError(f"the endpoint URL in {base_url_env} is not an http(s)://host/... URL; set it as "
                                  "https://host/v1")
        self.url = base.rstrip("/") + "/chat/completions"
        # A key pasted or read from a file often ends in a line break: stripped. One with whitespace or other
        # characters inside it cannot go into a header (http.client's error would print the header, key
        # included): refused, without showing it.
        key = (os.environ.get(api_key_env) or "").strip()
        if key and not (key.isascii() and key.isprintable() and not any(c.isspace() for c in key)):
            raise GenerationError(f"the API key in {api_key_env} holds whitespace or characters other than printable "
                                  "ASCII inside it; set it again without them (the key is not shown)")
        self._key = key or None

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r}, key={'***' if self._key else None})"


def sampling(p: dict) -> dict:
    """A prompt's sampling settings as the request carries them: none for greedy (temperature 0, the default);
    else its ``temperature`` and, where it has one, its ``seed`` (honoured by vLLM's and OpenAI's servers)."""
    t = p.get("temperature") or 0.0
    return {} if t == 0 else {"temperature": t, **({"seed": p["seed"]} if p.get("seed") is not None else {})}


def request_key(model: str, messages: list[dict], max_tokens: int, top_logprobs: int = 0,
                sampled: dict | None = None) -> str:
    """What a cached answer is filed under: a hash of the model and the whole request (the log-probabilities and
    the sampling settings it asks for among it; a greedy request without log-probabilities keeps the key it
    always had)."""
    asked = {"model": model, "messages": messages, "max_tokens": max_tokens, **(sampled or {})}
    if top_logprobs:
        asked["top_logprobs"] = top_logprobs
    text = json.dumps(asked, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def complete_openai(prompts: list[dict], model: str, endpoint: Endpoint, max_tokens: int, timeout: float = 120.0,
                    workers: int = 8, retry: Retry = Retry(), cache: dict[str, dict] | None = None,
                    on_result: Callable[[dict], None] | None = None, top_logprobs: int = 0) -> list[dict]:
    """Chat completions from an OpenAI-compatible endpoint, one per prompt, in the prompts' order, greedy unless
    a prompt has a ``temperature`` (and ``seed``: :func:`sampling`):
    ``id``, ``key`` (:func:`request_key`), ``answer``, ``num_new_tokens``, ``cached``, ``error`` and ``error_kind``
    (None unless the request failed after its retries). A prompt whose key is in ``cache`` (key -> an earlier
    answer) is answered from it, unsent. ``on_result`` sees each sent request's result in this thread as it
    arrives, so that a caller can store answers before the rest are done. At most ``workers`` requests are in
    flight.

    ``top_logprobs`` > 0 asks for the top log-probabilities of the first answer token (``logprobs: true``,
    ``top_logprobs``); each result then carries ``top_logprobs`` (``[{"token", "logprob"}]``, None for a failed
    request). An answer without them fails (``no logprobs``); when no request sent came back with them and the
    endpoint left them out or refused them, the call raises a :class:`GenerationError` that says so."""
    url, api_key = endpoint.url, endpoint._key
    rng = random.Random()
    lock = threading.Lock()
    streak = {"failed": 0, "last": ""}  # requests failed in a row (after their retries), and the last error

    def one(p: dict) -> dict:
        payload = {"model": model, "messages": p["messages"], "temperature": 0.0, "max_tokens": max_tokens,
                   **sampling(p)}
        if top_logprobs:
            payload.update(logprobs=True, top_logprobs=top_logprobs)
        with lock:
            if streak["failed"] >= retry.give_up_after:
                why = f"the {streak['failed']} requests before it failed (last: {streak['last']})"
                return {"answer": "", "num_new_tokens": 0, "error_kind": NOT_SENT, "error": f"{NOT_SENT}: {why}"}
        for attempt in range(retry.max_retries + 1):
            try:
                res = {**_post_once(url, payload, api_key, timeout), "error": None, "error_kind": None}
                with lock:
                    streak["failed"] = 0
                return res
            except _Failure as f:
                failure = f
                if not f.retry or attempt == retry.max_retries:
                    break
                time.sleep(retry.delay(attempt, f.retry_after, rng))
        error = scrub(f"{failure.kind}: {failure.text}", api_key)
        with lock:
            streak["failed"] += 1
            streak["last"] = error
        return {"answer": "", "num_new_tokens": 0, "error": error, "error_kind": failure.kind}

    out: list[dict | None] = [None] * len(prompts)
    todo = []
    logprobs = {"top_logprobs": None} if top_logprobs else {}  # every result has the key when they are asked for
    for i, p in enumerate(prompts):
        key = request_key(model, p["messages"], max_tokens, top_logprobs, sampling(p))
        hit = (cache or {}).get(key)
        if hit is None:
            todo.append((i, key, p))
        else:
            out[i] = {"id": p["id"], "key": key, "answer": hit["answer"], "num_new_tokens": hit["num_new_tokens"],
                      **({"top_logprobs": hit.get("top_logprobs")} if top_logprobs else {}),
                      "cached": True, "error": None, "error_kind": None}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(one, p): (i, key, p["id"]) for i, key, p in todo}
        for fut in as_completed(futures):
            i, key, pid = futures[fut]
            out[i] = {"id": pid, "key": key, **logprobs, **fut.result(), "cached": False}
            if on_result is not None:
                on_result(out[i])
    if top_logprobs:
        _check_logprobs(out, model, top_logprobs, api_key)  # type: ignore[arg-type]
    return out  # type: ignore[return-value]


def _check_logprobs(out: list[dict], model: str, n: int, api_key: str | None) -> None:
    """An endpoint that answered none of the requests sent with log-probabilities, and left them out of its answers
    or refused them (a 4xx that names them), cannot serve a judge that reads them: an error, rather than every
    judgement counted as failed."""
    sent = [o for o in out if not o["cached"] and o["error_kind"] != NOT_SENT]
    refused = [o for o in sent if o["error_kind"] == NO_LOGPROBS
               or (str(o["error_kind"]).startswith("http 4") and "logprob" in (o["error"] or "").lower())]
    if not refused or any(not o["error"] for o in sent):
        return
    how = "left them out of its answers" if refused[0]["error_kind"] == NO_LOGPROBS else "refused them"
    msg = (f"the endpoint answered model {model!r} without log-probabilities: asked for `logprobs: true, "
           f"top_logprobs: {n}` (the top log-probabilities of the first answer token, which this judge reads), it "
           f"{how} ({len(refused)} of the {len(sent)} requests sent; first: {refused[0]['error']}). Use an endpoint "
           "and model that return them (OpenAI's chat completions and vLLM's OpenAI-compatible server do)")
    raise GenerationError(msg.replace(api_key, "***") if api_key else msg)


# ------------------------------------------------------------------------------ answers kept across runs


def read_cache(path: Path) -> dict[str, dict]:
    """The answers a stage stored in ``path`` (request key -> answer and tokens); none when it is absent. A
    last line cut short by a killed run is left out: its request is sent again."""
    cache: dict[str, dict] = {}
    if not path.is_file():
        return cache
    cut = 0
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
                cache[r["key"]] = {"answer": r["answer"], "num_new_tokens": r.get("num_new_tokens", 0),
                                   **({"top_logprobs": r["top_logprobs"]} if r.get("top_logprobs") else {})}
            except (ValueError, KeyError, TypeError):
                cut += 1
    if cut:
        log.warning("%s: %d unreadable lines left out (a run killed while writing); those requests are sent again",
                    path, cut)
    return cache


def complete_cached(prompts: list[dict], model: str, endpoint: Endpoint, max_tokens: int, cache_path: Path,
                    **kwargs: Any) -> list[dict]:
    """:func:`complete_openai` with its answers kept in ``cache_path``: those stored there earlier are not asked
    again, and each new one is appended as it arrives (a run killed halfway keeps what came)."""
    cache = read_cache(cache_path)
    with open(cache_path, "a") as f:
        def keep(o: dict) -> None:
            if not o["error"]:
                f.write(cache_line(o["key"], o["answer"], o["num_new_tokens"], o.get("top_logprobs")))
                f.flush()

        return complete_openai(prompts, model, endpoint, max_tokens, cache=cache, on_result=keep, **kwargs)


def cache_line(key: str, answer: str, num_new_tokens: int = 0, top_logprobs: list[dict] | None = None) -> str:
    """One stored answer (with its first token's top log-probabilities where the request asked for them)."""
    line = {"key": key, "answer": answer, "num_new_tokens": num_new_tokens}
    if top_logprobs:
        line["top_logprobs"] = top_logprobs
    return json.dumps(line) + "\n"


def failure_message(what: str, failed: dict[str, int], total: int, first_error: str | None, setting: str,
                    max_fraction: float, kept: int, cache_path: Path) -> str | None:
    """Why a stage fails when more than ``max_fraction`` of its ``total`` requests failed (``failed``: kind ->
    requests), else None: the counts by kind, the endpoint's first (scrubbed) error and how a re-run resumes."""
    n = sum(failed.values())
    if n == 0 or n <= max_fraction * total:
        return None
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(failed.items(), key=lambda x: -x[1]))
    return (f"the {what} endpoint failed {n} of {total} requests ({kinds}), more than {setting}={max_fraction} "
            f"allows; first error: {first_error}. The {kept} answers received are kept in {cache_path}: run again "
            "to send only the failed requests")
