"""Index versions: build, manifest, add/remove as new versions, activate/rollback/gc, and the
faults (killed build, disk full, corrupt files, dimension mismatch)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest

from visearch import fileio
from visearch.errors import IndexFormatError
from visearch.index import IndexRoot, IndexVersion, build_version, update_version

N, D_DIM = 600, 16
CATS = ("bag", "shoe", "toy")


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items_for(ids: np.ndarray) -> list[dict]:
    return [{"sku": f"S{i // 2:05d}", "category": CATS[i % 3], "image_key": f"img/{i}.jpg",
             "title": f"item {i}"} for i in ids.tolist()]


@pytest.fixture()
def embedder(tmp_path: Path) -> Path:
    path = tmp_path / "embedder.pt"
    path.write_bytes(b"weights-v1" * 100)
    return path


@pytest.fixture()
def built(tmp_path: Path, embedder: Path) -> tuple[IndexRoot, IndexVersion, np.ndarray]:
    xb = unit_vectors(N, D_DIM, seed=0)
    ids = np.arange(N, dtype=np.int64)
    root = IndexRoot(tmp_path / "indexes")
    version = build_version(root, xb, ids, items_for(ids), embedder, k1=8,
                            inputs={"catalog": "abc123"})
    return root, version, xb


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: IndexRoot) -> dict[str, str]:
    """Every file under root (except the lock) -> sha256: what 'untouched' means."""
    return {p.relative_to(root.path).as_posix(): sha256(p)
            for p in sorted(root.path.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_build_version_writes_a_complete_active_version(built, embedder):
    root, v, xb = built
    assert root.current() == v.version and root.versions() == [v.version]
    m = v.manifest
    assert m["format_version"] == 1 and m["embedding_dim"] == D_DIM
    assert m["counts"] == {"total": N, "per_category": {c: N // 3 for c in CATS}}
    assert m["model"]["sha256"] == sha256(embedder) == sha256(v.embedder_path)
    assert v.detector_path is None and m["config"]["k1"] == 8
    assert m["inputs"] == {"catalog": "abc123"} and m["next_id"] == N
    for rel, info in m["files"].items():
        assert sha256(v.path / rel) == info["sha256"]
    assert v.items[7] == {"sku": "S00003", "category": "shoe", "image_key": "img/7.jpg",
                          "title": "item 7"}
    assert len(v.items) == N
    D, I = v.index.search(xb[[5]], 3, category="toy")  # noqa: E741
    assert I[0, 0] == 5 and abs(D[0, 0] - 1.0) < 1e-5
    _, nbrs = v.graph.neighbours([5])
    assert nbrs[0, 0] == 5 and nbrs.shape == (1, 8)
    report = v.verify()
    assert report.ok, report.problems
    assert report.checks["self_search_rate"] == 1.0


def test_detector_is_shipped_with_the_version(tmp_path, embedder):
    det = tmp_path / "det.pt"
    det.write_bytes(b"detector")
    ids = np.arange(30, dtype=np.int64)
    v = build_version(tmp_path / "r", unit_vectors(30, 8, 1), ids, items_for(ids), embedder,
                      detector_path=det, k1=4, activate=False)
    assert v.detector_path is not None and v.detector_path.read_bytes() == b"detector"
    assert IndexRoot(tmp_path / "r").current() is None


def test_add_and_remove_make_a_new_version_and_leave_the_old_one(built):
    root, v1, xb = built
    before = snapshot(root)
    xnew = unit_vectors(10, D_DIM, seed=5)
    new_items = [{"sku": "NEW", "category": "hat", "image_key": f"n{i}", "title": ""}
                 for i in range(10)]
    v2 = update_version(root, add_xb=xnew, add_items=new_items, remove_ids=np.arange(0, 60))
    assert root.current() == v2.version and v2.manifest["parent"] == v1.version
    new_ids = np.arange(N, N + 10)
    # New version: added items found, removed ones gone everywhere.
    _, I = v2.index.search(xnew, 1, category="hat")  # noqa: E741
    np.testing.assert_array_equal(I[:, 0], new_ids)
    _, I = v2.index.search(xb[:60], 5)  # noqa: E741
    assert not np.isin(I, np.arange(60)).any()
    assert v2.items[N + 3]["sku"] == "NEW" and 5 not in v2.items
    assert not np.isin(v2.graph.I, np.arange(60)).any()
    assert v2.graph.neighbours(new_ids)[1][:, 0].tolist() == new_ids.tolist()
    assert v2.manifest["counts"]["total"] == N - 60 + 10 and v2.manifest["next_id"] == N + 10
    assert v2.verify().ok
    # Old version: exactly as it was.
    old = root.open(v1.version)
    _, I = old.index.search(xb[:3], 1)  # noqa: E741
    np.testing.assert_array_equal(I[:, 0], [0, 1, 2])
    assert "hat" not in old.index.categories and 5 in old.items
    assert {k: h for k, h in snapshot(root).items() if k.startswith(v1.version)} == {
        k: h for k, h in before.items() if k.startswith(v1.version)}
    # Removing again never reuses ids.
    v3 = update_version(root, add_xb=xnew[:1], add_items=new_items[:1],
                        remove_ids=[N, 999_999])
    assert v3.items.get(N) is None and v3.items[N + 10]["sku"] == "NEW"


def test_add_with_a_model_of_another_dimension_is_refused(built):
    root, v1, _ = built
    before = snapshot(root)
    with pytest.raises(IndexFormatError, match="dimension 32 but the index has dimension 16"):
        update_version(root, add_xb=unit_vectors(2, 32, 3), add_items=items_for(np.arange(2)))
    assert snapshot(root) == before and root.current() == v1.version


def test_activate_rollback_and_gc(built, embedder):
    root, v1, xb = built
    ids = np.arange(N, dtype=np.int64)
    v2 = build_version(root, xb, ids, items_for(ids), embedder, k1=4)
    v3 = build_version(root, xb, ids, items_for(ids), embedder, k1=4, activate=False)
    assert root.versions() == [v1.version, v2.version, v3.version]
    assert root.current() == v2.version
    root.activate(v3.version)
    assert root.rollback() == v2.version and root.current() == v2.version
    assert root.rollback() == v1.version
    with pytest.raises(ValueError, match="nothing to roll back to"):
        root.rollback()
    with pytest.raises(ValueError, match="no index version 'v9999"):
        root.activate("v9999-20990101T000000")
    root.activate(v3.version)  # history: [v1, v3 active]; rollback target v1
    assert root.gc(keep=1) == [v2.version]
    assert root.versions() == [v1.version, v3.version]  # v1 kept: it is the rollback target
    assert root.rollback() == v1.version
    with pytest.raises(ValueError, match="keep must be"):
        root.gc(keep=0)


def test_current_always_names_a_complete_version_under_concurrent_switching(built, embedder):
    root, v1, xb = built
    ids = np.arange(N, dtype=np.int64)
    v2 = build_version(root, xb, ids, items_for(ids), embedder, k1=4)
    valid = {v1.version, v2.version}
    seen, errors = set(), []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                name = root.current()
                seen.add(name)
                assert name in valid, name
                assert root.open(name).manifest["counts"]["total"] == N
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)
                return

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(40):
        root.activate(v1.version if i % 2 else v2.version)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert seen == valid
    assert not list(root.path.glob(".CURRENT.tmp-*"))


def test_verify_catches_corrupt_and_truncated_files(built):
    root, v, _ = built
    whole = v.path / "index" / "whole.faiss"
    data = bytearray(whole.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    whole.write_bytes(bytes(data))
    report = root.open(v.version).verify()
    assert not report.ok and "index/whole.faiss: sha256 differs" in report.problems[0]
    whole.write_bytes(bytes(data[: len(data) // 3]))
    report = root.open(v.version).verify()
    assert "index/whole.faiss" in report.problems[0] and "truncated" in report.problems[0]
    with pytest.raises(IndexFormatError, match="corrupt or truncated index file"):
        _ = root.open(v.version).index
    (v.path / "graph" / "neighbours_I.npy").unlink()
    assert any("missing file graph/neighbours_I.npy" in p
               for p in root.open(v.version).verify().problems)


def test_disk_full_leaves_the_active_version_untouched(built, monkeypatch):
    root, v1, xb = built
    before = snapshot(root)

    def disk_full(path: Path) -> None:
        if path.name == "items.lmdb":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(fileio, "_fault_hook", disk_full)
    ids = np.arange(N, dtype=np.int64)
    with pytest.raises(OSError, match="disk full while writing a new index version") as e:
        build_version(root, xb, ids, items_for(ids), v1.embedder_path, k1=4)
    assert e.value.errno == errno.ENOSPC
    assert snapshot(root) == before and root.current() == v1.version
    assert not list(root.path.glob(".staging-*"))


_KILLED_BUILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from visearch import fileio
    from visearch.index import build_version

    root, emb = sys.argv[1], sys.argv[2]

    def kill_mid_build(path):
        if path.name == "neighbours_I.npy":  # index files written, graph half written
            os.kill(os.getpid(), signal.SIGKILL)

    fileio._fault_hook = kill_mid_build
    rng = np.random.default_rng(3)
    xb = rng.standard_normal((200, 16)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    items = [{"sku": f"S{i}", "category": "bag"} for i in range(200)]
    build_version(root, xb, np.arange(200), items, emb, k1=4)
    """
)


