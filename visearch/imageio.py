"""Image decoding for every stage: bytes or a file in, RGB ``uint8 [H, W, 3]`` out.

One place decides what an acceptable image is, so the offline pipeline and the server agree:
EXIF orientation is applied, transparent images are composited on white (product photos
are shown on white), grey/palette/CMYK/16-bit images become 8-bit RGB, and anything empty,
truncated, unrecognised, unsupported or too large raises ``ImageDecodeError`` with a
message saying what was wrong.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from visearch.errors import ImageDecodeError

logger = logging.getLogger(__name__)

#: Largest accepted image in pixels (width x height), checked from the header before any
#: pixel is decoded. 40 Mpx covers every phone camera; a 10,000 x 10,000 bomb is refused.
MAX_PIXELS = 40_000_000
#: Largest accepted side in pixels, whatever the area (a 100,000 x 10 strip is refused too).
MAX_INPUT_SIDE = 16_384



@runtime_checkable
class ByteSource(Protocol):
    """Anything that hands over an encoded image's bytes: ``read_bytes()`` and a ``name``
    for messages (``visearch.store.StoredImage``: an image in the LMDB store)."""

    @property
    def name(self) -> str: ...

    def read_bytes(self) -> bytes: ...


ImageSource = bytes | bytearray | memoryview | str | os.PathLike | ByteSource


#: File name endings of the images a folder of photos is searched for.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def image_files(folder: str | os.PathLike[str], *, what: str = "image folder") -> list[Path]:
    """The image files under ``folder`` (recursive, by ``IMAGE_SUFFIXES``), sorted.

    Raises:
        ValueError: ``folder`` is not a folder or holds no image file (``what`` names it
            in the message).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{what} {folder} does not exist or is not a folder")
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{what} {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_source(src: ImageSource) -> tuple[bytes, str]:
    """The encoded bytes of ``src`` and a short name for messages.

    Raises:
        ImageDecodeError: a file that cannot be read.
        TypeError: ``src`` is none of bytes, a path or a ``ByteSource``.
    """
    if isinstance(src, bytes | bytearray | memoryview):
        return bytes(src), "image bytes"
    if isinstance(src, str | os.PathLike):
        path = Path(src)
        try:
            return path.read_bytes(), str(path)
        except OSError as exc:
            raise ImageDecodeError(f"cannot read image file {path}: {exc.strerror or exc}") from exc
    if isinstance(src, ByteSource):
        # No OSError translation here: a source's own errors (a damaged store) must not
        # pass for one bad image.
        return src.read_bytes(), src.name
    raise TypeError(
        f"expected bytes, a path or a ByteSource (read_bytes(), name), got {type(src).__name__}"
    )


def _has_alpha(img: Image.Image) -> bool:
    """Whether ``img`` carries transparency (an alpha band or a transparent palette entry)."""
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """Convert any supported mode to 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # PIL's convert("RGB") clips 16-bit values at 255; scale the 16-bit range instead.
        arr = np.asarray(img, dtype=np.int64)
        arr = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 255.0
        arr = np.clip(np.nan_to_num(arr) / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    try:  # 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX...: PIL knows the conversion
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageDecodeError(f"{name}: unsupported image mode {mode!r}") from exc


def decode_pil(
    src: ImageSource,
    *,
    max_side: int | None = None,
    max_pixels: int = MAX_PIXELS,
    draft: tuple[int, int] | None = None,
    keep_alpha: bool = False,
) -> Image.Image:
    """Decode ``src`` into an RGB ``PIL.Image.Image`` (RGBA with ``keep_alpha`` when the
    image has transparency: RGBA, LA, PA or a palette with a transparent colour).

    Args:
        src: encoded image bytes, a path to an image file, or a ``ByteSource`` (an image
            in the store).
        max_side: when set, downsize (aspect kept, bilinear) so that the longer side is at
            most this many pixels. Never upsizes.
        max_pixels: refuse images larger than this many pixels (width x height), checked
            from the header before decoding (decompression-bomb guard).
        draft: ``(width, height)``: for JPEG, let the decoder skip detail and return an
            image at least this large (a power-of-two reduction): much faster thumbnails.
        keep_alpha: keep transparency (straight alpha) instead of compositing on white:
            what product cut-outs need.

    Raises:
        ImageDecodeError: empty, unreadable, truncated, not an image, unsupported mode,
            more than ``max_pixels`` pixels or a side above ``MAX_INPUT_SIDE``.
    """
    data, name = read_source(src)
    if not data:
        raise ImageDecodeError(f"{name}: empty image data (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own limit below gives the clearer message; PIL's warning is redundant.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"{name}: not an image in a known format ({len(data)} bytes, starting {data[:8]!r})"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(
            f"{name}: refused as a decompression bomb ({exc}); send a smaller image"
        ) from exc
    except OSError as exc:
        raise ImageDecodeError(f"{name}: cannot open image: {exc}") from exc

    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"{name}: image has no pixels ({width} x {height})")
    if max(width, height) > MAX_INPUT_SIDE:
        raise ImageDecodeError(
            f"{name}: image is {width} x {height}; the longest side may be at most "
            f"{MAX_INPUT_SIDE} pixels"
        )
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"{name}: image is {width} x {height} = {width * height} pixels, above the "
            f"limit of {max_pixels} (decompression-bomb guard); send a smaller image"
        )
    if draft is not None and img.format == "JPEG":
        img.draft("RGB", draft)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
        img = ImageOps.exif_transpose(img) or img
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{name}: truncated or corrupt image data: {exc}") from exc

    img = img.convert("RGBA") if keep_alpha and _has_alpha(img) else _to_rgb(img, name)
    if max_side is not None:
        if max_side <= 0:
            raise ValueError(f"max_side must be positive, got {max_side}")
        longest = max(img.size)
        if longest > max_side:
            scale = max_side / longest
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img = img.resize(size, Image.Resampling.BILINEAR)
    return img


#: EXIF orientations that rotate by 90 or 270 degrees, swapping width and height.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def image_size(src: ImageSource) -> tuple[int, int]:
    """``(width, height)`` as ``decode_image`` would return it (EXIF rotation applied), read
    from the header only, without decoding pixels.

    Raises:
        ImageDecodeError: unreadable, empty or not an image.
    """
    data, name = read_source(src)
    if not data:
        raise ImageDecodeError(f"{name}: empty image data (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                orientation = img.getexif().get(0x0112, 1)
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{name}: not an image in a known format") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{name}: cannot read image header: {exc}") from exc
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def decode_image(
    src: ImageSource,
    *,
    max_side: int | None = None,
    max_pixels: int = MAX_PIXELS,
    draft: tuple[int, int] | None = None,
    keep_alpha: bool = False,
) -> np.ndarray:
    """Decode ``src`` into an RGB array ``uint8 [H, W, 3]`` (``[H, W, 4]`` RGBA with
    ``keep_alpha`` for an image with transparency; see ``decode_pil`` for args)."""
    img = decode_pil(src, max_side=max_side, max_pixels=max_pixels, draft=draft,
                     keep_alpha=keep_alpha)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def encode_jpeg(image: np.ndarray | Image.Image, quality: int = 90) -> bytes:
    """Encode an RGB image (array ``uint8 [H, W, 3]`` or PIL image) as JPEG bytes."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
        image = Image.fromarray(image, mode="RGB")
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    """Encode ``uint8 [H, W, 4]`` (RGBA), ``[H, W, 3]`` (RGB) or ``[H, W]`` (8-bit grey) as
    lossless PNG bytes."""
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3
                                                           and image.shape[2] in (3, 4))):
        raise ValueError(f"expected uint8 [H, W], [H, W, 3] or [H, W, 4], got {image.dtype} "
                         f"{image.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def clip_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Integer pixel box ``(x1, y1, x2, y2)`` covering ``box``, clipped to the image and at
    least 1 pixel wide and high. ``box`` is in pixels, x2/y2 exclusive."""
    if len(box) != 4:
        raise ValueError(f"a box has 4 numbers (x1, y1, x2, y2), got {len(box)}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box has non-finite coordinates: {tuple(box)}")
    ix1 = min(max(int(math.floor(x1)), 0), width - 1)
    iy1 = min(max(int(math.floor(y1)), 0), height - 1)
    ix2 = max(min(int(math.ceil(x2)), width), ix1 + 1)
    iy2 = max(min(int(math.ceil(y2)), height), iy1 + 1)
    return ix1, iy1, ix2, iy2


def crop(image: np.ndarray, box: Sequence[float] | None) -> np.ndarray:
    """The part of ``image`` (``[H, W, 3]``) inside ``box`` (pixels, clipped); the whole image
    when ``box`` is None. Returns a view, at least 1 x 1."""
    if box is None:
        return image
    h, w = image.shape[:2]
    x1, y1, x2, y2 = clip_box(box, w, h)
    return image[y1:y2, x1:x2]
