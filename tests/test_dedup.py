"""Dedup: exact and near duplicates on hand-drawn images, the representative rule, and the
Hamming range search against a NumPy brute force."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from visearch.cleaning.dedup import (
    COLOR_TOL,
    ImageHashes,
    build_binary_index,
    color_distance,
    color_signature,
    dedup_images,
    find_duplicates,
    hamming_distance,
    hamming_range_pairs,
    hamming_range_search,
    hash_images,
)


def _bag(size: int = 128) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    d.arc((40, 10, 88, 60), 180, 360, fill=(30, 30, 120), width=4)
    d.polygon([(28, 40), (100, 40), (110, 110), (18, 110)], fill=(20, 70, 30))
    d.rectangle((55, 60, 73, 80), fill=(230, 200, 40))
    return img


def _bottle(size: int = 128) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    d.rectangle((56, 8, 72, 30), fill=(200, 40, 40))
    d.ellipse((34, 26, 94, 120), fill=(60, 120, 220))
    d.line((34, 70, 94, 70), fill=(250, 250, 250), width=6)
    return img


@pytest.fixture()
def images(tmp_path: Path) -> dict[str, Path]:
    paths = {
        "bag": tmp_path / "bag.jpg",
        "bag_copy": tmp_path / "bag_copy.jpg",
        "bag_dark": tmp_path / "bag_dark.jpg",
        "bottle": tmp_path / "bottle.jpg",
    }
    _bag().save(paths["bag"], quality=92)
    shutil.copyfile(paths["bag"], paths["bag_copy"])
    ImageEnhance.Brightness(_bag()).enhance(0.8).save(paths["bag_dark"], quality=92)
    _bottle().save(paths["bottle"], quality=92)
    return paths


def test_exact_and_brightness_copies_are_duplicates_a_different_product_is_not(images):
    names = list(images)
    result = dedup_images(list(images.values()), names)
    assert [g.members for g in result.groups] == [["bag", "bag_copy", "bag_dark"]]
    # Same size everywhere: the earliest image is the representative.
    assert result.groups[0].keep == "bag"
    kinds = {r.image: (r.kind, r.duplicate_of) for r in result.removed}
    assert kinds == {"bag_copy": ("exact", "bag"), "bag_dark": ("near", "bag")}
    assert result.removed_images == {"bag_copy", "bag_dark"}
    assert result.kept == 2 and result.summary()["groups"] == 1
    by_name = {r.image: r for r in result.removed}
    assert by_name["bag_copy"].distance == 0
    assert 0 <= by_name["bag_dark"].distance <= result.radius


def test_exact_only_when_radius_is_negative(images):
    result = dedup_images(list(images.values()), list(images), radius=-1)
    assert result.removed_images == {"bag_copy"}


def test_hashes_are_stable_and_pool_matches_in_process(images):
    paths = list(images.values())
    one = hash_images(paths, workers=1)
    two = hash_images(paths, workers=2, chunk_size=1)
    assert one.md5 == two.md5
    np.testing.assert_array_equal(one.codes, two.codes)
    assert one.codes.shape == (4, 32) and one.codes.dtype == np.uint8
    assert one.md5[0] == one.md5[1] != one.md5[2]
    np.testing.assert_array_equal(one.width, [128] * 4)


def test_undecodable_file_is_reported_not_grouped(images, tmp_path: Path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    paths = [images["bag"], bad, images["bag_copy"]]
    result = dedup_images(paths, ["bag", "bad", "bag_copy"])
    assert [e[0] for e in result.errors] == ["bad"]
    assert result.removed_images == {"bag_copy"}
    assert result.kept == 1


def _hashes(codes: list[list[int]], sizes: list[tuple[int, int]], md5: list[str]) -> ImageHashes:
    return ImageHashes(
        md5=md5,
        codes=np.array(codes, dtype=np.uint8),
        width=np.array([w for w, _ in sizes], dtype=np.int64),
        height=np.array([h for _, h in sizes], dtype=np.int64),
        color=np.zeros((len(codes), 32), dtype=np.float32),
    )


def test_representative_is_largest_then_earliest():
    # Images 0..3 are near-duplicates of each other (codes differ in 1 bit); 1 and 3 share the
    # largest resolution, so the earlier (1) is kept. Image 4 is far from all of them.
    base = [0b10101010] * 8
    codes = [base, base[:7] + [0b10101011], base[:7] + [0b10101000], base, [0b01010101] * 8]
    sizes = [(100, 100), (200, 150), (120, 80), (150, 200), (500, 500)]
    hashes = _hashes(codes, sizes, ["m0", "m1", "m2", "m3", "m4"])
    result = find_duplicates(hashes, ["a", "b", "c", "d", "e"], radius=2)
    assert len(result.groups) == 1
    assert result.groups[0].keep == "b"
    assert result.groups[0].members == ["a", "b", "c", "d"]
    assert {r.image: r.distance for r in result.removed} == {"a": 1, "c": 2, "d": 1}


def test_exact_copies_group_even_when_the_search_misses_them():
    # Same MD5, different (corrupted) codes: grouped as exact copies all the same.
    hashes = _hashes([[0] * 8, [255] * 8], [(10, 10), (10, 10)], ["same", "same"])
    result = find_duplicates(hashes, ["x", "y"], radius=0)
    assert [(r.image, r.kind) for r in result.removed] == [("y", "exact")]


def _random_codes(seed: int, n: int, nbytes: int, planted: int) -> np.ndarray:
    """Random codes plus ``planted`` near copies (1..10 bits flipped) of earlier ones."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    bits = np.unpackbits(codes[:planted], axis=1)
    for row in bits:
        flip = rng.choice(bits.shape[1], size=rng.integers(1, 11), replace=False)
        row[flip] ^= 1
    return np.concatenate([codes, np.packbits(bits, axis=1)])


