"""Image composition: clean shop images, cluttered user photos, and near-duplicate edits.

Shop images put one product, centred, on a plain background at a varied scale and view
(sometimes a detail close-up of the logo). User photos and detection scenes put the product
off-centre on clutter with distractor products of other categories, then apply what a phone
camera does: perspective, occlusion, colour cast and exposure, vignette, blur, sensor noise
and strong JPEG. That difference is the shop-to-street domain gap.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from visearch.synth.draw import draw_product, shade
from visearch.synth.spec import ProductSpec

Box = tuple[int, int, int, int]

NEAR_DUP_TRANSFORMS: tuple[str, ...] = (
    "exact", "brightness", "contrast", "scale", "crop", "blur", "sharpen", "hue", "jpeg",
    "rotate",
)


def to_jpeg(image: Image.Image, quality: int) -> bytes:
    """Baseline JPEG bytes; deterministic for the same pixels and quality."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def mask_box(mask: Image.Image) -> Box | None:
    """Tight ``(x1, y1, x2, y2)`` of pixels >= 128 (x2, y2 exclusive), or None if empty."""
    box = mask.point(lambda p: 255 if p >= 128 else 0).getbbox()
    return None if box is None else (int(box[0]), int(box[1]), int(box[2]), int(box[3]))


# ---- shop images ---------------------------------------------------------------------------


def render_shop(
    spec: ProductSpec,
    size: int,
    rng: np.random.Generator,
    *,
    closeup: bool = False,
    return_mask: bool = False,
) -> tuple[Image.Image, Box] | tuple[Image.Image, Box, Image.Image]:
    """A shop image (RGB, ``size`` x ``size``) and the product's tight box.

    The view varies: scale 60-90 % of the frame, mirror, a 3/4 squash, a small tilt; a
    ``closeup`` zooms on the logo so part of the product is cut off.

    With ``return_mask``, returns ``(image, box, mask)``: ``mask`` is the drawn product's
    alpha (PIL ``L``, ``size`` x ``size``, 255 = product, 0 = background and floor shadow);
    ``box`` is its tight box. The random draws are the same either way, so the image is too.
    """
    r = rng.uniform()
    if r < 0.55:
        bg = (255, 255, 255)
    elif r < 0.8:
        g = int(rng.integers(225, 246))
        bg = (g, g, g)
    else:
        bg = tuple(int(v) for v in rng.integers(215, 250, size=3))
    image = Image.new("RGB", (size, size), bg)
    flip = bool(rng.uniform() < 0.5)
    squash = float(rng.uniform(0.78, 1.0)) if rng.uniform() < 0.4 else 1.0
    theta = float(rng.uniform(-0.12, 0.12)) if rng.uniform() < 0.3 else 0.0
    if closeup:
        scale = float(rng.uniform(1.7, 2.3)) * size
        probe = Image.new("RGB", (size, size))
        _, (lx, ly) = draw_product(probe, spec, cx=0.0, cy=0.0, size=scale, theta=theta,
                                   flip=flip, squash=squash)
        cx = size / 2 - lx + float(rng.uniform(-0.08, 0.08)) * size
        cy = size / 2 - ly + float(rng.uniform(-0.08, 0.08)) * size
    else:
        scale = float(rng.uniform(0.6, 0.9)) * size
        cx = size / 2 + float(rng.uniform(-0.03, 0.03)) * size
        cy = size / 2 + float(rng.uniform(-0.03, 0.03)) * size
        if rng.uniform() < 0.4:
            # a soft floor shadow, as studio shots have
            d = ImageDraw.Draw(image)
            sw, sy = scale * 0.42, cy + scale * 0.47
            d.ellipse((cx - sw, sy - scale * 0.04, cx + sw, sy + scale * 0.04),
                      fill=shade(bg, 0.88))
    mask, _ = draw_product(image, spec, cx=cx, cy=cy, size=scale, theta=theta, flip=flip,
                           squash=squash)
    box = mask_box(mask)
    assert box is not None, "a shop product is always in frame"
    if return_mask:
        return image, box, mask
    return image, box


