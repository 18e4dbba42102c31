"""Copy-paste scene synthesis: product cut-outs composed onto backgrounds.

Copy-paste augmentation (Dwibedi et al., ICCV 2017, "Cut, Paste and Learn"; Ghiasi et al.,
CVPR 2021, "Simple Copy-Paste") makes training data from a catalog that has no detection
annotations: product cut-outs (straight-alpha RGBA from shop images) are pasted onto
backgrounds, and since the compositing is ours, every box is known exactly. It gives

- COCO detection scenes for the RetinaNet product detector (``synthesize_scenes``), and
- user-photo-like crops of each SKU (the main object's box moved like a detector's box), to
  train the embedder in the query domain.

A scene is built in this order: a background (a random crop of a user-given photo, or a
procedural one: gradients, value noise, wood, fabric, tiles, rooms, outdoor, shapes,
lighting, blur); distractor cut-outs (smaller, limited overlap) and the main cut-out (35-75 %
of the frame side, pasted last or next to last), each with scale, rotation, mild perspective,
flip, a soft cast shadow and light/colour-cast matching to what lies under it; then, on the
whole frame, sometimes a thumb-like or object occluder over an edge of the main object, a
lighting gradient, exposure and white balance, blur and sensor noise. JPEG is applied when
files are written.

Boxes are the VISIBLE extent: a pixel belongs to an object when the object's share of the
final composited pixel (its alpha times the transmittance of everything pasted above it) is
at least one half, i.e. its composited alpha rounds to >= 128 of 255. Objects mostly hidden
(covered, or outside the frame) or too small to see are dropped. Geometry, resampling and
blurs are OpenCV's; only this bookkeeping (premultiplied compositing with per-object alpha
layers and the transmittance pass that yields visible masks) is written here, because no
library keeps it.

Rate, measured with ``synthesize_scenes`` pinned to one core of a shared 2-core x86 machine
(300 cut-outs, 0-3 distractors, one crop per scene, scenes and crops written as JPEG): 140
scenes/s at 128 px with procedural backgrounds (1,002 scenes in 7.2 s; 95-110 while other
jobs loaded the machine), 185 scenes/s with photo backgrounds, ~55 scenes/s at 256 px and
~20 scenes/s at 512 px; ``workers`` scales it with cores. Scenes are seeded from
``(seed, scene index)`` alone, so ``workers > 1`` (``spawn`` processes: call it from an
importable module or under ``if __name__ == "__main__":``) writes byte-identical files to
``workers=1`` on the same machine and OpenCV/Pillow build.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np

from visearch.errors import ImageDecodeError
from visearch.fileio import atomic_write_text
from visearch.imageio import decode_image, encode_jpeg
from visearch.progress import progress_bar

logger = logging.getLogger(__name__)

#: Smallest scene side in pixels.
MIN_SIZE = 32
#: Smallest visible box side in pixels for an object to be annotated.
MIN_BOX_SIDE = 4

Box = tuple[int, int, int, int]

_KIND_PLAN, _KIND_SCENE = 0, 1
_VISIBLE_SHARE = 0.5  # composited alpha >= 127.5 / 255: rounds to >= 128
_JPEG_QUALITY = (35, 90)  # inclusive range of scene and crop JPEG qualities


@dataclass(frozen=True)
class SceneObject:
    """A product cut-out.

    Attributes:
        key: a stable id of the cut-out (e.g. the catalog image path).
        sku: the product's SKU.
        category: the product's category.
        rgba: ``uint8 [h, w, 4]``, straight (not premultiplied) alpha, cropped tight to the
            product.
    """

    key: str
    sku: str
    category: str
    rgba: np.ndarray = field(compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_rgba(self.rgba, f"cut-out {self.key!r}")
        for name in ("key", "sku", "category"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"SceneObject.{name} must be a non-empty string")


@dataclass(frozen=True)
class Pasted:
    """One object visible in a composed scene.

    Attributes:
        index: index into the ``objects`` sequence given to ``compose_scene``.
        box: ``(x1, y1, x2, y2)`` scene pixels, x2/y2 exclusive: the tight box of the pixels
            where this object's final composited alpha is >= 128 (of 255), after everything
            pasted or occluding above it.
        visible: visible pixels / pasted pixels of this object (pasted pixels counted on
            the whole warped cut-out, the part outside the frame included), in [0, 1].
        main: whether this is the main object.
    """

    index: int
    box: Box
    visible: float
    main: bool


@dataclass
class SceneSet:
    """What ``synthesize_scenes`` wrote.

    Attributes:
        coco: the training COCO dict written to ``coco_path``.
        coco_path: ``out/train.json``.
        crops_path: ``out/crops.jsonl``, or None when no crops were asked for.
        counts: scenes, train_images, val_images, annotations, crops, scenes_without_main,
            objects, backgrounds (photos decoded), background_failures.
    """

    coco: dict
    coco_path: Path
    crops_path: Path | None
    counts: dict[str, int]


# ---- input checks ---------------------------------------------------------------------------


def _check_rgba(rgba: Any, name: str) -> None:
    if not isinstance(rgba, np.ndarray):
        raise ValueError(f"{name}: rgba must be a numpy array, got {type(rgba).__name__}")
    if rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError(
            f"{name}: rgba must be uint8 [h, w, 4] (straight alpha), got {rgba.dtype} "
            f"{list(rgba.shape)}"
        )
    if rgba.shape[0] < 1 or rgba.shape[1] < 1:
        raise ValueError(f"{name}: rgba is empty ({rgba.shape[1]} x {rgba.shape[0]})")
    if int(rgba[..., 3].max()) < 128:
        raise ValueError(f"{name}: the cut-out is transparent (no alpha >= 128)")


def _check_size(size: int, name: str = "size") -> None:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < MIN_SIZE:
        raise ValueError(f"{name} must be an integer >= {MIN_SIZE} pixels, got {size!r}")


def _check_rgb(image: Any, name: str) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3:
        got = (f"{image.dtype} {list(image.shape)}" if isinstance(image, np.ndarray)
               else type(image).__name__)
        raise ValueError(f"{name} must be an RGB array uint8 [H, W, 3], got {got}")


# ---- small numeric helpers ------------------------------------------------------------------


def _hsv(h: np.ndarray | float, s: np.ndarray | float, v: np.ndarray | float) -> np.ndarray:
    """RGB float32 [n, 3] in 0..1 from hue (turns, wrapped), saturation and value (0..1)."""
    h, s, v = np.broadcast_arrays(np.atleast_1d(h), np.atleast_1d(s), np.atleast_1d(v))
    hsv = np.stack([(h % 1.0) * 360.0, np.clip(s, 0, 1), np.clip(v, 0, 1)], axis=-1)
    return cv2.cvtColor(hsv.astype(np.float32)[None], cv2.COLOR_HSV2RGB)[0]


def _palette(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` colours float32 [n, 3] (0..1) that belong together: analogous hues around a base,
    mostly muted (rooms are less saturated than products), sometimes vivid or with an
    accent hue."""
    base = rng.random()
    hue = base + rng.normal(0.0, 0.06, size=n)
    accent = rng.random(n) < 0.25
    hue[accent] = rng.random(int(accent.sum()))
    sat_top = 0.85 if rng.random() < 0.25 else 0.4
    return _hsv(hue, rng.uniform(0.0, sat_top, size=n), rng.uniform(0.12, 0.97, size=n))