def _brute_pairs(codes: np.ndarray, radius: int) -> set[tuple[int, int]]:
    d = hamming_distance(codes[:, None, :], codes[None, :, :])
    i, j = np.nonzero(np.triu(d <= radius, 1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


@pytest.mark.parametrize("method", ["flat", "multihash", "auto"])
@pytest.mark.parametrize(("nbytes", "radius"), [(8, 8), (8, 12), (32, 16)])
def test_range_pairs_equal_numpy_brute_force(method: str, nbytes: int, radius: int):
    codes = _random_codes(seed=nbytes + radius, n=1500, nbytes=nbytes, planted=200)
    i, j, d = hamming_range_pairs(codes, radius, method=method, batch_size=700)
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == _brute_pairs(codes, radius)
    np.testing.assert_array_equal(d, hamming_distance(codes[i], codes[j]))
    assert len(i) >= 150  # the planted copies are there to be found


def test_range_search_queries_against_a_database():
    xb = _random_codes(seed=7, n=2000, nbytes=8, planted=100)
    xq = xb[2000:2050]  # planted copies as queries: each finds at least its source
    lims, dist, ids = hamming_range_search(xb, xq, 10, method="multihash")
    brute = hamming_distance(xq[:, None, :], xb[None, :, :])
    for q in range(len(xq)):
        got = dict(
            zip(
                ids[lims[q] : lims[q + 1]].tolist(),
                dist[lims[q] : lims[q + 1]].tolist(),
                strict=True,
            )
        )
        expected = {int(k): int(brute[q, k]) for k in np.flatnonzero(brute[q] <= 10)}
        assert got == expected


def test_multihash_refuses_a_radius_it_cannot_answer_exactly():
    codes = np.zeros((10, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="flat"):
        build_binary_index(codes, radius=40, method="multihash")
    with pytest.raises(TypeError):
        hamming_range_pairs(codes.astype(np.int64), 3)


# ---- colour awareness and SKU awareness -------------------------------------------------------

# Two colourways of equal luminance (ITU-R 601: 0.299 R + 0.587 G + 0.114 B = 143.9 and 143.8):
# a grey-scale hash cannot tell them apart.
ORANGE = (232, 120, 36)
GREEN = (52, 205, 70)


def _sneaker(body: tuple[int, int, int], size: int = 128) -> Image.Image:
    img = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(img)
    d.polygon([(14, 92), (20, 52), (62, 44), (100, 70), (116, 92)], fill=body)
    d.rectangle((14, 92, 116, 104), fill=(40, 40, 40))
    d.line((40, 60, 70, 80), fill=(250, 250, 250), width=5)
    return img


def _hue_shift(img: Image.Image, degrees: float) -> Image.Image:
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(degrees * 256 / 360)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


@pytest.fixture()
def sneakers(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, img in {
        "orange": _sneaker(ORANGE),
        "green": _sneaker(GREEN),
        "orange_bright": ImageEnhance.Brightness(_sneaker(ORANGE)).enhance(1.2),
        "orange_hue": _hue_shift(_sneaker(ORANGE), 20),
    }.items():
        out[name] = tmp_path / f"{name}.png"
        img.save(out[name])
    shutil.copyfile(out["orange"], tmp_path / "orange_copy.png")
    out["orange_copy"] = tmp_path / "orange_copy.png"
    return out


def test_color_distance_by_hand():
    a = np.array([0.3, 0.4], np.float32)  # norm 0.5
    assert color_distance(a, a) == 0
    assert color_distance(a, 0.8 * a) == pytest.approx(0.2)  # 20 % darker: |0.1| / 0.5
    assert color_distance(a, -a) == pytest.approx(2.0)  # opposite chroma
    grey = np.zeros(2, np.float32)
    assert color_distance(grey, np.array([0.03, 0.04])) == pytest.approx(0.05 / 0.1)  # floor
    # The signature of a grey image is zero: opponent chroma ignores the grey level.
    assert np.abs(color_signature(Image.new("RGB", (8, 8), (90, 90, 90)))).max() < 1e-6


def test_two_colourways_of_one_shape_are_not_duplicates(sneakers):
    paths = [sneakers["orange"], sneakers["green"]]
    hashes = hash_images(paths)
    # The grey-scale dHash sees one image ...
    assert hamming_distance(hashes.codes[0], hashes.codes[1]) <= 4
    grey = find_duplicates(hashes, ["o", "g"], color_tol=None)
    assert [g.members for g in grey.groups] == [["o", "g"]]
    # ... the colour check does not, within a SKU or across SKUs.
    assert color_distance(hashes.color[0], hashes.color[1]) > 1.0
    for skus in (["S1", "S1"], ["S1", "S2"]):
        res = find_duplicates(hashes, ["o", "g"], skus=skus)
        assert res.groups == [] and res.removed == [] and res.cross_sku == []
        assert res.rejected_by_color == 1


def test_brightness_and_hue_edits_stay_duplicates_within_a_sku(sneakers):
    names = ["orange", "orange_bright", "orange_hue", "green"]
    hashes = hash_images([sneakers[n] for n in names])
    for k in (1, 2):
        assert color_distance(hashes.color[0], hashes.color[k]) < COLOR_TOL
    res = find_duplicates(hashes, names, skus=["S1"] * 4)
    assert [g.members for g in res.groups] == [["orange", "orange_bright", "orange_hue"]]
    assert sorted(r.image for r in res.removed) == ["orange_bright", "orange_hue"]


def test_cross_sku_near_duplicate_is_reported_and_not_removed(sneakers):
    names = ["orange", "orange_copy", "orange_bright", "green"]
    res = dedup_images([sneakers[n] for n in names], names, skus=["S1", "S1", "S2", "S3"])
    # Within S1 the byte copy goes; nothing of S2 (another SKU) is removed.
    assert [(r.image, r.duplicate_of, r.kind) for r in res.removed] == [
        ("orange_copy", "orange", "exact")
    ]
    pairs = {(p.image_a, p.sku_a, p.image_b, p.sku_b, p.kind) for p in res.cross_sku}
    assert pairs == {
        ("orange", "S1", "orange_bright", "S2", "near"),
        ("orange_copy", "S1", "orange_bright", "S2", "near"),
    }
    assert res.summary()["cross_sku_pairs"] == 2 and res.kept == 3
    # An exact copy under two SKUs is reported too, never removed.
    exact = dedup_images([sneakers["orange"], sneakers["orange_copy"]], ["a", "b"],
                         skus=["S1", "S2"])
    assert exact.removed == [] and [p.kind for p in exact.cross_sku] == ["exact"]
    # Without SKUs (one namespace) the old rule holds: the copies are removed.
    legacy = dedup_images([sneakers[n] for n in names[:3]], names[:3])
    assert sorted(r.image for r in legacy.removed) == ["orange_bright", "orange_copy"]


def test_skus_must_align_with_images(sneakers):
    hashes = hash_images([sneakers["orange"]])
    with pytest.raises(ValueError, match="one per image"):
        find_duplicates(hashes, ["o"], skus=["S1", "S2"])


def test_synthetic_colourway_families_lose_no_image(tmp_path: Path):
    from visearch.catalog import read_manifest
    from visearch.synth import generate_world

    generate_world(tmp_path, skus=16, seed=3, image_size=64, scenes=0, photos_per_sku=0,
                   dup_rate=0.0, mislabel_rate=0.0, split_rate=0.0, colourway_rate=1.0)
    truth = json.loads((tmp_path / "truth.json").read_text())
    rows = read_manifest(tmp_path / "catalog.jsonl").rows
    colour = {r.sku: r.attributes["color"] for r in rows}
    family = {r.sku: r.attributes["family"] for r in rows}
    assert truth["colourway_families"]
    for fam in truth["colourway_families"]:
        # one model (family) in as many body colours as members
        assert len({family[s] for s in fam["skus"]}) == 1
        assert len({colour[s] for s in fam["skus"]}) == len(fam["skus"])
    res = dedup_images([r.path for r in rows], [r.image for r in rows],
                       skus=[r.sku for r in rows])
    assert res.removed == [] and res.cross_sku == []
