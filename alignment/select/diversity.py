"""Deita's repr filter: score-first, diversity-aware selection (Liu et al. 2024, "What Makes Good Data for
Alignment?").

Definition (batch-1 semantics): rows in score order (descending, ties by id); keep the first; keep each next
row whose cosine similarity to every kept row is <= tau; stop at k rows.

:func:`repr_filter_reference` is that rule written plainly (one candidate at a time against every kept row,
as the reference code does). :func:`repr_filter` selects exactly the same rows, fast:

1. candidates come in blocks; a block is first checked against the kept rows of its own coarse cell (a
   cheap probe: a similarity > tau there is a witness, and a rejection with a witness is final);
2. the block's remaining candidates are checked exactly against every kept row (blocked matrix products);
3. what survives is decided in score order inside the block with its own Gram matrix: a survivor is kept
   unless an earlier kept survivor of the same block is too similar.

Only the kept rows (k x d) stay in memory; :func:`repr_filter_stream` takes the candidates as an iterator
of blocks, so a pool whose embeddings do not fit in memory streams through (e.g. from Parquet or Ray Data,
already in score order).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


def normalise(embeddings: np.ndarray) -> np.ndarray:
    """L2-normalised float32 rows (a zero row stays zero)."""
    e = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    return e / np.where(norms == 0, 1.0, norms)


def score_order(scores: np.ndarray, ids: list[str] | np.ndarray) -> np.ndarray:
    """Row order for the filter: score descending, ties by id ascending."""
    ids = np.asarray(ids).astype(str)
    return np.lexsort((ids, -np.asarray(scores, dtype=np.float64)))


def repr_filter_reference(embeddings: np.ndarray, k: int, tau: float) -> list[int]:
    """The rule, one candidate at a time (rows already in score order and normalised)."""
    e = np.asarray(embeddings, dtype=np.float32)
    if len(e) == 0 or k < 1:
        return []
    kept = [0]
    for i in range(1, len(e)):
        if len(kept) >= k:
            break
        if float((e[kept] @ e[i]).max()) <= tau:
            kept.append(i)
    return kept


def _blocks(embeddings: np.ndarray, block: int) -> Iterator[np.ndarray]:
    for start in range(0, len(embeddings), block):
        yield embeddings[start:start + block]


def repr_filter(embeddings: np.ndarray, k: int, tau: float, block: int = 4096, cells: int = 256,
                seed: int = 0) -> list[int]:
    """Exactly :func:`repr_filter_reference`'s rows, fast (rows in score order, normalised)."""
    return repr_filter_stream(_blocks(np.asarray(embeddings, dtype=np.float32), block), k, tau, cells, seed)


def repr_filter_stream(blocks: Iterable[np.ndarray], k: int, tau: float, cells: int = 256,
                       seed: int = 0) -> list[int]:
    """The filter over candidate blocks in score order; returns positions in the concatenated stream."""
    f = ReprFilter(k, tau, cells, seed)
    kept: list[int] = []
    offset = 0
    for block in blocks:
        kept += [offset + i for i in f.add(block)]
        offset += len(block)
        if f.full:
            break
    return kept


class ReprFilter:
    """The filter's state over a stream: feed blocks of candidates in score order, get back the kept ones."""

    def __init__(self, k: int, tau: float, cells: int = 256, seed: int = 0, chunk: int = 8192):
        self.k, self.tau, self.cells, self.chunk = k, tau, cells, chunk
        self.rng = np.random.default_rng(seed)
        self.kept: np.ndarray | None = None  # k x d, filled in order
        self.n = 0
        self.centroids: np.ndarray | None = None
        self.members: list[list[int]] = []  # per cell: indices into `kept`
        self.scanned = 0

    @property
    def full(self) -> bool:
        return self.n >= self.k

    def add(self, cand: np.ndarray) -> list[int]:
        """Positions (within this block) of the candidates kept; stops as soon as k rows are kept."""
        cand = np.ascontiguousarray(cand, dtype=np.float32)
        b = len(cand)
        if b == 0 or self.full:
            return []
        tau = self.tau
        if self.kept is None:
            self.kept = np.empty((self.k, cand.shape[1]), dtype=np.float32)
            # Routing only: any centroids keep the result exact; rows of the first block are good enough.
            n_cells = max(1, min(self.cells, b))
            self.centroids = cand[self.rng.choice(b, n_cells, replace=False)]
            self.members = [[] for _ in range(n_cells)]
        kept, n = self.kept, self.n
        cell = (cand @ self.centroids.T).argmax(axis=1)
        alive = np.ones(b, dtype=bool)
        if n:
            # 1. probe the kept rows of each candidate's cell: a witness rejects for good
            for c in np.unique(cell):
                m = self.members[c]
                if m:
                    rows = np.flatnonzero(cell == c)
                    hit = ((cand[rows] @ kept[m].T) > tau).any(axis=1)
                    alive[rows[hit]] = False
            # 2. the rest against every kept row, exactly
            rest = np.flatnonzero(alive)
            if len(rest):
                c = cand[rest]
                reject = np.zeros(len(rest), dtype=bool)
                for s in range(0, n, self.chunk):
                    reject |= (c @ kept[s:min(s + self.chunk, n)].T > tau).any(axis=1)
                alive[rest[reject]] = False
        # 3. in score order within the block
        out: list[int] = []
        rest = np.flatnonzero(alive)
        last = b - 1
        if len(rest):
            gram = cand[rest] @ cand[rest].T
            blocked = np.zeros(len(rest), dtype=bool)
            for j in range(len(rest)):
                if blocked[j]:
                    continue
                i = int(rest[j])
                kept[n] = cand[i]
                self.members[cell[i]].append(n)
                out.append(i)
                n += 1
                if n == self.k:
                    last = i
                    break
                blocked |= gram[j] > tau
        self.n = n
        self.scanned += last + 1
        return out
