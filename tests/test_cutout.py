"""Product cut-outs: checked against the synthetic world's drawn masks and against shapes
drawn here, plus every bad input, and the world's ``shop_masks`` option itself."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from index_builder.synth_cli import main as synth_main
from visearch.imageio import decode_image
from visearch.scenes import CUTOUT_STATUSES, Cutout, cut_out, cut_out_file, load_rgba
from visearch.synth import generate_world, sample_products
from visearch.synth.scene import mask_box, render_shop
from visearch.synth.world import mask_path

WORLD = {"skus": 30, "seed": 3, "image_size": 96, "photos_per_sku": 0, "scenes": 0}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _full_alpha(c: Cutout, shape: tuple[int, int]) -> np.ndarray:
    """The cut-out's alpha pasted back into a frame of ``shape`` (uint8 [H, W])."""
    out = np.zeros(shape, np.uint8)
    x1, y1, x2, y2 = c.box
    out[y1:y2, x1:x2] = c.rgba[..., 3]
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(1, int((a | b).sum()))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cutout_world")
    generate_world(out, shop_masks=True, **WORLD)
    return out


def _shop_items(world: Path) -> list[dict]:
    items = []
    for row in _rows(world / "catalog.jsonl"):
        mpath = world / mask_path(row["image"])
        if not mpath.is_file():
            continue
        with Image.open(mpath) as im:
            mask = np.asarray(im) >= 128
        h, w = mask.shape
        x1, y1, x2, y2 = row["bbox"]
        items.append({"row": row, "mask": mask,
                      "closeup": x1 == 0 or y1 == 0 or x2 == w or y2 == h})
    return items


# ---- against the drawn masks of the synthetic world ----------------------------------------


@pytest.mark.parametrize("use_bbox", [False, True], ids=["no_bbox", "catalog_bbox"])
def test_cut_out_matches_the_drawn_masks(world: Path, use_bbox: bool) -> None:
    """Plain-background shop images: mean mask IoU >= 0.95 and >= 90 % of them >= 0.9, the
    box within 2 px of the catalog bbox. Close-ups (the product cut by the frame: bbox on
    the border) are excluded from the IoU: they must come back ok or not_plain, and rank
    below whole products by quality."""
    items = _shop_items(world)
    plain = [it for it in items if not it["closeup"]]
    assert len(plain) >= 90
    ious, box_ok, quality = [], [], []
    for it in plain:
        row = it["row"]
        c = cut_out_file(world / row["image"], row["bbox"] if use_bbox else None)
        assert c.status == "ok", (row["image"], c.status, c.reason)
        assert c.rgba.dtype == np.uint8 and c.rgba.shape[2] == 4
        assert c.rgba.shape[:2] == (c.box[3] - c.box[1], c.box[2] - c.box[0])
        ious.append(_iou(_full_alpha(c, it["mask"].shape) >= 128, it["mask"]))
        box_ok.append(np.abs(np.subtract(c.box, row["bbox"])).max() <= 2)
        quality.append(c.quality)
    ious_arr = np.asarray(ious)
    assert ious_arr.mean() >= 0.95, ious_arr.mean()
    assert (ious_arr >= 0.9).mean() >= 0.9, np.sort(ious_arr)[:10]
    assert np.mean(box_ok) >= 0.9
    assert all(0.0 <= q <= 1.0 for q in quality)

    closeups = [it for it in items if it["closeup"]]
    assert closeups
    close_q = []
    for it in closeups:
        row = it["row"]
        c = cut_out_file(world / row["image"], row["bbox"] if use_bbox else None)
        assert c.status in ("ok", "not_plain"), c
        if c.ok:
            close_q.append(c.quality)
        else:
            assert c.reason and c.quality == 0.0
    if close_q:
        assert np.mean(close_q) < np.mean(quality)


def test_cut_out_of_synthetic_shop_image_with_soft_matting(world: Path) -> None:
    """refine="matting" keeps the grabCut mask's accuracy and makes some edges soft."""
    items = [it for it in _shop_items(world) if not it["closeup"]][:12]
    ious, soft = [], 0
    for it in items:
        c = cut_out_file(world / it["row"]["image"], refine="matting")
        assert c.ok, c.reason
        alpha = _full_alpha(c, it["mask"].shape)
        ious.append(_iou(alpha >= 128, it["mask"]))
        soft += int(((alpha > 0) & (alpha < 255)).sum())
    assert np.mean(ious) >= 0.95
    assert soft > 0


