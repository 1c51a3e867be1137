"""Deita's repr filter: the fast version selects exactly the rows of the per-row rule."""

from __future__ import annotations

import numpy as np
import pytest

from alignment.select import diversity


def clustered(rng, n, d, clusters, noise):
    centres = rng.normal(size=(clusters, d))
    return diversity.normalise(centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, d)))


@pytest.mark.parametrize("seed", range(12))
def test_fast_filter_equals_the_per_row_rule(seed):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(200, 2500)), int(rng.integers(4, 64))
    e = clustered(rng, n, d, int(rng.integers(5, 300)), float(rng.choice([0.0, 0.05, 0.2, 0.6])))
    dup_from, dup_to = rng.integers(0, n, n // 8), rng.integers(0, n, n // 8)
    e[dup_to] = e[dup_from]  # exact duplicates
    k, tau = int(rng.integers(1, 300)), float(rng.choice([0.5, 0.8, 0.9, 0.95]))
    expected = diversity.repr_filter_reference(e, k, tau)
    got = diversity.repr_filter(e, k, tau, block=int(rng.choice([16, 256, 4096])), cells=int(rng.choice([1, 8, 64])))
    assert got == expected
    assert len(got) <= k


def test_rule_on_a_hand_made_case():
    e = diversity.normalise(np.array([[1, 0], [1, 0.01], [0, 1], [0.6, 0.8], [0, 1]], dtype=np.float32))
    # row 1 is a near-duplicate of row 0; row 3 is 0.8 from row 2 and 0.6 from row 0; row 4 duplicates row 2
    assert diversity.repr_filter_reference(e, 10, 0.9) == [0, 2, 3]
    assert diversity.repr_filter(e, 10, 0.9, block=2) == [0, 2, 3]
    assert diversity.repr_filter(e, 2, 0.9) == [0, 2]
    assert diversity.repr_filter(e, 10, 0.5) == [0, 2]


def test_score_order_breaks_ties_by_id():
    order = diversity.score_order(np.array([1.0, 3.0, 3.0, 2.0]), ["d", "b", "a", "c"])
    assert order.tolist() == [2, 1, 3, 0]


def test_streaming_mode_matches_in_memory():
    rng = np.random.default_rng(5)
    e = clustered(rng, 3000, 16, 100, 0.1)
    blocks = (e[i:i + 777] for i in range(0, len(e), 777))  # e.g. batches read from Parquet in score order
    assert diversity.repr_filter_stream(blocks, 150, 0.9) == diversity.repr_filter(e, 150, 0.9)


@pytest.mark.parametrize("tau", [0.9, 0.95])
def test_parity_in_384_dimensions_where_the_low_rank_bound_prunes(tau):
    # near-duplicate clusters at cosine ~0.95 around tau: the bound must never wrongly clear a pair
    rng = np.random.default_rng(11)
    centres = diversity.normalise(rng.normal(size=(400, 384)))
    e = diversity.normalise(centres[rng.integers(0, 400, 3000)] + 0.23 / np.sqrt(384) * rng.normal(size=(3000, 384)))
    e[::50] = e[1::50]  # and exact duplicates
    assert diversity.repr_filter(e, 350, tau, block=512) == diversity.repr_filter_reference(e, 350, tau)
