"""Instruction, preference and eval-prompt data: reading files and normalising rows to one schema.

Every normalised row carries ``id`` (the input's own id where it has one, else ``<file label>:<row>``,
the label being the file's name, or as much of its path as tells it from the other inputs: see
:func:`file_labels`), ``source`` (the file) and ``row`` (0-based index in the file), so each selected row
traces back to its source. A row that cannot be normalised raises :class:`RowError` naming the field;
readers turn that into a set-aside record instead of dropping the row. A file that cannot be read at all
raises :class:`DataError` naming it, when its shards are planned (on the driver, before any Ray task).

Pure Python and pyarrow: no Ray here. The select stage maps :func:`read_shard` over shards in Ray Data.
"""

from __future__ import annotations

import codecs
import functools
import glob
import gzip
import io
import logging
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from .errors import InputError

SFT_FORMATS = ("alpaca", "sharegpt", "messages", "prompt_response", "pairs", "hh_rlhf")
PREFERENCE_FORMATS = ("pairs", "hh_rlhf", "unpaired")
HF_PREFIX = "hf:"

_ROLE_MAP = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
}
_ID_KEYS = ("id", "question_id", "idx", "prompt_id")

log = logging.getLogger("alignment")


class DataError(InputError, ValueError):
    """A file or a source that cannot be read at all (missing, unknown format)."""


def reason_key(field: str, error: str) -> str:
    """A set-aside row's reason as a countable kind: the field without its turn index, the error up to its first
    colon or semicolon without particulars in parentheses, numbers blanked (an HTTP status kept:
    ``score_rating: endpoint http 429``)."""
    kind = re.sub(r" ?\([^)]*\)", "", error.split(";")[0].split(":")[0])
    kind = re.sub(r"(?<!http )(?<![0-9])[0-9]+", "N", kind)
    return re.sub(r"\[[0-9]+\]", "", field) + ": " + kind


