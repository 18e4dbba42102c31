"""k-reciprocal re-ranking: the graph-based serving version against the paper's brute force."""

from __future__ import annotations

import numpy as np
import pytest

from visearch.search.rerank import KReciprocalReranker, k_reciprocal_bruteforce


def _clustered(seed: int, clusters: int = 12, per: int = 6, d: int = 16, noise: float = 0.35):
    """L2-normalised gallery of ``clusters * per`` points around random centres, one query."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    xb = np.repeat(centres, per, axis=0) + noise * rng.normal(size=(clusters * per, d))
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = centres[rng.integers(clusters)] + noise * rng.normal(size=d)
    xq /= np.linalg.norm(xq)
    return xb.astype(np.float32), xq.astype(np.float32)


def _graph(xb: np.ndarray, ids: np.ndarray, k: int, with_self: bool) -> np.ndarray:
    order = np.argsort(-(xb @ xb.T), axis=1)
    if not with_self:
        order = np.array([row[row != i] for i, row in enumerate(order)])
    return ids[order[:, :k]]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("with_self", [True, False])
def test_matches_bruteforce_ranking(seed: int, with_self: bool) -> None:
    xb, xq = _clustered(seed)
    ids = np.arange(len(xb), dtype=np.int64) * 3 + 7  # ids are not row numbers
    rr = KReciprocalReranker(ids, _graph(xb, ids, 24, with_self), xb, k1=20, k2=6,
                             lambda_value=0.3)
    nn = ids[np.argsort(-(xb @ xq))[:20]]
    final, sim = rr.rerank(xq, nn, ids)
    oracle = k_reciprocal_bruteforce(xq, xb, k1=20, k2=6, lambda_value=0.3)
    np.testing.assert_allclose(final, oracle, atol=1e-5)
    np.testing.assert_array_equal(np.argsort(final, kind="stable")[:30],
                                  np.argsort(oracle, kind="stable")[:30])
    np.testing.assert_allclose(sim, xb @ xq, atol=1e-6)


@pytest.mark.parametrize(("k1", "k2", "lam"), [(5, 1, 0.0), (8, 3, 0.5), (11, 4, 1.0)])
def test_other_parameters_match_bruteforce(k1: int, k2: int, lam: float) -> None:
    xb, xq = _clustered(100 + k1, clusters=8, per=5)
    ids = np.arange(len(xb), dtype=np.int64)
    rr = KReciprocalReranker(ids, _graph(xb, ids, k1 + 1, True), xb, k1=k1, k2=k2,
                             lambda_value=lam)
    # Re-rank a shortlist only: its distances must still be the brute force's.
    shortlist = np.argsort(-(xb @ xq))[:15]
    final, _ = rr.rerank(xq, ids[np.argsort(-(xb @ xq))[:k1]], ids[shortlist])
    oracle = k_reciprocal_bruteforce(xq, xb, k1=k1, k2=k2, lambda_value=lam)
    np.testing.assert_allclose(final, oracle[shortlist], atol=1e-5)


def test_lambda_one_is_the_original_distance() -> None:
    xb, xq = _clustered(3)
    ids = np.arange(len(xb), dtype=np.int64)
    rr = KReciprocalReranker(ids, _graph(xb, ids, 21, True), xb, lambda_value=1.0)
    final, sim = rr.rerank(xq, ids[np.argsort(-(xb @ xq))[:20]], ids)
    np.testing.assert_allclose(final, (1 - xb @ xq) / 2, atol=1e-6)


def test_unknown_candidates_keep_jaccard_one_and_short_graph_lowers_k1() -> None:
    xb, xq = _clustered(4)
    ids = np.arange(len(xb), dtype=np.int64)
    rr = KReciprocalReranker(ids, _graph(xb, ids, 9, True), xb, k1=20, lambda_value=0.3)
    assert rr.k1 == 8 and rr.h == 4
    final, sim = rr.rerank(xq, ids[:20], np.array([999, 0]))
    assert sim[0] == -1.0
    assert final[0] == pytest.approx(0.7 + 0.3 * 1.0)
    oracle = k_reciprocal_bruteforce(xq, xb, k1=8, k2=6, lambda_value=0.3)
    final_all, _ = rr.rerank(xq, ids[np.argsort(-(xb @ xq))[:8]], ids)
    np.testing.assert_allclose(final_all, oracle, atol=1e-5)


def test_rejects_bad_shapes_and_parameters() -> None:
    xb, _ = _clustered(5)
    ids = np.arange(len(xb))
    with pytest.raises(ValueError, match="one row per gallery item"):
        KReciprocalReranker(ids[:-1], _graph(xb, ids, 5, True), xb)
    with pytest.raises(ValueError, match="lambda_value"):
        KReciprocalReranker(ids, _graph(xb, ids, 5, True), xb, lambda_value=2.0)
    with pytest.raises(ValueError, match="k1"):
        k_reciprocal_bruteforce(xb[0], xb[:5], k1=10)