# ---- user photos and detection scenes ------------------------------------------------------


def photo_crop(photo: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """A random square crop (20-100 % of the shorter side) of ``photo``, ``size`` x ``size``."""
    w, h = photo.size
    side = max(8, int(min(w, h) * float(rng.uniform(0.2, 1.0))))
    x = int(rng.integers(0, w - side + 1))
    y = int(rng.integers(0, h - side + 1))
    return photo.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BILINEAR)


@dataclass(frozen=True)
class Placed:
    """A product in a scene: its spec index and tight box after all geometric changes."""

    product: int
    box: Box


def _muted(rng: np.random.Generator) -> tuple[int, int, int]:
    """A random colour pulled 40 % towards grey: rooms are less saturated than products."""
    c = rng.integers(0, 256, size=3).astype(np.float32)
    c = c.mean() + (c - c.mean()) * 0.6
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _clutter(size: int, rng: np.random.Generator) -> Image.Image:
    base = np.asarray(_muted(rng), np.float32) * 0.7 + 40.0
    top = np.clip(base + rng.integers(-50, 50, size=3), 0, 255)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    grad = top * (1 - t) + base * t
    img = np.broadcast_to(grad, (size, size, 3)).copy()
    if rng.uniform() < 0.6:
        # a table or floor surface across the lower part of the frame
        y = int(rng.uniform(0.45, 0.75) * size)
        img[y:] = _muted(rng)
    image = Image.fromarray(img.astype(np.uint8))
    d = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 13))):
        col = _muted(rng)
        x, y = rng.uniform(-0.1, 1.0, size=2) * size
        w, h = rng.uniform(0.05, 0.45, size=2) * size
        kind = rng.uniform()
        if kind < 0.4:
            d.rectangle((x, y, x + w, y + h), fill=col)
        elif kind < 0.75:
            d.ellipse((x, y, x + w, y + h), fill=col)
        else:
            d.line((x, y, x + w, y + h * (rng.uniform() - 0.5) * 2), fill=col,
                   width=int(rng.integers(1, 5)))
    return image.filter(ImageFilter.BoxBlur(float(rng.uniform(0.0, 1.5))))


def _perspective_coeffs(dst: np.ndarray, src: np.ndarray) -> list[float]:
    """PIL PERSPECTIVE coefficients mapping output corners ``dst`` to input corners ``src``."""
    a = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    sol = np.linalg.solve(np.asarray(a, np.float64), src.reshape(8).astype(np.float64))
    return [float(c) for c in sol]


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / max(1e-6, min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])))


