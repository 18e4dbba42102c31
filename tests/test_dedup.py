"""Dedup: exact and near duplicates on hand-drawn images, the representative rule, and the
Hamming range search against a NumPy brute force."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from visearch.dedup import (
    ImageHashes,
    build_binary_index,
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
    np.testing.assert_array_equal(one.dhash, two.dhash)
    assert one.dhash.shape == (4, 32) and one.dhash.dtype == np.uint8
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
        dhash=np.array(codes, dtype=np.uint8),
        width=np.array([w for w, _ in sizes], dtype=np.int64),
        height=np.array([h for _, h in sizes], dtype=np.int64),
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
