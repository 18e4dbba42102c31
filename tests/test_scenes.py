"""Copy-paste scenes: boxes against the compositing oracle, determinism, files, backgrounds."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from visearch.catalog import read_manifest
from visearch.imageio import decode_image, encode_jpeg
from visearch.scenes import compose
from visearch.scenes.compose import (
    SceneObject,
    background_from_photo,
    collapse_categories,
    compose_scene,
    procedural_background,
    synthesize_scenes,
)

PURE = ((255, 0, 0), (0, 255, 0), (0, 0, 255))


def _cutout(h: int, w: int, colour: tuple[int, int, int], ellipse: bool) -> np.ndarray:
    """uint8 [h, w, 4]: a solid colour; alpha a full rectangle or an anti-aliased ellipse."""
    alpha = np.zeros((h, w), np.uint8)
    if ellipse:
        cv2.ellipse(alpha, (w * 8, h * 8), (w * 8 - 8, h * 8 - 8), 0, 0, 360, 255, -1,
                    cv2.LINE_AA, 4)
    else:
        alpha[:] = 255
    rgb = np.broadcast_to(np.asarray(colour, np.uint8), (h, w, 3))
    return np.dstack([rgb, alpha])


def _tight(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """x1, y1, x2, y2 (exclusive) of a bool mask, or None when empty."""
    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    if cols.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _objects(n: int, seed: int) -> list[SceneObject]:
    """``n`` cut-outs of varied size and colour, two per SKU, categories hat/bag/shoe."""
    rng = np.random.default_rng(seed)
    cats = ("shoe", "bag", "hat")
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(12, 70, size=2))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        out.append(SceneObject(f"shop/{i}.jpg", f"S{i // 2:03d}", cats[(i // 2) % 3],
                               _cutout(h, w, colour, ellipse=bool(i % 2))))
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# ---- the oracle: boxes are the visible extent of each pasted object ---------------------------


def test_boxes_equal_the_visible_extent_recovered_by_colour() -> None:
    """Pure red, green and blue cut-outs on black without photometric effects: a channel
    holds exactly that object's share of each pixel, so thresholding it at 128 recovers the
    object's visible pixels independently of the compositor's own masks."""
    overlapped = stacked = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        objs = [_cutout(int(rng.integers(16, 90)), int(rng.integers(16, 90)), PURE[k],
                        ellipse=k != seed % 3) for k in range(3)]
        main = seed % 3
        image, pasted = compose_scene(objs, np.zeros((96, 96, 3), np.uint8), rng, main=main,
                                      photometric=False, occlusion=0.0, min_visible=0.0)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        assert pasted[0].index == main and pasted[0].main
        assert not any(p.main for p in pasted[1:])
        assert [p.index for p in pasted[1:]] == sorted(p.index for p in pasted[1:])
        by_index = {p.index: p for p in pasted}
        for k in range(3):
            box = _tight(image[..., k] >= 128)
            if k in by_index:
                assert by_index[k].box == box, (seed, k)
                assert 0.0 < by_index[k].visible <= 1.0
                overlapped += by_index[k].visible < 0.99
            else:  # not annotated: nothing visible, or under 4 px
                assert box is None or min(box[2] - box[0], box[3] - box[1]) < 4, (seed, k)
        stacked += bool(((image > 0).sum(-1) >= 2).any())
    # the check has teeth: objects were cut by the frame or partly covered (measured 51),
    # and objects were stacked on one another in many scenes (measured 17 of 40)
    assert overlapped >= 20 and stacked >= 8


def _fixed_layout(size: int):
    """A ``_plan_layout`` replacement: main (index 0) a 60 x 40 opaque rectangle in the
    middle, pasted last; object 1 wholly under it; object 2 a 30 x 30 square half under its
    right edge."""

    def layout(shapes, main, _size, _rng):
        zero = np.zeros((4, 2))

        def place(i: int, side: float, centre: tuple[float, float]):
            m = compose._homography(shapes[i], side, 0.0, False, zero, centre)
            return compose._Placement(i, m, side)

        return [place(1, 16.0, (48.0, 48.0)), place(2, 30.0, (78.0, 48.0)),
                place(0, 60.0, (48.0, 48.0))]

    return layout


def test_covered_objects_get_no_annotation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compose, "_plan_layout", _fixed_layout(96))
    objs = [_cutout(40, 60, PURE[0], ellipse=False), _cutout(16, 16, PURE[1], ellipse=True),
            _cutout(30, 30, PURE[2], ellipse=False)]
    bg = np.zeros((96, 96, 3), np.uint8)
    image, pasted = compose_scene(objs, bg, np.random.default_rng(0), photometric=False,
                                  occlusion=0.0, min_visible=0.25)
    assert int(image[..., 1].max()) == 0  # object 1 is wholly hidden ...
    assert [p.index for p in pasted] == [0, 2]  # ... and not annotated
    blue = image[..., 2] >= 128
    assert pasted[1].box == _tight(blue)
    # half of the 30 x 30 square shows (to a pixel column of anti-aliased edge)
    assert pasted[1].visible == pytest.approx(blue.sum() / 900, abs=0.04)
    assert pasted[1].visible == pytest.approx(0.5, abs=0.06)
    assert pasted[0].box == _tight(image[..., 0] >= 128) and pasted[0].visible == 1.0
    # a stricter visibility floor drops the half-hidden square
    _, strict = compose_scene(objs, bg, np.random.default_rng(0), photometric=False,
                              occlusion=0.0, min_visible=0.6)
    assert [p.index for p in strict] == [0]


def test_boxes_equal_the_final_masks_with_all_effects() -> None:
    """With shadows, light matching, occluders and camera effects on, boxes and visible
    fractions are those of the compositor's per-object visible masks (its test hook)."""
    occluded = 0
    for seed in range(30):
        rng = np.random.default_rng(100 + seed)
        objs = [compose._premultiplied(o.rgba) for o in _objects(4, seed)]
        comp = compose._compose(objs, procedural_background(96, rng), rng, main=1,
                                photometric=True, occlusion=1.0, min_visible=0.25)
        assert comp.pasted[0].index == 1 and comp.pasted[0].main
        annotated = {p.index: p for p in comp.pasted}
        for i, mask in enumerate(comp.masks):
            box = _tight(mask)
            visible = mask.sum() / max(comp.areas[i], 1)
            if i in annotated:
                assert annotated[i].box == box
                assert annotated[i].visible == pytest.approx(visible)
            else:
                assert box is None or min(box[2] - box[0], box[3] - box[1]) < 4 \
                    or visible < 0.25
        occluded += comp.pasted[0].visible < 0.97
    assert occluded >= 10  # the occluder covers part of the main object


