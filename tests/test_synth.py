"""The synthetic world: determinism, boxes, COCO, and ground truth checked against the pixels."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter, defaultdict
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from index_builder.synth_cli import main as synth_main
from visearch.catalog import read_manifest
from visearch.synth import CATEGORIES, NEAR_DUP_TRANSFORMS, generate_world, sample_products

SMALL = {"skus": 30, "image_size": 64, "scenes": 12, "dup_rate": 0.2, "mislabel_rate": 0.05,
         "split_rate": 0.1}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small_world")
    generate_world(out, seed=7, workers=1, **SMALL)
    return out


# ---- determinism ---------------------------------------------------------------------------


def test_same_seed_is_byte_identical_and_workers_do_not_matter(small_world, tmp_path):
    generate_world(tmp_path / "again", seed=7, workers=2, **SMALL)
    first, second = _tree(small_world), _tree(tmp_path / "again")
    assert len(first) > 100
    assert first == second  # every manifest and every image, byte for byte


def test_different_seeds_differ(small_world, tmp_path):
    generate_world(tmp_path / "other", seed=8, workers=1, **SMALL)
    for name in ("catalog.jsonl", "queries.jsonl", "truth.json", "detection/train.json"):
        assert (small_world / name).read_bytes() != (tmp_path / "other" / name).read_bytes()
    a = _tree(small_world)
    b = _tree(tmp_path / "other")
    same = [k for k in a if k.endswith(".jpg") and a[k] == b.get(k)]
    assert not same


def test_regenerating_in_place_leaves_no_stale_images(tmp_path):
    tiny = {"image_size": 48, "scenes": 4, "workers": 1}
    generate_world(tmp_path / "w", skus=20, seed=2, **tiny)
    generate_world(tmp_path / "w", skus=12, seed=3, **tiny)
    generate_world(tmp_path / "fresh", skus=12, seed=3, **tiny)
    assert _tree(tmp_path / "w") == _tree(tmp_path / "fresh")


# ---- manifests -----------------------------------------------------------------------------


def test_manifests_follow_the_contract(tiny_world):
    catalog = read_manifest(tiny_world / "catalog.jsonl").rows
    queries = read_manifest(tiny_world / "queries.jsonl").rows
    world = json.loads((tiny_world / "world.json").read_text())
    counts = world["counts"]
    assert world["params"]["skus"] == 200 and world["params"]["seed"] == 0
    assert len(catalog) == counts["catalog_rows"] == 800 + counts["near_duplicates"]
    assert len(queries) == counts["queries"] == 200
    assert len({r.sku for r in catalog}) == 200
    assert all(r.image.startswith("shop/S") for r in catalog)
    assert all(r.image.startswith("photos/Q") for r in queries)
    for r in catalog + queries:
        assert {"color", "pattern", "material", "family", "product"} <= set(r.attributes)
        assert r.title and r.bbox is not None
    # A query's SKU is a catalog SKU with the same product and category.
    product_of = {r.sku: r.attributes["product"] for r in catalog}
    category_of = {r.sku: r.category for r in catalog}
    for q in queries:
        assert product_of[q.sku] == q.attributes["product"]
        assert category_of[q.sku] == q.category


def test_at_least_eight_categories_each_with_products(tiny_world):
    catalog = _rows(tiny_world / "catalog.jsonl")
    per_cat = Counter(r["category"] for r in catalog)
    assert len(CATEGORIES) >= 8
    assert set(per_cat) == set(CATEGORIES)
    assert min(per_cat.values()) >= 40  # balanced: 200 SKUs over 10 categories


# ---- boxes ---------------------------------------------------------------------------------


def test_every_box_lies_inside_its_image(tiny_world):
    for name in ("catalog.jsonl", "queries.jsonl"):
        for r in _rows(tiny_world / name):
            with Image.open(tiny_world / r["image"]) as im:
                w, h = im.size
            x1, y1, x2, y2 = r["bbox"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, r
            assert x2 - x1 >= 4 and y2 - y1 >= 4


def test_shop_box_is_tight_around_the_drawn_product(tiny_world):
    """On a plain background, the product's pixels lie inside the box and touch its edges.

    Tightness is checked on pixels visibly off the background; a part drawn in nearly the
    background's colour (a white strap on white) can leave an edge undetectable, so a few
    such images are allowed.
    """
    truth = json.loads((tiny_world / "truth.json").read_text())
    # Sharpening and contrast edits darken the (unboxed) floor shadow past the threshold.
    edited = {d["image"] for d in truth["near_duplicates"]
              if d["transform"] in ("sharpen", "contrast")}
    checked, loose = 0, []
    for r in _rows(tiny_world / "catalog.jsonl"):
        img = _rgb(tiny_world / r["image"]).astype(np.int16)
        h, w, _ = img.shape
        x1, y1, x2, y2 = r["bbox"]
        if (x2 - x1) * (y2 - y1) > 0.6 * w * h:
            continue  # a close-up: the product fills the frame, no background to compare
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        bg = np.median(border, axis=0)
        diff = np.abs(img - bg).max(axis=2)
        pad = 3  # JPEG ringing and sharpening halos
        outside = diff > 60
        outside[max(0, y1 - pad):y2 + pad, max(0, x1 - pad):x2 + pad] = False
        if r["image"] not in edited:
            assert outside.sum() <= 2, (r["image"], int(outside.sum()))
        inside = diff[y1:y2, x1:x2] > 12
        e = 3
        if not (inside[:e].any() and inside[-e:].any() and inside[:, :e].any()
                and inside[:, -e:].any()):
            loose.append(r["image"])
        checked += 1
    assert checked > 600
    assert len(loose) <= 0.02 * checked, loose


# ---- detection scenes ----------------------------------------------------------------------


def test_coco_files_load_and_match_the_world(tiny_world):
    world = json.loads((tiny_world / "world.json").read_text())["counts"]
    for split, n_images in (("train", 160), ("val", 40)):
        coco = COCO(str(tiny_world / "detection" / f"{split}.json"))
        assert len(coco.getImgIds()) == n_images == world[f"scenes_{split}"]
        assert len(coco.getAnnIds()) == world[f"annotations_{split}"]
        cats = coco.loadCats(coco.getCatIds())
        assert [c["id"] for c in cats] == list(range(1, len(CATEGORIES) + 1))
        assert [c["name"] for c in cats] == sorted(CATEGORIES)
        per_image = Counter(a["image_id"] for a in coco.loadAnns(coco.getAnnIds()))
        for img in coco.loadImgs(coco.getImgIds()):
            assert img["file_name"].startswith("scenes/")
            with Image.open(tiny_world / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) == (96, 96)
            # the main product and at least one distractor are annotated
            assert per_image[img["id"]] >= 2
        for a in coco.loadAnns(coco.getAnnIds()):
            x, y, bw, bh = a["bbox"]
            assert x >= 0 and y >= 0 and x + bw <= 96 and y + bh <= 96 and bw > 0 and bh > 0
            assert a["area"] == bw * bh


# ---- ground truth --------------------------------------------------------------------------


def _dhash(img: Image.Image) -> imagehash.ImageHash:
    return imagehash.dhash(img)


def _thumb(img: Image.Image) -> np.ndarray:
    """32x32 grey thumbnail, mean-centred, unit norm: correlation by dot product."""
    a = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.BILINEAR), np.float64)
    a = a.ravel() - a.mean()
    return a / np.linalg.norm(a)


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def test_near_duplicates_are_transformed_copies_of_their_source(tiny_world):
    truth = json.loads((tiny_world / "truth.json").read_text())
    rows = {r["image"]: r for r in _rows(tiny_world / "catalog.jsonl")}
    dups = truth["near_duplicates"]
    assert len(dups) == 80  # 10 % of 800 shop images
    assert {d["transform"] for d in dups} == set(NEAR_DUP_TRANSFORMS)
    dup_images = {d["image"] for d in dups}
    originals = sorted(k for k in rows if k not in dup_images)
    gallery = np.stack([_thumb(_open(tiny_world / k)) for k in originals])
    hamming = []
    for d in dups:
        img, src = _open(tiny_world / d["image"]), _open(tiny_world / d["source"])
        box, src_box = rows[d["image"]]["bbox"], rows[d["source"]]["bbox"]
        assert rows[d["image"]]["sku"] == rows[d["source"]]["sku"]
        t = d["transform"]
        if t == "exact":
            assert (tiny_world / d["image"]).read_bytes() == (tiny_world / d["source"]).read_bytes()
            continue
        assert (tiny_world / d["image"]).read_bytes() != (tiny_world / d["source"]).read_bytes()
        if t == "rotate":
            # dHash misses rotations; turning the copy back restores its source.
            assert _dhash(img) - _dhash(src) > 10, d
            img = max((img.rotate(k, expand=True) for k in (90, 180, 270)),
                      key=lambda im: float(_thumb(im) @ _thumb(src)))
            assert _thumb(img) @ _thumb(src) > 0.97, d
        elif t in ("scale", "crop"):
            w, h = img.size
            sx = (box[2] - box[0]) / (src_box[2] - src_box[0])
            sy = (box[3] - box[1]) / (src_box[3] - src_box[1])
            if 0 in src_box[:2] or src_box[2] == src.size[0] or src_box[3] == src.size[1]:
                assert _thumb(img) @ _thumb(src) > 0.8, d  # box clipped: no exact alignment
                continue
            # map the source into the copy's frame through the two boxes
            extent = (src_box[0] - box[0] / sx, src_box[1] - box[1] / sy,
                      src_box[0] + (w - box[0]) / sx, src_box[1] + (h - box[1]) / sy)
            aligned = src.transform((w, h), Image.Transform.EXTENT, extent,
                                    Image.Resampling.BILINEAR)
            assert _thumb(aligned) @ _thumb(img) > 0.95, d
            continue
        else:
            assert box == src_box, d
            assert _thumb(img) @ _thumb(src) > 0.97, d
            hamming.append(_dhash(img) - _dhash(src))
        # the copy's nearest original image in the whole catalog is its source
        assert originals[int(np.argmax(gallery @ _thumb(img)))] == d["source"], d
    # photometric edits keep dHash close (what the dedup stage relies on)
    assert np.mean(np.asarray(hamming) <= 10) >= 0.9, hamming


@pytest.mark.parametrize("transform", NEAR_DUP_TRANSFORMS)
def test_near_duplicate_box_follows_the_edit(transform):
    """A red rectangle at a known box: the returned box is the rectangle's box in the copy."""
    from visearch.synth.scene import near_duplicate, to_jpeg

    img = np.full((80, 96, 3), 255, np.uint8)  # not square, so rotations show in the box
    box = (20, 12, 61, 50)
    img[box[1]:box[3], box[0]:box[2]] = (220, 20, 20)
    source = to_jpeg(Image.fromarray(img), 95)
    for seed in range(16):  # several draws: every rotation angle, both edit directions
        data, out_box = near_duplicate(source, box, transform, np.random.default_rng(seed))
        with Image.open(io.BytesIO(data)) as im:
            out = np.asarray(im.convert("RGB")).astype(np.int16)
        red = (out[..., 0] - out[..., 1] > 80) & (out[..., 0] - out[..., 2] > 80)
        ys, xs = np.nonzero(red)
        found = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert np.abs(np.asarray(found) - np.asarray(out_box)).max() <= 2, (found, out_box)


