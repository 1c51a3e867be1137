"""The select stage's selectors: how k rows are picked from the ranked pool (``scored.parquet``), one table
(``SELECTORS``).

- ``top_k``: the k best scores (score descending, ties by id, source, row), streaming: k rows and one batch
  in memory;
- ``repr_filter``: Deita's filter (Liu et al. 2024): rows in score order, each kept only if its embedding's
  cosine similarity to every kept row is at most ``select.tau``, until k are kept; embedded lazily, in that
  order, only as deep as the scan goes (:class:`diversity.ReprFilter`);
- ``kmeans`` (the Long-Is-More diversity baseline): k-means on the whole pool's embeddings, then the
  best-scored row of every cluster in turn.

Adding a selector: its ``pick`` function, one ``SELECTORS`` entry, and its name in ``SelectConfig.selector``'s
Literal in config.py (a test checks that the two agree).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import embed
from .rows import SelectError
from .scorers.random import random_scores

if TYPE_CHECKING:
    from ..config import EmbeddingConfig, SelectConfig
    from .scorers import Resolved


@dataclass(frozen=True)
class Picked:
    """A selector's result: the picked rows, best first (with their messages where the selector read them),
    its counts for the manifest (under the selector's name) and any files it wrote (output name -> path)."""

    rows: pa.Table
    counts: dict[str, Any] | None = None
    outputs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Selector:
    """``embeds``: the scored pool keeps the rows' texts and the selector embeds them with ``select.embedding``
    (the pipeline resolves its model); ``pick(scored, select_config, resolved, out_dir) -> Picked``."""

    embeds: bool
    pick: Callable[[Path, SelectConfig, Resolved, Path], Picked]


class TopK:
    """The k best rows seen so far: score descending, ties by id, source, row."""

    SORT = [("score", "descending"), ("id", "ascending"), ("source", "ascending"), ("row", "ascending")]

    def __init__(self, k: int):
        self.k = k
        self.best: pa.Table | None = None

    def add(self, table: pa.Table) -> None:
        if self.best is not None and self.best.num_rows == self.k and table.num_rows:
            # Once k rows are held, only rows scoring at least the k-th can enter (ties go to the sort).
            table = table.filter(pc.greater_equal(table["score"], self.best["score"][self.k - 1]))
        if table.num_rows == 0:
            return
        merged = table if self.best is None else pa.concat_tables([self.best, table])
        self.best = merged.sort_by(self.SORT).slice(0, self.k)

    def result(self) -> pa.Table:
        return self.best if self.best is not None else pa.table({})


SCAN_BATCH = 8192  # rows per batch when a selector reads the scored pool back


def top_k(scored: Path, s: SelectConfig, resolved: Resolved, out_dir: Path) -> Picked:
    top = TopK(s.k)
    for batch in pq.ParquetFile(scored).iter_batches(batch_size=max(s.batch_size, SCAN_BATCH)):
        top.add(pa.Table.from_batches([batch]))
    return Picked(top.result())


def repr_filter_rows(scored: Path, k: int, tau: float, emb: EmbeddingConfig, model: str,
                     batch_size: int) -> tuple[pa.Table, dict[str, int]]:
    """Deita's filter over the scored pool: sorted by score (ties by id), embedded lazily in that order by
    Ray Data actors, streamed through :class:`diversity.ReprFilter` until k rows are kept."""
    import ray

    from .diversity import ReprFilter

    ctx = ray.data.DataContext.get_current()
    preserve = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # the filter's result depends on the order
    try:
        ds = embed.add_embeddings(
            ray.data.read_parquet(str(scored)).sort(["score", "id", "source", "row"],
                                                    descending=[True, False, False, False]),
            emb, model, batch_size)
        f = ReprFilter(k, tau)
        kept: list[pa.Table] = []
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=batch_size):
            idx = f.add(embed.vectors(batch["embedding"], batch.num_rows))
            if idx:
                kept.append(batch.take(idx))
            if f.full:
                break
    finally:
        ctx.execution_options.preserve_order = preserve
    table = pa.concat_tables(kept) if kept else pa.table({})
    return table, {"scanned": f.scanned, "kept": f.n, "rejected_as_similar": f.scanned - f.n}


def repr_filter(scored: Path, s: SelectConfig, resolved: Resolved, out_dir: Path) -> Picked:
    rows, counts = repr_filter_rows(scored, s.k, s.tau, s.embedding, resolved.embedding_model, s.batch_size)
    if rows.num_rows < s.k and not s.allow_fewer:
        pool = pq.ParquetFile(scored).metadata.num_rows
        raise SelectError(f"only {rows.num_rows} of {pool} valid rows pass the repr filter at tau={s.tau} (k={s.k}); "
                          "raise select.tau, lower k or set select.allow_fewer=true")
    return Picked(rows, counts)


