"""Cut-outs of user photos given the product box, and ``cut_out_product``'s dispatch:
checked against the synthetic world's drawn photo masks, against photos drawn here with a
known mask, against the plain grabCut-with-rect baseline, plus bad inputs and determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from visearch.scenes import (
    Cutout,
    cut_out,
    cut_out_photo,
    cut_out_product,
    load_rgba,
    plain_border,
)
from visearch.synth import generate_world, sample_products
from visearch.synth.scene import mask_box, render_scene
from visearch.synth.world import mask_path

WORLD = {"skus": 24, "seed": 3, "image_size": 96, "photos_per_sku": 1, "scenes": 0}


def _full_alpha(c: Cutout, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    x1, y1, x2, y2 = c.box
    out[y1:y2, x1:x2] = c.rgba[..., 3]
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(1, int((a | b).sum()))


def _spearman(a: list[float], b: list[float]) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("photo_cutout_world")
    generate_world(out, shop_masks=True, **WORLD)
    return out


def _photos(world: Path) -> list[dict]:
    items = []
    for line in (world / "queries.jsonl").read_text().splitlines():
        row = json.loads(line)
        with Image.open(world / mask_path(row["image"])) as im:
            mask = np.asarray(im) >= 128
        items.append({"image": load_rgba(world / row["image"]), "bbox": row["bbox"],
                      "mask": mask})
    return items


def _rect_baseline(image: np.ndarray, bbox: list[int]) -> np.ndarray:
    """grabCut initialised with the box alone, 5 iterations, hard mask (the baseline)."""
    gc = np.zeros(image.shape[:2], np.uint8)
    x1, y1, x2, y2 = bbox
    cv2.setRNGSeed(0)
    cv2.grabCut(np.ascontiguousarray(image[..., :3]), gc, (x1, y1, x2 - x1, y2 - y1),
                np.zeros((1, 65)), np.zeros((1, 65)), 5, cv2.GC_INIT_WITH_RECT)
    return (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)


# ---- the world's photo masks ---------------------------------------------------------------


def test_photo_masks_do_not_change_the_world(world: Path, tmp_path: Path) -> None:
    """shop_masks=True also writes each user photo's mask; every image and manifest is the
    same bytes as without it; the mask is the product's visible part, inside its box."""
    plain = tmp_path / "plain"
    generate_world(plain, **WORLD)
    for f in sorted(plain.rglob("*")):
        if f.is_file() and f.name != "world.json":
            a = hashlib.sha256(f.read_bytes()).digest()
            assert a == hashlib.sha256((world / f.relative_to(plain)).read_bytes()).digest(), f
    rows = [json.loads(line) for line in (world / "queries.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    for row in rows:
        with Image.open(world / mask_path(row["image"])) as im:
            assert im.mode == "L" and im.size == (96, 96)
            box = mask_box(im)
        assert box is not None
        x1, y1, x2, y2 = row["bbox"]  # the whole product's box; occlusion only shrinks it
        assert x1 <= box[0] and y1 <= box[1] and box[2] <= x2 and box[3] <= y2, (row, box)


def test_render_scene_return_mask_keeps_the_draws() -> None:
    """Same draws with and without the mask; an occluded product's mask loses pixels but
    its (whole-product) box does not change."""
    products = sample_products(12, np.random.default_rng(2))
    occluded = 0
    for seed in range(12):
        image, placed = render_scene(products, seed % 12, 80, np.random.default_rng(seed))
        image2, placed2, mask = render_scene(products, seed % 12, 80,
                                             np.random.default_rng(seed), return_mask=True)
        assert np.array_equal(np.asarray(image), np.asarray(image2))
        assert placed == placed2
        box = mask_box(mask)
        b = placed[0].box
        assert b[0] <= box[0] and b[1] <= box[1] and box[2] <= b[2] and box[3] <= b[3]
        occluded += box != b
    assert occluded >= 1  # some photos have an occluder over the product's edge


# ---- cut-outs of the world's user photos ---------------------------------------------------


def test_photo_cut_outs_match_the_drawn_masks_and_beat_the_rect_baseline(world: Path) -> None:
    """Given the true box: mean IoU >= 0.72 (0.77 measured on these 24 photos at 96 px;
    the 0.75 target is the benchmark's, on 200 photos at 128 px), above plain grabCut with
    the rectangle (0.69 here); quality in [0, 1] and ranking IoU (Spearman >= 0.3, 0.78
    measured)."""
    ious, base, quality = [], [], []
    for it in _photos(world):
        c = cut_out_product(it["image"], tuple(it["bbox"]))
        assert c.status in ("ok", "empty", "too_small"), c  # a failure counts IoU 0
        assert 0.0 <= c.quality <= 1.0
        alpha = _full_alpha(c, it["mask"].shape) if c.ok else np.zeros((96, 96), np.uint8)
        x1, y1, x2, y2 = it["bbox"]
        assert not alpha[:y1].any() and not alpha[y2:].any()
        assert not alpha[:, :x1].any() and not alpha[:, x2:].any()
        ious.append(_iou(alpha >= 128, it["mask"]))
        base.append(_iou(_rect_baseline(it["image"], it["bbox"]), it["mask"]))
        quality.append(c.quality)
    assert np.mean(ious) >= 0.72, np.round(ious, 2)
    assert np.mean(ious) > np.mean(base) + 0.02, (np.mean(ious), np.mean(base))
    assert _spearman(quality, ious) >= 0.3


def test_photo_cut_out_is_deterministic(world: Path) -> None:
    """grabCut draws from OpenCV's global generator: the same photo gives the same bytes,
    whatever ran before."""
    items = _photos(world)[:4]
    first = [cut_out_product(it["image"], tuple(it["bbox"])) for it in items]
    cv2.setRNGSeed(12345)
    cv2.randu(np.zeros((8, 8), np.float32), 0, 1)  # move the generator on
    again = [cut_out_product(it["image"], tuple(it["bbox"])) for it in reversed(items)][::-1]
    for a, b in zip(first, again, strict=True):
        assert a.box == b.box and a.quality == b.quality
        assert np.array_equal(a.rgba, b.rgba)


def test_shop_cut_out_is_deterministic(world: Path) -> None:
    """The shop path's grabCut is seeded too: same bytes whatever ran before."""
    rows = [json.loads(line) for line in (world / "catalog.jsonl").read_text().splitlines()]
    images = [load_rgba(world / r["image"]) for r in rows]
    first = [cut_out_product(im) for im in images]
    cv2.setRNGSeed(777)
    cv2.randu(np.zeros((8, 8), np.float32), 0, 1)
    again = [cut_out_product(im) for im in reversed(images)][::-1]
    for a, b in zip(first, again, strict=True):
        assert a.status == b.status and a.box == b.box and a.quality == b.quality
        assert a.rgba is None or np.array_equal(a.rgba, b.rgba)


def test_a_large_photo_is_cut_at_the_working_scale(world: Path) -> None:
    """A photo 5x larger (480 px) is segmented at ``work_side`` and its alpha scaled back:
    IoU with the 5x mask close to the 96 px result, the box in the large photo's pixels."""
    it = _photos(world)[0]
    big = cv2.resize(it["image"], (480, 480), interpolation=cv2.INTER_CUBIC)
    big_mask = cv2.resize(it["mask"].astype(np.uint8), (480, 480),
                          interpolation=cv2.INTER_NEAREST) > 0
    small = cut_out_product(it["image"], tuple(it["bbox"]))
    c = cut_out_photo(big, [5 * v for v in it["bbox"]], work_side=160)
    assert c.ok, c.reason
    iou_small = _iou(_full_alpha(small, it["mask"].shape) >= 128, it["mask"])
    iou_big = _iou(_full_alpha(c, (480, 480)) >= 128, big_mask)
    assert iou_big >= iou_small - 0.1, (iou_big, iou_small)
    assert max(c.box) > 96


def test_gmm_log_likelihood_reads_opencv_models_right() -> None:
    """The colour-model evaluation used for pinning reads OpenCV's [1, 65] layout: equal
    to a mixture of scipy's multivariate normals built from the same numbers, and the
    foreground model prefers the foreground's colour."""
    from scipy.stats import multivariate_normal

    from visearch.scenes.photo_cutout import _gmm_log_likelihood

    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(60, 8, (40, 40, 3)), 0, 255).astype(np.uint8)
    img[10:30, 10:30] = np.clip(rng.normal((200, 40, 40), 8, (20, 20, 3)), 0, 255)
    gc = np.zeros((40, 40), np.uint8)
    bgd, fgd = np.zeros((1, 65)), np.zeros((1, 65))
    cv2.setRNGSeed(0)
    cv2.grabCut(img, gc, (8, 8, 24, 24), bgd, fgd, 3, cv2.GC_INIT_WITH_RECT)
    pixels = rng.uniform(0, 255, (50, 3))
    expect = np.zeros(50)
    for k in range(5):
        w = fgd[0, k]
        if w > 0:
            cov = fgd[0, 20 + 9 * k:29 + 9 * k].reshape(3, 3) + 1e-6 * np.eye(3)
            expect += w * multivariate_normal(fgd[0, 5 + 3 * k:8 + 3 * k], cov).pdf(pixels)
    got = _gmm_log_likelihood(fgd, pixels)
    finite = expect > 1e-300
    assert finite.sum() >= 5
    np.testing.assert_allclose(got[finite], np.log(expect[finite]), rtol=1e-6, atol=1e-6)
    red, grey = np.array([[200.0, 40, 40]]), np.array([[60.0, 60, 60]])
    llr = _gmm_log_likelihood(fgd, red) - _gmm_log_likelihood(bgd, red)
    assert llr[0] > 0 > (_gmm_log_likelihood(fgd, grey) - _gmm_log_likelihood(bgd, grey))[0]


# ---- photos drawn here: a known mask -------------------------------------------------------


def _drawn_photo(seed: int, size: int = 128) -> tuple[np.ndarray, np.ndarray,
                                                      tuple[int, int, int, int]]:
    """Clutter (random rectangles and ellipses, sensor noise) with a product drawn on it
    (a saturated bottle-like polygon with a cap and a label): (photo, mask, tight box)."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(60, 160, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(14):
        x, y = rng.uniform(-0.1, 1.0, 2) * size
        w, h = rng.uniform(0.1, 0.4, 2) * size
        fill = tuple(int(v) for v in rng.integers(60, 180, 3))
        (d.rectangle if rng.uniform() < 0.5 else d.ellipse)((x, y, x + w, y + h), fill=fill)
    body = [(44, 50), (84, 50), (88, 112), (40, 112)]
    cap = (56, 24, 72, 50)
    d.polygon(body, fill=(210, 30, 40))
    d.rectangle(cap, fill=(20, 40, 170))
    d.rectangle((46, 72, 82, 90), fill=(240, 230, 200))
    m = Image.new("L", (size, size), 0)
    md = ImageDraw.Draw(m)
    md.polygon(body, fill=255)
    md.rectangle(cap, fill=255)
    noise = rng.normal(0.0, 6.0, (size, size, 3))
    photo = np.clip(np.asarray(img, np.float64) + noise, 0, 255).astype(np.uint8)
    mask = np.asarray(m) >= 128
    return photo, mask, mask_box(m)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drawn_product_on_clutter_is_cut_out(seed: int) -> None:
    photo, mask, box = _drawn_photo(seed)
    assert not plain_border(photo)
    c = cut_out_product(photo, box)
    assert c.ok, c.reason
    alpha = _full_alpha(c, mask.shape)
    assert _iou(alpha >= 128, mask) >= 0.9
    assert ((alpha > 0) & (alpha < 255)).any()  # pymatting made a soft edge
    assert np.abs(np.subtract(c.box, box)).max() <= 3


def test_a_box_covering_the_whole_photo_leaves_no_background() -> None:
    photo, _, _ = _drawn_photo(2)
    for box in ((0, 0, 128, 128), (-10, -10, 140, 140)):
        c = cut_out_product(photo, box)
        assert c.status == "not_plain" and c.rgba is None and "whole image" in c.reason


def test_cluttered_photo_without_a_box_needs_one() -> None:
    photo, _, _ = _drawn_photo(0)
    c = cut_out_product(photo)
    assert c.status == "needs_bbox" and not c.ok and c.quality == 0.0
    assert "bbox" in c.reason and "detector" in c.reason


# ---- dispatch: shop images and own alpha keep today's path ---------------------------------


def test_plain_shop_image_takes_the_shop_path(world: Path) -> None:
    rows = [json.loads(line) for line in (world / "catalog.jsonl").read_text().splitlines()]
    image = load_rgba(world / rows[0]["image"])
    assert plain_border(image)
    for bbox in (None, tuple(rows[0]["bbox"])):
        a = cut_out_product(image, bbox)
        b = cut_out(image, bbox, refine="matting")
        assert a.ok and a.box == b.box and a.quality == b.quality
        assert np.array_equal(a.rgba, b.rgba)


def test_a_large_shop_image_is_cut_at_the_working_scale(world: Path) -> None:
    """A shop image 4x larger than ``work_side`` is cut at that scale: the alpha scaled
    back matches the 4x drawn mask; a bad box is judged in the large image's pixels."""
    rows = [json.loads(line) for line in (world / "catalog.jsonl").read_text().splitlines()]
    row = rows[1]
    image = cv2.resize(load_rgba(world / row["image"]), (384, 384),
                       interpolation=cv2.INTER_CUBIC)
    with Image.open(world / mask_path(row["image"])) as im:
        mask = np.asarray(im.resize((384, 384), Image.Resampling.NEAREST)) >= 128
    for bbox in (None, tuple(4 * v for v in row["bbox"])):
        c = cut_out_product(image, bbox, work_side=96)
        assert c.ok, c.reason
        assert _iou(_full_alpha(c, (384, 384)) >= 128, mask) >= 0.9
        assert np.abs(np.subtract(c.box, [4 * v for v in row["bbox"]])).max() <= 8
    bad = cut_out_product(image, (390, 10, 500, 90), work_side=96)
    assert bad.status == "bad_bbox" and "384 x 384" in bad.reason


def test_rgba_with_its_own_alpha_is_kept_exactly() -> None:
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)  # clutter, but own alpha
    image[..., 3] = 0
    image[10:40, 20:50, 3] = 255
    image[10:40, 19, 3] = 100  # a soft edge
    c = cut_out_product(image)
    assert c.ok and c.quality == 1.0 and c.box == (20, 10, 50, 40)
    assert np.array_equal(c.rgba[..., 3], image[10:40, 20:50, 3])
    assert np.array_equal(c.rgba[..., :3], image[10:40, 20:50, :3])
    with_box = cut_out_product(image, (25, 10, 50, 40))
    assert with_box.box == (25, 10, 50, 40)


# ---- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("bbox", [(200, 200, 300, 300), (-50, 10, -5, 40), (126, 126, 140, 140),
                                  (60, 10, 50, 40), (float("inf"), 0, 10, 10), (1, 2, 3)])
def test_bad_bbox_is_a_status_with_a_reason(bbox) -> None:
    photo, _, _ = _drawn_photo(1)
    c = cut_out_product(photo, bbox)
    assert c.status == "bad_bbox" and not c.ok and c.rgba is None
    assert "128 x 128" in c.reason or "not 4" in c.reason


def test_caller_errors_raise() -> None:
    photo, _, box = _drawn_photo(1)
    with pytest.raises(TypeError, match="bbox"):
        cut_out_product(photo, ("a", "b", "c", "d"))
    with pytest.raises(ValueError, match="uint8"):
        cut_out_product(photo.astype(np.float32), box)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        cut_out_product(photo[..., 0], box)
    with pytest.raises(ValueError, match="max_pixels"):
        cut_out_photo(photo, box, max_pixels=128 * 127)
    with pytest.raises(ValueError, match="work_side"):
        cut_out_photo(photo, box, work_side=4)
    with pytest.raises(ValueError, match="work_side"):
        cut_out_product(photo, box, work_side=4)
