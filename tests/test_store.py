"""LMDB image store: round trip, idempotent ingest, resume after a crash, growth, bad rows."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from visearch.catalog import read_manifest
from visearch.errors import ManifestError
from visearch.store import ImageStore, item_key


@pytest.fixture()
def catalog(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(12):
        Image.new("RGB", (32, 24), (i * 20, 0, 255 - i * 20)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "sku": f"S{i // 3}", "category": "box",
                     "bbox": [1, 1, 30, 20], "title": f"item {i}"})
    # The same picture filed again under another SKU: one image, two items.
    rows.append({"image": "img/0.png", "sku": "S9", "category": "box"})
    path = tmp_path / "catalog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_round_trip_and_idempotent_ingest(tmp_path: Path, catalog: Path) -> None:
    rows = read_manifest(catalog).rows
    with ImageStore(tmp_path / "store") as store:
        first = store.ingest(rows)
        assert (first.added_items, first.present_items, first.added_images) == (13, 0, 12)
        assert first.shared_images == 1
        again = store.ingest(rows)
        assert (again.added_items, again.present_items, again.added_images) == (0, 13, 0)
        assert len(store) == 13 and store.num_images == 12
        assert again.keys == first.keys
        data = rows[4].path.read_bytes()
        md5 = hashlib.md5(data).hexdigest()
        assert store.get_bytes(md5) == data
        meta = store.get_item(item_key(md5, "S1"))
        assert meta["sku"] == "S1" and meta["bbox"] == [1, 1, 30, 20] and meta["line"] == 5
        assert (meta["width"], meta["height"]) == (32, 24)
        with pytest.raises(KeyError, match="no item"):
            store.get_item("nope")


def test_item_size_is_the_exif_rotated_size(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # shown 20 wide, 40 high
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"image": "rot.jpg", "sku": "S", "category": "c", "bbox": [0, 0, 20, 40]})
        + "\n"
    )
    with ImageStore(tmp_path / "store") as store:
        (key,) = store.ingest(read_manifest(tmp_path / "c.jsonl").rows).keys
        meta = store.get_item(key)
    assert (meta["width"], meta["height"]) == (20, 40)


def test_resume_after_crash_completes(tmp_path: Path, catalog: Path) -> None:
    rows = read_manifest(catalog).rows
    store = ImageStore(tmp_path / "store", batch_size=4)
    with pytest.raises(RuntimeError, match="simulated crash after 10 rows"):
        store.ingest(rows, _fail_after=10)
    store.close()
    # Two full batches (8 rows) were committed before the crash; the rest were not.
    store = ImageStore(tmp_path / "store", batch_size=4)
    assert len(store) == 8
    report = store.ingest(rows)
    assert (report.added_items, report.present_items) == (5, 8)
    assert len(store) == 13
    store.close()


def test_map_grows_when_full(tmp_path: Path, catalog: Path) -> None:
    big = tmp_path / "img" / "big.png"
    Image.effect_noise((300, 300), 80).convert("RGB").save(big)  # ~270 KB, above the map
    row = {"image": "img/big.png", "sku": "B", "category": "box"}
    with open(catalog, "a") as f:
        f.write(json.dumps(row) + "\n")
    with ImageStore(tmp_path / "store", initial_map_size=64 << 10) as store:  # 64 KiB
        report = store.ingest(read_manifest(catalog).rows)
        assert report.added_items == 14
        assert store.env.info()["map_size"] > 64 << 10


def test_bad_image_is_reported_with_its_line(tmp_path: Path, catalog: Path) -> None:
    good = (tmp_path / "img" / "1.png").read_bytes()
    (tmp_path / "img" / "1.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ManifestError, match=r"catalog.jsonl:2: .*truncated"):
        read_manifest(catalog)  # the manifest check already sees it...
    # ...and ingest decodes every image too, for files that break after validation.
    rows = read_manifest(catalog, check_images=False).rows
    with ImageStore(tmp_path / "store") as store:
        report = store.ingest(rows)
        assert [f.line for f in report.failed] == [2]
        assert "truncated or corrupt" in report.failed[0].reason
        assert report.added_items == 12
    with ImageStore(tmp_path / "store2") as store, pytest.raises(ManifestError, match=":2: "):
        store.ingest(rows, strict=True)


def test_readonly_pickling_and_reads_from_another_process(tmp_path: Path, catalog: Path) -> None:
    with ImageStore(tmp_path / "store") as store:
        keys = store.ingest(read_manifest(catalog).rows).keys
    reader = ImageStore(tmp_path / "store", readonly=True)
    expected = reader.get_item(keys[0])
    # Another process reads while this one holds the environment open.
    code = (
        "import json, sys; from visearch.store import ImageStore; "
        "s = ImageStore(sys.argv[1], readonly=True); print(json.dumps(s.get_item(sys.argv[2])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "store"), keys[0]],
        check=True, capture_output=True, text=True,
    )
    assert json.loads(out.stdout) == expected
    with pytest.raises(ValueError, match="opened readonly"):
        reader.ingest([])
    blob = pickle.dumps(reader)  # what a DataLoader worker receives: the path, reopened there
    reader.close()
    clone = pickle.loads(blob)
    assert clone.readonly and clone.get_item(keys[0]) == expected
    assert [k for k, _ in clone.iter_items()] == sorted(set(keys))
    with pytest.raises(FileNotFoundError, match="no image store"):
        ImageStore(tmp_path / "absent", readonly=True)
