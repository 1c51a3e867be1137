"""Deduplication before selection: exact (a hash of the normalised text) and near-duplicate (MinHash LSH).

Per row (in Ray Data workers): :func:`signatures` gives a 64-bit hash of the normalised conversation and
``bands`` 64-bit LSH band hashes of its MinHash signature (word n-gram shingles). In the driver:
:func:`find_duplicates` takes those compact arrays for the whole pool (8 x (1 + bands) bytes a row) and
decides which rows go:

- exact: rows with the same normalised text; the first one (in file and row order) stays;
- near: rows that share at least one LSH band with another row are linked, and each connected group keeps
  its first row (in file and row order). The bands and rows per band are chosen for the Jaccard
  ``threshold`` as datasketch does (least false positives + false negatives), so pairs above the threshold
  are caught with high probability; pairs are not re-verified, as in most large-scale dedup pipelines.

No Ray here: the select stage maps :func:`signature_batch` in Ray Data and calls :func:`find_duplicates`.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass

import numpy as np

_MERSENNE = np.uint64((1 << 61) - 1)
_WORD = re.compile(r"[\w]+", re.UNICODE)


def normalise_text(text: str) -> str:
    """Case-folded words joined by single spaces (punctuation and whitespace differences vanish)."""
    return " ".join(_WORD.findall(text.casefold()))


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) with bands * rows <= num_perm minimising the false positive and false negative
    probability mass around ``threshold`` (equal weights; datasketch's rule)."""
    s = np.linspace(0.0, 1.0, 1001)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - s ** r) ** b
            fp = np.trapezoid(np.where(s < threshold, p, 0.0), s)
            fn = np.trapezoid(np.where(s >= threshold, 1.0 - p, 0.0), s)
            if fp + fn < best_err:
                best, best_err = (b, r), fp + fn
    return best


@dataclass(frozen=True)
class MinHasher:
    """MinHash over word n-grams with ``num_perm`` universal hash functions, banded for LSH."""

    num_perm: int
    ngram: int
    bands: int
    rows: int
    seed: int = 0

    def __post_init__(self):
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands x rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        rng = np.random.default_rng(self.seed)
        object.__setattr__(self, "_a", rng.integers(1, 1 << 31, self.num_perm, dtype=np.uint64))
        object.__setattr__(self, "_b", rng.integers(0, 1 << 31, self.num_perm, dtype=np.uint64))

    def signature(self, words: list[str]) -> np.ndarray:
        """The MinHash signature (num_perm uint32) of a text's word n-grams (the whole text if shorter)."""
        if not words:
            words = [""]
        h = np.array([zlib.crc32(w.encode()) for w in words], dtype=np.uint64)
        n = max(1, len(h) - self.ngram + 1)
        # An n-gram's hash: a polynomial over its words' hashes (uint64 arithmetic wraps), folded to 32 bits.
        g = np.zeros(n, dtype=np.uint64)
        for j in range(min(self.ngram, len(h))):
            g = g * np.uint64(1_000_003) + h[j:j + n]
        g = (g ^ (g >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
        perm = (g[:, None] * self._a[None, :] + self._b[None, :]) % _MERSENNE
        return (perm & np.uint64(0xFFFFFFFF)).min(axis=0).astype(np.uint32)

    def band_hashes(self, signature: np.ndarray) -> np.ndarray:
        return np.array([_h64(signature[i * self.rows:(i + 1) * self.rows].tobytes()) for i in range(self.bands)],
                        dtype=np.uint64)


def signatures(messages: list[dict], hasher: MinHasher | None) -> tuple[int, np.ndarray | None]:
    """(exact hash of the normalised conversation, LSH band hashes or None)."""
    from ..formats import conversation_text

    norm = normalise_text(conversation_text(messages))
    exact = _h64(norm.encode())
    if hasher is None:
        return exact, None
    return exact, hasher.band_hashes(hasher.signature(norm.split(" ") if norm else []))


def find_duplicates(order: np.ndarray, exact: np.ndarray, bands: np.ndarray | None) -> tuple[np.ndarray, np.ndarray,
                                                                                              np.ndarray]:
    """Which rows are duplicates, and of which row.

    ``order``: a sortable key per row (file index, then row: the first one of a group stays); ``exact``:
    uint64 per row; ``bands``: uint64 (rows x bands) or None for exact only.
    Returns (duplicate positions, the position each one duplicates, kind: 0 exact, 1 near)."""
    n = len(order)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(order, kind="stable")] = np.arange(n)
    # Exact: group by hash, the lowest rank stays.
    idx = np.lexsort((rank, exact))
    same = np.r_[False, exact[idx][1:] == exact[idx][:-1]]
    first = idx[np.maximum.accumulate(np.where(~same, np.arange(n), 0))]
    keep_of = np.empty(n, dtype=np.int64)
    keep_of[idx] = first
    dup_pos = np.flatnonzero(keep_of != np.arange(n))
    dup_of = keep_of[dup_pos]
    kind = np.zeros(len(dup_pos), dtype=np.int64)
    if bands is None:
        return dup_pos, dup_of, kind
    # Near: among the rows left, link rows sharing a band hash; each connected group keeps its lowest rank.
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    left = np.flatnonzero(keep_of == np.arange(n))
    src, dst = [], []
    for b in range(bands.shape[1]):
        h = bands[left, b]
        o = np.argsort(h, kind="stable")
        hit = np.flatnonzero(h[o][1:] == h[o][:-1])
        src.append(left[o[hit]])
        dst.append(left[o[hit + 1]])
    src, dst = np.concatenate(src), np.concatenate(dst)
    if len(src) == 0:
        return dup_pos, dup_of, kind
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    lab = label[left]
    o = np.lexsort((rank[left], lab))
    new_group = np.r_[True, lab[o][1:] != lab[o][:-1]]
    head = left[o][np.maximum.accumulate(np.where(new_group, np.arange(len(o)), 0))]
    near = left[o][~new_group]
    return (np.concatenate([dup_pos, near]), np.concatenate([dup_of, head[~new_group]]),
            np.concatenate([kind, np.ones(len(near), dtype=np.int64)]))
