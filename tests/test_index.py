"""GalleryIndex and NeighbourGraph against brute-force numpy oracles on seeded vectors."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from visearch.errors import IndexFormatError
from visearch.index import (
    PAD_SIMILARITY,
    GalleryIndex,
    NeighbourGraph,
    build_neighbour_graph,
    choose_factory,
    update_neighbour_graph,
)

TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    # The test machine's cores are shared; OpenMP spin-waiting with several threads makes
    # faiss training orders of magnitude slower under load.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered(n: int, d: int, *, clusters: int, seed: int, spread: float = 0.35) -> np.ndarray:
    """Gaussian mixture on the unit sphere: float32 [n, d], L2-normalised."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d))
    x = centers[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def brute_force(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, k: int):
    """Exact top-k by inner product: (D [M, k], I [M, k])."""
    s = xq.astype(np.float64) @ xb.astype(np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), ids[order]


def assert_same_topk(D, I, D_ref, I_ref):  # noqa: E741, N803
    """Tie-aware: similarities equal; ids equal wherever the similarity is not tied."""
    np.testing.assert_allclose(D, D_ref, atol=TOL)
    gap_prev = np.diff(D_ref, axis=1, prepend=np.inf)
    gap_next = -np.diff(D_ref, axis=1, append=-np.inf)
    distinct = (np.abs(gap_prev) > TOL) & (np.abs(gap_next) > TOL)
    assert distinct.mean() > 0.9  # the check below must actually compare most ids
    np.testing.assert_array_equal(I[distinct], I_ref[distinct])


def recall_at(I, I_ref, k: int) -> float:  # noqa: E741, N803
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(I, I_ref, strict=True)]))


@pytest.fixture(scope="module")
def gallery():
    x = clustered(3050, 32, clusters=30, seed=0)
    xb, xq = x[:3000], x[3000:]
    rng = np.random.default_rng(1)
    ids = rng.permutation(10_000)[:3000].astype(np.int64)  # sparse, shuffled ids
    cats = np.array(["bag", "shoe", "toy"])[rng.integers(0, 3, 3000)]
    return xb, ids, cats, xq


def test_choose_factory_follows_gallery_size():
    assert choose_factory(1_000, 256) == "Flat"
    assert choose_factory(100_000, 256) == "IVF1024,Flat"
    assert choose_factory(5_000_000, 256) == "IVF8192,SQ8"
    assert choose_factory(30_000_000, 256) == "IVF16384,PQ64np"


def test_flat_search_equals_brute_force(gallery):
    xb, ids, cats, xq = gallery
    index = GalleryIndex.build(xb, ids, cats)
    assert index.factories[""] == "Flat" and index.ntotal == 3000 and index.dim == 32
    D, I = index.search(xq, 10)  # noqa: E741
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == (50, 10)
    assert_same_topk(D, I, *brute_force(xq, xb, ids, 10))


def test_category_search_equals_brute_force_within_category(gallery):
    xb, ids, cats, xq = gallery
    index = GalleryIndex.build(xb, ids, cats)
    assert index.categories == ["bag", "shoe", "toy"]
    for cat in index.categories:
        D, I = index.search(xq, 10, category=cat)  # noqa: E741
        assert set(index.categories_of(I.ravel())) == {cat}
        mask = cats == cat
        assert_same_topk(D, I, *brute_force(xq, xb[mask], ids[mask], 10))
    with pytest.raises(ValueError, match="unknown category 'hat'"):
        index.search(xq, 10, category="hat")


def test_unpartitioned_index_searches_the_whole_gallery_only(gallery):
    xb, ids, cats, xq = gallery
    index = GalleryIndex.build(xb, ids, cats, partitioned=False)
    assert index.factories == {"": "Flat"} and index.counts()["bag"] == (cats == "bag").sum()
    assert_same_topk(*index.search(xq, 5), *brute_force(xq, xb, ids, 5))
    with pytest.raises(ValueError, match="without per-category partitions"):
        index.search(xq, 5, category="bag")
    index.remove(ids[:10])
    index.add(xb[:10], ids[:10], ["new"] * 10)
    assert index.counts()["new"] == 10 and index.ntotal == 3000


def test_padding_when_fewer_than_k():
    xb = clustered(5, 8, clusters=2, seed=3)
    index = GalleryIndex.build(xb, np.arange(5), ["a", "a", "a", "b", "b"])
    D, I = index.search(xb[:1], 4, category="b")  # noqa: E741
    assert (I[0, 2:] == -1).all() and (D[0, 2:] == PAD_SIMILARITY).all()
    assert set(I[0, :2]) == {3, 4}