def test_shop_masks_do_not_change_the_world(world: Path, tmp_path: Path) -> None:
    """shop_masks=False writes the same bytes as before (no masks/ folder); with it, every
    original shop image has a mask whose tight box is its catalog bbox."""
    plain = tmp_path / "plain"
    generate_world(plain, **WORLD)
    assert not (plain / "masks").exists()
    assert (plain / "catalog.jsonl").read_bytes() == (world / "catalog.jsonl").read_bytes()
    for name in ("queries.jsonl", "truth.json", "detection/train.json"):
        assert (plain / name).read_bytes() == (world / name).read_bytes()
    shop = sorted(p.name for p in (plain / "shop").glob("*.jpg"))
    assert shop == sorted(p.name for p in (world / "shop").glob("*.jpg"))
    for name in shop:
        a = hashlib.sha256((plain / "shop" / name).read_bytes()).digest()
        assert a == hashlib.sha256((world / "shop" / name).read_bytes()).digest(), name
    params = json.loads((world / "world.json").read_text())["params"]
    assert params.pop("shop_masks") is True
    assert params == json.loads((plain / "world.json").read_text())["params"]

    dups = {d["image"] for d in json.loads((world / "truth.json").read_text())["near_duplicates"]}
    assert dups
    rows = _rows(world / "catalog.jsonl")
    masks = sorted(p.name for p in (world / "masks").glob("*.png"))
    assert masks == sorted(Path(mask_path(r["image"])).name for r in rows
                           if r["image"] not in dups)
    for r in rows:
        if r["image"] in dups:
            continue
        with Image.open(world / mask_path(r["image"])) as im:
            assert im.mode == "L" and im.size == (96, 96)
            assert list(mask_box(im)) == r["bbox"]


def test_render_shop_return_mask_keeps_the_draws() -> None:
    spec = sample_products(3, np.random.default_rng(5))[1]
    for closeup in (False, True):
        image, box = render_shop(spec, 64, np.random.default_rng(9), closeup=closeup)
        image2, box2, mask = render_shop(spec, 64, np.random.default_rng(9), closeup=closeup,
                                         return_mask=True)
        assert box == box2 == mask_box(mask)
        assert np.array_equal(np.asarray(image), np.asarray(image2))


def test_synth_cli_passes_shop_masks(tmp_path: Path, capsys) -> None:
    out = tmp_path / "w"
    assert synth_main(["--out", str(out), "--skus", "4", "--seed", "1", "--image-size", "48",
                       "--scenes", "0", "--photos-per-sku", "0", "--workers", "1", "-q",
                       "--shop-masks"]) == 0
    capsys.readouterr()
    assert len(list((out / "masks").glob("*.png"))) == 16
    assert json.loads((out / "world.json").read_text())["params"]["shop_masks"] is True


# ---- shapes drawn here: exact oracles ------------------------------------------------------


def _scene(bg=(255, 255, 255), size=96) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (size, size), bg)
    return img, ImageDraw.Draw(img)


def _mask(size: int, draw_fn) -> np.ndarray:
    m = Image.new("L", (size, size), 0)
    draw_fn(ImageDraw.Draw(m), 255)
    return np.asarray(m) >= 128


def test_white_logo_inside_the_product_is_kept_and_a_handle_hole_is_not() -> None:
    """A red body with a small white logo (a hole of the background's colour: filled) and a
    thick ring above it (the background seen through a handle: stays background)."""
    img, d = _scene()
    d.rectangle((20, 44, 75, 84), fill=(200, 30, 30))
    d.rectangle((40, 58, 46, 64), fill=(255, 255, 255))  # the logo: 49 px, 2 % of the body
    d.ellipse((28, 12, 67, 56), outline=(30, 30, 160), width=6)
    truth = _mask(96, lambda m, v: (m.rectangle((20, 44, 75, 84), fill=v),
                                    m.ellipse((28, 12, 67, 56), outline=v, width=6)))
    c = cut_out(np.asarray(img))
    assert c.ok, c.reason
    alpha = _full_alpha(c, (96, 96)) >= 128
    assert alpha[58:65, 40:47].all()  # the logo
    assert not alpha[24:40, 40:56].any()  # inside the handle
    assert _iou(alpha, truth) >= 0.97
    assert c.box == (20, 12, 76, 85)


def test_floor_shadow_is_background() -> None:
    """A shadow (the background colour x 0.85) under and beside the product is left out."""
    img, d = _scene(bg=(236, 236, 236))
    d.ellipse((14, 70, 82, 82), fill=(200, 200, 200))  # wider than the product
    d.rectangle((30, 20, 65, 76), fill=(40, 120, 60), outline=(20, 60, 30))
    c = cut_out(np.asarray(img))
    assert c.ok, c.reason
    assert np.abs(np.subtract(c.box, (30, 20, 66, 77))).max() <= 1, c.box
    assert c.quality > 0.8


def test_rgba_png_keeps_its_own_alpha_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = np.zeros((40, 50, 4), np.uint8)
    arr[..., :3] = rng.integers(0, 256, size=(40, 50, 3))
    yy, xx = np.mgrid[:40, :50]
    r = np.hypot(yy - 20, xx - 24)
    arr[..., 3] = np.clip((14.0 - r) * 60.0, 0, 255).astype(np.uint8)  # soft disc edge
    arr[18:22, 30:45, 3] = 90  # a semi-transparent tab
    path = tmp_path / "product.png"
    path.write_bytes(_png(Image.fromarray(arr, mode="RGBA")))
    assert np.array_equal(load_rgba(path), arr)

    c = cut_out_file(path)
    assert c.ok and c.quality == 1.0
    ys, xs = np.nonzero(arr[..., 3] >= 128)
    assert c.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    x1, y1, x2, y2 = c.box
    assert np.array_equal(c.rgba, arr[y1:y2, x1:x2])  # straight RGB and alpha, untouched
    assert np.array_equal(_full_alpha(c, (40, 50)), np.where(
        (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2), arr[..., 3], 0))

    # with a bbox, alpha outside it is dropped
    c = cut_out(arr, (10, 0, 24, 40))
    assert c.ok and c.box[0] >= 10 and c.box[2] <= 24