# ---- scene sets ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("scenes")
    objs = _objects(12, 0)
    result = synthesize_scenes(objs, out, scenes_per_object=2.0, image_size=64, seed=3,
                               crops_per_scene=2, crop_jitter=0.15, val_fraction=0.25)
    return out, objs, result


def test_writes_valid_coco(scene_set) -> None:
    from pycocotools.coco import COCO

    out, objs, result = scene_set
    assert result.coco_path == out / "train.json"
    assert result.counts["scenes"] == 24 and result.counts["scenes_without_main"] == 0
    cat_of = {o.sku: o.category for o in objs}
    n_images = 0
    for name in ("train.json", "val.json"):
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(out / name))
        cats = coco.loadCats(coco.getCatIds())
        assert [(c["id"], c["name"]) for c in cats] == [(1, "bag"), (2, "hat"), (3, "shoe")]
        names = {c["id"]: c["name"] for c in cats}
        for img in coco.dataset["images"]:
            n_images += 1
            assert decode_image(out / img["file_name"]).shape == (64, 64, 3)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            assert sum(a["main"] for a in anns) == 1
            for a in anns:
                x, y, w, h = a["bbox"]
                assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
                assert w >= 4 and h >= 4 and a["area"] == w * h and a["iscrowd"] == 0
                assert names[a["category_id"]] == cat_of[a["sku"]]
                assert 0.25 <= a["visible"] <= 1.0
    assert n_images == 24 and result.counts["val_images"] == 6
    assert result.coco == json.loads((out / "train.json").read_text())


def test_every_cutout_is_main_equally_often_and_crops_follow_the_main_box(scene_set) -> None:
    out, objs, result = scene_set
    manifest = read_manifest(result.crops_path)  # strict: valid catalog rows
    assert len(manifest.rows) == 48 == result.counts["crops"]
    by_key = {o.key: o for o in objs}
    assert Counter(r.attributes["cutout"] for r in manifest.rows) == {o.key: 4 for o in objs}
    train = json.loads((out / "train.json").read_text())
    val = json.loads((out / "val.json").read_text())
    files = {i["id"]: i["file_name"] for i in train["images"] + val["images"]}
    main_box = {files[a["image_id"]]: (a["bbox"], a["sku"])
                for a in train["annotations"] + val["annotations"] if a["main"]}
    for row in manifest.rows:
        obj = by_key[row.attributes["cutout"]]
        assert (row.sku, row.category) == (obj.sku, obj.category)
        (x, y, w, h), sku = main_box[row.attributes["source"]]
        assert sku == obj.sku
        x1, y1, x2, y2 = (int(v) for v in row.attributes["box"].split(","))
        jx, jy = 0.15 * w + 0.5, 0.15 * h + 0.5  # + half a pixel of rounding
        assert abs(x1 - max(x, 0)) <= jx or x1 == 0
        assert abs(x2 - (x + w)) <= jx or x2 == 64
        assert abs(y1 - y) <= jy or y1 == 0
        assert abs(y2 - (y + h)) <= jy or y2 == 64
        crop = decode_image(row.path)
        assert crop.shape == (y2 - y1, x2 - x1, 3)
        # The crop shows the source scene's pixels there: compared in luma (JPEG keeps it
        # far better than chroma), the box matches better than any box shifted by 2 px.
        grey = cv2.cvtColor(decode_image(out / row.attributes["source"]), cv2.COLOR_RGB2GRAY)
        pad = np.pad(grey.astype(int), 2, mode="edge")
        crop_grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY).astype(int)
        diffs = {(dx, dy): np.abs(pad[y1 + 2 + dy:y2 + 2 + dy, x1 + 2 + dx:x2 + 2 + dx]
                                  - crop_grey).mean()
                 for dx in (-2, 0, 2) for dy in (-2, 0, 2)}
        assert diffs[0, 0] < 9 and diffs[0, 0] == min(diffs.values())