class RowError(ValueError):
    """A row that cannot be normalised; ``field`` names the offending field."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# --------------------------------------------------------------------------------------------- files


def expand_paths(patterns: list[str], exclude: list[str] | None = None) -> list[str]:
    """Files from paths, globs and directories (sorted, deduplicated); a pattern matching nothing is an error.

    An existing file is taken as it is ('[' in its name is no glob). What a directory or a glob finds under
    a directory of ``exclude`` (the run directory: a stage's outputs are no input data) is left out; a file
    named on its own is the user's choice and kept."""
    if not patterns:
        raise DataError("no data files given")
    skip = [Path(e).resolve() for e in exclude or () if "://" not in str(e)]

    def outside(f: str) -> bool:
        r = Path(f).resolve()
        return not any(r.is_relative_to(d) for d in skip)

    out: list[str] = []
    for pat in patterns:
        if pat.startswith(HF_PREFIX):
            out.append(hf_to_parquet(pat))
            continue
        if "://" in pat:
            out.append(pat)
            continue
        p = Path(pat)
        if p.is_file():
            out.append(str(p))
        elif p.is_dir():
            found = sorted(f for f in _walk(pat, skip) if file_kind(f, strict=False))
            if not found:
                where = (" outside the run directory"
                         if skip and any(file_kind(f, strict=False) for f in _walk(pat, [])) else "")
                raise DataError(f"directory {pat} holds no .json, .jsonl or .parquet files{where}")
            out.extend(found)
        elif any(c in pat for c in "*?["):
            every = [f for f in glob.glob(pat, recursive=True) if os.path.isfile(f)]
            found = sorted(f for f in every if outside(f))
            if not found:
                raise DataError(f"glob {pat} matched no files" + (" outside the run directory" if every else ""))
            out.extend(found)
        else:
            raise DataError(f"data file not found: {pat}")
    seen: set[str] = set()
    return [f for f in out if not (f in seen or seen.add(f))]


def _walk(top: str, skip: list[Path]) -> Iterator[str]:
    """Every file under ``top``, not descending into the directories of ``skip``."""
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if not any(Path(root, d).resolve().is_relative_to(s) for s in skip)]
        yield from (str(Path(root, f)) for f in files)


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG][@SPLIT]`` -> (name, config, split); the split defaults to ``train``."""
    spec = source[len(HF_PREFIX):]
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition(":") if not spec.startswith("/") else (spec, "", "")
    if not name:
        raise DataError(f"{source}: expected hf:NAME[:CONFIG][@SPLIT], "
                        "e.g. hf:HuggingFaceH4/ultrafeedback_binarized@train_prefs")
    return name, config or None, split or "train"


@functools.lru_cache(maxsize=64)
def hf_to_parquet(source: str, cache: Path | None = None) -> str:
    """A Hugging Face dataset (``hf:NAME[:CONFIG][@SPLIT]``, a hub name or a local dataset directory), loaded
    with ``datasets`` and written once to a Parquet file in the cache (keyed by the dataset's fingerprint),
    so that it is read in shards like any other file. Row ids fall back to ``<that file>:<row>``. Loaded once
    per process (the stage's fingerprint and its run both expand the sources)."""
    import datasets

    from .models import cache_dir

    name, config, split = parse_hf_source(source)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - any loading failure is the user's source
        raise DataError(f"{source}: cannot load the Hugging Face dataset {name!r} (config {config}, split {split}): "
                        f"{type(e).__name__}: {e}") from e
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name.strip('/')}-{config or 'default'}-{split}")
    out = (cache or cache_dir() / "datasets") / f"{safe}-{ds._fingerprint}.parquet"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        ds.to_parquet(str(tmp))
        tmp.replace(out)
    return str(out)


def _uri_path(path: str) -> str:
    """A URI's bucket and path, its scheme and ``?options`` left out (a local path as it is): what names the
    file and tells its type."""
    if "://" not in path:
        return path
    parts = urlsplit(path)
    return parts.netloc + parts.path


def file_kind(path: str, strict: bool = True) -> str | None:
    """'jsonl', 'json' or 'parquet' from the file name (``.gz`` allowed for JSON; a URI's options aside)."""
    name = _uri_path(path).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for ext, kind in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".parquet", "parquet")):
        if name.endswith(ext):
            return kind
    if strict:
        raise DataError(f"{path}: unknown file type (expected .jsonl, .json, .parquet, optionally .gz for JSON)")
    return None


def file_labels(paths: list[str]) -> dict[str, str]:
    """Each file's label in fallback row ids: the shortest path suffix (whole folders) that tells it from the
    other inputs of the same read: the file name when the names differ (``train.jsonl``), else ``a/train.jsonl``
    and ``b/train.jsonl``. Never the absolute path: ids seed random scores and subsets, so they must be the
    same wherever the data lies. A file written two ways (relative and absolute) keeps its path as given."""
    parts = {p: [x for x in _uri_path(p).split("/") if x not in ("", ".")] for p in paths}
    depth = dict.fromkeys(paths, 1)
    while True:
        labels = {p: "/".join(parts[p][-depth[p]:]) for p in paths}
        counts = Counter(labels.values())
        grow = [p for p in paths if counts[labels[p]] > 1 and depth[p] < len(parts[p])]
        if not grow:
            return {p: labels[p] if counts[labels[p]] == 1 else p for p in paths}
        for p in grow:
            depth[p] += 1


def _gzipped(path: str) -> bool:
    return _uri_path(path).endswith(".gz")


def _open_bytes(path: str):
    if "://" in path:
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(path)  # takes the URI's options (?region=...) too
        f = fs.open_input_stream(p)
        # pyarrow's streams read but cannot iterate lines: a buffered reader over them can.
        return gzip.open(f) if _gzipped(path) else io.BufferedReader(f)
    return gzip.open(path, "rb") if _gzipped(path) else open(path, "rb")


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    if "://" in path:
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(path)
        return pq.ParquetFile(fs.open_input_file(p))
    return pq.ParquetFile(path)