@pytest.mark.parametrize("mode", ["LA", "P"])
def test_load_rgba_keeps_grey_and_palette_transparency(mode: str) -> None:
    if mode == "LA":
        img = Image.new("LA", (6, 4), (100, 255))
        img.putpixel((0, 0), (100, 0))
    else:
        img = Image.new("P", (6, 4), 1)
        img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
        img.putpixel((0, 0), 0)
        img.info["transparency"] = 0
    out = load_rgba(_png(img))
    assert out.shape == (4, 6, 4) and out[0, 0, 3] == 0 and out[1, 1, 3] == 255
    opaque = Image.new("RGB", (6, 4), (1, 2, 3))
    assert np.array_equal(load_rgba(_png(opaque)), decode_image(_png(opaque)))


def test_load_rgba_applies_exif_orientation() -> None:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    out = load_rgba(buf.getvalue())
    assert out.shape == (40, 20, 3)
    assert np.array_equal(out, decode_image(buf.getvalue()))


# ---- bad inputs: a status and a reason, never an exception ---------------------------------


def _check_failure(c: Cutout, status: str) -> None:
    assert c.status == status, (c.status, c.reason)
    assert not c.ok and c.reason and c.rgba is None and c.box is None and c.quality == 0.0


def test_all_white_image_is_empty() -> None:
    white = np.full((96, 96, 3), 255, np.uint8)
    _check_failure(cut_out(white), "empty")
    _check_failure(cut_out(white, (10, 10, 60, 60)), "empty")


def test_noisy_background_is_not_plain() -> None:
    noise = np.random.default_rng(1).integers(0, 256, size=(96, 96, 3), dtype=np.uint8)
    c = cut_out(noise)
    _check_failure(c, "not_plain")
    assert "max_spread" in c.reason
    _check_failure(cut_out(noise, (20, 20, 70, 70)), "not_plain")


def test_bbox_covering_the_whole_image_leaves_no_background() -> None:
    img, d = _scene()
    d.rectangle((20, 20, 70, 70), fill=(0, 0, 200))
    _check_failure(cut_out(np.asarray(img), (0, 0, 96, 96)), "not_plain")


def test_fully_transparent_png_is_transparent(tmp_path: Path) -> None:
    path = tmp_path / "clear.png"
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(path)
    _check_failure(cut_out_file(path), "transparent")


@pytest.mark.parametrize("bbox", [(200, 200, 300, 300), (-50, 10, -5, 40), (95, 95, 120, 120),
                                  (10, 10, 5, 40), (float("nan"), 0, 10, 10), (1, 2, 3)])
def test_bad_bbox(bbox) -> None:
    img, d = _scene()
    d.rectangle((20, 20, 70, 70), fill=(0, 0, 200))
    c = cut_out(np.asarray(img), bbox)
    _check_failure(c, "bad_bbox")
    assert "96 x 96" in c.reason or "not 4" in c.reason


def test_bbox_partly_outside_is_clipped() -> None:
    img, d = _scene()
    d.rectangle((20, 20, 70, 70), fill=(0, 0, 200))
    c = cut_out(np.asarray(img), (10.5, -30, 80, 200))
    assert c.ok and c.box == (20, 20, 71, 71)


def test_undecodable_files_are_decode_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    _check_failure(cut_out_file(garbage), "decode_error")
    img, _ = _scene()
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[:200])
    _check_failure(cut_out_file(truncated), "decode_error")
    _check_failure(cut_out_file(tmp_path / "missing.jpg"), "decode_error")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    _check_failure(cut_out_file(empty), "decode_error")


def test_tiny_product_is_too_small() -> None:
    img, d = _scene()
    d.rectangle((40, 40, 44, 44), fill=(0, 0, 0))  # 25 px of 9216
    c = cut_out(np.asarray(img))
    _check_failure(c, "too_small")
    assert "min_area" in c.reason
    _check_failure(cut_out(np.full((6, 6, 3), 255, np.uint8)), "too_small")


def test_caller_errors_raise() -> None:
    img = np.full((32, 32, 3), 255, np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        cut_out(img.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        cut_out(img[..., 0])
    with pytest.raises(TypeError, match="numpy array"):
        cut_out(img.tolist())
    with pytest.raises(ValueError, match="grabcut"):
        cut_out(img, refine="magic")
    with pytest.raises(TypeError, match="bbox"):
        cut_out(img, bbox=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="status"):
        Cutout(status="fine", reason="")


def test_statuses_are_the_documented_ones() -> None:
    assert CUTOUT_STATUSES == ("ok", "decode_error", "bad_bbox", "empty", "transparent",
                               "not_plain", "too_small", "needs_bbox")
