"""What the select stage's scorers and selectors share: the rows' messages type, per-row helpers over Arrow
tables of normalised rows (``id``, ``source``, ``row``, ``messages``, ``field``, ``error``), response lengths,
and the stage's errors."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import AlignmentError, InputError

MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


class SelectError(AlignmentError, ValueError):
    """The selection cannot be made (too few rows, an endpoint that failed too often, files that changed)."""


class ScorerError(InputError, ValueError):
    """A scorer that cannot be used at all (as opposed to a row that cannot be scored)."""


def valid(table: pa.Table) -> list[bool]:
    """Which rows passed validation (no ``error``): the only rows a scorer scores."""
    return pc.is_null(table["error"]).to_pylist()


def scatter(values: list, ok: list[bool], fill: Any = None) -> list:
    """The valid rows' ``values`` back in place among all rows, ``fill`` for the others."""
    it = iter(values)
    return [next(it) if good else fill for good in ok]


def merge_errors(table: pa.Table, errors: list[str | None]) -> pa.Table:
    """Add this scorer's per-row failure reasons to ``score_error`` ("; "-joined)."""
    if "score_error" in table.column_names:
        old = table["score_error"].to_pylist()
        errors = ["; ".join(x for x in (o, e) if x) or None for o, e in zip(old, errors)]
        table = table.drop_columns(["score_error"])
    return table.append_column("score_error", pa.array(errors, pa.string()))


TOKENIZE_CHUNK = 1024  # texts per call of the Rust tokenizer


@contextlib.contextmanager
def _tokenizer_threads():
    """The Rust tokenizer's own threads for one call, even where TOKENIZERS_PARALLELISM=false (our Ray
    workers' default, against fork-after-threads deadlocks in training); restored afterwards. For a caller
    alone on its machine; the select stage's read tasks, one per CPU, go without."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def token_counts(texts: list[str], tokenizer: Any, threads: bool = True) -> list[int]:
    """Tokens per text, no special tokens added. A fast tokenizer's Rust ``encode_batch_fast`` directly (no
    offsets, no Python-side wrapping: the same ids as ``tokenizer(texts)``, faster), in chunks of
    ``TOKENIZE_CHUNK`` texts (benchmark (a)). Its own threads unless ``threads`` is False (for callers that
    already run one process per core)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not texts:
        return []
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return [len(x) for x in tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]]
    with _tokenizer_threads() if threads else contextlib.nullcontext():
        return [len(e) for s in range(0, len(texts), TOKENIZE_CHUNK)
                for e in backend.encode_batch_fast(texts[s:s + TOKENIZE_CHUNK], add_special_tokens=False)]


def assistant_lengths(messages: pa.Array | pa.ChunkedArray, unit: str, tokenizer: Any = None,
                      threads: bool = True) -> np.ndarray:
    """Length of all assistant turns per row of a messages column (0 for a null row), computed in Arrow:
    chars are code points (Python's ``len``), words are ``str.split()``'s, tokens come from batched calls of
    the tokenizer over every assistant turn, on the Rust tokenizer's own threads unless ``threads`` is False
    (for callers that already run one process per core)."""
    if isinstance(messages, pa.ChunkedArray):
        messages = messages.combine_chunks() if messages.num_chunks else pa.array([], MESSAGES_TYPE)
    n = len(messages)
    flat = pc.list_flatten(messages)
    parents = pc.list_parent_indices(messages).to_numpy()
    assistant = pc.equal(pc.struct_field(flat, "role"), "assistant").to_numpy(zero_copy_only=False)
    content = pc.filter(pc.struct_field(flat, "content"), pa.array(assistant))
    parents = parents[assistant]
    if unit == "chars":
        per = pc.utf8_length(content).to_numpy(zero_copy_only=False)
    elif unit == "words":  # Python's split beats Arrow's split and regex kernels here (benchmark (a))
        per = np.array([len(t.split()) for t in content.to_pylist()], dtype=np.int64)
    elif unit == "tokens":
        if tokenizer is None:
            raise ScorerError("length in tokens needs a tokenizer")
        per = np.array(token_counts(content.to_pylist(), tokenizer, threads), np.int64)
    else:
        raise ScorerError(f"unknown length unit {unit!r}")
    return np.bincount(parents, weights=per, minlength=n).astype(np.int64)


def in_read_tasks(ds: Any, fn: Any, tasks: int, **kwargs: Any) -> Any:
    """``ds.map_batches(fn)`` on each block as the read tasks make it, so that Ray Data fuses ``fn`` into them:
    the rows' texts never cross the object store between reading and scoring, and each task reads and
    scores its shard on its own CPU. (A batch size here would make the fused task bundle that many shard
    descriptions: every shard in one task; benchmark (a).)"""
    import ray

    return ds.map_batches(fn, fn_kwargs=kwargs, batch_size=None, batch_format="pyarrow",
                          compute=ray.data.TaskPoolStrategy(size=tasks))