def _read_json(path: str) -> Any:
    """The value of a JSON file (after a UTF-8 byte-order mark, if any); DataError naming the file if it is
    not UTF-8 or not JSON."""
    with _open_bytes(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def _json_rows(path: str) -> list[Any]:
    """The rows of a JSON file: an array, or an object holding exactly one list (``{"data": [...]}``)."""
    data = _read_json(path)
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of rows (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of rows, got {type(data).__name__}")
    return data


def _is_json_lines(path: str) -> bool:
    """Whether a file that is not one JSON value is JSON Lines: its first line alone is a JSON object."""
    with _open_bytes(path) as f:
        first = f.readline().removeprefix(codecs.BOM_UTF8)
    try:
        return isinstance(orjson.loads(first), dict)
    except orjson.JSONDecodeError:
        return False


@dataclass(frozen=True)
class Shard:
    """A slice of one file: rows ``[start, stop)`` (JSONL lines, JSON array items or Parquet rows)."""

    path: str
    kind: str
    start: int
    stop: int | None  # None: to the end
    offset: int = -1  # JSONL: the byte offset of row ``start`` in an uncompressed file (-1: count lines instead)
    label: str = ""  # the file's label in fallback ids (:func:`file_labels`); "" for its name

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "start": self.start,
                "stop": -1 if self.stop is None else self.stop,
                "offset": self.offset, "label": self.label}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Shard:
        stop = int(d["stop"])
        return Shard(str(d["path"]), str(d["kind"]), int(d["start"]), None if stop < 0 else stop,
                     int(d.get("offset", -1)), str(d.get("label", "")))

    @property
    def name(self) -> str:
        """What fallback ids start with."""
        return self.label or os.path.basename(_uri_path(self.path))


def plan_shards(paths: list[str], rows_per_shard: int = 50_000) -> list[Shard]:
    """Split files into shards read in parallel. JSONL and Parquet split by row; a JSON array is one shard.

    Every file is opened here, once, so that one that cannot be read (a corrupt or truncated gzip, a
    ``.parquet`` that is not Parquet, JSON that is not JSON or not UTF-8) is a DataError naming it before any
    Ray task starts. JSON Lines in a ``.json`` file are read as JSON Lines (as ``datasets`` does)."""
    import pyarrow as pa

    labels = file_labels(paths)
    shards: list[Shard] = []
    for path in paths:
        try:
            shards += _file_shards(path, labels[path], rows_per_shard)
        except (OSError, EOFError, zlib.error, pa.ArrowException) as e:
            what = "a truncated or corrupt gzip file? " if _gzipped(path) else ""
            raise DataError(f"{path}: cannot read it ({what}{type(e).__name__}: {e})") from None
    return shards


def _file_shards(path: str, label: str, rows_per_shard: int) -> list[Shard]:
    kind = file_kind(path)
    if kind == "json":
        try:
            _json_rows(path)
            return [Shard(path, kind, 0, None, label=label)]
        except DataError:
            if not _is_json_lines(path):
                raise
        log.info("%s holds JSON Lines (a JSON object on each line): read as JSON Lines", path)
        kind = "jsonl"
    if kind == "jsonl":
        # One pass counts the lines and notes where each shard starts, so a shard seeks to its first row
        # (a compressed file cannot seek: its shards skip lines instead).
        seekable = not _uri_path(path).endswith((".gz", ".bz2", ".xz", ".zst")) and "://" not in path
        offsets, n, pos = [0], 0, 0
        with _open_bytes(path) as f:
            for line in f:
                n += 1
                pos += len(line)
                if n % rows_per_shard == 0:
                    offsets.append(pos)
        return [Shard(path, kind, start, min(start + rows_per_shard, n), offsets[j] if seekable else -1, label)
                for j, start in enumerate(range(0, max(n, 1), rows_per_shard))]
    n = _parquet_file(path).metadata.num_rows
    return [Shard(path, kind, start, min(start + rows_per_shard, n), label=label)
            for start in range(0, max(n, 1), rows_per_shard)]


class BadJSON:
    """Stands in for a row whose text is not valid JSON."""

    def __init__(self, message: str):
        self.message = message


def iter_raw(shard: Shard, only: set[int] | None = None) -> Iterator[tuple[int, Any]]:
    """(row index, parsed row or BadJSON) for every row of a shard (or only the rows in ``only``: the others
    are not parsed)."""
    if shard.kind == "jsonl":
        with _open_bytes(shard.path) as f:
            first = 0
            if shard.offset >= 0:
                f.seek(shard.offset)
                first = shard.start
            for i, line in enumerate(f, start=first):
                if i < shard.start:
                    continue
                if shard.stop is not None and i >= shard.stop:
                    break
                if only is not None and i not in only:
                    continue
                if i == 0:  # a UTF-8 byte-order mark is no part of row 0
                    line = line.removeprefix(codecs.BOM_UTF8)
                if not line.strip():
                    yield i, BadJSON("empty line")
                    continue
                try:
                    yield i, orjson.loads(line)
                except orjson.JSONDecodeError as e:
                    yield i, BadJSON(f"malformed JSON: {e}")
    elif shard.kind == "json":
        data = _json_rows(shard.path)
        stop = len(data) if shard.stop is None else shard.stop
        for i in range(shard.start, min(stop, len(data))):
            if only is None or i in only:
                yield i, data[i]
    elif shard.kind == "parquet":
        pf = _parquet_file(shard.path)
        i = 0
        for batch in pf.iter_batches(batch_size=4096):
            rows = batch.to_pylist()
            for r in rows:
                if i >= shard.start and (shard.stop is None or i < shard.stop) and (only is None or i in only):
                    yield i, r
                i += 1
            if shard.stop is not None and i >= shard.stop:
                break
    else:  # pragma: no cover - plan_shards only makes the kinds above
        raise DataError(f"{shard.path}: unknown kind {shard.kind}")


def row_id(row: dict[str, Any], name: str, index: int) -> str:
    """The row's own id (the first of ``_ID_KEYS`` it has), else ``<name>:<index>`` (``name``: the file's
    label, :attr:`Shard.name`)."""
    for key in _ID_KEYS:
        v = row.get(key)
        if v is not None and str(v) != "":
            return str(v)
    return f"{name}:{index}"


# ------------------------------------------------------------------------------------ instruction rows


def detect_sft_format(row: dict[str, Any]) -> str:
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "messages"
    if "instruction" in row and ("output" in row or "response" in row):
        return "alpaca"
    if "prompt" in row and ("response" in row or "completion" in row):
        return "prompt_response"
    if "chosen" in row:  # preference data as instruction data: the prompt and the chosen answer
        return detect_preference_format(row)
    raise RowError("(format)", f"cannot tell the format from the fields {sorted(row)[:10]}; set data.sft_format")


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(field, "empty or whitespace-only text")
    return value


def turn_order_error(roles: list[str]) -> tuple[int, str] | None:
    """The first turn out of order and why, or None. The order chat templates and trainers assume: an
    optional system turn first, then user and assistant turns alternating, the user's first. Rows out of
    order are set aside rather than repaired (merging two user turns would train on text nobody wrote)."""
    prev = "system"
    for i, role in enumerate(roles):
        if role == "system":
            if i:
                return i, "a system turn is only allowed first"
        elif prev == "system" and role == "assistant":
            return i, "starts with an assistant turn"
        elif role == prev:
            return i, f"two {role} turns in a row"
        prev = role
    return None


def _turn_field(parts: list[tuple[str, Any, int]], i: int) -> str:
    """The field of turn ``i`` of messages joined from ``parts`` (field, raw value, turn count): ``prompt``
    for a prompt given as a string, ``completion[1]`` for the second turn of a list."""
    for field, raw, n in parts:
        if i < n:
            return field if isinstance(raw, str) else f"{field}[{i}]"
        i -= n
    return parts[-1][0]


def _check_order(messages: list[dict[str, str]], parts: list[tuple[str, Any, int]]) -> None:
    bad = turn_order_error([m["role"] for m in messages])
    if bad:
        raise RowError(_turn_field(parts, bad[0]), bad[1])


def _check_turns(messages: list[dict[str, str]], field: str,
                 parts: list[tuple[str, Any, int]] | None = None) -> list[dict[str, str]]:
    """An instruction conversation: turns in order (:func:`turn_order_error`), ending with an assistant turn.
    ``parts``: where the turns came from, when not all from ``field`` (see :func:`_turn_field`)."""
    parts = parts or [(field, messages, len(messages))]
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(field, "no assistant turn")
    _check_order(messages, parts)
    if messages[-1]["role"] != "assistant":
        raise RowError(_turn_field(parts, len(messages) - 1),
                       "the conversation ends with a user turn that has no response")
    return messages


def _turns(items: Any, field: str, role_key: str, content_key: str) -> list[dict[str, str]]:
    if not isinstance(items, list) or not items:
        raise RowError(field, "expected a non-empty list of turns")
    out = []
    for i, turn in enumerate(items):
        if not isinstance(turn, dict):
            raise RowError(f"{field}[{i}]", f"expected an object, got {type(turn).__name__}")
        if role_key not in turn:
            raise RowError(f"{field}[{i}].{role_key}", "missing")
        role = _ROLE_MAP.get(str(turn[role_key]).lower())
        if role is None:
            raise RowError(f"{field}[{i}].{role_key}", f"unknown role {turn[role_key]!r}")
        if content_key not in turn:
            raise RowError(f"{field}[{i}].{content_key}", "missing")
        out.append({"role": role, "content": _text(turn[content_key], f"{field}[{i}].{content_key}")})
    return out


def _pick(row: dict[str, Any], keys: tuple[str, ...]) -> str:
    """The first of ``keys`` the row has (RowError naming the first one if none)."""
    for key in keys:
        if key in row:
            return key
    raise RowError(keys[0], "missing")


def normalise_sft(row: Any, fmt: str = "auto") -> list[dict[str, str]]:
    """Messages ``[{role, content}, ...]`` of one instruction row, or RowError."""
    if not isinstance(row, dict):
        raise RowError("(row)", f"expected a JSON object, got {type(row).__name__}")
    if fmt == "auto":
        fmt = detect_sft_format(row)
    if fmt == "sharegpt":
        if "conversations" not in row:
            raise RowError("conversations", "missing")
        return _check_turns(_turns(row["conversations"], "conversations", "from", "value"), "conversations")
    if fmt == "messages":
        if "messages" not in row:
            raise RowError("messages", "missing")
        return _check_turns(_turns(row["messages"], "messages", "role", "content"), "messages")
    if fmt == "alpaca":
        _pick(row, ("instruction",))
        out_key = _pick(row, ("output", "response"))
        instruction = _text(row["instruction"], "instruction")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise RowError("input", f"expected a string, got {type(extra).__name__}")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = []
        if isinstance(row.get("system"), str) and row["system"].strip():
            messages.append({"role": "system", "content": row["system"]})
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row[out_key], out_key)}]
        return messages
    if fmt == "prompt_response":
        # TRL's prompt-completion format too: strings, or lists of messages (conversational).
        _pick(row, ("prompt",))
        out_key = _pick(row, ("response", "completion"))
        prompt = _as_messages(row["prompt"], "prompt", "user")
        answer = _as_messages(row[out_key], out_key, "assistant")
        return _check_turns(prompt + answer, out_key,
                            [("prompt", row["prompt"], len(prompt)), (out_key, row[out_key], len(answer))])
    if fmt in PREFERENCE_FORMATS:
        pair = normalise_preference(row, fmt)
        return [*pair["prompt"], {"role": "assistant", "content": pair["chosen"]}]
    raise DataError(f"unknown instruction format {fmt!r}; choose auto or one of {', '.join(SFT_FORMATS)}")


