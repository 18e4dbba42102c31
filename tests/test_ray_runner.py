"""The Ray Data runner gives the same stage outputs as the local runner: image hashes,
embeddings (within float tolerance) and neighbour-graph rows. One private Ray per module
(2 CPUs, no dashboard): starting Ray costs seconds."""

from __future__ import annotations

import json
import operator
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ray.data")
# Ray Data's own context module warns about its deprecated settings on import.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

from test_index_root import one_faiss_thread  # noqa: E402, F401 (autouse fixture)

from visearch.cleaning.dedup import hash_images  # noqa: E402
from visearch.embedding import build_embedder, save_embedder  # noqa: E402
from visearch.index import GalleryIndex, build_neighbour_graph  # noqa: E402
from visearch.parallel import LocalRunner, RayRunner, make_runner  # noqa: E402


@pytest.fixture(scope="module")
def ray_runner():
    with tempfile.TemporaryDirectory(prefix="visearch-ray-", dir="/tmp") as tmp:
        runner = RayRunner("local", workers=2, num_cpus=2, temp_dir=tmp)
        yield runner
        runner.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """40 seeded JPEGs: blocks of colour (so the hashes differ) plus noise."""
    out = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(40):
        a = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((24, 24, 1))).astype(np.uint8)
        a = np.clip(a + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8)
        p = out / f"{i:03d}.jpg"
        Image.fromarray(a).save(p, quality=90)
        paths.append(p)
    return paths


def test_map_keeps_task_order_and_ships_shared_data(ray_runner):
    # Workers import a task's function by name: a library function, not this test module's.
    tasks = list(range(-11, 12))
    assert ray_runner.map(abs, tasks) == [abs(x) for x in tasks]
    assert ray_runner.map(operator.add, tasks, shared=100) == [x + 100 for x in tasks]
    assert LocalRunner(2).map(operator.add, tasks, shared=1) == [x + 1 for x in tasks]
    assert ray_runner.map(abs, []) == []
    with pytest.raises(ValueError, match="workers must be >= 1"):
        make_runner(None, workers=0)


@pytest.mark.parametrize("kind", ["dhash", "phash"])
def test_hashes_are_identical_to_the_local_pool(ray_runner, images, kind):
    local = hash_images(images, kind=kind, workers=2, chunk_size=8)
    ray = hash_images(images, kind=kind, chunk_size=8, runner=ray_runner)
    assert ray.md5 == local.md5 and len(set(local.md5)) == 40
    np.testing.assert_array_equal(ray.codes, local.codes)
    np.testing.assert_array_equal(ray.color, local.color)
    assert len({c.tobytes() for c in local.codes}) == 40  # the comparison is not vacuous


def test_embeddings_match_the_local_runner(ray_runner, images, tmp_path):
    torch.manual_seed(0)
    model = build_embedder("tiny", dim=8, input_size=32)
    path = tmp_path / "embedder.pt"
    save_embedder(model, path)
    items = [(100 + i, p, (0, 0, 60, 70) if i % 3 == 0 else None)
             for i, p in enumerate(images)]
    ids_l, x_l = LocalRunner(1).embed(path, items, batch_size=8)
    ids_r, x_r = ray_runner.embed(path, items, batch_size=8)
    np.testing.assert_array_equal(ids_l, np.arange(100, 140))
    np.testing.assert_array_equal(ids_r, ids_l)
    assert x_l.shape == (40, 8)
    np.testing.assert_allclose(x_r, x_l, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(x_r, axis=1), 1.0, atol=1e-5)
    assert np.abs(x_l[0] - x_l[1]).max() > 1e-3  # distinct images, distinct vectors


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_neighbour_graph_rows_are_identical(ray_runner):
    xb = _unit(700, 16, seed=1)
    ids = np.arange(1000, 1700, dtype=np.int64)
    here = build_neighbour_graph(xb, ids, 9, batch_size=128)
    ray = build_neighbour_graph(xb, ids, 9, batch_size=128, runner=ray_runner)
    np.testing.assert_array_equal(ray.I, here.I)
    np.testing.assert_array_equal(ray.D, here.D)
    np.testing.assert_array_equal(ray.kreciprocal.indices, here.kreciprocal.indices)
    # through an approximate (IVF) gallery index: the same index answers on every worker
    index = GalleryIndex.build(xb, ids, ["a"] * 700, factory="IVF16,Flat", partitioned=False)
    here = build_neighbour_graph(index, k1=9, nprobe=2, batch_size=128)
    ray = build_neighbour_graph(index, k1=9, nprobe=2, batch_size=128, runner=ray_runner)
    np.testing.assert_array_equal(ray.I, here.I)
    np.testing.assert_array_equal(ray.D, here.D)
    exact = build_neighbour_graph(xb, ids, 9)
    assert (here.I != exact.I).any()  # nprobe=2 really is approximate: a real comparison


def test_ingest_cutouts_and_scenes_are_identical_to_the_local_runner(ray_runner, tmp_path):
    from index_builder.cmd_scenes import cut_out_catalog, synthesize_catalog_scenes
    from visearch.catalog import read_manifest
    from visearch.store import ImageStore, store_lookup
    from visearch.synth import generate_world

    world = tmp_path / "world"
    generate_world(world, skus=30, seed=3, image_size=96, scenes=0, photos_per_sku=0,
                   dup_rate=0.0, mislabel_rate=0.0, split_rate=0.0)
    catalog = world / "catalog.jsonl"
    first = json.loads(catalog.read_text().splitlines()[0])
    # A truncated JPEG: its header reads (the manifest takes the row), its data does not
    # decode, so ingest itself rejects it, through the runner's shard or here.
    data = (world / first["image"]).read_bytes()
    (world / "cut.jpg").write_bytes(data[: len(data) // 2])
    with catalog.open("a") as f:
        f.write(json.dumps({**first, "image": "cut.jpg", "sku": "CUT"}) + "\n")
    rows = read_manifest(catalog, strict=False).rows
    stores, reports = {}, {}
    for name, runner in (("local", None), ("ray", ray_runner)):
        with ImageStore(tmp_path / f"store-{name}") as st:
            reports[name] = st.ingest(rows, runner=runner)
            stores[name] = list(st.iter_items())
    assert reports["ray"] == reports["local"]
    assert stores["ray"] == stores["local"]
    assert len(stores["local"]) == len(rows) - 1 >= 100
    assert [f.line for f in reports["local"].failed] == [len(rows)]  # the truncated JPEG

    out = {}
    for name, runner in (("local", None), ("ray", ray_runner)):
        stored = read_manifest(catalog, strict=False,
                               images=store_lookup(tmp_path / f"store-{name}")).rows
        cut = cut_out_catalog(stored, tmp_path / f"cut-{name}", runner=runner)
        synthesize_catalog_scenes(tmp_path / f"cut-{name}", tmp_path / f"scenes-{name}",
                                  scenes_per_object=0.3, image_size=64, seed=5,
                                  val_fraction=0.2, runner=runner)
        out[name] = {p.relative_to(tmp_path / f"{kind}-{name}"): p.read_bytes()
                     for kind in ("cut", "scenes")
                     for p in sorted((tmp_path / f"{kind}-{name}").rglob("*")) if p.is_file()}
        out[name]["summary"] = cut
    assert out["ray"].keys() == out["local"].keys()
    for key, value in out["local"].items():
        assert out["ray"][key] == value, key  # the same bytes, file by file
    # many shards per actor: without a per-image seed grabCut's masks would differ
    assert out["local"]["summary"].objects >= 100
    assert sum(str(k).startswith("scenes/") for k in out["local"]) >= 5