def test_same_seed_same_bytes_and_workers_agree(tmp_path: Path) -> None:
    objs = _objects(8, 1)
    kw = {"scenes_per_object": 2.0, "image_size": 48, "crops_per_scene": 1,
          "val_fraction": 0.25}
    synthesize_scenes(objs, tmp_path / "a", seed=5, **kw)
    synthesize_scenes(objs, tmp_path / "b", seed=5, **kw)
    synthesize_scenes(objs, tmp_path / "c", seed=5, workers=2, **kw)
    synthesize_scenes(objs, tmp_path / "d", seed=6, **kw)
    a, b, c, d = (_files(tmp_path / k) for k in "abcd")
    assert len(a) == 16 + 16 + 3 and a == b == c
    scenes = [k for k in a if k.startswith("scenes/")]
    assert sum(a[k] != d[k] for k in scenes) == len(scenes)


def test_scenes_per_object_rounds_and_balances_mains(tmp_path: Path) -> None:
    objs = _objects(10, 2)
    result = synthesize_scenes(objs, tmp_path, scenes_per_object=1.5, image_size=32,
                               crops_per_scene=0, max_distractors=0)
    assert result.counts["scenes"] == 15 and result.crops_path is None
    assert not (tmp_path / "crops.jsonl").exists() and not (tmp_path / "val.json").exists()
    mains = Counter(a["sku"] for a in result.coco["annotations"] if a["main"])
    per_cutout = Counter()
    for o in objs:
        per_cutout[o.sku] += 1
    # two cut-outs per SKU, each main once or twice: 2..4 scenes per SKU, 15 in all
    assert sum(mains.values()) == 15 and all(2 <= mains[s] <= 4 for s in per_cutout)
    assert all(len([a for a in result.coco["annotations"] if a["image_id"] == i["id"]]) == 1
               for i in result.coco["images"])  # no distractors


# ---- backgrounds ------------------------------------------------------------------------------


def test_procedural_backgrounds_are_varied() -> None:
    images = [procedural_background(64, np.random.default_rng(s)) for s in range(20)]
    assert all(im.shape == (64, 64, 3) and im.dtype == np.uint8 for im in images)
    means = np.array([im.reshape(-1, 3).mean(0) for im in images])
    assert means.std(0).mean() > 25  # scene colours differ (measured ~45)
    assert np.median([im.std() for im in images]) > 10  # and they are not flat
    assert len({im.tobytes() for im in images}) == 20
    again = procedural_background(64, np.random.default_rng(7))
    assert np.array_equal(again, images[7])
    assert procedural_background(37, np.random.default_rng(0)).shape == (37, 37, 3)


def test_background_from_photo_crops_and_resizes() -> None:
    ramp = np.zeros((90, 160, 3), np.uint8)
    ramp[..., 0] = np.linspace(0, 255, 160, dtype=np.uint8)[None, :]
    ramp[..., 1] = 77
    first = []
    for s in range(12):
        bg = background_from_photo(ramp, 48, np.random.default_rng(s))
        assert bg.shape == (48, 48, 3) and bg.dtype == np.uint8
        assert np.all(np.abs(bg[..., 1].astype(int) - 77) <= 1)
        first.append(int(bg[:, 0, 0].mean()) - int(bg[:, -1, 0].mean()))
    assert min(first) < 0 < max(first)  # some crops are mirrored
    with pytest.raises(ValueError, match="uint8"):
        background_from_photo(ramp.astype(np.float32), 48, np.random.default_rng(0))