# ------------------------------------------------------------------------------------- preference rows


def _parse_hh(transcript: Any, field: str) -> list[dict[str, str]]:
    """``\\n\\nHuman: ... \\n\\nAssistant: ...`` into messages."""
    if not isinstance(transcript, str):
        raise RowError(field, f"expected a transcript string, got {type(transcript).__name__}")
    parts = re.split(r"\n\n(Human|Assistant):", transcript)
    if parts[0].strip():
        raise RowError(field, "text before the first '\\n\\nHuman:' turn")
    messages = []
    for speaker, text in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        messages.append({"role": role, "content": text.strip()})
    if not messages:
        raise RowError(field, "no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    return messages


def _as_messages(value: Any, field: str, default_role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": default_role, "content": _text(value, field)}]
    return _turns(value, field, "role", "content")


def detect_preference_format(row: dict[str, Any]) -> str:
    if "chosen" in row or "rejected" in row:
        sample = row.get("chosen", row.get("rejected"))
        if "prompt" not in row and isinstance(sample, str) and "\n\nHuman:" in sample:
            return "hh_rlhf"
        return "pairs"
    if "completion" in row and "label" in row:
        return "unpaired"
    raise RowError("(format)",
                   f"cannot tell the format from the fields {sorted(row)[:10]}; set data.preferences_format")


def normalise_preference(row: Any, fmt: str = "auto") -> dict[str, Any]:
    """``{prompt: messages, chosen: str, rejected: str}`` of one preference row (``unpaired``: TRL's
    ``{prompt, completion, label}`` for KTO, normalised to ``{prompt: messages, completion: str, label: bool}``),
    or RowError."""
    if not isinstance(row, dict):
        raise RowError("(row)", f"expected a JSON object, got {type(row).__name__}")
    if fmt == "auto":
        fmt = detect_preference_format(row)
    if fmt == "unpaired":
        for key in ("prompt", "completion", "label"):
            if key not in row:
                raise RowError(key, "missing")
        if not isinstance(row["label"], bool):
            raise RowError("label", f"expected true (desirable) or false (undesirable), got {row['label']!r}")
        prompt = _as_messages(row["prompt"], "prompt", "user")
        completion = _as_messages(row["completion"], "completion", "assistant")
        if len(completion) != 1 or completion[0]["role"] != "assistant":
            raise RowError("completion", "expected one assistant answer")
        _check_order(prompt, [("prompt", row["prompt"], len(prompt))])
        if prompt[-1]["role"] != "user":
            raise RowError("prompt", "the prompt must end with a user turn")
        return {"prompt": prompt, "completion": completion[0]["content"], "label": row["label"]}
    for key in ("chosen", "rejected"):
        if key not in row:
            raise RowError(key, "missing")
    if fmt == "hh_rlhf":
        chosen = _parse_hh(row["chosen"], "chosen")
        rejected = _parse_hh(row["rejected"], "rejected")
        for name, conv in (("chosen", chosen), ("rejected", rejected)):
            if conv[-1]["role"] != "assistant":
                raise RowError(name, "the transcript does not end with an Assistant turn")
            if not conv[-1]["content"]:
                raise RowError(name, "the final Assistant turn is empty")
            bad = turn_order_error([m["role"] for m in conv])
            if bad:
                raise RowError(name, f"{bad[1]} (turn {bad[0] + 1} of the transcript)")
        if chosen[:-1] != rejected[:-1]:
            raise RowError("rejected", "chosen and rejected transcripts differ before their final Assistant turn")
        prompt = chosen[:-1]
        if not prompt or prompt[-1]["role"] != "user":
            raise RowError("chosen", "no Human turn before the final Assistant turn")
        return {"prompt": prompt, "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}
    if fmt == "pairs":
        chosen = _as_messages(row["chosen"], "chosen", "assistant")
        rejected = _as_messages(row["rejected"], "rejected", "assistant")
        if "prompt" in row:
            prompt = _as_messages(row["prompt"], "prompt", "user")
            where = [("prompt", row["prompt"], len(prompt))]
            # UltraFeedback-style: chosen/rejected repeat the prompt before the answer.
            if chosen[:-1] == prompt and rejected[:-1] == prompt:
                chosen, rejected = chosen[-1:], rejected[-1:]
        else:  # implicit prompt: the shared prefix of chosen and rejected
            if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
                raise RowError("prompt", "missing, and chosen/rejected do not share a prompt prefix")
            prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
            where = [("chosen", row["chosen"], len(prompt))]
        _check_order(prompt, where)
        for name, conv in (("chosen", chosen), ("rejected", rejected)):
            if len(conv) != 1 or conv[0]["role"] != "assistant":
                raise RowError(name, "expected one assistant answer")
        if prompt[-1]["role"] != "user":
            raise RowError("prompt", "the prompt must end with a user turn")
        return {"prompt": prompt, "chosen": chosen[0]["content"], "rejected": rejected[0]["content"]}
    raise DataError(f"unknown preference format {fmt!r}; choose auto or one of {', '.join(PREFERENCE_FORMATS)}")


# ----------------------------------------------------------------------------------------- eval prompts


def normalise_eval_prompt(row: Any) -> list[dict[str, str]]:
    """The first user turn of an eval prompt (Vicuna, Koala, Self-Instruct, WizardLM, LIMA, MT-Bench, AlpacaEval)."""
    if not isinstance(row, dict):
        raise RowError("(row)", f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = _turns(row["messages"], "messages", "role", "content")
        _check_order(msgs, [("messages", row["messages"], len(msgs))])
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs or msgs[-1]["role"] != "user":
            raise RowError("messages", "no user turn to answer")
        return msgs
    for key in ("text", "prompt", "Instruction", "instruction"):
        if key in row:
            text = _text(row[key], key)
            instances = row.get("instances")
            if key == "instruction" and isinstance(instances, list) and instances:
                extra = instances[0].get("input") if isinstance(instances[0], dict) else None
                if isinstance(extra, str) and extra.strip():
                    text = f"{text}\n\n{extra}"
            elif key == "instruction" and isinstance(row.get("input"), str) and row["input"].strip():
                text = f"{text}\n\n{row['input']}"
            return [{"role": "user", "content": text}]
    for key in ("turns", "conversations"):
        if key in row:
            turns = row[key]
            if not isinstance(turns, list) or not turns:
                raise RowError(key, "expected a non-empty list")
            return [{"role": "user", "content": _text(turns[0], f"{key}[0]")}]
    raise RowError("(format)", f"no prompt field among {sorted(row)[:10]}")


def eval_prompt_turns(row: dict[str, Any]) -> dict[str, Any]:
    """``{question_turns, category}`` of an MT-Bench-format row (``{question_id, category, turns}``, the row
    :func:`normalise_eval_prompt` reads by its ``turns``), else ``{}``.

    Every user turn is kept: the generate stage asks turn k after the model's own answers to the turns before
    it (Zheng et al. 2023). The category is required: it sets the sampling temperature and the judge prompt,
    and neither has a right default.
    """
    if any(key in row for key in ("messages", "text", "prompt", "Instruction", "instruction")) or "turns" not in row:
        return {}
    turns = [_text(t, f"turns[{i}]") for i, t in enumerate(row["turns"])]
    if "category" not in row:
        raise RowError("category", "an MT-Bench-format row (turns) needs its category: it sets the sampling "
                       "temperature and the judge prompt")
    return {"question_turns": turns, "category": _text(row["category"], "category")}


# ------------------------------------------------------------------------------------------- reading


def detect_format(shard: Shard, kind: str, max_rows: int = 1000) -> str:
    """The format of a shard's first recognisable row ('auto' if none is), so that every later row is
    checked against that format and a bad row's error names its missing field."""
    detect = {"sft": detect_sft_format, "preference": detect_preference_format}.get(kind)
    if detect is None:
        return "auto"
    for i, (_, raw) in enumerate(iter_raw(shard)):
        if i >= max_rows:
            break
        if isinstance(raw, dict):
            try:
                return detect(raw)
            except RowError:
                continue
    return "auto"


def read_shard(shard: Shard, kind: str, fmt: str = "auto", only: set[int] | None = None) -> Iterator[dict[str, Any]]:
    """Normalised rows of a shard. ``kind`` is 'sft', 'preference' or 'eval'.

    Good rows: ``{id, source, row, ...payload, error: None}``; bad rows: ``{id, source, row, field, error}``.
    With ``fmt='auto'`` the format is detected once per shard (see :func:`detect_format`). ``only``: just
    these row indices (read back later exactly as they were read the first time).
    """
    if fmt == "auto":
        fmt = detect_format(shard, kind)
    normalise = {
        "sft": lambda r, f: {"messages": normalise_sft(r, f)},
        "preference": normalise_preference,
        "eval": lambda r, f: {"messages": normalise_eval_prompt(r), **eval_prompt_turns(r)},
    }[kind]
    for index, raw in iter_raw(shard, only):
        base = {"source": shard.path, "row": index}
        if isinstance(raw, BadJSON):
            yield {**base, "id": f"{shard.name}:{index}", "field": "(json)", "error": raw.message}
            continue
        rid = row_id(raw, shard.name, index) if isinstance(raw, dict) else f"{shard.name}:{index}"
        try:
            payload = normalise(raw, fmt)
        except RowError as e:
            yield {**base, "id": rid, "field": e.field, "error": e.reason}
            continue
        yield {**base, "id": rid, **payload, "field": None, "error": None}


def read_rows(patterns: list[str] | str, kind: str, fmt: str = "auto",
              exclude: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """All rows of small inputs, in-process: (good rows, set-aside rows). A good row whose id an earlier good
    row has (in file order) is set aside, naming the first: ids key answers, verdicts and seeded subsets.
    ``exclude``: as in :func:`expand_paths`."""
    paths = expand_paths([patterns] if isinstance(patterns, str) else patterns, exclude)
    good: list[dict] = []
    bad: list[dict] = []
    first: dict[str, dict] = {}
    for shard in plan_shards(paths):
        for r in read_shard(shard, kind, fmt):
            if not r["error"] and first.setdefault(r["id"], r) is not r:
                seen = first[r["id"]]
                r = {"source": r["source"], "row": r["row"], "id": r["id"], "field": "id",
                     "error": f"duplicate id: {seen['source']}:{seen['row']} has it first"}
            (bad if r["error"] else good).append(r)
    dups = [b for b in bad if b["field"] == "id" and b["error"].startswith("duplicate id")]
    if dups:
        log.warning("%d rows of %s set aside as duplicate ids (first: %s, %s)", len(dups), ", ".join(paths),
                    dups[0]["id"], dups[0]["error"])
    for r in good:
        r.pop("error"), r.pop("field")
    return good, bad


def conversation_text(messages: list[dict[str, str]]) -> str:
    """The whole conversation as one text (``role: content`` lines): what is embedded and deduplicated."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


# ------------------------------------------------------------------------------------------- exports

EXPORT_FORMATS = ("trl", "sharegpt", "alpaca")
_SHAREGPT_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


def export_row(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """A normalised row (``id``, ``messages``) in an output format: ``trl`` (conversational language
    modelling: ``messages``), ``sharegpt`` (``conversations`` of ``from``/``value``) or ``alpaca``
    (``instruction``/``input``/``output``, optional ``system``; single-turn rows only)."""
    msgs = row["messages"]
    if fmt == "trl":
        return {"id": row["id"], "messages": msgs}
    if fmt == "sharegpt":
        return {"id": row["id"],
                "conversations": [{"from": _SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in msgs]}
    if fmt == "alpaca":
        system = [m["content"] for m in msgs if m["role"] == "system"]
        turns = [m for m in msgs if m["role"] != "system"]
        if len(turns) != 2:
            raise RowError("messages", f"row {row['id']} has {len(turns) // 2} user/assistant exchanges; the Alpaca "
                           "format holds one (export it as trl or sharegpt)")
        out = {"id": row["id"], "instruction": turns[0]["content"], "input": "", "output": turns[1]["content"]}
        if system:
            out["system"] = system[0]
        return out
    raise DataError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