def test_killed_build_leaves_current_and_old_version_intact(built, tmp_path):
    root, v1, xb = built
    before = snapshot(root)
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_BUILD, str(root.path), str(v1.embedder_path)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    leftovers = list(root.path.glob(".staging-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "index" / "whole.faiss").is_file()
    # The old version is still active, complete and verified; the leftovers are no version.
    after = {k: h for k, h in snapshot(root).items() if not k.startswith(".staging-")}
    assert after == before and root.current() == v1.version
    assert root.versions() == [v1.version] and root.open().verify().ok
    # The next build cleans the leftovers up and publishes normally.
    ids = np.arange(N, dtype=np.int64)
    v2 = build_version(root, xb, ids, items_for(ids), v1.embedder_path, k1=4)
    assert not list(root.path.glob(".staging-*"))
    assert root.versions() == [v1.version, v2.version] and root.current() == v2.version


def test_open_errors_are_clear(tmp_path):
    root = IndexRoot(tmp_path / "empty")
    assert root.versions() == [] and root.current() is None
    with pytest.raises(ValueError, match="no active index version"):
        root.open()
    bad = tmp_path / "empty" / "v0001-20260101T000000"
    bad.mkdir(parents=True)
    (bad / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(IndexFormatError, match="format version 99"):
        root.open("v0001-20260101T000000")


def test_staging_that_fails_verification_is_not_published(tmp_path):
    root = IndexRoot(tmp_path / "r")
    manifest = {"format_version": 1, "files": {"index/whole.faiss": {"sha256": "0", "bytes": 9}}}
    with (
        pytest.raises(IndexFormatError, match="failed verification.*missing file index/whole"),
        root.staging() as tmp,
    ):
        (tmp / "manifest.json").write_text(json.dumps(manifest))
    assert root.versions() == [] and not list(root.path.glob(".staging-*"))


def test_graph_search_settings_are_applied_recorded_and_reused(tmp_path, embedder, monkeypatch):
    from visearch.index import graph as graph_mod

    xb = unit_vectors(N, D_DIM, seed=3)
    ids = np.arange(N, dtype=np.int64)
    root = IndexRoot(tmp_path / "r")
    v = build_version(root, xb, ids, items_for(ids), embedder, factory="IVF16,Flat", k1=6,
                      graph_nprobe=1)
    assert v.manifest["config"]["graph_nprobe"] == 1
    assert "graph_ef_search" not in v.manifest["config"]
    # The graph is exactly what a one-list search returns, and differs from the default
    # (8 of 16 lists) search on these unclustered vectors: the setting was used.
    D1, I1 = v.index.search(xb, 6, nprobe=1)  # noqa: E741
    rows = v.graph.rows(ids)
    np.testing.assert_array_equal(v.graph.I[rows], I1)
    _, I8 = v.index.search(xb, 6)  # noqa: E741
    assert (I8 != I1).any(axis=1).mean() > 0.3
    # update_version searches the rows it must redo with the recorded setting.
    seen = []
    real = graph_mod.build_neighbour_graph

    def spy(*args, **kwargs):
        seen.append((kwargs.get("nprobe"), kwargs.get("ef_search")))
        return real(*args, **kwargs)

    monkeypatch.setattr(graph_mod, "build_neighbour_graph", spy)
    v2 = update_version(root, add_xb=unit_vectors(5, D_DIM, seed=9),
                        add_items=items_for(np.arange(N, N + 5)))
    assert seen == [(1, None)]
    assert v2.manifest["config"]["graph_nprobe"] == 1


def test_graph_search_settings_must_be_positive(tmp_path, embedder):
    ids = np.arange(50, dtype=np.int64)
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        build_version(tmp_path / "r", unit_vectors(50, 8, 1), ids, items_for(ids), embedder,
                      k1=4, graph_nprobe=0)
    assert not (tmp_path / "r").exists() or IndexRoot(tmp_path / "r").current() is None