def _fbm(
    shape: tuple[int, int], rng: np.random.Generator, cells: tuple[int, int], octaves: int,
    persistence: float,
) -> np.ndarray:
    """Multi-octave value noise float32 [h, w] rescaled to 0..1: random grids of ``cells``
    (rows, cols) doubled per octave, bicubic-upsampled by OpenCV and summed."""
    h, w = shape
    out = np.zeros(shape, np.float32)
    amp = 1.0
    cy, cx = cells
    for _ in range(octaves):
        grid = rng.random((min(cy, h) + 1, min(cx, w) + 1), dtype=np.float32)
        out += amp * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        amp *= persistence
        cy, cx = cy * 2, cx * 2
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / max(hi - lo, 1e-6)


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates float32 [size, size] in 0..1 (x, y)."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.broadcast_to(t[None, :], (size, size)), np.broadcast_to(t[:, None], (size, size))


def _lerp(c0: np.ndarray, c1: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-pixel mix float32 [h, w, 3] of colours ``c0``, ``c1`` ([3]) by ``t`` ([h, w])."""
    t = t[..., None]
    return c0 * (1.0 - t) + c1 * t


def _rotated(size: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u along ``angle``, v across it) float32 [size, size], in pixels."""
    x, y = _coords(size)
    c, s = math.cos(angle), math.sin(angle)
    return (x * c + y * s) * size, (-x * s + y * c) * size


# ---- procedural backgrounds -----------------------------------------------------------------


def _tex_gradient(size: int, rng: np.random.Generator) -> np.ndarray:
    c = _palette(rng, 2)
    x, y = _coords(size)
    if rng.random() < 0.6:
        a = rng.uniform(0, 2 * math.pi)
        t = x * math.cos(a) + y * math.sin(a)
    else:
        cx, cy = rng.uniform(-0.2, 1.2, size=2)
        t = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return _lerp(c[0], c[1], t)


def _tex_noise(size: int, rng: np.random.Generator) -> np.ndarray:
    """Plaster, concrete, carpet, stone: value noise through a colour ramp, plus grain."""
    c = _palette(rng, 3)
    cells = int(rng.integers(2, 9))
    n = _fbm((size, size), rng, (cells, cells), int(rng.integers(2, 6)),
             float(rng.uniform(0.35, 0.7)))
    img = _lerp(c[0], c[1], n)
    if rng.random() < 0.5:  # blotches of a third colour
        m = np.clip((n - rng.uniform(0.55, 0.8)) * 6.0, 0, 1)
        img = _lerp(img, c[2], m)
    grain = rng.uniform(0.0, 0.12)
    fine = _fbm((size, size), rng, (size // 4, size // 4), 1, 0.5)
    return img * (1.0 - grain + 2.0 * grain * fine[..., None])


def _tex_wood(size: int, rng: np.random.Generator) -> np.ndarray:
    """Grain stripes bent by stretched noise, optionally cut into planks."""
    if rng.random() < 0.7:
        hue = rng.uniform(0.03, 0.11)
        dark = _hsv(hue, rng.uniform(0.35, 0.8), rng.uniform(0.15, 0.45))[0]
        light = _hsv(hue + rng.normal(0, 0.01), rng.uniform(0.25, 0.65),
                     rng.uniform(0.45, 0.9))[0]
    else:  # painted or stained in any colour
        dark, light = _palette(rng, 2)
        dark = dark * 0.6
    angle = float(rng.choice([0.0, math.pi / 2])) + rng.normal(0.0, 0.15)
    u, v = _rotated(size, angle)
    warp = _fbm((size, size), rng, (2, int(rng.integers(6, 16))), 3, 0.5)
    freq = rng.uniform(0.08, 0.35) * 128 / size
    rings = 0.5 + 0.5 * np.sin(v * freq + warp * rng.uniform(4, 14))
    t = rings ** rng.uniform(0.6, 3.0)
    img = _lerp(dark, light, t.astype(np.float32))
    if rng.random() < 0.6:
        plank = rng.uniform(0.12, 0.4) * size
        row = np.floor(v / plank)
        tone = 1.0 + rng.normal(0.0, 0.08, size=64).astype(np.float32)
        img = img * tone[(row.astype(np.int64) % 64)][..., None]
        seam = np.abs(v - (row + 0.5) * plank) > plank / 2 - max(1.0, size / 128)
        img = np.where(seam[..., None], img * 0.55, img)
    return img


def _tex_fabric(size: int, rng: np.random.Generator) -> np.ndarray:
    """Plaid, stripes or a plain weave, with a fine thread texture."""
    c = _palette(rng, 3)
    u, v = _rotated(size, rng.normal(0.0, 0.2) + float(rng.choice([0.0, math.pi / 4])))
    kind = rng.random()
    if kind < 0.4:  # plaid: two sets of bands
        pu, pv = rng.uniform(0.05, 0.3, size=2) * size
        bu = ((u / pu) % 1.0) < rng.uniform(0.2, 0.6)
        bv = ((v / pv) % 1.0) < rng.uniform(0.2, 0.6)
        img = np.where(bu[..., None], c[1], c[0])
        img = np.where((bu & bv)[..., None], c[2], np.where(bv[..., None], c[1] * 0.85, img))
    elif kind < 0.75:  # stripes
        p = rng.uniform(0.03, 0.25) * size
        band = ((v / p) % 1.0) < rng.uniform(0.2, 0.7)
        img = np.where(band[..., None], c[1], c[0])
    else:
        img = np.broadcast_to(c[0], (size, size, 3))
    f = rng.uniform(0.6, 1.6)
    weave = 0.5 + 0.25 * (np.sin(u * f * math.pi) + np.sin(v * f * math.pi))
    depth = rng.uniform(0.03, 0.15)
    return (img * (1.0 - depth + 2.0 * depth * weave[..., None])).astype(np.float32)


def _tex_tiles(size: int, rng: np.random.Generator) -> np.ndarray:
    """Tiles or bricks with grout lines and per-tile tone, sometimes a checkerboard."""
    c = _palette(rng, 3)
    u, v = _rotated(size, rng.normal(0.0, 0.1) + float(rng.choice([0.0, math.pi / 4],
                                                                   p=[0.85, 0.15])))
    tw = rng.uniform(0.07, 0.35) * size
    th = tw * (rng.uniform(0.3, 0.6) if rng.random() < 0.35 else 1.0)
    row = np.floor(v / th)
    if th < tw:  # bricks: every other row shifted by half a tile
        u = u + (row % 2) * tw * 0.5
    col = np.floor(u / tw)
    idx = ((row.astype(np.int64) * 31 + col.astype(np.int64) * 17) % 97).astype(np.int64)
    tone = (1.0 + rng.normal(0.0, rng.uniform(0.0, 0.12), size=97)).astype(np.float32)
    checker = rng.random() < 0.2
    base = np.where(((row + col) % 2 == 1)[..., None] & checker, c[1], c[0])
    img = base * tone[idx][..., None]
    g = max(0.7, rng.uniform(0.03, 0.1) * tw)
    grout = ((u % tw) < g) | ((v % th) < g)
    return np.where(grout[..., None], c[2], img).astype(np.float32)


def _tex_outdoor(size: int, rng: np.random.Generator) -> np.ndarray:
    """A sky gradient over ground (grass, soil, pavement) with a broken horizon."""
    sky_top = _hsv(rng.uniform(0.55, 0.63), rng.uniform(0.2, 0.7), rng.uniform(0.6, 1.0))[0]
    sky_low = _hsv(rng.uniform(0.5, 0.62), rng.uniform(0.0, 0.3), rng.uniform(0.8, 1.0))[0]
    x, y = _coords(size)
    img = _lerp(sky_top, sky_low, y)
    ground_hue = float(rng.choice([0.25, 0.3, 0.08, 0.0]))
    g0 = _hsv(ground_hue, rng.uniform(0.0, 0.6), rng.uniform(0.2, 0.5))[0]
    g1 = _hsv(ground_hue + 0.03, rng.uniform(0.0, 0.6), rng.uniform(0.4, 0.8))[0]
    ground = _lerp(g0, g1, _fbm((size, size), rng, (4, 4), 4, 0.6))
    edge = _fbm((1, size), rng, (1, int(rng.integers(3, 10))), 3, 0.5)[0]
    horizon = rng.uniform(0.2, 0.7) + (edge - 0.5) * rng.uniform(0.0, 0.4)
    return np.where((y > horizon[None, :])[..., None], ground, img).astype(np.float32)


#: Procedural backgrounds are drawn at most this large and enlarged: they are mostly out
#: of focus anyway, and drawing costs grow with the pixel count (4x fewer pixels at 512).
_MAX_PROCEDURAL = 256

_TEXTURES: tuple[Callable[[int, np.random.Generator], np.ndarray], ...] = (
    _tex_gradient, _tex_noise, _tex_wood, _tex_fabric, _tex_tiles, _tex_outdoor,
)


def _surface(texture: np.ndarray, horizon: float, rng: np.random.Generator) -> np.ndarray:
    """``texture`` (float32 [S, S, 3]) seen as a floor or table top receding to ``horizon``
    (a row, in pixels): the far edge is narrowed by a perspective warp."""
    size = texture.shape[0]
    squeeze = rng.uniform(0.1, 0.45) * size
    src = np.float32([[0, 0], [size, 0], [size, size], [0, size]])
    dst = np.float32([[squeeze, horizon], [size - squeeze, horizon], [size, size], [0, size]])
    m = cv2.getPerspectiveTransform(src, dst)
    return cv2.warpPerspective(texture, m, (size, size), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT)


def _shapes(img: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    """Non-product clutter on ``img`` (float32 [S, S, 3]): frames, shelves, plates, cables,
    stains and plant-like blobs, each shaded by its own gradient."""
    size = img.shape[0]
    colours = _palette(rng, max(count, 1))
    x, y = _coords(size)
    img = np.array(img, np.float32)
    for i in range(count):
        mask = np.zeros((size, size), np.uint8)
        kind = rng.random()
        cx, cy = rng.uniform(-0.1, 1.1, size=2) * size
        w, h = rng.uniform(0.04, 0.5, size=2) * size
        if kind < 0.3:
            thick = -1 if rng.random() < 0.7 else max(1, int(rng.uniform(0.01, 0.04) * size))
            cv2.rectangle(mask, (int(cx - w / 2), int(cy - h / 2)),
                          (int(cx + w / 2), int(cy + h / 2)), 255, thick, cv2.LINE_AA)
        elif kind < 0.55:
            cv2.ellipse(mask, (int(cx), int(cy)), (int(w / 2) + 1, int(h / 2) + 1),
                        float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
        elif kind < 0.7:
            pts = rng.uniform(-0.5, 0.5, size=(int(rng.integers(3, 8)), 2)) * (w, h) + (cx, cy)
            cv2.fillPoly(mask, [pts.astype(np.int32)], 255, cv2.LINE_AA)
        elif kind < 0.85:
            ex, ey = rng.uniform(-0.1, 1.1, size=2) * size
            cv2.line(mask, (int(cx), int(cy)), (int(ex), int(ey)), 255,
                     max(1, int(rng.uniform(0.005, 0.03) * size)), cv2.LINE_AA)
        else:
            blob = _fbm((size, size), rng, (3, 3), 3, 0.5)
            mask = (np.clip((blob - rng.uniform(0.6, 0.8)) * 8.0, 0, 1) * 255).astype(np.uint8)
        opacity = rng.uniform(0.6, 1.0)
        ang = rng.uniform(0, 2 * math.pi)
        slope = rng.uniform(0.0, 0.4)
        bx, by, bw, bh = cv2.boundingRect(mask)
        if bw == 0 or bh == 0:
            continue
        win = (slice(by, by + bh), slice(bx, bx + bw))
        a = mask[win].astype(np.float32)[..., None] * np.float32(opacity / 255.0)
        shade = 1.0 + slope * ((x[win] * math.cos(ang) + y[win] * math.sin(ang)) - 0.5)
        img[win] = img[win] * (1.0 - a) + (colours[i] * shade[..., None]) * a
    return img


def _lighting(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A multiplicative lighting gradient: directional, or a spot/vignette."""
    x, y = _coords(img.shape[0])
    strength = rng.uniform(0.0, 0.45)
    if rng.random() < 0.5:
        a = rng.uniform(0, 2 * math.pi)
        light = 1.0 + strength * ((x * math.cos(a) + y * math.sin(a)) - 0.5) * 1.4
    else:
        cx, cy = rng.uniform(0.0, 1.0, size=2)
        r2 = (x - cx) ** 2 + (y - cy) ** 2
        light = 1.0 - strength + 2.0 * strength * np.exp(-r2 / rng.uniform(0.05, 0.5))
    return img * light[..., None].astype(np.float32)


def procedural_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A procedural background photo, ``uint8 [size, size, 3]`` RGB.

    Indoor-ish and outdoor-ish scenes drawn from several families so no single look
    dominates: gradients, multi-octave value noise (plaster, concrete, carpet), wood grain
    and planks, fabric (plaid, stripes, weave), tiles and bricks, sky over ground, and
    rooms (a wall over a floor or table seen in perspective); then non-product clutter
    (frames, shelves, plates, cables, blobs), a lighting gradient and a depth-of-field blur.

    Args:
        size: side in pixels, at least ``MIN_SIZE``.
        rng: the generator; the same state gives the same image.
    """
    _check_size(size)
    final, size = size, min(size, _MAX_PROCEDURAL)
    pick = int(rng.integers(len(_TEXTURES)))
    img = _TEXTURES[pick](size, rng)
    if rng.random() < 0.4:  # a room: the wall, a surface in perspective below a horizon
        horizon = rng.uniform(0.2, 0.7) * size
        surface = _surface(_TEXTURES[int(rng.integers(len(_TEXTURES)))](size, rng), horizon,
                           rng)
        below = (np.arange(size, dtype=np.float32)[:, None, None] + 0.5) >= horizon
        img = np.where(below, surface, img)
        edge = max(1, int(round(size * rng.uniform(0.0, 0.03))))
        row = int(horizon)
        img[row:row + edge] *= rng.uniform(0.5, 1.3)
    count = int(rng.integers(0, 10)) if rng.random() < 0.75 else 0
    img = _shapes(img, rng, count)
    img = _lighting(img, rng)
    if rng.random() < 0.7:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 2.5) * size / 128)
    if final != size:
        img = cv2.resize(img, (final, final), interpolation=cv2.INTER_LINEAR)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def background_from_photo(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of a background ``photo`` (RGB ``uint8 [H, W, 3]``) as ``uint8
    [size, size, 3]``: 25-100 % of the area, aspect ratio jittered within 3:4..4:3, mirrored
    half the time, resized (area-averaged when shrinking, bilinear when enlarging)."""
    _check_rgb(photo, "photo")
    _check_size(size)
    h, w = photo.shape[:2]
    area = rng.uniform(0.25, 1.0) * h * w
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = int(round(min(w, max(1.0, math.sqrt(area * aspect)))))
    ch = int(round(min(h, max(1.0, math.sqrt(area / aspect)))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    crop = photo[y0:y0 + ch, x0:x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    interp = cv2.INTER_AREA if min(cw, ch) > size else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=interp)


# ---- cut-outs and layout ----------------------------------------------------------------------


def _premultiplied(rgba: np.ndarray) -> np.ndarray:
    """float32 [h, w, 4] in 0..1, colour premultiplied by alpha, cropped to alpha > 0."""
    ys, xs = np.nonzero(rgba[..., 3])
    rgba = rgba[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    out = rgba.astype(np.float32) * np.float32(1.0 / 255.0)
    out[..., :3] *= out[..., 3:]
    return out


def _shrink_rgba(rgba: np.ndarray, max_side: int) -> np.ndarray:
    """``rgba`` (uint8 [h, w, 4], straight alpha) with its long side at most ``max_side``,
    resampled premultiplied so transparent pixels' colour does not bleed into edges."""
    pre = _premultiplied(rgba)
    h, w = pre.shape[:2]
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        pre = cv2.resize(pre, size, interpolation=cv2.INTER_AREA)
    a = pre[..., 3:]
    rgb = np.where(a > 0, pre[..., :3] / np.maximum(a, 1e-6), 0.0)
    out = np.concatenate([rgb, a], axis=-1)
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class _Placement:
    """Where one object goes: ``matrix`` float64 [3, 3] maps its (tight, premultiplied)
    source pixels to scene pixels; ``side`` is its long side in scene pixels."""

    index: int
    matrix: np.ndarray
    side: float


def _homography(
    shape: tuple[int, int], side: float, angle: float, flip: bool, jitter: np.ndarray,
    centre: tuple[float, float],
) -> np.ndarray:
    """float64 [3, 3] taking a ``shape`` (h, w) source to ``side`` long side, mirrored,
    corner-jittered by ``jitter`` ([4, 2], fractions of ``side``), rotated by ``angle``
    (radians) and centred at ``centre`` (scene pixels)."""
    h, w = shape
    s = side / max(h, w)
    hw, hh = w * s / 2, h * s / 2
    dst = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]], np.float64)
    if flip:
        dst[:, 0] *= -1
    dst += jitter * side
    c, sn = math.cos(angle), math.sin(angle)
    dst = dst @ np.array([[c, sn], [-sn, c]]) + np.asarray(centre)
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    return cv2.getPerspectiveTransform(src, dst.astype(np.float32)).astype(np.float64)


def _quad_box(matrix: np.ndarray, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """Float ``(x1, y1, x2, y2)`` of the warped source rectangle (a projective map sends the
    rectangle to the quad of its corners, so the corners bound it)."""
    h, w = shape
    corners = np.array([[0, 0, 1], [w, 0, 1], [w, h, 1], [0, h, 1]], np.float64) @ matrix.T
    xy = corners[:, :2] / corners[:, 2:]
    return float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()), \
        float(xy[:, 1].max())


def _overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over the smaller box's area of float boxes ``(x1, y1, x2, y2)``."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(small, 1e-6)


def _plan_layout(
    shapes: Sequence[tuple[int, int]], main: int, size: int, rng: np.random.Generator
) -> list[_Placement]:
    """Placements in paste order (bottom first) for objects of source ``shapes`` (h, w).

    The main object's long side is 35-75 % of ``size``, its centre within +-20 % of the
    frame centre, kept in frame but for 5 % of its box; distractors are 15-40 % (at most
    0.85 of the main), anywhere with half their box in frame, overlapping every earlier box
    by less than a quarter of the smaller one; one that finds no such place in 12 tries is
    left out. The main object is pasted last, or next to last 20 % of the time.
    """
    def jitter() -> np.ndarray:
        return rng.uniform(-1.0, 1.0, size=(4, 2)) * rng.uniform(0.0, 0.08)

    shape = shapes[main]
    m_side = rng.uniform(0.35, 0.75) * size
    angle = float(np.clip(rng.normal(0.0, math.radians(7)), -math.radians(20),
                          math.radians(20)))
    flip = bool(rng.random() < 0.5)
    jit = jitter()
    m0 = _homography(shape, m_side, angle, flip, jit, (0.0, 0.0))
    x1, y1, x2, y2 = _quad_box(m0, shape)
    centre = []
    for lo, hi in ((x1, x2), (y1, y2)):
        slack = 0.05 * (hi - lo)
        want = size / 2 + rng.uniform(-0.2, 0.2) * size
        low, high = -lo - slack, size - hi + slack
        centre.append(float(np.clip(want, low, high)) if low <= high else size / 2)
    main_m = _homography(shape, m_side, angle, flip, jit, (centre[0], centre[1]))
    taken = [_quad_box(main_m, shape)]
    below: list[_Placement] = []
    for idx in range(len(shapes)):
        if idx == main:
            continue
        side = min(rng.uniform(0.15, 0.4) * size, 0.85 * m_side)
        angle = rng.uniform(-math.radians(30), math.radians(30))
        flip = bool(rng.random() < 0.5)
        jit = jitter()
        for _ in range(12):
            cx, cy = rng.uniform(0.0, size, size=2)
            m = _homography(shapes[idx], side, angle, flip, jit, (cx, cy))
            box = _quad_box(m, shapes[idx])
            inside = (min(box[2], size) - max(box[0], 0)) * (min(box[3], size) - max(box[1], 0))
            area = (box[2] - box[0]) * (box[3] - box[1])
            if inside >= 0.5 * area and all(_overlap(box, t) < 0.25 for t in taken):
                taken.append(box)
                below.append(_Placement(idx, m, side))
                break
    order = [*below, _Placement(main, main_m, m_side)]
    if len(below) > 0 and rng.random() < 0.2:
        order[-2], order[-1] = order[-1], order[-2]
    return order


# ---- compositing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Patch:
    """An object warped into its own box: ``pre`` float32 [h, w, 4] premultiplied (0..1),
    top-left corner at scene pixel ``(x0, y0)`` (may be outside the frame)."""

    pre: np.ndarray
    x0: int
    y0: int


def _warp(pre: np.ndarray, place: _Placement) -> _Patch:
    """Warp a premultiplied cut-out (float32 [h, w, 4]) by ``place.matrix`` into the box of
    its warped quad; shrinking by more than 2x is area-averaged first (no aliasing)."""
    h, w = pre.shape[:2]
    m = place.matrix
    scale = place.side / max(h, w)
    if scale < 0.5:
        nw, nh = max(1, round(w * scale * 1.5)), max(1, round(h * scale * 1.5))
        pre = cv2.resize(pre, (nw, nh), interpolation=cv2.INTER_AREA)
        m = m @ np.diag([w / nw, h / nh, 1.0])
        h, w = nh, nw
    x1, y1, x2, y2 = _quad_box(m, (h, w))
    x0, y0 = math.floor(x1) - 1, math.floor(y1) - 1
    pw, ph = math.ceil(x2) + 1 - x0, math.ceil(y2) + 1 - y0
    local = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], np.float64) @ m
    out = cv2.warpPerspective(pre, local, (pw, ph), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))
    return _Patch(out, x0, y0)


