"""Image decoding: every supported mode becomes RGB, every bad input one clear error."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visearch.errors import ImageDecodeError
from visearch.imageio import (
    MAX_PIXELS,
    clip_box,
    crop,
    decode_image,
    decode_pil,
    encode_jpeg,
    encode_png,
)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied() -> None:
    # A 40 x 20 image: left half red, right half blue, stored with orientation 6 (the
    # camera was turned 90 degrees clockwise): viewers show it 20 wide, 40 high.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    out = decode_image(_jpeg(img, exif=exif.tobytes()))
    assert out.shape == (40, 20, 3)
    # Rotating 90 degrees clockwise puts the left (red) half on top.
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60


def test_rgba_is_composited_on_white() -> None:
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 255  # red
    arr[:, :2, 3] = 255  # left half opaque, right half fully transparent
    arr[0, 2, 3] = 128  # one half-transparent red pixel
    out = decode_image(_png(Image.fromarray(arr, mode="RGBA")))
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    assert out[1, 0].tolist() == [255, 0, 0]
    assert out[1, 3].tolist() == [255, 255, 255]
    assert out[0, 2].tolist() == [255, 127, 127]


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [("L", 100, 100), ("LA", (100, 255), 100), ("P", 0, None), ("1", 1, 255)],
)
def test_grey_palette_and_bilevel_become_rgb(mode: str, value, expected) -> None:
    img = Image.new(mode, (3, 2), value)
    out = decode_image(_png(img))
    assert out.shape == (2, 3, 3)
    if expected is not None:
        assert (out == expected).all()


def test_cmyk_jpeg_becomes_rgb() -> None:
    img = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(_jpeg(img))
    assert out.shape == (8, 8, 3)
    assert out[4, 4, 0] > 200 and out[4, 4, 1] < 60


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    img = Image.fromarray(np.full((2, 2), 32768, np.uint16))  # mid-grey in 16 bits
    out = decode_image(_png(img))
    assert (out == 128).all()


def test_max_side_downsizes_keeping_aspect() -> None:
    img = Image.new("RGB", (400, 100), (10, 20, 30))
    out = decode_image(_png(img), max_side=200)
    assert out.shape == (50, 200, 3)
    assert decode_image(_png(img), max_side=1000).shape == (100, 400, 3)


def test_jpeg_draft_decodes_small() -> None:
    img = Image.new("RGB", (800, 600), (200, 30, 30))
    out = decode_pil(_jpeg(img), draft=(100, 100))
    assert out.size == (200, 150)  # the smallest power-of-two reduction >= the request


def test_empty_bytes() -> None:
    with pytest.raises(ImageDecodeError, match=r"^image bytes: empty image data \(0 bytes\)$"):
        decode_image(b"")


def test_not_an_image() -> None:
    with pytest.raises(ImageDecodeError, match="not an image in a known format"):
        decode_image(b"hello, this is text and not a picture")


def test_truncated_jpeg() -> None:
    data = _jpeg(Image.effect_noise((64, 64), 60).convert("RGB"))
    with pytest.raises(ImageDecodeError, match="truncated or corrupt image data"):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_refused_from_header() -> None:
    # A 10,000 x 10,000 PNG of one colour compresses to a few hundred KiB.
    data = _png(Image.new("L", (10_000, 10_000), 0))
    with pytest.raises(
        ImageDecodeError,
        match=rf"10000 x 10000 = 100000000 pixels, above the limit of {MAX_PIXELS}",
    ):
        decode_image(data)


def test_overlong_side_refused() -> None:
    data = _png(Image.new("L", (20_000, 2), 0))
    with pytest.raises(ImageDecodeError, match="longest side may be at most 16384"):
        decode_image(data)


def test_unsupported_mode() -> None:
    class _NoRGB:
        """An image in a mode PIL cannot turn into RGB."""

        mode = "XYZ;12"
        info: dict = {}

        def convert(self, mode: str) -> None:
            raise ValueError(f"conversion from {self.mode} to {mode} not supported")

    from visearch.imageio import _to_rgb

    with pytest.raises(ImageDecodeError, match="^x: unsupported image mode 'XYZ;12'$"):
        _to_rgb(_NoRGB(), "x")  # type: ignore[arg-type]


def test_missing_file_and_wrong_type(tmp_path) -> None:
    with pytest.raises(ImageDecodeError, match="cannot read image file .*nope.jpg"):
        decode_image(tmp_path / "nope.jpg")
    with pytest.raises(TypeError, match="expected bytes, a path or a ByteSource .*got int"):
        decode_image(3)  # type: ignore[arg-type]


def test_jpeg_round_trip_and_crop() -> None:
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[2:5, 3:9] = 200
    back = decode_image(encode_jpeg(arr, quality=100))
    assert back.shape == arr.shape
    assert np.abs(back.astype(int) - arr).max() < 40
    assert crop(arr, (3, 2, 9, 5)).shape == (3, 6, 3)
    assert (crop(arr, (3, 2, 9, 5)) == 200).all()
    assert clip_box((-5, -5, 100, 100), 20, 10) == (0, 0, 20, 10)
    assert clip_box((19.5, 9.5, 19.6, 9.6), 20, 10) == (19, 9, 20, 10)
    with pytest.raises(ValueError, match="non-finite"):
        clip_box((0, 0, float("nan"), 1), 20, 10)


def test_image_size_reads_the_header_and_applies_exif_rotation() -> None:
    from visearch.imageio import image_size

    img = Image.new("RGB", (40, 20))
    exif = img.getexif()
    exif[0x0112] = 6
    data = _jpeg(img, exif=exif.tobytes())
    assert image_size(data) == (20, 40) == decode_image(data).shape[1::-1]
    assert image_size(_png(Image.new("L", (7, 3)))) == (7, 3)
    # A bomb's size is read from its header without decoding its pixels.
    assert image_size(_png(Image.new("L", (10_000, 10_000), 0))) == (10_000, 10_000)
    with pytest.raises(ImageDecodeError, match="not an image in a known format"):
        image_size(b"plain text")


def test_image_files_lists_images_recursively_sorted_and_refuses_an_empty_folder(
    tmp_path: Path,
) -> None:
    from visearch.imageio import image_files

    (tmp_path / "b").mkdir()
    for name in ("b/z.JPG", "a.png", "b/c.webp", "notes.txt", "b/d.svg"):
        (tmp_path / name).write_bytes(b"x")
    assert image_files(tmp_path) == [tmp_path / "a.png", tmp_path / "b/c.webp",
                                     tmp_path / "b/z.JPG"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="backgrounds folder .* holds no image files"):
        image_files(tmp_path / "empty", what="backgrounds folder")
    with pytest.raises(ValueError, match="does not exist or is not a folder"):
        image_files(tmp_path / "missing")


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3), (5, 7, 4)])
def test_encode_png_is_lossless(shape: tuple[int, ...]) -> None:
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(image)))), image)


def test_encode_png_rejects_other_arrays() -> None:
    with pytest.raises(ValueError, match=r"expected uint8"):
        encode_png(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"expected uint8"):
        encode_png(np.zeros((4, 4, 2), np.uint8))
