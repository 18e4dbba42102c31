"""The Milvus backend (Milvus Lite, a local file) passes the same index tests as faiss:
Flat equals brute force, category restriction, add/remove visible only in the new version,
and activation by alias switch, atomic under concurrent readers."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("milvus_lite")

from pymilvus import MilvusClient  # noqa: E402

# The faiss tests' oracles and fixtures, so both backends face the very same checks.
from test_index import TOL, assert_same_topk, brute_force  # noqa: E402
from test_index_root import (  # noqa: E402
    CATS,
    D_DIM,
    N,
    items_for,
    one_faiss_thread,  # noqa: F401 (the autouse fixture, used by being imported)
    unit_vectors,
)

from visearch.errors import IndexFormatError  # noqa: E402
from visearch.index import IndexRoot, build_version, update_version  # noqa: E402
from visearch.index.backend import FaissBackend, MilvusBackend, load_gallery  # noqa: E402
from visearch.index.gallery import PAD_SIMILARITY  # noqa: E402


def backend_for(name: str, tmp_path: Path) -> FaissBackend | MilvusBackend:
    return FaissBackend() if name == "faiss" else MilvusBackend(str(tmp_path / "milvus.db"))


@pytest.fixture()
def embedder(tmp_path: Path) -> Path:
    path = tmp_path / "embedder.pt"
    path.write_bytes(b"weights-v1" * 100)
    return path


@pytest.mark.parametrize("name", ["faiss", "milvus"])
def test_flat_search_and_category_restriction_equal_brute_force(name, tmp_path):
    rng = np.random.default_rng(3)
    xb, xq = unit_vectors(900, 24, seed=1), unit_vectors(40, 24, seed=2)
    ids = rng.permutation(5000)[:900].astype(np.int64)  # sparse, shuffled ids
    cats = np.array(CATS)[rng.integers(0, 3, 900)]
    index = backend_for(name, tmp_path).build(xb, ids, cats.tolist())
    assert index.ntotal == 900 and index.dim == 24 and index.categories == list(CATS)
    D, I = index.search(xq, 10)  # noqa: E741
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == (40, 10)
    assert_same_topk(D, I, *brute_force(xq, xb, ids, 10))
    for cat in CATS:
        D, I = index.search(xq, 10, category=cat)  # noqa: E741
        assert set(index.categories_of(I.ravel())) == {cat}
        mask = cats == cat
        assert_same_topk(D, I, *brute_force(xq, xb[mask], ids[mask], 10))
    with pytest.raises(ValueError, match="unknown category 'hat'"):
        index.search(xq, 10, category="hat")
    np.testing.assert_array_equal(index.reconstruct(ids[[5, 0, 77]]), xb[[5, 0, 77]])
    with pytest.raises(KeyError):
        index.reconstruct(np.array([99_999]))
    assert index.counts() == {c: int((cats == c).sum()) for c in CATS}
    # fewer items than k: padded like faiss
    small = backend_for(name, tmp_path / "small").build(xb[:3], ids[:3], ["bag"] * 3)
    D, I = small.search(xq[:2], 5)  # noqa: E741
    assert (I[:, 3:] == -1).all() and (D[:, 3:] == PAD_SIMILARITY).all()
    assert sorted(I[0, :3].tolist()) == sorted(ids[:3].tolist())


def test_milvus_gallery_round_trips_through_the_version_directory(tmp_path):
    xb = unit_vectors(50, 8, seed=4)
    ids = np.arange(100, 150, dtype=np.int64)
    index = MilvusBackend(str(tmp_path / "m.db")).build(xb, ids, ["bag"] * 25 + ["toy"] * 25)
    index.save(tmp_path / "index")
    again = load_gallery(tmp_path / "index")
    assert type(again).__name__ == "MilvusGallery" and again.collection == index.collection
    assert again.counts() == {"bag": 25, "toy": 25}
    np.testing.assert_array_equal(again.search(xb[:4], 1)[1][:, 0], ids[:4])
    index.drop()
    with pytest.raises(IndexFormatError, match="is missing"):
        load_gallery(tmp_path / "index")


@pytest.mark.parametrize("name", ["faiss", "milvus"])
def test_add_and_remove_are_visible_only_in_the_new_version(name, tmp_path, embedder):
    backend = backend_for(name, tmp_path)
    xb = unit_vectors(N, D_DIM, seed=0)
    ids = np.arange(N, dtype=np.int64)
    root = IndexRoot(tmp_path / "indexes")
    v1 = build_version(root, xb, ids, items_for(ids), embedder, k1=8, onnx=False,
                       backend=backend)
    assert root.current() == v1.version and v1.verify().ok
    xnew = unit_vectors(10, D_DIM, seed=5)
    new_items = [{"sku": "NEW", "category": "hat", "image_key": f"n{i}", "title": ""}
                 for i in range(10)]
    v2 = update_version(root, add_xb=xnew, add_items=new_items, remove_ids=np.arange(0, 60))
    assert root.current() == v2.version and v2.manifest["parent"] == v1.version
    new_ids = np.arange(N, N + 10)
    _, I = v2.index.search(xnew, 1, category="hat")  # noqa: E741
    np.testing.assert_array_equal(I[:, 0], new_ids)
    _, I = v2.index.search(xb[:60], 5)  # noqa: E741
    assert not np.isin(I, np.arange(60)).any()
    assert not np.isin(v2.graph.I, np.arange(60)).any()
    assert v2.graph.neighbours(new_ids)[1][:, 0].tolist() == new_ids.tolist()
    assert v2.manifest["counts"]["total"] == N - 60 + 10
    report = v2.verify()
    assert report.ok, report.problems
    # the old version, reopened, is exactly as it was
    old = root.open(v1.version)
    D, I = old.index.search(xb[:60], 1)  # noqa: E741
    np.testing.assert_array_equal(I[:, 0], np.arange(60))
    assert "hat" not in old.index.categories and old.index.ntotal == N
    _, I = old.index.search(xnew, 1)  # noqa: E741
    assert not np.isin(I, new_ids).any()
    if name == "milvus":
        assert v1.collection != v2.collection and v1.collection and v2.collection
        assert v2.manifest["index_backend"]["collection"] == v2.collection


def test_milvus_graph_equals_the_faiss_graph(tmp_path, embedder):
    xb = unit_vectors(N, D_DIM, seed=6)
    ids = np.arange(N, dtype=np.int64)
    versions = [build_version(IndexRoot(tmp_path / name), xb, ids, items_for(ids), embedder,
                              k1=8, onnx=False, backend=backend_for(name, tmp_path))
                for name in ("faiss", "milvus")]
    g_faiss, g_milvus = (v.graph for v in versions)
    np.testing.assert_array_equal(g_faiss.ids, g_milvus.ids)
    np.testing.assert_allclose(g_faiss.D, g_milvus.D, atol=TOL)
    np.testing.assert_array_equal(g_faiss.I, g_milvus.I)


def test_alias_activation_rollback_gc_and_mixing_is_refused(tmp_path, embedder):
    backend = MilvusBackend(str(tmp_path / "m.db"), alias="shop_active")
    xb = unit_vectors(90, 8, seed=7)
    ids = np.arange(90, dtype=np.int64)
    root = IndexRoot(tmp_path / "indexes")
    v1, v2, v3 = (build_version(root, xb, ids, items_for(ids), embedder, k1=4, onnx=False,
                                backend=backend, activate=i < 2) for i in range(3))
    client = MilvusClient(backend.uri)

    def alias_names() -> str:
        return client.describe_alias("shop_active")["collection_name"]

    assert root.current() == v2.version and alias_names() == v2.collection
    assert not (root.path / "CURRENT").exists()  # the alias is the switch, not CURRENT
    root.activate(v3.version)
    assert alias_names() == v3.collection
    assert root.rollback() == v2.version and alias_names() == v2.collection
    root.activate(v3.version)  # history [v1, v2]; rollback target v2
    assert root.gc(keep=1) == [v1.version]
    assert not client.has_collection(v1.collection) and client.has_collection(v2.collection)
    with pytest.raises(ValueError, match="serves its versions from Milvus"):
        build_version(root, xb, ids, items_for(ids), embedder, k1=4, onnx=False)
    faiss_root = IndexRoot(tmp_path / "faiss")
    build_version(faiss_root, xb, ids, items_for(ids), embedder, k1=4, onnx=False)
    with pytest.raises(ValueError, match="holds faiss versions"):
        build_version(faiss_root, xb, ids, items_for(ids), embedder, k1=4, onnx=False,
                      backend=backend)


def test_failed_milvus_build_leaves_no_collection_and_the_active_one_serving(
        tmp_path, embedder, monkeypatch):
    backend = MilvusBackend(str(tmp_path / "m.db"))
    xb = unit_vectors(60, 8, seed=8)
    ids = np.arange(60, dtype=np.int64)
    root = IndexRoot(tmp_path / "indexes")
    v1 = build_version(root, xb, ids, items_for(ids), embedder, k1=4, onnx=False,
                       backend=backend)
    client = MilvusClient(backend.uri)
    before = set(client.list_collections())

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("visearch.index.build.ItemStore.write", full_disk)
    with pytest.raises(OSError, match="disk full"):
        build_version(root, xb, ids, items_for(ids), embedder, k1=4, onnx=False,
                      backend=backend)
    assert set(client.list_collections()) == before == {v1.collection}
    assert root.current() == v1.version and root.versions() == [v1.version]


def test_alias_switch_is_atomic_under_concurrent_readers(tmp_path, embedder):
    """Readers search through the alias while it flips between two versions whose galleries
    differ: every answer is wholly one version's, and both versions are seen."""
    backend = MilvusBackend(str(tmp_path / "m.db"))
    ids = np.arange(120, dtype=np.int64)
    xa, xb = unit_vectors(120, 8, seed=9), unit_vectors(120, 8, seed=10)
    root = IndexRoot(tmp_path / "indexes")
    va = build_version(root, xa, ids, items_for(ids), embedder, k1=4, onnx=False,
                       backend=backend)
    vb = build_version(root, xb, ids, items_for(ids), embedder, k1=4, onnx=False,
                       backend=backend)
    xq = unit_vectors(3, 8, seed=11)
    expect = {va.collection: brute_force(xq, xa, ids, 5)[1],
              vb.collection: brute_force(xq, xb, ids, 5)[1]}
    assert not np.array_equal(*expect.values())
    flips = 30
    start = threading.Barrier(4)
    done = threading.Event()
    seen: list[set[int]] = [set() for _ in range(3)]
    errors: list[BaseException] = []

    def reader(slot: int) -> None:
        client = MilvusClient(backend.uri)
        start.wait()
        while True:
            last = done.is_set()  # read once more after the writer finished
            try:
                hits = client.search(backend.alias, data=xq.tolist(), limit=5,
                                     search_params={"metric_type": "IP"})
                got = np.array([[h["id"] for h in row] for row in hits])
                match = [c for c, want in expect.items() if np.array_equal(got, want)]
                assert len(match) == 1, got
                seen[slot].add(list(expect).index(match[0]))
                name = root.current()
                assert name in (va.version, vb.version), name
            except BaseException as e:  # noqa: BLE001 - collected, asserted below
                errors.append(e)
                return
            if last:
                return

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    start.wait()
    for i in range(flips):
        root.activate(va.version if i % 2 == 0 else vb.version)
    done.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert all(s for s in seen)  # every reader read
    assert set().union(*seen) <= {0, 1}
    assert root.current() == vb.version
