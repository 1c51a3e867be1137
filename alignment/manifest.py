"""Stage outputs and manifests: a re-run skips finished work, a killed run starts the unfinished stage again.

Each stage run lives in ``<run_dir>/<stage>/<label>-<key>/`` where ``key`` hashes the stage's config and
its inputs' fingerprints, so a change to either gives a new directory and a matching finished manifest
means the work is done. ``manifest.json`` holds the config, input fingerprints, outputs, counts, timings
and library versions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

log = logging.getLogger("alignment")

MANIFEST = "manifest.json"
_EDGE = 1 << 20  # bytes hashed from each end of a large file


def _hash_file(path: Path, h: hashlib._Hash, full_limit: int = 64 << 20) -> None:
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= full_limit:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:  # large weights: size plus both ends (a different checkpoint differs there too)
            h.update(f.read(_EDGE))
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))


def fingerprint(path: str | os.PathLike) -> str:
    """Content fingerprint of a file or a directory tree; a URI or a hub id is fingerprinted by its name."""
    p = Path(path)
    h = hashlib.sha256()
    if "://" in str(path) or not p.exists():
        h.update(f"name:{path}".encode())
    elif p.is_file():
        _hash_file(p, h)
    else:
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            if f.name.startswith(".") or f.name == MANIFEST:
                continue
            h.update(str(f.relative_to(p)).encode())
            _hash_file(f, h)
    return h.hexdigest()[:16]


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def read_manifest(stage_dir: str | os.PathLike) -> dict[str, Any] | None:
    p = Path(stage_dir) / MANIFEST
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic JSON write (a killed run never leaves half a manifest)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str))
    os.replace(tmp, p)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("alignment", "torch", "ray", "transformers", "trl", "datasets", "pyarrow"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def missing_outputs(outputs: Any) -> list[str]:
    """The local files and directories named in a manifest's outputs (at any depth) that no longer exist.
    Only absolute local paths count: a URI or a model name is not looked up."""
    if isinstance(outputs, dict):
        return [p for v in outputs.values() for p in missing_outputs(v)]
    if isinstance(outputs, list):
        return [p for v in outputs for p in missing_outputs(v)]
    if isinstance(outputs, str) and "://" not in outputs and os.path.isabs(outputs) and not os.path.exists(outputs):
        return [outputs]
    return []


def run_stage(
    run_dir: str | os.PathLike,
    stage: str,
    label: str,
    config: dict[str, Any],
    inputs: dict[str, str],
    work: Callable[[Path], dict[str, Any]],
) -> dict[str, Any]:
    """Run ``work(stage_dir)`` unless a finished manifest for the same config and inputs exists and the local
    outputs it names are all still there.

    ``inputs`` maps names to fingerprints. ``work`` returns ``{"outputs": ..., "counts": ..., ...}``;
    this function adds the config, inputs, timings and versions and writes the manifest.
    """
    key = digest({"stage": stage, "config": config, "inputs": inputs})
    stage_dir = Path(run_dir).resolve() / stage / f"{label}-{key}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(stage_dir / ".lock")):
        done = read_manifest(stage_dir)
        if done and done.get("status") == "complete":
            gone = missing_outputs(done.get("outputs"))
            if not gone:
                log.info("%s %s: finished earlier, skipped (%s)", stage, label, stage_dir)
                return {**done, "skipped": True}
            log.warning("%s %s: finished earlier, but its output %s no longer exists%s: running it again", stage,
                        label, gone[0], f" (and {len(gone) - 1} more)" if len(gone) > 1 else "")
        started = time.time()
        base = {"stage": stage, "label": label, "dir": str(stage_dir), "config": config, "inputs": inputs,
                "versions": versions()}
        write_json(stage_dir / MANIFEST, {**base, "status": "running", "started": started})
        log.info("%s %s: running in %s", stage, label, stage_dir)
        try:
            result = work(stage_dir)
        except BaseException as e:
            write_json(stage_dir / MANIFEST, {**base, "status": "failed", "started": started, "error": repr(e),
                                              "traceback": traceback.format_exc(limit=20)})
            raise
        finished = time.time()
        manifest = {**base, "status": "complete", **result,
                    "timings": {**result.get("timings", {}), "started": started, "finished": finished,
                                "seconds": round(finished - started, 3)}}
        write_json(stage_dir / MANIFEST, manifest)
        log.info("%s %s: done in %.1f s", stage, label, finished - started)
        return {**manifest, "skipped": False}
