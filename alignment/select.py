"""The select stage: read instruction data with Ray Data, normalise, score, keep the top k.

Reading and scoring run as Ray Data tasks over file shards; the driver streams the scored batches once,
keeping the k best rows (bounded memory: k rows plus one batch) and writing set-aside rows to a file.
Ranking: score descending, ties by id, then source and row.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import formats

log = logging.getLogger("alignment")

MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
ROWS_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("row", pa.int64()), ("messages", MESSAGES_TYPE),
    ("field", pa.string()), ("error", pa.string()),
])


class SelectError(ValueError):
    pass


def read_batch(batch: dict[str, Any], fmt: str) -> pa.Table:
    """Ray Data UDF: a batch of shard descriptions -> normalised rows (bad rows carry ``error``)."""
    rows: list[dict] = []
    for i in range(len(batch["path"])):
        shard = formats.Shard.from_dict({k: batch[k][i] for k in ("path", "kind", "start", "stop")})
        for r in formats.read_shard(shard, "sft", fmt):
            r.setdefault("messages", None)
            rows.append(r)
    return pa.Table.from_pylist(rows, schema=ROWS_SCHEMA)


def length_scores(messages: list[list[dict]], unit: str, tokenizer: Any = None) -> list[int]:
    """Length of all assistant turns of each conversation, in chars, words or tokens (Long Is More)."""
    texts_per_row = [formats.assistant_texts(m) for m in messages]
    if unit == "chars":
        return [sum(len(t) for t in ts) for ts in texts_per_row]
    if unit == "words":
        return [sum(len(t.split()) for t in ts) for ts in texts_per_row]
    if unit == "tokens":
        flat = [t for ts in texts_per_row for t in ts]
        ids = tokenizer(flat, add_special_tokens=False, return_attention_mask=False)["input_ids"] if flat else []
        out, i = [], 0
        for ts in texts_per_row:
            out.append(sum(len(x) for x in ids[i:i + len(ts)]))
            i += len(ts)
        return out
    raise SelectError(f"unknown length unit {unit!r}")


def score_batch(table: pa.Table, unit: str, tokenizer_path: str | None) -> pa.Table:
    """Ray Data UDF: add ``score`` (null for set-aside rows)."""
    from . import models

    ok = pc.is_null(table["error"]).to_pylist()
    msgs = [m for m, good in zip(table["messages"].to_pylist(), ok) if good]
    tok = models.load_tokenizer(tokenizer_path) if unit == "tokens" else None
    scores = iter(length_scores(msgs, unit, tok))
    col = [float(next(scores)) if good else None for good in ok]
    return table.append_column("score", pa.array(col, pa.float64()))


class TopK:
    """The k best rows seen so far: score descending, ties by id, source, row."""

    SORT = [("score", "descending"), ("id", "ascending"), ("source", "ascending"), ("row", "ascending")]

    def __init__(self, k: int):
        self.k = k
        self.best: pa.Table | None = None

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        merged = table if self.best is None else pa.concat_tables([self.best, table])
        self.best = merged.sort_by(self.SORT).slice(0, self.k)

    def result(self) -> pa.Table:
        return self.best if self.best is not None else pa.table({})


def run_select(sources: list[str], fmt: str, k: int, unit: str, tokenizer_path: str | None, out_dir: Path,
               allow_fewer: bool = False, batch_size: int = 1024) -> dict[str, Any]:
    """Select the k longest rows; writes ``selected.parquet`` and ``set_aside.jsonl`` into ``out_dir``."""
    import ray

    paths = formats.expand_paths(sources)
    shards = formats.plan_shards(paths)
    ds = (
        ray.data.from_items([s.to_dict() for s in shards])
        .map_batches(read_batch, fn_kwargs={"fmt": fmt}, batch_size=1, batch_format="numpy")
        .map_batches(score_batch, fn_kwargs={"unit": unit, "tokenizer_path": tokenizer_path},
                     batch_size=batch_size, batch_format="pyarrow")
    )
    top = TopK(k)
    n_read = n_valid = n_bad = 0
    reasons: dict[str, int] = {}
    aside_path = out_dir / "set_aside.jsonl"
    with open(aside_path, "w") as aside:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=batch_size):
            n_read += batch.num_rows
            bad_mask = pc.is_valid(batch["error"])
            bad = batch.filter(bad_mask)
            good = batch.filter(pc.invert(bad_mask)).drop_columns(["field", "error"])
            n_bad += bad.num_rows
            n_valid += good.num_rows
            for r in bad.select(["source", "row", "id", "field", "error"]).to_pylist():
                reasons[r["error"].split(":")[0]] = reasons.get(r["error"].split(":")[0], 0) + 1
                aside.write(json.dumps(r) + "\n")
            top.add(good)
    if n_valid < k and not allow_fewer:
        raise SelectError(
            f"select.k={k} is larger than the pool: {n_valid} valid rows in {', '.join(paths)} "
            f"({n_bad} set aside, see {aside_path}); lower k or set select.allow_fewer=true"
        )
    selected = top.result()
    selected = selected.append_column("rank", pa.array(range(1, selected.num_rows + 1), pa.int64()))
    selected = selected.rename_columns([f"score_length_{unit}" if c == "score" else c for c in selected.column_names])
    pq.write_table(selected, out_dir / "selected.parquet")
    if n_bad:
        log.warning("select: %d of %d rows set aside (%s); see %s", n_bad, n_read, reasons, aside_path)
    scores = selected[f"score_length_{unit}"]
    return {
        "outputs": {"selected": str(out_dir / "selected.parquet"), "set_aside": str(aside_path)},
        "counts": {"rows_read": n_read, "rows_kept": n_valid, "rows_set_aside": n_bad,
                   "rows_selected": selected.num_rows, "set_aside_reasons": reasons},
        "metrics": {"files": paths, "score": f"length_{unit}",
                    "selected_score_min": pc.min(scores).as_py(), "selected_score_max": pc.max(scores).as_py()},
    }
