"""The precomputed k-reciprocal vectors: equal to the paper's in the gallery alone, stored
with the graph, and serving from them stays equal to the brute force however the query
perturbs the gallery's sets."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from visearch.errors import IndexFormatError
from visearch.index.graph import (
    KR_FILE,
    KReciprocalVectors,
    NeighbourGraph,
    build_neighbour_graph,
    compute_k_reciprocal_vectors,
    half_k,
    self_first_lists,
    with_k_reciprocal,
)
from visearch.search.rerank import KReciprocalReranker, k_reciprocal_bruteforce


def _gallery(seed: int, clusters: int = 10, per: int = 7, d: int = 16, noise: float = 0.4):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    xb = np.repeat(centres, per, axis=0) + noise * rng.normal(size=(clusters * per, d))
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    return xb.astype(np.float32), centres, rng


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x)).astype(np.float32)


def _oracle_vectors(xb: np.ndarray, k1: int) -> np.ndarray:
    """float64 [N, N] unnormalised exp(-d) on R*(i), the paper's loops over the gallery."""
    n = len(xb)
    dist = np.clip((1.0 - xb @ xb.T) * np.float32(0.5), 0.0, 1.0)
    np.fill_diagonal(dist, 0.0)
    rank = np.lexsort((np.arange(n)[None, :] != np.arange(n)[:, None], dist), axis=1)

    def reciprocal(i: int, k: int) -> set[int]:
        return {int(g) for g in rank[i, : k + 1] if i in rank[g, : k + 1]}

    out = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        members = set(r)
        for c in r:
            rc = reciprocal(c, half_k(k1))
            if len(rc & r) > 2.0 / 3.0 * len(rc):
                members |= rc
        idx = sorted(members)
        out[i, idx] = np.exp(-dist[i, idx])
    return out