def test_bad_background_photos_are_skipped(tmp_path: Path, caplog) -> None:
    good = tmp_path / "good.jpg"
    good.write_bytes(encode_jpeg(np.full((100, 140, 3), (20, 200, 40), np.uint8)))
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(good.read_bytes()[:60])
    objs = _objects(4, 3)
    with caplog.at_level(logging.WARNING, logger="visearch.scenes.compose"):
        result = synthesize_scenes(objs, tmp_path / "a", image_size=32, photo_fraction=1.0,
                                   backgrounds=[junk, good, truncated, tmp_path / "none.jpg"])
    assert result.counts["backgrounds"] == 1 and result.counts["background_failures"] == 3
    assert sum("skipping background photo" in r.getMessage() for r in caplog.records) == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="visearch.scenes.compose"):
        fallback = synthesize_scenes(objs, tmp_path / "b", image_size=32,
                                     backgrounds=[junk])
    assert fallback.counts["backgrounds"] == 0 and fallback.counts["scenes"] == 4
    assert any("procedural" in r.getMessage() for r in caplog.records)
    # photo scenes are a green crop behind the objects; procedural ones are not
    green = [decode_image(tmp_path / "a" / i["file_name"]) for i in result.coco["images"]]
    assert all(np.median(g[..., 1]) > np.median(g[..., 0]) + 60 for g in green)


# ---- caller errors and helpers ----------------------------------------------------------------


def test_caller_errors_raise_value_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ok = _cutout(20, 20, PURE[0], ellipse=False)
    bg = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="at least one object"):
        compose_scene([], bg, rng)
    with pytest.raises(ValueError, match=r"uint8 \[h, w, 4\]"):
        compose_scene([ok[..., :3]], bg, rng)
    with pytest.raises(ValueError, match=r"uint8 \[h, w, 4\]"):
        compose_scene([ok.astype(np.float32)], bg, rng)
    with pytest.raises(ValueError, match="transparent"):
        compose_scene([np.zeros((5, 5, 4), np.uint8)], bg, rng)
    with pytest.raises(ValueError, match="square"):
        compose_scene([ok], np.zeros((64, 60, 3), np.uint8), rng)
    with pytest.raises(ValueError, match=">= 32"):
        compose_scene([ok], np.zeros((16, 16, 3), np.uint8), rng)
    with pytest.raises(ValueError, match="main must index"):
        compose_scene([ok], bg, rng, main=1)
    with pytest.raises(ValueError, match=">= 32"):
        procedural_background(16, rng)
    with pytest.raises(ValueError, match="rgba"):
        SceneObject("k", "S1", "shoe", ok[..., 0])
    with pytest.raises(ValueError, match="sku"):
        SceneObject("k", "", "shoe", ok)
    objs = _objects(2, 0)
    with pytest.raises(ValueError, match="at least one SceneObject"):
        synthesize_scenes([], tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        synthesize_scenes(objs, tmp_path, image_size=16)
    with pytest.raises(ValueError, match="no scene"):
        synthesize_scenes(objs, tmp_path, scenes_per_object=0.0)
    with pytest.raises(ValueError, match="val_fraction"):
        synthesize_scenes(objs, tmp_path, val_fraction=1.0)
    with pytest.raises(ValueError, match="workers"):
        synthesize_scenes(objs, tmp_path, workers=0)
    with pytest.raises(ValueError, match="SceneObject"):
        synthesize_scenes([ok], tmp_path)


def test_collapse_categories_keeps_every_box(scene_set) -> None:
    _, _, result = scene_set
    before = json.dumps(result.coco)
    one = collapse_categories(result.coco)
    assert one["categories"] == [{"id": 1, "name": "product", "supercategory": "product"}]
    assert [a["bbox"] for a in one["annotations"]] == \
        [a["bbox"] for a in result.coco["annotations"]]
    assert {a["category_id"] for a in one["annotations"]} == {1}
    assert one["images"] == result.coco["images"]
    assert json.dumps(result.coco) == before  # the input is not modified
    with pytest.raises(ValueError, match="COCO"):
        collapse_categories({"images": []})


def test_main_categories_label_the_marked_object_main_and_the_rest_other() -> None:
    from visearch.detection.main_object import MAIN_LABEL
    from visearch.scenes.compose import OTHER_LABEL, main_categories

    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
            "categories": [{"id": 1, "name": "bag"}, {"id": 2, "name": "cap"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 2, "bbox": [0, 0, 4, 4], "main": True},
                {"id": 2, "image_id": 1, "category_id": 1, "bbox": [4, 4, 2, 2],
                 "main": False}]}
    out = main_categories(coco)
    assert [c["name"] for c in out["categories"]] == [MAIN_LABEL, OTHER_LABEL]
    assert [a["category_id"] for a in out["annotations"]] == [1, 2]
    assert [a["bbox"] for a in out["annotations"]] == [[0, 0, 4, 4], [4, 4, 2, 2]]
    assert coco["annotations"][0]["category_id"] == 2  # the input is not modified
    for a in coco["annotations"]:
        del a["main"]
    with pytest.raises(ValueError, match="marks its main object"):
        main_categories(coco)