@pytest.mark.parametrize(
    ("factory", "options", "bound"),
    [
        ("IVF64,Flat", {"nprobe": 8}, 0.9),
        ("IVF64,SQ8", {"nprobe": 8}, 0.9),
        ("HNSW32", {"ef_search": 64}, 0.9),
    ],
)
def test_approximate_recall_at_10(factory, options, bound):
    x = clustered(10_200, 32, clusters=100, seed=4)
    xb, xq = x[:10_000], x[10_000:]
    ids = np.arange(10_000, dtype=np.int64)
    index = GalleryIndex.build(xb, ids, ["x"] * 10_000, factory=factory)
    _, I_ref = brute_force(xq, xb, ids, 10)
    _, I = index.search(xq, 10, **options)  # noqa: E741
    assert recall_at(I, I_ref, 10) >= bound
    # Probing more lists / a wider beam can only help on average.
    wide = {"nprobe": 64} if "nprobe" in options else {"ef_search": 512}
    _, I_wide = index.search(xq, 10, **wide)
    assert recall_at(I_wide, I_ref, 10) >= recall_at(I, I_ref, 10) - 0.01


def test_ivf_pq_finds_gallery_items_in_top_10():
    # PQ stores approximations, so exact top-10 recall is low; what verify relies on is
    # that an item searched with its own vector comes back near the top.
    xb = clustered(2500, 32, clusters=50, seed=9)
    index = GalleryIndex.build(xb, np.arange(2500), ["x"] * 2500, factory="IVF16,PQ16x4")
    assert index.factories[""] == "IVF16,PQ16x4"  # trained without polysemous codes
    _, I = index.search(index.reconstruct(np.arange(300)), 10, nprobe=8)  # noqa: E741
    assert (np.arange(300)[:, None] == I).any(axis=1).mean() >= 0.9


def test_small_partition_falls_back_to_flat_when_factory_cannot_train():
    xb = clustered(2100, 16, clusters=10, seed=5)
    cats = ["big"] * 2000 + ["tiny"] * 100
    index = GalleryIndex.build(xb, np.arange(2100), cats, factory="IVF256,Flat")
    assert index.factories == {"": "IVF256,Flat", "big": "IVF256,Flat", "tiny": "Flat"}
    D, I = index.search(xb[2000:2010], 1, category="tiny")  # noqa: E741
    np.testing.assert_array_equal(I[:, 0], np.arange(2000, 2010))


@pytest.mark.parametrize("factory", ["Flat", "IVF32,Flat", "IVF32,SQ8", "HNSW16"])
def test_add_and_remove_without_rebuild(factory):
    xb = clustered(2000, 16, clusters=20, seed=6)
    ids = np.arange(2000, dtype=np.int64) * 3
    cats = np.where(np.arange(2000) % 2 == 0, "even", "odd")
    index = GalleryIndex.build(xb, ids, cats, factory=factory)
    gone = ids[:500]
    assert index.remove(np.concatenate([gone, [999_999]])) == 500
    assert index.ntotal == 1500 and index.counts() == {"even": 750, "odd": 750}
    xnew = clustered(20, 16, clusters=20, seed=7)
    index.add(xnew, np.arange(20) + 10_000, ["new"] * 20)
    assert index.counts()["new"] == 20
    # Removed items are never returned; kept and new items find themselves.
    probe = np.concatenate([xb[:500:25], xb[1000:1020], xnew])
    want = np.concatenate([np.full(20, -2), ids[1000:1020], np.arange(20) + 10_000])
    for cat in (None, "even", "odd", "new"):
        _, I = index.search(probe, 10, category=cat, nprobe=32, ef_search=256)  # noqa: E741
        assert not np.isin(I, gone).any()
    _, I = index.search(probe, 1, nprobe=32, ef_search=256)  # noqa: E741
    np.testing.assert_array_equal(I[20:, 0], want[20:])
    # SQ8 stores each component in 8 bits over its trained range: a quantisation step.
    atol = 0.02 if "SQ8" in factory else 1e-6
    np.testing.assert_allclose(index.reconstruct(ids[1000:1003]), xb[1000:1003], atol=atol)
    with pytest.raises(KeyError):
        index.reconstruct(gone[:1])
    with pytest.raises(ValueError, match="already in the index"):
        index.add(xnew[:1], [10_000], ["new"])