def render_scene(
    products: Sequence[ProductSpec],
    main: int,
    size: int,
    rng: np.random.Generator,
    *,
    distractors: Sequence[int] | None = None,
    max_distractors: int = 3,
    background: Image.Image | None = None,
    return_mask: bool = False,
) -> tuple[Image.Image, list[Placed]] | tuple[Image.Image, list[Placed], Image.Image]:
    """A phone-style photo of product ``main`` among distractors of other categories.

    Returns the RGB image (``size`` x ``size``) and the placed products, main first, each
    with its tight box (x1, y1, x2, y2 in pixels, x2/y2 exclusive) after perspective.
    Distractors (indices into ``products``, default: every product of another category
    than ``main``) are placed so that at most a quarter of either box overlaps another.
    ``background`` (RGB, ``size`` x ``size``) replaces the procedural clutter, e.g. a crop of
    a real photo for an evaluation the generator's own backgrounds cannot bias.

    With ``return_mask``, returns ``(image, placed, mask)``: ``mask`` is the visible part of
    the main product (PIL ``L``, ``size`` x ``size``, 255 = product; the occluder drawn over
    it removed; after the same perspective as the image). The random draws are the same
    either way, so the image is too.
    """
    image = _clutter(size, rng) if background is None else background.convert("RGB").copy()
    main_cat = products[main].category
    others = (
        [i for i, p in enumerate(products) if p.category != main_cat]
        if distractors is None else distractors
    )
    ms = float(rng.uniform(0.38, 0.72)) * size
    mcx = float(rng.uniform(0.3, 0.7)) * size
    mcy = float(rng.uniform(0.3, 0.7)) * size
    reach = 0.42 * ms
    taken = [(mcx - reach, mcy - reach, mcx + reach, mcy + reach)]
    placements: list[tuple[int, float, float, float]] = []
    n_dis = int(rng.integers(1, max_distractors + 1)) if others else 0
    for _ in range(n_dis):
        idx = others[int(rng.integers(len(others)))]
        ds = float(rng.uniform(0.22, 0.42)) * size
        for _try in range(8):
            cx, cy = (float(v) * size for v in rng.uniform(0.12, 0.88, size=2))
            r = 0.42 * ds
            cand = (cx - r, cy - r, cx + r, cy + r)
            if all(_overlap(cand, t) < 0.25 for t in taken):
                taken.append(cand)
                placements.append((idx, cx, cy, ds))
                break
    placements.append((main, mcx, mcy, ms))
    masks: list[tuple[int, Image.Image]] = []
    for k, (idx, cx, cy, ds) in enumerate(placements):
        tilt = 0.5 if k == len(placements) - 1 else 0.35
        mask, _ = draw_product(
            image, products[idx], cx=cx, cy=cy, size=ds,
            theta=float(rng.uniform(-tilt, tilt)), flip=bool(rng.uniform() < 0.5),
            squash=float(rng.uniform(0.72, 1.0)),
        )
        masks.append((idx, mask))
    visible = masks[-1][1].copy() if return_mask else None  # the main product, drawn last
    # Occlusion: a thumb, a cup, a hand-held object over an edge of the main product.
    if rng.uniform() < 0.35:
        d = ImageDraw.Draw(image)
        skin = rng.uniform() < 0.5
        col = (int(rng.integers(170, 230)), int(rng.integers(120, 170)), int(rng.integers(90, 140)))
        if not skin:
            col = tuple(int(v) for v in rng.integers(0, 256, size=3))
        side = int(rng.integers(4))
        ow, oh = float(rng.uniform(0.12, 0.28)) * ms, float(rng.uniform(0.2, 0.42)) * ms
        edge = 1.1 * reach  # the occluder's centre sits just outside the product's edge
        ex = (mcx - edge, mcy, mcx + edge, mcy)[side]
        ey = (mcy, mcy - edge, mcy, mcy + edge)[side]
        d.ellipse((ex - ow, ey - oh, ex + ow, ey + oh), fill=col)
        if visible is not None:
            ImageDraw.Draw(visible).ellipse((ex - ow, ey - oh, ex + ow, ey + oh), fill=0)
    # Camera perspective: the output samples a quad inside the frame, so no empty borders.
    corners = np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float64)
    jitter = rng.uniform(0.0, 0.12, size=(4, 2)) * size
    src = corners + jitter * np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    coeffs = _perspective_coeffs(corners, src)
    image = image.transform((size, size), Image.Transform.PERSPECTIVE, coeffs,
                            Image.Resampling.BILINEAR)
    placed = []
    for idx, mask in reversed(masks):  # main first
        warped = mask.transform((size, size), Image.Transform.PERSPECTIVE, coeffs,
                                Image.Resampling.BILINEAR)
        box = mask_box(warped)
        if box is not None and (box[2] - box[0]) >= 4 and (box[3] - box[1]) >= 4:
            placed.append(Placed(idx, box))
    if visible is not None:
        main_mask = visible.transform((size, size), Image.Transform.PERSPECTIVE, coeffs,
                                           Image.Resampling.BILINEAR)
        return _camera(image, rng), placed, main_mask
    return _camera(image, rng), placed