def _histogram(path: Path) -> np.ndarray:
    q = _rgb(path) // 64
    idx = (q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel()
    hist = np.bincount(idx, minlength=64).astype(np.float64)
    return hist / hist.sum()


def test_mislabelled_images_depict_the_true_sku(tiny_world):
    truth = json.loads((tiny_world / "truth.json").read_text())
    catalog = _rows(tiny_world / "catalog.jsonl")
    mislabelled = truth["mislabelled"]
    assert len(mislabelled) == 24  # 3 % of 800
    bad = {m["image"] for m in mislabelled}
    clean: dict[str, list[Path]] = defaultdict(list)
    product: dict[str, str] = {}
    for r in catalog:
        product[r["sku"]] = r["attributes"]["product"]
        if r["image"] not in bad:
            clean[r["sku"]].append(tiny_world / r["image"])
    rows = {r["image"]: r for r in catalog}
    closer_to_true = 0
    for m in mislabelled:
        assert rows[m["image"]]["sku"] == m["filed_sku"]
        assert product[m["filed_sku"]] != product[m["true_sku"]]
        h = _histogram(tiny_world / m["image"])
        d_true = min(np.abs(h - _histogram(p)).sum() for p in clean[m["true_sku"]])
        d_filed = min(np.abs(h - _histogram(p)).sum() for p in clean[m["filed_sku"]])
        closer_to_true += d_true < d_filed
    assert closer_to_true >= 0.8 * len(mislabelled)


def test_split_skus_are_one_product_under_several_ids(tiny_world):
    truth = json.loads((tiny_world / "truth.json").read_text())
    skus_of: dict[str, set[str]] = defaultdict(set)
    for r in _rows(tiny_world / "catalog.jsonl"):
        skus_of[r["attributes"]["product"]].add(r["sku"])
    from_disk = {p: sorted(s) for p, s in skus_of.items() if len(s) > 1}
    assert from_disk == {s["product"]: s["skus"] for s in truth["split_skus"]}
    assert len(truth["split_skus"]) == 6  # round(0.03 * 200)


def test_lookalike_family_members_share_look_but_differ_in_detail(tiny_world):
    truth = json.loads((tiny_world / "truth.json").read_text())
    by_sku: dict[str, dict] = {}
    for r in _rows(tiny_world / "catalog.jsonl"):
        by_sku.setdefault(r["sku"], r)
    families = truth["lookalike_families"]
    assert len(families) >= 30
    for fam in families:
        first = [by_sku[s] for s in fam["skus"]]
        assert len({r["category"] for r in first}) == 1
        assert len({r["attributes"]["color"] for r in first}) == 1
        assert {r["attributes"]["family"] for r in first} == {fam["family"]}
        assert len({r["attributes"]["product"] for r in first}) >= 2


def test_family_members_are_different_drawings():
    products = sample_products(60, np.random.default_rng(1))
    fams: dict[str, list] = defaultdict(list)
    for p in products:
        fams[p.family].append(p)
    multi = [m for m in fams.values() if len(m) > 1]
    assert multi
    from visearch.synth.draw import draw_product

    for members in multi:
        pics = []
        for p in members:
            im = Image.new("RGB", (96, 96), (255, 255, 255))
            draw_product(im, p, cx=48, cy=48, size=80)
            pics.append(np.asarray(im))
        for i in range(len(pics)):
            for j in range(i + 1, len(pics)):
                assert (pics[i] != pics[j]).any(axis=2).sum() >= 10


def test_bad_arguments_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="skus"):
        generate_world(tmp_path, skus=1, seed=0)
    with pytest.raises(ValueError, match="dup_rate"):
        generate_world(tmp_path, skus=10, seed=0, dup_rate=0.9)
    with pytest.raises(ValueError, match="image_size"):
        generate_world(tmp_path, skus=10, seed=0, image_size=16)


# ---- CLI -----------------------------------------------------------------------------------


def test_cli_generates_a_world_and_a_contact_sheet(tmp_path, capsys):
    out = tmp_path / "w"
    code = synth_main(["--out", str(out), "--skus", "12", "--seed", "3", "--image-size", "64",
                       "--scenes", "5", "--workers", "1", "-q"])
    assert code == 0
    assert "catalog_rows" in capsys.readouterr().out
    assert len(_rows(out / "catalog.jsonl")) == json.loads(
        (out / "world.json").read_text())["counts"]["catalog_rows"]
    sheet = tmp_path / "sheet.png"
    assert synth_main(["sheet", "--world", str(out), "--out", str(sheet), "--rows", "3"]) == 0
    with Image.open(sheet) as im:
        assert im.size == (150 + 7 * 128, (3 + 1) * 128)  # + the row of detection scenes