def _rank_in_group(labels: np.ndarray) -> np.ndarray:
    """Position of each row within its run of equal labels (rows already sorted by label)."""
    start = np.r_[0, np.flatnonzero(labels[1:] != labels[:-1]) + 1]
    return np.arange(len(labels)) - np.repeat(start, np.diff(np.r_[start, len(labels)]))


def kmeans_rows(scored: Path, k: int, n_clusters: int, fit_rows: int, emb: EmbeddingConfig, model: str,
                batch_size: int, seed: int, emb_path: Path) -> tuple[pa.Table, dict[str, Any]]:
    """k-means diversity sampling: embed every ranked row (Ray Data actors; ``emb_path`` keeps ids, scores and
    embeddings), fit centroids on a seeded sample, assign every row, then take the best-scored row of every
    cluster in turn (cluster 0, 1, ..., then each one's second best, ...) until k rows are taken. Returns the
    chosen rows without their texts (every score, ``cluster``), best score first."""
    import ray
    from sklearn.cluster import KMeans

    writer: pq.ParquetWriter | None = None
    sample_h, sample_ids, sample_v = np.zeros(0), np.zeros(0, dtype=object), None
    ds = embed.add_embeddings(ray.data.read_parquet(str(scored)), emb, model, batch_size)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=batch_size):
        slim = batch.drop_columns(["messages"])
        if writer is None:
            writer = pq.ParquetWriter(emb_path, slim.schema)
        writer.write_table(slim)
        # The fitting sample: the rows with the smallest hash of (seed, id): the same whatever the order.
        ids = np.array(batch["id"].to_pylist(), dtype=object)
        v = embed.vectors(batch["embedding"], batch.num_rows)
        sample_h = np.concatenate([sample_h, random_scores(ids.tolist(), seed)])
        sample_ids = np.concatenate([sample_ids, ids])
        sample_v = v if sample_v is None else np.concatenate([sample_v, v])
        if len(sample_h) > 2 * fit_rows:
            keep = np.lexsort((sample_ids.astype(str), sample_h))[:fit_rows]
            sample_h, sample_ids, sample_v = sample_h[keep], sample_ids[keep], sample_v[keep]
    if writer is None:
        return pa.table({}), {"clusters": 0}
    writer.close()
    x = sample_v[np.lexsort((sample_ids.astype(str), sample_h))[:fit_rows]]
    n_clusters = min(n_clusters, len(x))
    km = KMeans(n_clusters=n_clusters, random_state=seed, n_init="auto").fit(x)
    pool_sizes = np.zeros(n_clusters, dtype=np.int64)
    order = [("cluster", "ascending"), *TopK.SORT]
    cand: pa.Table | None = None
    for batch in pq.ParquetFile(emb_path).iter_batches(batch_size=max(batch_size, SCAN_BATCH)):
        t = pa.Table.from_batches([batch]).drop_columns(["embedding"])
        label = km.predict(embed.vectors(batch.column("embedding"), batch.num_rows)).astype(np.int64)
        pool_sizes += np.bincount(label, minlength=n_clusters)
        t = t.append_column("cluster", pa.array(label))
        t = (t if cand is None else pa.concat_tables([cand, t])).sort_by(order)
        cand = t.filter(pa.array(_rank_in_group(t["cluster"].to_numpy()) < k))  # no cluster gives more than k rows
    lab = cand["cluster"].to_numpy()
    take = np.lexsort((lab, _rank_in_group(lab)))[:k]  # round robin: every cluster's best, then second best, ...
    chosen = cand.take(pa.array(take)).sort_by(TopK.SORT)
    selected_sizes = np.bincount(chosen["cluster"].to_numpy(), minlength=n_clusters)
    return chosen, {"clusters": n_clusters, "fit_rows": int(len(x)), "inertia": float(km.inertia_),
                    "pool_per_cluster": pool_sizes.tolist(), "selected_per_cluster": selected_sizes.tolist()}


def kmeans(scored: Path, s: SelectConfig, resolved: Resolved, out_dir: Path) -> Picked:
    path = out_dir / "embeddings.parquet"
    rows, counts = kmeans_rows(scored, s.k, s.clusters, s.kmeans_fit_rows, s.embedding, resolved.embedding_model,
                               s.batch_size, resolved.seed, path)
    return Picked(rows, counts, {"embeddings": str(path)})


SELECTORS: dict[str, Selector] = {
    "top_k": Selector(embeds=False, pick=top_k),
    "repr_filter": Selector(embeds=True, pick=repr_filter),
    "kmeans": Selector(embeds=True, pick=kmeans),
}