def _camera(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Exposure, colour cast, vignette, blur and sensor noise (JPEG is applied on save)."""
    size = image.size[0]
    if rng.uniform() < 0.7:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.4))))
    gamma = float(rng.uniform(0.7, 1.45))
    gain = float(rng.uniform(0.65, 1.25)) * rng.uniform(0.78, 1.22, size=3)
    # exposure and gamma through a per-channel lookup table: 256 values, not H*W*3
    levels = np.arange(256, dtype=np.float64) / 255.0
    lut = np.clip(255.0 * (levels[None, :] ** gamma) * gain[:, None], 0, 255)
    image = image.point(lut.round().astype(np.uint8).ravel().tolist())
    a = np.asarray(image, np.float32)
    r = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    vignette = 1.0 - np.float32(rng.uniform(0.0, 0.9)) * (r[None, :] ** 2 + r[:, None] ** 2)
    noise = rng.standard_normal(size=a.shape, dtype=np.float32)
    a = a * vignette[..., None] + noise * np.float32(rng.uniform(2.0, 12.0))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


# ---- near-duplicates -----------------------------------------------------------------------


def near_duplicate(
    jpeg: bytes, box: Box, transform: str, rng: np.random.Generator
) -> tuple[bytes, Box]:
    """An edited copy of a published image (``jpeg``) and the product box in it.

    ``transform`` is one of :data:`NEAR_DUP_TRANSFORMS`; "exact" returns the same bytes,
    "rotate" turns the image by 90, 180 or 270 degrees (dHash does not match rotations).
    """
    if transform not in NEAR_DUP_TRANSFORMS:
        raise ValueError(f"transform must be one of {NEAR_DUP_TRANSFORMS}, got {transform!r}")
    if transform == "exact":
        return jpeg, box
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    w, h = img.size
    quality = 92
    x1, y1, x2, y2 = box
    if transform == "brightness":
        f = float(rng.choice([rng.uniform(0.75, 0.9), rng.uniform(1.1, 1.25)]))
        img = ImageEnhance.Brightness(img).enhance(f)
    elif transform == "contrast":
        f = float(rng.choice([rng.uniform(0.7, 0.85), rng.uniform(1.15, 1.3)]))
        img = ImageEnhance.Contrast(img).enhance(f)
    elif transform == "scale":
        f = float(rng.uniform(0.6, 0.85))
        nw, nh = max(8, round(w * f)), max(8, round(h * f))
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        box = (math.floor(x1 * nw / w), math.floor(y1 * nh / h),
               min(nw, math.ceil(x2 * nw / w)), min(nh, math.ceil(y2 * nh / h)))
    elif transform == "crop":
        m = rng.uniform(0.02, 0.05, size=4)
        cx1, cy1 = int(m[0] * w), int(m[1] * h)
        cx2, cy2 = w - int(m[2] * w), h - int(m[3] * h)
        img = img.crop((cx1, cy1, cx2, cy2)).resize((w, h), Image.Resampling.BILINEAR)
        sx, sy = w / (cx2 - cx1), h / (cy2 - cy1)
        box = (max(0, math.floor((x1 - cx1) * sx)), max(0, math.floor((y1 - cy1) * sy)),
               min(w, math.ceil((x2 - cx1) * sx)), min(h, math.ceil((y2 - cy1) * sy)))
    elif transform == "blur":
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.6, 1.2))))
    elif transform == "sharpen":
        img = img.filter(ImageFilter.UnsharpMask(radius=2, percent=int(rng.integers(80, 160))))
    elif transform == "hue":
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.integers(6, 18))) % 256
        img = Image.fromarray(hsv, "HSV").convert("RGB")
    elif transform == "jpeg":
        quality = int(rng.integers(25, 55))
    else:  # rotate
        k = int(rng.integers(1, 4))
        op = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
              Image.Transpose.ROTATE_270)[k - 1]
        img = img.transpose(op)
        # PIL rotates counter-clockwise: (x, y) -> (y, W - x) for 90 degrees.
        if k == 1:
            box = (y1, w - x2, y2, w - x1)
        elif k == 2:
            box = (w - x2, h - y2, w - x1, h - y1)
        else:
            box = (h - y2, x1, h - y1, x2)
    return to_jpeg(img, quality), tuple(int(v) for v in box)  # type: ignore[return-value]
