"""The ``random`` scorer: uniform in [0, 1), a hash of the experiment's seed and the row id, so the same seed
picks the same rows however the data is split or batched."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ..rows import in_read_tasks, scatter, valid

if TYPE_CHECKING:
    from ...config import SelectConfig
    from . import Context


def random_scores(ids: Sequence[str], seed: int) -> list[float]:
    """A uniform [0, 1) score per row id: the same for the same (seed, id), however the rows are batched."""
    out = []
    for i in ids:
        h = hashlib.blake2b(f"{seed}\x00{i}".encode(), digest_size=8).digest()
        out.append(int.from_bytes(h, "big") / 2**64)
    return out


def score_random_batch(table: pa.Table, seed: int) -> pa.Table:
    """Ray Data UDF: ``score_random``, a function of (seed, id) only; null for rows that failed validation."""
    ok = valid(table)
    ids = [i for i, good in zip(table["id"].to_pylist(), ok) if good]
    return table.append_column("score_random", pa.array(scatter(random_scores(ids, seed), ok), pa.float64()))


def add(ds: Any, s: SelectConfig, ctx: Context) -> Any:
    return in_read_tasks(ds, score_random_batch, ctx.tasks, seed=ctx.resolved.seed)
