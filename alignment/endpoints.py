"""Clients for OpenAI-compatible chat-completions endpoints (judges, raters). Keys come from the environment,
are read at call time, and never reach logs, manifests or reports."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor


class GenerationError(RuntimeError):
    pass


def _post_json(url: str, payload: dict, api_key: str | None, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


class Endpoint:
    """An endpoint's URL and key, read from the environment in the driver and shipped to Ray workers (whose
    environment is the cluster's, not the driver's). Its repr never shows the key."""

    def __init__(self, base_url_env: str, api_key_env: str):
        base = os.environ.get(base_url_env)
        if not base:
            raise GenerationError(f"the endpoint URL is not set: export {base_url_env}=https://.../v1")
        self.url = base.rstrip("/") + "/chat/completions"
        self._key = os.environ.get(api_key_env)

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r}, key={'***' if self._key else None})"


def complete_openai(prompts: list[dict], model: str, endpoint: Endpoint, max_tokens: int, timeout: float = 120.0,
                    workers: int = 8) -> list[dict]:
    """Greedy chat completions from an OpenAI-compatible endpoint."""
    url, api_key = endpoint.url, endpoint._key

    def one(p: dict) -> dict:
        payload = {"model": model, "messages": p["messages"], "temperature": 0.0, "max_tokens": max_tokens}
        try:
            body = _post_json(url, payload, api_key, timeout)
            text = body["choices"][0]["message"]["content"] or ""
            n = int((body.get("usage") or {}).get("completion_tokens") or 0)
            return {"id": p["id"], "answer": text.strip(), "num_new_tokens": n, "error": None}
        except (urllib.error.URLError, TimeoutError, KeyError, IndexError, ValueError) as e:
            # Never guessed: the caller counts an error as an unparsed answer. The key never appears in it.
            return {"id": p["id"], "answer": "", "num_new_tokens": 0, "error": f"{type(e).__name__}: {e}"}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, prompts))
