"""Gallery thumbnails (``visearch.index.thumbs``) and the review page's images from the store."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index_builder.cli import main as index_main
from index_builder.cmd_ingest import ingest_catalog
from visearch.errors import IndexFormatError
from visearch.imageio import encode_jpeg
from visearch.index.thumbs import (
    THUMB_SIDE,
    THUMBS_FILE,
    ThumbnailStore,
    make_thumbnail,
    make_thumbnails,
    open_thumbnails,
    write_thumbnails,
)
from visearch.store import StoredImage


def _jpeg(w: int, h: int, colour: tuple[int, int, int]) -> bytes:
    return encode_jpeg(np.full((h, w, 3), colour, np.uint8), quality=95)


@pytest.mark.parametrize(("size", "expected"), [((400, 200), (160, 80)),
                                                ((120, 300), (64, 160)),
                                                ((50, 40), (50, 40))])
def test_make_thumbnail_scales_down_only(size, expected) -> None:
    thumb = Image.open(io.BytesIO(make_thumbnail(_jpeg(*size, (200, 40, 10)))))
    assert thumb.format == "JPEG" and thumb.size == expected
    mean = np.asarray(thumb.convert("RGB")).reshape(-1, 3).mean(0)
    assert np.abs(mean - (200, 40, 10)).max() < 6
    assert max(thumb.size) <= THUMB_SIDE


def test_make_thumbnails_in_processes_keeps_order(tmp_path: Path) -> None:
    sources = [_jpeg(40 + 10 * i, 30, (20 * i, 0, 0)) for i in range(7)]
    (tmp_path / "a.jpg").write_bytes(sources[0])
    sources.append(str(tmp_path / "a.jpg"))
    serial = list(make_thumbnails(sources))
    assert serial == [make_thumbnail(s) for s in sources] and serial[0] == serial[-1]
    assert list(make_thumbnails(sources, workers=2, chunksize=2)) == serial


def test_write_and_read_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # 600 entries cross a write batch; 17 blobs of 1 MiB outgrow the first 16 MiB map.
    entries = [(int(i), rng.bytes(int(rng.integers(1, 64)))) for i in rng.permutation(600)]
    entries += [(1000 + i, rng.bytes(1 << 20)) for i in range(17)]
    path = tmp_path / THUMBS_FILE
    assert write_thumbnails(path, iter(entries)) == len(entries)
    assert not Path(f"{path}-lock").exists()
    with open_thumbnails(tmp_path) as store:
        assert len(store) == len(entries)
        assert list(store.items()) == sorted(entries)
        assert store.get(int(entries[0][0])) == entries[0][1]
        assert store.get(-1) is None and store.get(99_999) is None
    assert open_thumbnails(tmp_path / "nothing") is None
    with pytest.raises(IndexFormatError, match="missing thumbnail file"):
        ThumbnailStore(tmp_path / "nothing" / THUMBS_FILE)
    with pytest.raises(ValueError, match="duplicate thumbnail for item id 7"):
        write_thumbnails(tmp_path / "dup.lmdb", [(7, b"a"), (7, b"b")])


def test_review_page_shows_the_stored_images(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    rows = [{"image": "img/a.jpg", "sku": "A", "category": "bag"},
            {"image": "img/b.jpg", "sku": "B", "category": "bag"}]
    ingested = {"img/a.jpg": _jpeg(64, 48, (250, 0, 0)), "img/b.jpg": _jpeg(48, 64, (0, 0, 250))}
    for name, data in ingested.items():
        (tmp_path / name).write_bytes(data)
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "store"
    ingest_catalog(catalog, store)
    stored = [StoredImage(store.resolve(), hashlib.md5(d).hexdigest()) for d in ingested.values()]
    # Worker processes open the store themselves.
    assert list(make_thumbnails(stored, workers=2)) == [make_thumbnail(d)
                                                        for d in ingested.values()]
    # The file changes after ingest: the page must show what was ingested.
    (tmp_path / "img" / "a.jpg").write_bytes(_jpeg(64, 48, (0, 250, 0)))
    work = tmp_path / "work"
    (work / "dedup").mkdir(parents=True)
    pair = {"image_a": "img/a.jpg", "image_b": "img/b.jpg", "sku_a": "A", "sku_b": "B",
            "kind": "near", "distance": 3, "color_distance": 0.1}
    (work / "dedup" / "report.json").write_text(json.dumps({"cross_sku_detail": [pair]}))
    review = ["review", "--catalog", str(catalog), "--work", str(work)]

    assert index_main([*review, "--store", str(store)]) == 0
    page = (work / "review" / "index.html").read_text()
    for data in ingested.values():
        md5 = hashlib.md5(data).hexdigest()
        assert f"src='thumbs/{md5}.jpg'" in page
        thumb = (work / "review" / "thumbs" / f"{md5}.jpg").read_bytes()
        assert thumb == make_thumbnail(data)
    assert "img/a.jpg'" not in page.replace("title='img/a.jpg'", "")

    # Without a store the page links the catalog files, as before.
    assert index_main(review) == 0
    assert "src='../../img/a.jpg'" in (work / "review" / "index.html").read_text()