def test_bad_inputs_have_clear_errors(gallery):
    xb, ids, cats, xq = gallery
    index = GalleryIndex.build(xb, ids, cats)
    with pytest.raises(IndexFormatError, match="dimension 16 but the index has dimension 32"):
        index.search(np.ones((1, 16), np.float32) / 4, 5)
    with pytest.raises(IndexFormatError, match="dimension"):
        index.add(np.ones((1, 64), np.float32) / 8, [1], ["bag"])
    with pytest.raises(ValueError, match="L2-normalised"):
        GalleryIndex.build(xb * 2, ids, cats)
    with pytest.raises(ValueError, match="unique"):
        GalleryIndex.build(xb[:2], [1, 1], ["a", "a"])
    with pytest.raises(ValueError, match="k must be"):
        index.search(xq, 0)


def test_save_load_roundtrip_and_corrupt_file(gallery, tmp_path):
    xb, ids, cats, xq = gallery
    index = GalleryIndex.build(xb, ids, cats, factory="IVF16,Flat")
    index.save(tmp_path)
    loaded = GalleryIndex.load(tmp_path)
    for cat in (None, "shoe"):
        D0, I0 = index.search(xq, 5, category=cat)
        D1, I1 = loaded.search(xq, 5, category=cat)
        np.testing.assert_array_equal(I0, I1)
        np.testing.assert_array_equal(D0, D1)
    assert loaded.counts() == index.counts() and loaded.factory == "IVF16,Flat"
    whole = tmp_path / "whole.faiss"
    whole.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(IndexFormatError, match="corrupt or truncated index file .*whole.faiss"):
        GalleryIndex.load(tmp_path)
    whole.unlink()
    with pytest.raises(IndexFormatError, match="missing index file"):
        GalleryIndex.load(tmp_path)


def test_neighbour_graph_equals_brute_force(gallery):
    xb, ids, cats, _ = gallery
    graph = build_neighbour_graph(xb, ids, 15, batch_size=700)
    D_ref, I_ref = brute_force(xb, xb, ids, 15)
    np.testing.assert_array_equal(graph.ids, ids)
    assert_same_topk(graph.D, graph.I, D_ref, I_ref)
    # Through a Flat index (how build_version computes it) the graph is the same.
    via_index = build_neighbour_graph(GalleryIndex.build(xb, ids, cats), ids, 15)
    assert_same_topk(via_index.D, via_index.I, D_ref, I_ref)
    # Lookup by item id, in any order.
    pick = ids[[2999, 0, 1234]]
    D, I = graph.neighbours(pick)  # noqa: E741
    np.testing.assert_array_equal(I, graph.I[[2999, 0, 1234]])
    assert (I[:, 0] == pick).all()  # each item is its own first neighbour
    with pytest.raises(KeyError):
        graph.neighbours([10_001])


def test_neighbour_graph_sparse_ids_and_roundtrip(tmp_path):
    xb = clustered(200, 8, clusters=5, seed=8)
    ids = np.arange(200, dtype=np.int64) * 1_000_003  # too sparse for the dense table
    graph = build_neighbour_graph(xb, ids, 5)
    graph.save(tmp_path)
    loaded = NeighbourGraph.load(tmp_path)
    D, I = loaded.neighbours(ids[[7, 3]])  # noqa: E741
    np.testing.assert_array_equal(I, graph.I[[7, 3]])
    np.testing.assert_array_equal(D, graph.D[[7, 3]])


def test_incremental_graph_update_equals_rebuild(gallery):
    xb, ids, cats, xq = gallery
    index = GalleryIndex.build(xb, ids, cats)
    graph = build_neighbour_graph(index, ids, 10)
    removed = ids[::7]
    new_ids = np.arange(20_000, 20_050, dtype=np.int64)
    index.remove(removed)
    index.add(xq, new_ids, ["bag"] * len(new_ids))
    updated = update_neighbour_graph(graph, index, added_ids=new_ids, removed_ids=removed)
    keep = ~np.isin(ids, removed)
    all_x = np.concatenate([xb[keep], xq])
    all_ids = np.concatenate([ids[keep], new_ids])
    D_ref, I_ref = brute_force(all_x, all_x, all_ids, 10)
    order = np.argsort(all_ids)
    rows = updated.rows(all_ids[order])
    assert_same_topk(updated.D[rows], updated.I[rows], D_ref[order], I_ref[order])


def test_ivf_sq8_quantises_vectors_not_residuals_and_keeps_it_on_disk(tmp_path):
    xb = clustered(3000, 32, clusters=30, seed=11)
    index = GalleryIndex.build(xb, np.arange(3000), ["x"] * 3000, factory="IVF16,SQ8",
                               partitioned=False)
    index.save(tmp_path)
    loaded = GalleryIndex.load(tmp_path)
    for idx in (index, loaded):
        ivf = faiss.downcast_index(faiss.extract_index_ivf(idx._whole.index))
        assert isinstance(ivf, faiss.IndexIVFScalarQuantizer) and not ivf.by_residual
    D0, I0 = index.search(xb[:50], 5, nprobe=4)  # noqa: E741
    D1, I1 = loaded.search(xb[:50], 5, nprobe=4)  # noqa: E741
    np.testing.assert_array_equal(I0, I1)
    np.testing.assert_array_equal(D0, D1)
    assert (I0[:, 0] == np.arange(50)).mean() >= 0.95