def _graph(xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = xb @ xb.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order.astype(np.int64), np.take_along_axis(sims, order, axis=1)


@pytest.mark.parametrize(("seed", "k1"), [(0, 20), (1, 10), (2, 7)])
def test_vectors_equal_the_papers_in_the_gallery(seed: int, k1: int) -> None:
    xb, _, _ = _gallery(seed)
    ids = np.arange(len(xb), dtype=np.int64)
    lists, _ = self_first_lists(ids, _graph(xb, k1 + 1)[0], xb)
    kr = compute_k_reciprocal_vectors(lists, xb, k1, chunk=16)  # several chunks
    kr.check(len(xb))
    dense = np.zeros((len(xb), len(xb)))
    rows = np.repeat(ids, np.diff(kr.indptr))
    dense[rows, kr.indices] = kr.weights
    want = _oracle_vectors(xb, k1)
    np.testing.assert_array_equal(dense > 0, want > 0)
    np.testing.assert_allclose(dense, want, atol=1e-6)
    # A subset of rows is those rows of the whole.
    part = compute_k_reciprocal_vectors(lists, xb, k1, rows=np.array([5, 0, 33]))
    np.testing.assert_array_equal(part.indices, np.concatenate(
        [kr.indices[kr.indptr[r] : kr.indptr[r + 1]] for r in (5, 0, 33)]))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dense_below", [0, 4096])
def test_serving_from_stored_vectors_matches_bruteforce_for_perturbing_queries(
    seed: int, dense_below: int,
) -> None:
    """Queries that enter many lists (near-copies of gallery items, cluster centres, points
    between clusters) and ones that enter few (outliers): every candidate's d* is exact,
    whether the query is compared with every item (small galleries) or with the rows it
    can perturb only (``dense_below=0``, the path of large galleries)."""
    xb, centres, rng = _gallery(seed)
    ids = np.arange(len(xb), dtype=np.int64) * 5 + 3
    nb, d_nb = _graph(xb, 21)
    graph = with_k_reciprocal(NeighbourGraph(ids, ids[nb], d_nb.astype(np.float32)), xb)
    assert graph.kreciprocal is not None and graph.kreciprocal.k1 == 20
    rr = KReciprocalReranker(ids, graph.I, xb, k1=20, k2=6, lambda_value=0.3,
                             vectors=graph.kreciprocal, dense_below=dense_below)
    assert rr.vectors is graph.kreciprocal  # used as stored, not recomputed
    queries = [
        _unit(xb[rng.integers(len(xb))] + 0.05 * rng.normal(size=xb.shape[1])),
        _unit(centres[rng.integers(len(centres))]),
        _unit(centres[0] + centres[1]),
        _unit(rng.normal(size=xb.shape[1])),
    ]
    for xq in queries:
        order = np.argsort(-(xb @ xq), kind="stable")
        final, _ = rr.rerank(xq, ids[order[:20]], ids[order[:50]])
        oracle = k_reciprocal_bruteforce(xq, xb, k1=20, k2=6, lambda_value=0.3)
        np.testing.assert_allclose(final, oracle[order[:50]], atol=1e-5)
    # The scratch maps are clean again after every query.
    assert all((m == -1).all() for m in rr._scratch())


def test_vectors_for_another_k1_or_wrong_ones_are_recomputed(caplog) -> None:
    xb, centres, _ = _gallery(7)
    ids = np.arange(len(xb), dtype=np.int64)
    nb, d_nb = _graph(xb, 21)
    graph = with_k_reciprocal(NeighbourGraph(ids, nb, d_nb.astype(np.float32)), xb, k1=12)
    xq = _unit(centres[2])
    order = np.argsort(-(xb @ xq), kind="stable")
    oracle = k_reciprocal_bruteforce(xq, xb, k1=20, k2=6, lambda_value=0.3)
    with caplog.at_level(logging.INFO, logger="visearch.search.rerank"):
        rr = KReciprocalReranker(ids, nb, xb, vectors=graph.kreciprocal)
    assert "are for k1=12" in caplog.text and rr.vectors.k1 == 20
    np.testing.assert_allclose(rr.rerank(xq, order[:20], ids)[0], oracle, atol=1e-5)
    # Vectors that do not belong to this graph (every weight halved) fail the spot check.
    good = rr.vectors
    bad = KReciprocalVectors(20, good.indptr, good.indices, good.weights * np.float32(0.5))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="visearch.search.rerank"):
        rr2 = KReciprocalReranker(ids, nb, xb, vectors=bad)
    assert "disagree" in caplog.text
    np.testing.assert_allclose(rr2.rerank(xq, order[:20], ids)[0], oracle, atol=1e-5)


def test_graph_saves_and_loads_the_vectors_and_old_graphs_still_serve(tmp_path, caplog) -> None:
    xb, centres, _ = _gallery(8)
    ids = np.arange(len(xb), dtype=np.int64) + 100
    graph = build_neighbour_graph(xb, ids, 21)
    kr = graph.kreciprocal
    assert kr is not None and kr.k1 == 20
    assert tmp_path / KR_FILE in graph.save(tmp_path)
    back = NeighbourGraph.load(tmp_path)
    assert back.kreciprocal is not None and back.kreciprocal.k1 == 20
    for a, b in ((kr.indptr, back.kreciprocal.indptr), (kr.indices, back.kreciprocal.indices),
                 (kr.weights, back.kreciprocal.weights)):
        np.testing.assert_array_equal(a, b)
    # A graph saved before the vectors existed: loads without them, the re-ranker
    # computes them (and says so) and serves the same distances.
    (tmp_path / KR_FILE).unlink()
    old = NeighbourGraph.load(tmp_path)
    assert old.kreciprocal is None
    with caplog.at_level(logging.INFO, logger="visearch.search.rerank"):
        rr = KReciprocalReranker(old.ids, old.I, xb, vectors=old.kreciprocal)
    assert "computed k-reciprocal vectors at load" in caplog.text
    xq = _unit(centres[3])
    order = np.argsort(-(xb @ xq), kind="stable")
    oracle = k_reciprocal_bruteforce(xq, xb, k1=20, k2=6, lambda_value=0.3)
    np.testing.assert_allclose(rr.rerank(xq, ids[order[:20]], ids)[0], oracle, atol=1e-5)
    np.testing.assert_array_equal(rr.vectors.indices, kr.indices)