def _clip(patch_shape: tuple[int, int], x0: int, y0: int, size: int
          ) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """(scene slices, patch slices) of a patch's part inside the frame, or None."""
    ph, pw = patch_shape
    fx0, fy0 = max(x0, 0), max(y0, 0)
    fx1, fy1 = min(x0 + pw, size), min(y0 + ph, size)
    if fx0 >= fx1 or fy0 >= fy1:
        return None
    return ((slice(fy0, fy1), slice(fx0, fx1)),
            (slice(fy0 - y0, fy1 - y0), slice(fx0 - x0, fx1 - x0)))


def _match_light(pre: np.ndarray, under: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pull an object's brightness and colour cast part way towards what lies ``under`` it
    (float32 [h, w, 3]), plus a random exposure: a pasted shop shot otherwise looks lit by a
    studio. Returns the premultiplied patch with scaled colour (kept <= alpha)."""
    a = pre[..., 3]
    total = float(a.sum())
    if total <= 0 or under.size == 0:
        return pre
    obj = pre[..., :3].reshape(-1, 3).sum(0) / total
    bg = under.reshape(-1, 3).mean(0)
    lum_obj, lum_bg = float(obj.mean()) + 0.03, float(bg.mean()) + 0.03
    cast = (bg + 0.03) / lum_bg
    gain = (lum_bg / lum_obj) ** rng.uniform(0.0, 0.3) * cast ** rng.uniform(0.0, 0.25)
    gain = np.clip(gain * rng.uniform(0.85, 1.15), 0.6, 1.5).astype(np.float32)
    out = pre.copy()
    out[..., :3] = np.minimum(pre[..., :3] * gain, a[..., None])
    return out


def _cast_shadow(scene: np.ndarray, patch: _Patch, side: float,
                 rng: np.random.Generator) -> None:
    """Darken ``scene`` (float32 [S, S, 3], in place) under a blurred, shifted copy of the
    patch's alpha: a soft shadow cast down and to one side."""
    size = scene.shape[0]
    sigma = max(0.8, rng.uniform(0.02, 0.08) * side)
    dx, dy = rng.uniform(-0.08, 0.08) * side, rng.uniform(0.0, 0.1) * side
    pad = int(math.ceil(3 * sigma + max(abs(dx), abs(dy)))) + 1
    a = patch.pre[..., 3]
    ph, pw = a.shape
    canvas = np.zeros((ph + 2 * pad, pw + 2 * pad), np.float32)
    oy, ox = pad + int(round(dy)), pad + int(round(dx))
    canvas[oy:oy + ph, ox:ox + pw] = a
    canvas = cv2.GaussianBlur(canvas, (0, 0), sigma)
    where = _clip(canvas.shape, patch.x0 - pad, patch.y0 - pad, size)
    if where is None:
        return
    dst, src = where
    scene[dst] *= (1.0 - rng.uniform(0.2, 0.55) * canvas[src])[..., None]


def _occluder(main_alpha: np.ndarray, side: float, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """A thumb-like or random object over one edge of the main object, whose alpha in the
    scene is ``main_alpha`` (float32 [S, S], 0..1; ``side`` its long side in pixels): it
    enters the silhouette from outside at a random point of one side. Returns the
    occluder's alpha float32 [S, S] (0..1) and colour float32 [S, S, 3] (straight)."""
    size = main_alpha.shape[0]
    solid = main_alpha >= _VISIBLE_SHARE
    cols, rows = np.flatnonzero(solid.any(0)), np.flatnonzero(solid.any(1))
    x1, x2, y1, y2 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
    edge = int(rng.integers(4))  # enters from the left, top, right, bottom
    t = rng.uniform(0.2, 0.8)
    if edge in (0, 2):
        row = int(y1 + t * (y2 - 1 - y1))
        line = np.flatnonzero(solid[row])
        px = float((line[0] if edge == 0 else line[-1] + 1) if line.size else
                   (x1 if edge == 0 else x2))
        py, nx, ny = row + 0.5, (-1.0 if edge == 0 else 1.0), 0.0
    else:
        col = int(x1 + t * (x2 - 1 - x1))
        line = np.flatnonzero(solid[:, col])
        py = float((line[0] if edge == 1 else line[-1] + 1) if line.size else
                   (y1 if edge == 1 else y2))
        px, nx, ny = col + 0.5, 0.0, (-1.0 if edge == 1 else 1.0)
    mask = np.zeros((size, size), np.uint8)
    shift = 4  # OpenCV sub-pixel drawing: coordinates in 1/16 px
    one = 1 << shift
    thumb = rng.random() < 0.5
    if thumb:
        length, width = rng.uniform(0.25, 0.45) * side, rng.uniform(0.08, 0.14) * side
        out = rng.uniform(0.3, 0.7) * length  # how far the centre sits outside the edge
        ang = math.degrees(math.atan2(ny, nx)) + rng.uniform(-25, 25)
        centre = (int((px + nx * out) * one), int((py + ny * out) * one))
        cv2.ellipse(mask, centre, (int(length * one), int(width * one)), ang, 0, 360, 255,
                    -1, cv2.LINE_AA, shift)
        colour = _hsv(rng.uniform(0.01, 0.08), rng.uniform(0.25, 0.6),
                      rng.uniform(0.3, 0.95))[0]
    else:
        r = rng.uniform(0.15, 0.3) * side
        out = rng.uniform(0.0, 0.6) * r
        cx, cy = px + nx * out, py + ny * out
        k = int(rng.integers(3, 9))
        ang = np.sort(rng.uniform(0, 2 * math.pi, size=k))
        rad = r * rng.uniform(0.6, 1.0, size=k)
        pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)
        cv2.fillPoly(mask, [np.round(pts * one).astype(np.int32)], 255, cv2.LINE_AA, shift)
        colour = _palette(rng, 1)[0] if rng.random() < 0.5 else rng.random(3).astype(
            np.float32)
    alpha = mask.astype(np.float32) * np.float32(1.0 / 255.0)
    # rounded shading: darker towards the rim, brighter where the shape is thick (blurred
    # only around the shape: a full-frame blur of this width is the costliest step at 512 px)
    sigma = max(1.0, 0.06 * side)
    pad = int(math.ceil(3 * sigma))
    bx, by, bw, bh = cv2.boundingRect(mask)
    win = (slice(max(by - pad, 0), by + bh + pad), slice(max(bx - pad, 0), bx + bw + pad))
    body = np.zeros_like(alpha)
    if bw and bh:
        body[win] = cv2.GaussianBlur(alpha[win], (0, 0), sigma)
    tex = _fbm((size, size), rng, (4, 4), 2, 0.5)
    rgb = colour * (0.65 + 0.35 * body + 0.1 * (tex - 0.5))[..., None]
    return alpha, rgb.astype(np.float32)


def _camera(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lighting gradient, exposure, gamma and white balance, blur, sensor noise (float32
    [S, S, 3] in 0..1 -> same)."""
    size = scene.shape[0]
    if rng.random() < 0.5:
        scene = _lighting(scene, rng)
    gain = rng.uniform(0.8, 1.2) * rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    scene = np.clip(scene * gain, 0.0, 1.0) ** np.float32(rng.uniform(0.8, 1.25))
    r = rng.random()
    if r < 0.5:
        scene = cv2.GaussianBlur(scene, (0, 0), rng.uniform(0.3, 1.2) * size / 128)
    elif r < 0.6:  # hand shake: a short line kernel
        k = max(3, int(rng.uniform(0.02, 0.05) * size) | 1)
        kernel = np.zeros((k, k), np.float32)
        kernel[k // 2] = 1.0 / k
        rot = cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), rng.uniform(0, 180), 1.0)
        kernel = cv2.warpAffine(kernel, rot, (k, k))
        scene = cv2.filter2D(scene, -1, kernel / max(float(kernel.sum()), 1e-6))
    if rng.random() < 0.85:
        sigma = rng.uniform(0.004, 0.03)
        scene = scene + rng.standard_normal(scene.shape, dtype=np.float32) * np.float32(sigma)
    return scene


@dataclass(frozen=True)
class _Composite:
    """Everything ``_compose`` knows: the scene, the annotations, and per object the
    visible mask (bool [S, S]; all False when not pasted) and pasted pixel count."""

    image: np.ndarray
    pasted: list[Pasted]
    masks: list[np.ndarray]
    areas: list[int]


def _compose(
    cutouts: Sequence[np.ndarray], background: np.ndarray, rng: np.random.Generator, *,
    main: int, photometric: bool, occlusion: float, min_visible: float,
) -> _Composite:
    """``compose_scene`` on premultiplied cut-outs (float32 [h, w, 4], tight), keeping the
    masks (the test oracle's hook)."""
    size = background.shape[0]
    scene = background.astype(np.float32) * np.float32(1.0 / 255.0)
    order = _plan_layout([c.shape[:2] for c in cutouts], main, size, rng)
    n = len(cutouts)
    alphas: list[np.ndarray | None] = [None] * n
    areas = [0] * n
    main_side = float(size)
    for place in order:
        patch = _warp(cutouts[place.index], place)
        areas[place.index] = int((patch.pre[..., 3] >= _VISIBLE_SHARE).sum())
        if place.index == main:
            main_side = place.side
        where = _clip(patch.pre.shape[:2], patch.x0, patch.y0, size)
        if where is None:
            continue
        dst, src = where
        pre = patch.pre
        if photometric:
            pre = _match_light(pre, scene[dst], rng)
            if rng.random() < 0.7:
                _cast_shadow(scene, patch, place.side, rng)
        layer = pre[src]
        scene[dst] = layer[..., :3] + scene[dst] * (1.0 - layer[..., 3:])
        full = np.zeros((size, size), np.float32)
        full[dst] = layer[..., 3]
        alphas[place.index] = full
    # Transmittance from the top of the stack down: what each object still shows.
    transmit = np.ones((size, size), np.float32)
    if occlusion > 0 and rng.random() < occlusion and alphas[main] is not None \
            and bool((alphas[main] >= _VISIBLE_SHARE).any()):
        occ_a, occ_rgb = _occluder(alphas[main], main_side, rng)
        scene = occ_rgb * occ_a[..., None] + scene * (1.0 - occ_a[..., None])
        transmit = 1.0 - occ_a
    masks = [np.zeros((size, size), bool) for _ in range(n)]
    for place in reversed(order):
        a = alphas[place.index]
        if a is None:
            continue
        masks[place.index] = a * transmit >= _VISIBLE_SHARE
        transmit = transmit * (1.0 - a)
    if photometric:
        scene = _camera(scene, rng)
    image = np.clip(scene * 255.0 + 0.5, 0, 255).astype(np.uint8)
    pasted = []
    for idx in [main, *(i for i in range(n) if i != main)]:
        mask = masks[idx]
        cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
        if cols.size == 0:
            continue
        box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
        visible = min(1.0, int(mask.sum()) / max(areas[idx], 1))
        if box[2] - box[0] >= MIN_BOX_SIDE and box[3] - box[1] >= MIN_BOX_SIDE \
                and visible >= min_visible:
            pasted.append(Pasted(idx, box, visible, idx == main))
    return _Composite(image, pasted, masks, areas)


def compose_scene(
    objects: Sequence[np.ndarray],
    background: np.ndarray,
    rng: np.random.Generator,
    *,
    main: int = 0,
    photometric: bool = True,
    occlusion: float = 0.35,
    min_visible: float = 0.25,
) -> tuple[np.ndarray, list[Pasted]]:
    """Paste RGBA cut-outs onto a background, as a phone photo of ``objects[main]``.

    ``objects[main]`` is the main object: long side 35-75 % of the frame side, centre within
    +-20 % of the frame centre, pasted last (or next to last, 20 % of the time). The others
    are distractors: 15-40 % of the side, placed with limited overlap (one that finds no
    room is left out). Each object is scaled, rotated, mildly perspective-warped and maybe
    mirrored; with ``photometric``, it gets a soft cast shadow and its light and colour cast
    are pulled towards what lies under it, and the frame gets a lighting gradient, exposure,
    white balance, blur and sensor noise. With probability ``occlusion`` a thumb-like or
    random-object occluder covers part of one edge of the main object.

    Args:
        objects: RGBA cut-outs, each ``uint8 [h, w, 4]`` with straight alpha (cropped to
            alpha > 0 here if they are not tight).
        background: RGB ``uint8 [S, S, 3]``, ``S >= MIN_SIZE``.
        rng: the generator; the same state and inputs give the same scene.
        main: index of the main object in ``objects``.
        photometric: False turns off shadows, light matching and camera effects, so pixels
            are exact alpha composites (for tests and inspection).
        occlusion: probability (0..1) of an occluder over the main object.
        min_visible: smallest visible fraction (0..1) for an object to be returned.

    Returns:
        The scene RGB ``uint8 [S, S, 3]`` and one ``Pasted`` per object still visible
        (visible box at least ``MIN_BOX_SIDE`` px wide and high, visible fraction at least
        ``min_visible``), the main object first (when it is still visible: only a
        degenerate cut-out, e.g. a 1-px line, can lose it), then by index.

    Raises:
        ValueError: no objects, a bad cut-out or background, ``main`` out of range, or
            ``occlusion``/``min_visible`` outside 0..1.
    """
    if len(objects) == 0:
        raise ValueError("compose_scene needs at least one object (the main one)")
    for i, rgba in enumerate(objects):
        _check_rgba(rgba, f"objects[{i}]")
    _check_rgb(background, "background")
    if background.shape[0] != background.shape[1]:
        raise ValueError(f"background must be square, got {background.shape[1]} x "
                         f"{background.shape[0]}; crop it or use background_from_photo")
    _check_size(background.shape[0], "background side")
    if not 0 <= main < len(objects):
        raise ValueError(f"main must index objects (0..{len(objects) - 1}), got {main}")
    if not 0.0 <= occlusion <= 1.0:
        raise ValueError(f"occlusion is a probability in 0..1, got {occlusion}")
    if not 0.0 <= min_visible <= 1.0:
        raise ValueError(f"min_visible is a fraction in 0..1, got {min_visible}")
    comp = _compose([_premultiplied(o) for o in objects], background, rng, main=main,
                    photometric=photometric, occlusion=occlusion, min_visible=min_visible)
    return comp.image, comp.pasted


# ---- scene sets -------------------------------------------------------------------------------

class _SceneJob(NamedTuple):
    """Scene number ``scene`` (0-based; it seeds the scene's generator) with main cut-out
    ``main`` (an index into the objects)."""

    scene: int
    main: int


class _Annotation(NamedTuple):
    """One object visible in a rendered scene: its cut-out ``obj`` (index into the
    objects), visible ``box``, ``visible`` fraction, and whether it is the ``main`` one."""

    obj: int
    box: Box
    visible: float
    main: bool


class _RenderedScene(NamedTuple):
    """A rendered scene: its JPEG bytes, annotations (the main object first when still
    visible) and ``crops`` ``[(JPEG bytes, box)]`` of the main object."""

    scene: int
    jpeg: bytes
    annotations: list[_Annotation]
    crops: list[tuple[bytes, Box]]


@dataclass(frozen=True)
class _SceneRenderer:
    """Everything a scene needs besides its job; one per rendering process.

    ``cutouts`` are the objects' RGBA cut-outs (already shrunk to the scene size), ``skus``
    their SKUs, ``photos`` the decoded background photos; the rest are the arguments of
    ``synthesize_scenes`` of the same names (``size`` is ``image_size``).
    """

    cutouts: list[np.ndarray]
    skus: list[str]
    photos: list[np.ndarray]
    seed: int
    size: int
    max_distractors: int
    crops_per_scene: int
    crop_jitter: float
    photo_fraction: float
    occlusion: float
    min_visible: float

    def _pick_distractors(self, main: int, count: int, rng: np.random.Generator) -> list[int]:
        """Up to ``count`` other cut-outs, preferring SKUs other than the main's."""
        skus = self.skus
        n = len(skus)
        picked: list[int] = []
        if n < 2:
            return picked
        for _ in range(4 * count):
            if len(picked) == count:
                break
            j = int(rng.integers(n))
            if j != main and j not in picked and skus[j] != skus[main]:
                picked.append(j)
        return picked

    def render(self, job: _SceneJob) -> _RenderedScene:
        """Render scene ``job.scene`` with main cut-out ``job.main``."""
        rng = np.random.default_rng([self.seed, _KIND_SCENE, job.scene])
        size = self.size
        if self.photos and rng.random() < self.photo_fraction:
            bg = background_from_photo(self.photos[int(rng.integers(len(self.photos)))], size,
                                       rng)
        else:
            bg = procedural_background(size, rng)
        count = int(rng.integers(0, self.max_distractors + 1))
        chosen = [job.main, *self._pick_distractors(job.main, count, rng)]
        comp = _compose([_premultiplied(self.cutouts[j]) for j in chosen], bg, rng, main=0,
                        photometric=True, occlusion=self.occlusion,
                        min_visible=self.min_visible)
        lo, hi = _JPEG_QUALITY
        data = encode_jpeg(comp.image, int(rng.integers(lo, hi + 1)))
        anns = [_Annotation(chosen[p.index], p.box, p.visible, p.main) for p in comp.pasted]
        crops = []
        if comp.pasted and comp.pasted[0].main:
            for _ in range(self.crops_per_scene):
                x1, y1, x2, y2 = box = _jitter_box(comp.pasted[0].box, self.crop_jitter, size,
                                                   rng)
                crop = np.ascontiguousarray(comp.image[y1:y2, x1:x2])
                crops.append((encode_jpeg(crop, int(rng.integers(lo, hi + 1))), box))
        return _RenderedScene(job.scene, data, anns, crops)


# The renderer of a pool worker process, set once by ``_init_pool_worker`` in that process
# (multiprocessing hands per-process state to tasks only through the initializer); the
# calling process never sets it.
_pool_renderer: _SceneRenderer | None = None


def _init_pool_worker(renderer: _SceneRenderer) -> None:
    global _pool_renderer
    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would contend
    _pool_renderer = renderer


def _render_in_pool_worker(job: _SceneJob) -> _RenderedScene:
    assert _pool_renderer is not None, "called outside a pool started by _run"
    return _pool_renderer.render(job)


def _render_job(job: _SceneJob, renderer: _SceneRenderer) -> _RenderedScene:
    """A runner's task (``visearch.parallel``): the renderer is its shared data."""
    return renderer.render(job)


def _jitter_box(box: Box, jitter: float, size: int, rng: np.random.Generator) -> Box:
    """``box`` with each side moved by up to ``jitter`` x the box's width (x sides) or
    height (y sides), clipped to the frame and at least 2 px wide and high."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    d = rng.uniform(-jitter, jitter, size=4) * (w, h, w, h)
    nx1 = int(np.clip(round(x1 + d[0]), 0, size - 2))
    ny1 = int(np.clip(round(y1 + d[1]), 0, size - 2))
    nx2 = int(np.clip(round(x2 + d[2]), nx1 + 2, size))
    ny2 = int(np.clip(round(y2 + d[3]), ny1 + 2, size))
    return nx1, ny1, nx2, ny2


def _run(jobs: list[_SceneJob], renderer: _SceneRenderer, workers: int, progress: bool,
         runner: Any = None) -> Iterator[_RenderedScene]:
    bar = progress_bar(total=len(jobs), desc="scenes", unit="scene", disable=not progress)
    try:
        if runner is not None:
            for res in runner.map(_render_job, jobs, shared=renderer):
                yield res
                bar.update()
            return
        if workers == 1:
            for job in jobs:
                yield renderer.render(job)
                bar.update()
            return
        # spawn: workers do not inherit the caller's threads (torch, BLAS) or open files;
        # the cut-outs and photos travel once per worker through the initializer.
        ctx = multiprocessing.get_context("spawn")
        chunk = max(1, min(32, len(jobs) // (workers * 8)))
        with ctx.Pool(workers, initializer=_init_pool_worker, initargs=(renderer,)) as pool:
            for res in pool.imap(_render_in_pool_worker, jobs, chunksize=chunk):
                yield res
                bar.update()
    finally:
        bar.close()


def _load_photos(paths: Sequence[Path], size: int) -> tuple[list[np.ndarray], int]:
    """Decode background photos (long side at most ``2 * size``); undecodable ones are
    logged and skipped. Returns the photos and the number of failures."""
    photos, failed = [], 0
    for p in paths:
        try:
            photos.append(decode_image(p, max_side=2 * size, draft=(2 * size, 2 * size)))
        except (ImageDecodeError, OSError) as exc:
            failed += 1
            logger.warning("skipping background photo %s: %s", p, exc)
    if paths and not photos:
        logger.warning("none of the %d background photos decodes; all backgrounds will be "
                       "procedural", len(paths))
    return photos, failed


def synthesize_scenes(
    objects: Sequence[SceneObject],
    out: Path,
    *,
    scenes_per_object: float = 1.0,
    image_size: int = 128,
    seed: int = 0,
    backgrounds: Sequence[Path] = (),
    max_distractors: int = 3,
    crops_per_scene: int = 1,
    crop_jitter: float = 0.15,
    val_fraction: float = 0.0,
    workers: int = 1,
    progress: bool = False,
    photo_fraction: float = 0.8,
    occlusion: float = 0.35,
    min_visible: float = 0.25,
    runner: Any = None,
) -> SceneSet:
    """Write a copy-paste detection set and query-domain crops of ``objects``.

    Scene ``i``'s main object is ``objects[perm[i % n]]`` (``perm`` a seeded permutation),
    so every cut-out is the main object equally often (+-1); its distractors are 0 to
    ``max_distractors`` other cut-outs, of other SKUs when there are any. Scene ``i``'s
    generator is seeded from ``(seed, i)`` alone: ``workers > 1`` writes the same bytes.

    Files, all paths relative to ``out``::

        scenes/S000001.jpg ...   scenes, JPEG quality 35..90 (ids widen past 999999)
        train.json               COCO: file_name "scenes/S000001.jpg"; categories are the
                                 sorted set of the objects' categories, ids 1..C; bbox
                                 [x, y, w, h] of the VISIBLE extent (integers), area w * h,
                                 iscrowd 0, and extra fields "main" (bool), "sku", "visible"
        val.json                 the same for a random val_fraction of the scenes (> 0 only)
        crops/C000001.jpg ...    the main object's visible box moved like a detector's box
        crops.jsonl              catalog rows {"image": "crops/C000001.jpg", "sku",
                                 "category", "attributes": {"source": "scenes/S000001.jpg",
                                 "box": "x1,y1,x2,y2", "cutout": key}} (read_manifest reads
                                 it: unknown top-level fields are refused there)

    Args:
        objects: the cut-outs; every one is a main object about equally often.
        out: output folder (created).
        scenes_per_object: scenes = round(scenes_per_object * len(objects)).
        image_size: scene side in pixels (>= ``MIN_SIZE``); cut-outs are shrunk once to it.
        seed: the seed for everything.
        backgrounds: photo files; each scene uses a random crop of one with probability
            ``photo_fraction`` (else a procedural background). Undecodable files are logged
            and skipped; if none decodes, all backgrounds are procedural.
        max_distractors: at most this many distractors per scene (uniform 0..max).
        crops_per_scene: crops of the main object per scene (0: no crops, no crops.jsonl).
        crop_jitter: each crop side moves by up to this fraction of the box width/height.
        val_fraction: fraction (0..1) of scenes in ``val.json``.
        workers: processes (``spawn``; callers need a ``__main__`` guard).
        progress: show a tqdm bar.
        photo_fraction: probability that a scene uses a background photo (when any).
        occlusion: probability of an occluder over the main object.
        min_visible: smallest visible fraction for an annotation.
        runner: a ``visearch.parallel`` runner (e.g. Ray Data) rendering the scenes instead
            of ``workers`` processes; the same bytes.

    Raises:
        ValueError: no objects, an argument out of range, or no scene to make.
    """
    if len(objects) == 0:
        raise ValueError("synthesize_scenes needs at least one SceneObject")
    for i, o in enumerate(objects):
        if not isinstance(o, SceneObject):
            raise ValueError(f"objects[{i}] is a {type(o).__name__}, expected a SceneObject")
    _check_size(image_size, "image_size")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    n = len(objects)
    n_scenes = round(scenes_per_object * n)
    if not math.isfinite(scenes_per_object) or n_scenes < 1:
        raise ValueError(f"scenes_per_object={scenes_per_object} gives no scene for {n} "
                         "objects; pass a positive number")
    checks = (
        (max_distractors >= 0, f"max_distractors must be >= 0, got {max_distractors}"),
        (crops_per_scene >= 0, f"crops_per_scene must be >= 0, got {crops_per_scene}"),
        (0.0 <= crop_jitter < 1.0, f"crop_jitter must be in [0, 1), got {crop_jitter}"),
        (0.0 <= val_fraction < 1.0, f"val_fraction must be in [0, 1), got {val_fraction}"),
        (workers >= 1, f"workers must be >= 1, got {workers}"),
        (0.0 <= photo_fraction <= 1.0, f"photo_fraction must be in 0..1, got {photo_fraction}"),
        (0.0 <= occlusion <= 1.0, f"occlusion must be in 0..1, got {occlusion}"),
        (0.0 <= min_visible <= 1.0, f"min_visible must be in 0..1, got {min_visible}"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(message)

    out = Path(out)
    (out / "scenes").mkdir(parents=True, exist_ok=True)
    if crops_per_scene:
        (out / "crops").mkdir(parents=True, exist_ok=True)
    categories = sorted({o.category for o in objects})
    cat_id = {c: i + 1 for i, c in enumerate(categories)}
    photos, failed = _load_photos([Path(p) for p in backgrounds], image_size)
    cutouts = [_shrink_rgba(o.rgba, image_size) for o in objects]

    plan = np.random.default_rng([seed, _KIND_PLAN])
    perm = plan.permutation(n)
    n_val = round(val_fraction * n_scenes)
    is_val = np.zeros(n_scenes, bool)
    is_val[plan.choice(n_scenes, size=n_val, replace=False)] = True
    jobs = [_SceneJob(i, int(perm[i % n])) for i in range(n_scenes)]
    renderer = _SceneRenderer(
        cutouts=cutouts, skus=[o.sku for o in objects], photos=photos, seed=seed,
        size=image_size, max_distractors=max_distractors, crops_per_scene=crops_per_scene,
        crop_jitter=crop_jitter, photo_fraction=photo_fraction, occlusion=occlusion,
        min_visible=min_visible,
    )

    width = max(6, len(str(n_scenes)))
    crop_width = max(6, len(str(n_scenes * crops_per_scene)))
    splits: dict[str, dict[str, list]] = {"train": {"images": [], "annotations": []},
                                          "val": {"images": [], "annotations": []}}
    rows: list[dict[str, Any]] = []
    without_main = 0
    n_ann = 0
    for i, data, anns, crops in _run(jobs, renderer, workers, progress, runner):
        name = f"scenes/S{i + 1:0{width}d}.jpg"
        (out / name).write_bytes(data)
        split = splits["val" if is_val[i] else "train"]
        split["images"].append({"id": i + 1, "file_name": name, "width": image_size,
                                "height": image_size})
        if not (anns and anns[0].main):
            without_main += 1
        for obj, (x1, y1, x2, y2), visible, is_main in anns:
            n_ann += 1
            split["annotations"].append({
                "id": n_ann, "image_id": i + 1, "category_id": cat_id[objects[obj].category],
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                "iscrowd": 0, "main": is_main, "sku": objects[obj].sku,
                "visible": round(visible, 4),
            })
        main_obj = objects[jobs[i].main]
        for data_c, box in crops:
            crop_name = f"crops/C{len(rows) + 1:0{crop_width}d}.jpg"
            (out / crop_name).write_bytes(data_c)
            rows.append({"image": crop_name, "sku": main_obj.sku,
                         "category": main_obj.category,
                         "attributes": {"source": name, "box": ",".join(map(str, box)),
                                        "cutout": main_obj.key}})

    cats = [{"id": cat_id[c], "name": c, "supercategory": "product"} for c in categories]
    info = {"description": "visearch copy-paste scenes", "seed": seed,
            "image_size": image_size}
    cocos = {k: {"info": info, "images": v["images"], "annotations": v["annotations"],
                 "categories": cats} for k, v in splits.items()}
    # as visearch.detection.data.write_coco writes it; not imported, so spawned workers skip torch
    atomic_write_text(out / "train.json", json.dumps(cocos["train"]))
    if val_fraction > 0:
        atomic_write_text(out / "val.json", json.dumps(cocos["val"]))
    crops_path = None
    if crops_per_scene:
        crops_path = out / "crops.jsonl"
        atomic_write_text(crops_path, "".join(json.dumps(r) + "\n" for r in rows))
    counts = {"scenes": n_scenes, "train_images": len(cocos["train"]["images"]),
              "val_images": len(cocos["val"]["images"]), "annotations": n_ann,
              "crops": len(rows), "scenes_without_main": without_main, "objects": n,
              "backgrounds": len(photos), "background_failures": failed}
    if without_main:
        logger.warning("%d of %d scenes lost their main object (covered or too small)",
                       without_main, n_scenes)
    logger.info("copy-paste scenes in %s: %s", out, counts)
    return SceneSet(coco=cocos["train"], coco_path=out / "train.json", crops_path=crops_path,
                    counts=counts)


def collapse_categories(coco: dict, name: str = "product") -> dict:
    """A copy of ``coco`` with every annotation in one category ``name`` (id 1), for a
    class-agnostic detector. Boxes and all other fields are kept."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key) if isinstance(coco, dict) else None, list):
            raise ValueError(f"not a COCO detection dict (no {key!r} list)")
    if not name:
        raise ValueError("the category name must be non-empty")
    out = copy.deepcopy(coco)
    out["categories"] = [{"id": 1, "name": name, "supercategory": name}]
    for ann in out["annotations"]:
        ann["category_id"] = 1
    return out


#: The category of every object but the photographed one in :func:`main_categories`.
OTHER_LABEL = "other"


def main_categories(coco: dict) -> dict:
    """A copy of ``coco`` with two categories: ``MAIN_LABEL`` (id 1; the detector's
    ``select_main_object`` ranks boxes of that label first) for annotations marked
    ``"main": true`` and ``OTHER_LABEL`` (id 2) for the rest, so that a detector learns
    which object the photo is of (its size, place and visibility among the others) instead
    of a hand-set rule. Boxes and all other fields are kept.

    Raises:
        ValueError: ``coco`` is not a detection dict, or no annotation carries a ``main``
            field (annotations made by :func:`synthesize_scenes` do).
    """
    # imported here: the scene workers never load torch
    from visearch.detection.main_object import MAIN_LABEL

    out = collapse_categories(coco, OTHER_LABEL)
    if out["annotations"] and not any("main" in a for a in out["annotations"]):
        raise ValueError("no annotation marks its main object ('main' field); scenes made "
                         "by synthesize_scenes do, given COCO files usually do not")
    out["categories"] = [{"id": 1, "name": MAIN_LABEL, "supercategory": "product"},
                         {"id": 2, "name": OTHER_LABEL, "supercategory": "product"}]
    for ann in out["annotations"]:
        ann["category_id"] = 1 if ann.get("main") else 2
    return out