def test_ivf_sq8_residual_encoding_is_a_build_parameter_kept_by_load_and_add(tmp_path):
    xb = clustered(3000, 32, clusters=30, seed=11)
    cats = ["x"] * 2000 + ["y"] * 1000
    index = GalleryIndex.build(xb[:2000], np.arange(2000), cats[:2000], factory="IVF16,SQ8",
                               sq_by_residual=True)
    index.save(tmp_path)
    loaded = GalleryIndex.load(tmp_path)
    assert index.sq_by_residual and loaded.sq_by_residual
    # a category new to the index gets a partition encoded like the rest
    loaded.add(xb[2000:], np.arange(2000, 3000), cats[2000:])
    for part in (loaded._whole, *loaded._parts.values()):
        ivf = faiss.downcast_index(faiss.extract_index_ivf(part.index))
        assert isinstance(ivf, faiss.IndexIVFScalarQuantizer) and ivf.by_residual
    plain = GalleryIndex.build(xb[:2000], np.arange(2000), cats[:2000], factory="IVF16,SQ8")
    assert not plain.sq_by_residual
    # the two encodings store different codes for the same vectors
    assert not np.array_equal(plain.reconstruct(np.arange(50)), index.reconstruct(np.arange(50)))


def test_importing_the_index_leaves_faiss_settings_alone_and_search_restores_them(gallery):
    import subprocess
    import sys

    code = ("import faiss; before = faiss.cvar.distance_compute_blas_threshold; "
            "import visearch.index; "
            "print(before, faiss.cvar.distance_compute_blas_threshold)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == out[1] == "128000"

    from visearch.index.blas import SMALL_BATCH_BLAS_THRESHOLD, small_batch_blas

    xb, ids, cats, _ = gallery
    xq = clustered(300, 32, clusters=30, seed=5)
    index = GalleryIndex.build(xb, ids, cats)
    default = faiss.cvar.distance_compute_blas_threshold
    D, I = index.search(xq, 10)  # noqa: E741
    assert faiss.cvar.distance_compute_blas_threshold == default
    # Bitwise what faiss answers with the threshold lowered: 300 queries x d=32 = 9600 is
    # above it but under faiss's default, where a plain search takes the SIMD path, whose
    # similarities differ in the last bits.
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    D_plain, _ = flat.search(xq, 10)
    assert not np.array_equal(D, D_plain)
    with small_batch_blas():
        assert faiss.cvar.distance_compute_blas_threshold == min(default,
                                                                 SMALL_BATCH_BLAS_THRESHOLD)
        with small_batch_blas():  # nested (another thread's search): still lowered
            pass
        assert faiss.cvar.distance_compute_blas_threshold == min(default,
                                                                 SMALL_BATCH_BLAS_THRESHOLD)
        D_ref, rows = flat.search(xq, 10)
    assert faiss.cvar.distance_compute_blas_threshold == default
    np.testing.assert_array_equal(D, D_ref)
    np.testing.assert_array_equal(I, ids[rows])


def test_faiss_threads_scopes_the_calling_thread_only() -> None:
    import threading

    from visearch.index.blas import faiss_threads

    before = faiss.omp_get_max_threads()
    inside: list[int] = []
    other: list[int] = []
    entered, checked = threading.Event(), threading.Event()

    def searcher() -> None:
        inside.append(faiss.omp_get_max_threads())
        with faiss_threads(inside[0] + 1):  # differs from the default whatever it is
            inside.append(faiss.omp_get_max_threads())
            entered.set()
            checked.wait(timeout=30)
        inside.append(faiss.omp_get_max_threads())

    def bystander() -> None:
        entered.wait(timeout=30)
        other.append(faiss.omp_get_max_threads())  # while the searcher is inside
        checked.set()

    threads = [threading.Thread(target=searcher), threading.Thread(target=bystander)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # threads start from the process default; only the searcher's own value changed, and
    # it is restored on exit
    default = inside[0]
    assert inside == [default, default + 1, default] and other == [default]
    assert faiss.omp_get_max_threads() == before
    with faiss_threads(None):
        assert faiss.omp_get_max_threads() == before
    with pytest.raises(ValueError, match=">= 1"), faiss_threads(0):
        pass