def test_damaged_vector_files_are_format_errors(tmp_path) -> None:
    xb, _, _ = _gallery(9)
    graph = build_neighbour_graph(xb, np.arange(len(xb), dtype=np.int64), 11)
    graph.save(tmp_path)
    data = (tmp_path / KR_FILE).read_bytes()
    (tmp_path / KR_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexFormatError, match=KR_FILE):
        NeighbourGraph.load(tmp_path)
    kr = graph.kreciprocal
    assert kr is not None
    bad = KReciprocalVectors(kr.k1, kr.indptr, kr.indices + len(xb), kr.weights)
    NeighbourGraph(graph.ids, graph.I, graph.D).save(tmp_path)
    with open(tmp_path / KR_FILE, "wb") as f:
        np.savez(f, k1=np.int64(bad.k1), indptr=bad.indptr, indices=bad.indices,
                 weights=bad.weights)
    with pytest.raises(IndexFormatError, match="out of range"):
        NeighbourGraph.load(tmp_path)


def test_incremental_update_recomputes_the_vectors() -> None:
    from visearch.index.gallery import GalleryIndex
    from visearch.index.graph import update_neighbour_graph

    xb, _, _ = _gallery(10, clusters=8, per=6)
    ids = np.arange(len(xb), dtype=np.int64)
    cats = ["c"] * len(xb)
    keep = ids < 40
    graph = build_neighbour_graph(GalleryIndex.build(xb[keep], ids[keep], cats[:40]),
                                  ids[keep], 21)
    index = GalleryIndex.build(xb[2:], ids[2:], cats[2:])  # 0, 1 removed; 40.. added
    updated = update_neighbour_graph(graph, index, added_ids=ids[40:], removed_ids=ids[:2])
    fresh = build_neighbour_graph(index, updated.ids, 21)
    assert updated.kreciprocal is not None and fresh.kreciprocal is not None
    np.testing.assert_array_equal(updated.kreciprocal.indptr, fresh.kreciprocal.indptr)
    np.testing.assert_array_equal(updated.kreciprocal.indices, fresh.kreciprocal.indices)
    np.testing.assert_allclose(updated.kreciprocal.weights, fresh.kreciprocal.weights,
                               atol=1e-6)


@pytest.mark.parametrize("dense_below", [0, 4096])
@pytest.mark.parametrize(("k1", "k2", "lam", "per"), [(5, 1, 0.0, 5), (8, 3, 0.5, 4),
                                                      (11, 4, 1.0, 6), (2, 2, 0.3, 1)])
def test_both_paths_match_bruteforce_for_other_parameters(
    dense_below: int, k1: int, k2: int, lam: float, per: int,
) -> None:
    """Other k1/k2/lambda, down to a 3-item gallery (k1=2, h=1), on both paths."""
    xb, centres, rng = _gallery(20 + k1, clusters=3 if per == 1 else 8, per=per)
    ids = np.arange(len(xb), dtype=np.int64)
    nb, _ = _graph(xb, k1 + 1)
    rr = KReciprocalReranker(ids, nb, xb, k1=k1, k2=k2, lambda_value=lam,
                             dense_below=dense_below)
    for xq in (_unit(centres[0]), _unit(xb[1] + 0.02 * rng.normal(size=xb.shape[1]))):
        order = np.argsort(-(xb @ xq), kind="stable")
        final, _ = rr.rerank(xq, ids[order[:k1]], ids[order[:15]])
        oracle = k_reciprocal_bruteforce(xq, xb, k1=k1, k2=k2, lambda_value=lam)
        np.testing.assert_allclose(final, oracle[order[:15]], atol=1e-5)
