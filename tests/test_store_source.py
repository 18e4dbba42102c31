"""The image store as the one source: after ingest every stage reads the stored bytes.

A catalog whose files are deleted or overwritten after ingest rebuilds to the same result,
and a store whose bytes no longer match their MD5 stops the run with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import pickle
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image
from test_rebuild import TINY as REBUILD_TINY

from index_builder import cmd_rebuild
from index_builder.cli import main as index_main
from index_builder.cmd_clean import DedupParams, dedup_catalog
from index_builder.cmd_scenes import cut_out_catalog
from visearch.catalog import read_manifest
from visearch.cleaning.dedup import hash_images
from visearch.errors import ImageDecodeError, ManifestError
from visearch.imageio import decode_image
from visearch.index import IndexRoot
from visearch.store import DamagedStoreError, ImageStore, StoredImage, store_lookup

# test_rebuild's tiny models and index, with smaller scenes
TINY = {**REBUILD_TINY, "scenes": {"image_size": 64, "scenes_per_object": 0.25}}


def _catalog(folder: Path, n: int = 6) -> Path:
    """``n`` small PNG shop images on white (the first two identical) and their catalog."""
    (folder / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        img = Image.new("RGB", (40, 30), (255, 255, 255))
        img.paste((max(i - 1, 0) * 40, 0, 200), (8, 6, 32, 24))
        img.save(folder / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "sku": f"S{i // 2}", "category": "box",
                     "bbox": [4, 4, 36, 26]})
    path = folder / "catalog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ingest(catalog: Path, store: Path) -> None:
    with ImageStore(store) as st:
        st.ingest(read_manifest(catalog).rows, strict=True)


def _overwrite_images(catalog: Path) -> None:
    """Replace every catalog image with bytes that are no image at all."""
    for row in read_manifest(catalog, check_images=False).rows:
        row.path.write_bytes(b"overwritten after ingest")


def _read_in_child(image: StoredImage) -> str:
    return hashlib.md5(image.read_bytes()).hexdigest()


def test_rows_read_with_the_store_never_open_their_files(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path)
    expected = [decode_image(r.path) for r in read_manifest(catalog).rows]
    store = tmp_path / "store"
    _ingest(catalog, store)
    for path in (tmp_path / "img").iterdir():
        path.unlink()

    rows = read_manifest(catalog, images=store_lookup(store)).rows
    assert all(isinstance(r.stored, StoredImage) and r.source is r.stored for r in rows)
    for row, image in zip(rows, expected, strict=True):
        np.testing.assert_array_equal(decode_image(row.source), image)
    # The bbox is still checked, against the stored image's size.
    catalog.write_text(catalog.read_text().replace("[4, 4, 36, 26]", "[4, 4, 41, 26]", 1))
    lenient = read_manifest(catalog, strict=False, images=store_lookup(store))
    assert [r.line for r in lenient.rejects] == [1]
    assert "outside the 40 x 30 image" in lenient.rejects[0].reason
    # Without the store the deleted files are what they are: missing.
    assert len(read_manifest(catalog, strict=False).rejects) == len(expected)


def test_a_stored_image_is_picklable_and_read_in_worker_processes(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path)
    store = tmp_path / "store"
    _ingest(catalog, store)
    rows = read_manifest(catalog, images=store_lookup(store)).rows
    images = [r.stored for r in rows]
    assert pickle.loads(pickle.dumps(images[2])) == images[2]
    # The parent holds an open reader; forked workers must open their own.
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        md5s = list(pool.map(_read_in_child, images))
    assert md5s == [hashlib.md5(r.path.read_bytes()).hexdigest() for r in rows]
    assert md5s == [i.md5 for i in images]


def test_a_damaged_store_raises_a_clear_error_not_a_bad_image(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path)
    store = tmp_path / "store"
    _ingest(catalog, store)
    md5 = hashlib.md5((tmp_path / "img" / "3.png").read_bytes()).hexdigest()
    env = lmdb.open(str(store), max_dbs=4)
    with env.begin(write=True, db=env.open_db(b"images")) as txn:
        txn.put(md5.encode(), (tmp_path / "img" / "4.png").read_bytes())
    env.close()

    with ImageStore(store, readonly=True) as st, pytest.raises(
            DamagedStoreError, match=f"damaged: the image stored under MD5 {md5}"):
        st.get_bytes(md5)
    rows = read_manifest(catalog, images=store_lookup(store)).rows
    damaged = rows[3].source
    with pytest.raises(DamagedStoreError, match="re-ingest"):
        decode_image(damaged)
    assert not issubclass(DamagedStoreError, ImageDecodeError)  # never skipped as a bad row
    with pytest.raises(DamagedStoreError):
        hash_images([r.source for r in rows])
    with pytest.raises(DamagedStoreError):
        dedup_catalog(catalog, tmp_path / "work", DedupParams(), store=store)
    with pytest.raises(DamagedStoreError, match="has no image 0123"):
        StoredImage(store.resolve(), "0123").read_bytes()


def test_dedup_and_cut_outs_read_the_store_after_the_files_change(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path)
    store = tmp_path / "store"
    _ingest(catalog, store)

    def stages(work: Path) -> tuple[object, ...]:
        dedup_catalog(catalog, work, DedupParams(), store=store)
        manifest = read_manifest(catalog, images=store_lookup(store))
        cut_out_catalog(manifest.rows, work / "cutouts")
        return tuple((work / f).read_text() for f in (
            "dedup/removed.json", "dedup/report.json", "cutouts/report.jsonl",
            "cutouts/objects.jsonl"))

    before = stages(tmp_path / "a")
    assert "img/1.png" in json.loads(before[0])  # img/0.png, same bytes, same SKU
    _overwrite_images(catalog)
    assert stages(tmp_path / "b") == before
    # The same stage without the store reads the overwritten files: not images.
    with pytest.raises(ManifestError, match="not an image"):
        dedup_catalog(catalog, tmp_path / "c", DedupParams())


def _rebuild(base: Path, world: Path, *, overwrite: bool,
             monkeypatch: pytest.MonkeyPatch) -> Path:
    """A rebuild of a copy of ``world`` under ``base`` (catalog scenes, cleaning on); with
    ``overwrite`` every catalog image is overwritten right after ingest."""
    shutil.copytree(world, base / "world")
    catalog = base / "world" / "catalog.jsonl"
    ingest = cmd_rebuild.ingest_catalog

    def ingest_then_overwrite(*args: object, **kwargs: object) -> object:
        result = ingest(*args, **kwargs)  # type: ignore[arg-type]
        _overwrite_images(catalog)
        return result

    monkeypatch.setattr(cmd_rebuild, "ingest_catalog",
                        ingest_then_overwrite if overwrite else ingest)
    config = base / "tiny.json"
    config.write_text(json.dumps(TINY))
    assert index_main(["rebuild", "--catalog", str(catalog), "--root", str(base / "indexes"),
                       "--work", str(base / "work"), "--config", str(config)]) == 0
    return base


def test_a_rebuild_reads_every_catalog_image_from_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visearch.synth import generate_world

    world = tmp_path / "world"
    generate_world(world, skus=16, seed=5, image_size=64, scenes=0)
    shutil.rmtree(world / "detection")  # the detector trains on the catalog's cut-outs
    clean = _rebuild(tmp_path / "clean", world, overwrite=False, monkeypatch=monkeypatch)
    moved = _rebuild(tmp_path / "moved", world, overwrite=True, monkeypatch=monkeypatch)
    assert (moved / "world" / "shop").is_dir()
    assert all(p.read_bytes() == b"overwritten after ingest"
               for p in (moved / "world" / "shop").iterdir())

    for name in ("dedup/removed.json", "dedup/report.json", "cutouts/report.jsonl",
                 "cutouts/objects.jsonl", "scenes/train.json", "scenes/crops.jsonl",
                 "clean/removed.jsonl", "merge/sku_map.json", "catalogs/train.jsonl",
                 "catalogs/gallery.jsonl"):
        assert (moved / "work" / name).read_text() == (clean / "work" / name).read_text(), name
    a, b = IndexRoot(clean / "indexes").open(), IndexRoot(moved / "indexes").open()
    try:
        ids = a.index.ids
        np.testing.assert_array_equal(b.index.ids, ids)
        np.testing.assert_allclose(b.index.reconstruct(ids), a.index.reconstruct(ids),
                                   atol=1e-6)
    finally:
        a.close()
        b.close()


def test_a_re_ingested_file_is_read_as_last_ingested(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path)
    store = tmp_path / "store"
    _ingest(catalog, store)
    first = read_manifest(catalog, images=store_lookup(store)).rows[5].stored
    Image.new("RGB", (40, 30), (9, 9, 9)).save(tmp_path / "img" / "5.png")
    _ingest(catalog, store)
    (row,) = [r for r in read_manifest(catalog, images=store_lookup(store)).rows if r.line == 6]
    assert isinstance(first, StoredImage) and isinstance(row.stored, StoredImage)
    assert row.stored.md5 == hashlib.md5((tmp_path / "img" / "5.png").read_bytes()).hexdigest()
    assert row.stored.md5 != first.md5
    assert first.read_bytes() != row.stored.read_bytes()  # the old image is still stored


def test_the_subcommands_read_the_store_given_with_store(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    catalog = _catalog(tmp_path)
    store = tmp_path / "store"
    assert index_main(["ingest", "--catalog", str(catalog), "--store", str(store)]) == 0
    _overwrite_images(catalog)
    assert index_main(["dedup", "--catalog", str(catalog), "--out", str(tmp_path / "w"),
                       "--store", str(store)]) == 0
    assert "img/1.png" in json.loads((tmp_path / "w" / "dedup" / "removed.json").read_text())
    capsys.readouterr()
    assert index_main(["dedup", "--catalog", str(catalog), "--out", str(tmp_path / "w"),
                       "--store", str(tmp_path / "nowhere"), "--force"]) == 1
    assert "no image store at" in capsys.readouterr().err
