"""Product cut-outs from shop images: an RGBA image of the product alone, or a status saying
why not.

Shop images mostly show one product on a plain or near-plain background, so the background
is estimated from the image's border and the product is what differs from it:

1. An RGBA image with real transparency (some alpha < 255) already is a cut-out: its own
   alpha is used as is (straight, exact; zeroed outside a given bbox). Fully transparent
   -> ``"transparent"``. No matting.
2. A given ``bbox`` is validated (``"bad_bbox"``) and clipped to the image; everything
   outside it is background.
3. The background colour is the median of a band ``border`` pixels wide around the frame
   (with a ``bbox``: of every pixel outside it), its noise the spread of those pixels'
   colour distances to that median (distances in YCbCr, JPEG's own space). A border that is
   not plain (a median distance above ``max_spread``, or more than ``max_outliers`` of it
   far from the median) gives ``"not_plain"``: no guessing.
4. A trimap: pixels far from the background colour (above ``t_fg``, 3x the border's own
   noise, at least 30) are sure foreground; background-like pixels (below ``t_bg``)
   connected to the frame, and cast shadows (a darker copy of the background colour, a
   wide blob in the lower half lying against the background) are sure background; the rest
   is unknown. Holes inside the foreground seeds (a white logo on a shoe) are probable
   foreground, unless they are large, empty and of the background colour (the background
   seen through a mug's handle): those are background.
5. ``refine="grabcut"`` (default): OpenCV's ``cv2.grabCut`` initialised with that trimap
   decides the unknown pixels (hard alpha). ``refine="matting"`` follows it with pymatting's
   closed-form matting (``estimate_alpha_cf``) over a band around the grabCut edge, and
   ``estimate_foreground_ml`` for the straight (un-mixed) colours of the soft edge pixels.
6. The mask is cleaned (parts smaller than ``min_part`` of the largest are dropped, a 3x3
   close, holes below ``max_hole`` of the product filled); nothing left -> ``"empty"``,
   less than ``min_area`` of the image or ``min_pixels`` -> ``"too_small"``.

Only the trimap (steps 3-4 and the hole rule) is written here, because no library builds a
trimap from a border estimate; the segmentation is OpenCV's grabCut and the matting is
pymatting's. Products cut by the frame (close-ups) are cut out when the rest of the border
is plain, with a lower ``quality``; a product that fills the frame gives ``"not_plain"``
with a bbox (no background outside it), but without one its uniform body can pass for a
backdrop and give a wrong cut-out of a detail: rank by ``quality``, prefer rows with a bbox.

``quality`` in [0, 1] is the product of four factors, each 1 for an easy image: contrast
(the share of the mask's edge pixels, off the frame, more than ``t_fg`` from the background
colour: low where the product fades into the backdrop), agreement (IoU of the trimap's
foreground, sure plus probable, with the final mask: low when grabCut had to move much),
plainness (``1 - spread / max_spread`` of the border) and framing (1 minus the share of
the mask's edge lying on the image frame: a product cut by the frame is incomplete).
On the synthetic world (``benchmarks/bench_cutout.py``, 200 SKUs, 128 px) it ranks mask IoU
with Spearman rho ~0.5 (IoU varies little among good cut-outs). Of 1,467 ok cut-outs (with
and without bbox) the 7 wrong close-ups (IoU < 0.7) score 0.0-0.6, and 98.8 % of those
scoring >= 0.5 have IoU >= 0.9; what it cannot see is a near-white part on a near-white
backdrop left out (IoU ~0.73 at quality 0.8-0.9): that colour difference is not in the image.

Speed (``benchmarks/bench_cutout.py`` and a ``cut_out_file`` loop over a catalog, one
process on a shared 2-core x86 machine): grabCut ~7 ms per 128 px image and ~5 ms per 96 px
image (decode excluded); with decoding, 1,500 catalog rows take ~12 s at 128 px and ~7.5 s
at 96 px on one core. Matting: ~12 ms per 128 px image, plus a one-time numba load of
~1 s (longer on the very first run, then cached). Mask IoU against the drawn masks in the
same benchmark (plain-background images): mean 0.986 at 128 px and 0.981 at 96 px, against
0.92 for a plain colour threshold.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from visearch.errors import ImageDecodeError
from visearch.imageio import MAX_PIXELS, ImageSource, decode_image

logger = logging.getLogger(__name__)

#: ``"needs_bbox"``: a cluttered photo given without the product's box
#: (:func:`visearch.scenes.cut_out_product` only).
CUTOUT_STATUSES = ("ok", "decode_error", "bad_bbox", "empty", "transparent", "not_plain",
                   "too_small", "needs_bbox")

#: RGB -> (Y, Cb - 128, Cr - 128), ITU-R BT.601 as JPEG uses it.
_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                np.float32)


@dataclass(frozen=True)
class Cutout:
    """The result of one cut-out.

    Attributes:
        status: one of :data:`CUTOUT_STATUSES`; ``"ok"`` when ``rgba`` is set. (This
            dataclass also carries the user-photo cut-outs of
            :mod:`visearch.scenes.photo_cutout`.)
        reason: what was wrong and what to do about it; ``""`` when ok.
        rgba: ``uint8 [h, w, 4]``, the product cropped to ``box``: straight (not
            premultiplied) RGB, alpha 0..255 (255 = product). RGB under alpha 0 is the
            source's (no dark fringe when resized). None unless ok.
        box: ``(x1, y1, x2, y2)``, the tight box of alpha >= 128 in source image pixels,
            x2/y2 exclusive. None unless ok.
        quality: in [0, 1], how much to trust the cut-out (see the module docstring);
            1.0 for an image's own alpha; 0.0 unless ok.
    """

    status: str
    reason: str
    rgba: np.ndarray | None = None
    box: tuple[int, int, int, int] | None = None
    quality: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in CUTOUT_STATUSES:
            raise ValueError(f"status must be one of {CUTOUT_STATUSES}, got {self.status!r}")
        if (self.status == "ok") != (self.rgba is not None and self.box is not None):
            raise ValueError("rgba and box are set exactly when status is 'ok'")

    @property
    def ok(self) -> bool:
        """True when the cut-out succeeded (``status == "ok"``)."""
        return self.status == "ok"


def _fail(status: str, reason: str) -> Cutout:
    return Cutout(status=status, reason=reason)


# ---- decoding ------------------------------------------------------------------------------


def load_rgba(src: ImageSource, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode ``src`` keeping its transparency.

    Same validation, errors and EXIF orientation as :func:`visearch.imageio.decode_image`,
    but an image with an alpha channel (RGBA, LA, PA, or a palette with transparency: the
    images ``decode_image`` composites on white) is returned as straight ``uint8 [H, W, 4]``;
    every other image as RGB ``uint8 [H, W, 3]``, exactly as ``decode_image`` returns it.

    Raises:
        ImageDecodeError: empty, unreadable, truncated, not an image, unsupported mode,
            more than ``max_pixels`` pixels or a side above ``MAX_INPUT_SIDE``.
        TypeError: ``src`` is neither bytes nor a path.
    """
    return decode_image(src, max_pixels=max_pixels, keep_alpha=True)


# ---- input checks --------------------------------------------------------------------------


def _check_image(image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``(rgb uint8 [H, W, 3], alpha uint8 [H, W] or None)``; raises on a caller error."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(
            f"image must be uint8 (0..255), got {image.dtype}; convert floats in [0, 1] "
            "with (image * 255).round().astype(np.uint8)"
        )
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(
            f"image must be [H, W, 3] RGB or [H, W, 4] RGBA, got shape {image.shape}; "
            "expand a grey image with np.repeat(image[..., None], 3, axis=2)"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image has no pixels: shape {image.shape}")
    rgb = np.ascontiguousarray(image[..., :3])
    alpha = np.ascontiguousarray(image[..., 3]) if image.shape[2] == 4 else None
    return rgb, alpha


def _check_bbox(
    bbox: Sequence[float], width: int, height: int, min_overlap: int
) -> tuple[int, int, int, int] | str:
    """The bbox as integer pixels clipped to the image, or the reason it is unusable."""
    try:
        values = [float(v) for v in bbox]
    except (TypeError, ValueError) as exc:
        raise TypeError(f"bbox must be a sequence of 4 numbers (x1, y1, x2, y2), got {bbox!r}") \
            from exc
    size = f"the image is {width} x {height}"
    if len(values) != 4:
        return f"bbox {tuple(bbox)} has {len(values)} numbers, not 4 (x1, y1, x2, y2)"
    x1, y1, x2, y2 = values
    if not all(math.isfinite(v) for v in values):
        return f"bbox {tuple(values)} has non-finite coordinates; {size}"
    if not (x1 < x2 and y1 < y2):
        return f"bbox {tuple(values)} is empty or inverted (needs x1 < x2 and y1 < y2); {size}"
    ix1, iy1 = max(0, math.floor(x1)), max(0, math.floor(y1))
    ix2, iy2 = min(width, math.ceil(x2)), min(height, math.ceil(y2))
    if ix2 - ix1 < min_overlap or iy2 - iy1 < min_overlap:
        return (f"bbox {tuple(values)} overlaps the image by less than {min_overlap} pixels "
                f"each way; {size}: check the box's units (pixels) and image")
    return ix1, iy1, ix2, iy2


# ---- background and trimap (hand-written: no library estimates these from a border) -------


@dataclass(frozen=True)
class _Background:
    color: np.ndarray  # float32 [3], median border colour
    spread: float  # median colour distance of the border pixels to ``color``
    outliers: float  # share of border pixels far from ``color``
    t_bg: float  # colour distance up to which a pixel looks like background
    t_fg: float  # colour distance above which a pixel is sure foreground


def _distance(pixels: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Colour distance of ``pixels`` (float32 ``[..., 3]`` RGB) to ``color`` (``[3]``):
    Euclidean in YCbCr, JPEG's own space, so a grey step of 10 counts 10 and hue changes
    (which JPEG stores at half resolution, hence noisier) count less than in RGB."""
    return np.linalg.norm((pixels - color) @ _YCC.T, axis=-1)


def _background(pixels: np.ndarray) -> _Background:
    """Robust colour and noise of ``pixels`` (float32 ``[N, 3]``, the border sample)."""
    color = np.median(pixels, axis=0).astype(np.float32)
    d = _distance(pixels, color)
    spread = float(np.median(d))
    # Far = beyond what JPEG noise and gentle shading do to a flat backdrop.
    tol = max(12.0, 4.0 * spread)
    inliers = d[d <= tol]
    outliers = 1.0 - inliers.size / max(1, d.size)
    noise = float(np.percentile(inliers, 95)) if inliers.size else tol
    t_bg = max(6.0, 1.5 * noise)
    return _Background(color=color, spread=spread, outliers=outliers, t_bg=t_bg,
                       t_fg=max(30.0, 3.0 * t_bg))


def plain_border(image: np.ndarray, *, border: int = 3, max_spread: float = 8.0,
                 max_outliers: float = 0.35) -> bool:
    """Whether the ``border`` px frame band of ``image`` (``uint8 [H, W, 3|4]``) is a plain
    backdrop by :func:`cut_out`'s test without a bbox (same defaults): a median colour
    distance to the band's median colour of at most ``max_spread``, and at most
    ``max_outliers`` of the band far from it. An image too small for the band: False."""
    rgb, _ = _check_image(image)
    h, w = rgb.shape[:2]
    if min(h, w) < 2 * border + 3:
        return False
    band = np.ones((h, w), bool)
    band[border:h - border, border:w - border] = False
    bg = _background(rgb[band].astype(np.float32))
    return bg.spread <= max_spread and bg.outliers <= max_outliers


def _frame_connected(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` (bool) 4-connected to the image frame through ``mask``."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)
    if n <= 1:
        return np.zeros_like(mask)
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    keep = np.zeros(n, bool)
    keep[np.unique(edge)] = True
    keep[0] = False
    return keep[labels]


def _holes(fg: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Holes of ``fg`` (bool): ``(n, labels int32 [H, W] (0 = no hole), areas int [n])``.

    A hole is a 4-connected region of non-foreground not reaching the frame (the dual of
    an 8-connected foreground, so a diagonal gap in an outline does not leak).
    """
    holes = ~fg & ~_frame_connected(~fg)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(holes.astype(np.uint8),
                                                           connectivity=4)
    return n, labels, stats[:, cv2.CC_STAT_AREA]


def _fill_small_holes(mask: np.ndarray, max_fraction: float) -> np.ndarray:
    """``mask`` with its holes smaller than ``max_fraction`` of its area filled."""
    n, labels, areas = _holes(mask)
    if n <= 1:
        return mask
    small = areas < max_fraction * max(1, int(mask.sum()))
    small[0] = False
    return mask | small[labels]


def _shadows(shadow_color: np.ndarray, strong: np.ndarray, backdrop: np.ndarray) -> np.ndarray:
    """The cast shadows among the shadow-coloured pixels (all bool ``[H, W]``).

    A shadow is a blob of shadow colour that lies against the backdrop (the frame-connected
    background) itself, not behind a product outline (pixels next to a strongly different
    pixel do not count: they are an outline's JPEG halo), that is at least as wide as tall
    and whose centre is in the lower half of the product (a floor shadow). A grey lamp pole
    (tall), a white handle (high, thin) or a white sole (behind its outline) are not.
    """
    if not shadow_color.any() or not strong.any():
        return np.zeros_like(shadow_color)
    k3 = np.ones((3, 3), np.uint8)
    blobs = (shadow_color & ~(cv2.dilate(strong.astype(np.uint8), k3) > 0)).astype(np.uint8)
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(blobs, connectivity=8)
    if n <= 1:
        return np.zeros_like(shadow_color)
    touching = (cv2.dilate(backdrop.astype(np.uint8), k3) > 0) & (blobs > 0)
    keep = np.zeros(n, bool)
    keep[np.unique(labels[touching])] = True
    ys = np.nonzero(strong.any(axis=1))[0]
    middle = (ys[0] + ys[-1]) / 2.0
    keep &= stats[:, cv2.CC_STAT_WIDTH] >= stats[:, cv2.CC_STAT_HEIGHT]
    keep &= centroids[:, 1] >= middle
    keep[0] = False
    return keep[labels]


def _trimap(
    rgb: np.ndarray,
    bg: _Background,
    inside: np.ndarray | None,
    *,
    shadow_floor: float,
    max_hole: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The grabCut mask (``uint8 [H, W]`` of ``cv2.GC_*``) and the colour distance to the
    background (float32 ``[H, W]``). ``inside``: bool mask of the bbox, or None."""
    img = rgb.astype(np.float32)
    d = _distance(img, bg.color)
    bg_like = d <= bg.t_bg
    # A cast shadow is the backdrop's colour scaled down: luma between shadow_floor and 1
    # times the background's, chroma the background's scaled alike. Chroma gets a looser
    # tolerance: JPEG halves its resolution, so a product's colour bleeds 1-2 px into the
    # shadow next to it. Grey and white product parts have a shadow's colour too; _shadows
    # keeps what also has a shadow's place and shape.
    ycc = img @ _YCC.T  # Y, Cb - 128, Cr - 128
    bg_ycc = _YCC @ bg.color
    if shadow_floor < 1.0 and bg_ycc[0] > 30.0:
        k = ycc[..., 0] / bg_ycc[0]
        chroma = np.linalg.norm(ycc[..., 1:] - k[..., None] * bg_ycc[1:], axis=2)
        shadow_color = ~bg_like & (k >= shadow_floor) & (k < 1.0) & \
            (chroma <= max(12.0, 2.0 * bg.t_bg))
    else:
        shadow_color = np.zeros_like(bg_like)
    backdrop = _frame_connected(bg_like)
    strong = (d > bg.t_fg) & ~shadow_color
    shadow = _shadows(shadow_color, strong, backdrop)
    seeds = strong.copy()
    if inside is not None:
        seeds &= inside
    gc = np.full(d.shape, cv2.GC_PR_BGD, np.uint8)
    gc[~bg_like & ~shadow] = cv2.GC_PR_FGD
    gc[backdrop] = cv2.GC_BGD
    gc[shadow] = cv2.GC_BGD
    gc[seeds] = cv2.GC_FGD
    n, labels, areas = _holes(seeds)
    if n > 1:
        # A white logo on a shoe is a hole of the seeds: probable foreground. The background
        # seen through a handle is a large, empty hole of the background's colour (a white
        # watch dial has hands inside it: islands of seeds).
        filled = int(seeds.sum() + areas[1:].sum())
        kind = np.full(n, cv2.GC_PR_FGD, np.uint8)
        large = areas >= max(2.0, max_hole * filled)
        large[0] = False
        for i in np.nonzero(large)[0]:
            region = labels == i
            if np.median(d[region]) <= bg.t_bg and _holes(region)[0] <= 1:
                kind[i] = cv2.GC_BGD
        hole = labels > 0
        gc[hole] = kind[labels[hole]]
    if inside is not None:
        gc[~inside] = cv2.GC_BGD
    return gc, d


# ---- refiners (OpenCV grabCut, pymatting closed-form matting) ------------------------------


def _grabcut(rgb: np.ndarray, gc: np.ndarray, iterations: int, margin: int = 8) -> np.ndarray:
    """Run ``cv2.grabCut`` initialised with the trimap ``gc`` on the region around the
    undecided pixels; returns the foreground (bool ``[H, W]``)."""
    undecided = gc != cv2.GC_BGD
    fg = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
    ys, xs = np.nonzero(undecided)
    if ys.size == 0:
        return fg
    h, w = gc.shape
    y1, y2 = max(0, ys.min() - margin), min(h, ys.max() + 1 + margin)
    x1, x2 = max(0, xs.min() - margin), min(w, xs.max() + 1 + margin)
    sub = np.ascontiguousarray(gc[y1:y2, x1:x2])
    has_bg = bool(((sub == cv2.GC_BGD) | (sub == cv2.GC_PR_BGD)).any())
    has_fg = bool(((sub == cv2.GC_FGD) | (sub == cv2.GC_PR_FGD)).any())
    if not (has_bg and has_fg):
        return fg  # grabCut needs samples of both to fit its colour models
    bgd = np.zeros((1, 65), np.float64)
    fgd = np.zeros((1, 65), np.float64)
    # grabCut seeds its k-means from OpenCV's global generator: seed it, or the same image
    # can give another cut-out depending on what ran before.
    cv2.setRNGSeed(0)
    try:
        cv2.grabCut(np.ascontiguousarray(rgb[y1:y2, x1:x2]), sub, None, bgd, fgd,
                    iterations, cv2.GC_INIT_WITH_MASK)
    except cv2.error as exc:  # e.g. a colour model that cannot be fitted (too few pixels)
        logger.debug("grabCut failed (%s); keeping the trimap", exc)
        return fg
    out = np.zeros_like(fg)
    out[y1:y2, x1:x2] = (sub == cv2.GC_FGD) | (sub == cv2.GC_PR_FGD)
    return out


def _hard_alpha(rgb: np.ndarray, mask: np.ndarray, *, matting_radius: int) -> tuple[
        np.ndarray, np.ndarray]:
    """``refine="grabcut"``: the mask itself as alpha (0 or 255), the source colours."""
    return mask.astype(np.uint8) * 255, rgb


def _soft_alpha(rgb: np.ndarray, mask: np.ndarray, *, matting_radius: int) -> tuple[
        np.ndarray, np.ndarray]:
    """``refine="matting"``: pymatting's closed-form alpha over a band ``matting_radius``
    pixels either side of the edge of ``mask``, and its ``estimate_foreground_ml`` colours
    (the product's own colour under a soft edge, not mixed with the background's)."""
    import numba  # pymatting's dependency
    import pymatting  # here: its numba compilation is paid only by who asks for matting

    radius = matting_radius
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    m8 = mask.astype(np.uint8)
    sure_fg = cv2.erode(m8, kernel, borderType=cv2.BORDER_REPLICATE) > 0
    maybe = cv2.dilate(m8, kernel) > 0
    h, w = mask.shape
    ys, xs = np.nonzero(maybe)
    pad = radius + 2
    y1, y2 = max(0, ys.min() - pad), min(h, ys.max() + 1 + pad)
    x1, x2 = max(0, xs.min() - pad), min(w, xs.max() + 1 + pad)
    trimap = np.where(sure_fg, 1.0, np.where(maybe, 0.5, 0.0))[y1:y2, x1:x2]
    alpha = mask.astype(np.float64)
    colours = rgb.copy()
    if (trimap == 0.5).any() and (trimap == 0.0).any() and (trimap == 1.0).any():
        image = rgb[y1:y2, x1:x2].astype(np.float64) / 255.0
        # One numba thread: on images this small its parallel regions cost far more than
        # they save (estimate_foreground_ml: 250 ms with 2 threads, 2 ms with 1, measured
        # on 2 cores). The setting is per calling thread, restored below. The Jacobi
        # preconditioner: the default incomplete Cholesky fails (and prints) on the
        # near-singular systems that flat backgrounds give.
        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            a = pymatting.estimate_alpha_cf(image, trimap, preconditioner=pymatting.jacobi)
            fg = pymatting.estimate_foreground_ml(image, a)
        finally:
            numba.set_num_threads(threads)
        alpha[y1:y2, x1:x2] = a
        sub = colours[y1:y2, x1:x2]
        soft = a > 0
        sub[soft] = np.clip(np.round(fg[soft] * 255.0), 0, 255).astype(np.uint8)
    return np.clip(np.round(alpha * 255.0), 0, 255).astype(np.uint8), colours


#: ``refine`` name -> how the alpha is made from grabCut's cleaned mask.
_ALPHA: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "grabcut": _hard_alpha,
    "matting": _soft_alpha,
}


# ---- the cut-out ---------------------------------------------------------------------------


def _clean(mask: np.ndarray, *, min_part: float, max_hole: float) -> np.ndarray:
    """Drop parts smaller than ``min_part`` of the largest (8-connected), close gaps of one
    pixel, fill holes smaller than ``max_hole`` of the product."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8),
                                                           connectivity=8)
    if n <= 1:
        return np.zeros_like(mask)
    areas = stats[:, cv2.CC_STAT_AREA].copy()
    areas[0] = 0
    keep = areas >= min_part * areas.max()
    keep[0] = False
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    closed = cv2.morphologyEx(keep[labels].astype(np.uint8), cv2.MORPH_CLOSE, kernel,
                              borderType=cv2.BORDER_REPLICATE) > 0
    return _fill_small_holes(closed, max_hole)


def _tight_box(alpha: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(alpha >= 128)
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _finish(rgb: np.ndarray, alpha: np.ndarray, quality: float, *, min_area: float,
            min_pixels: int) -> Cutout:
    """Check the size of ``alpha`` (uint8 ``[H, W]``) and crop the RGBA to its tight box."""
    h, w = alpha.shape
    box = _tight_box(alpha)
    if box is None:
        return _fail("empty", "no pixel is at least half opaque: nothing to cut out")
    area = int((alpha >= 128).sum())
    need = max(min_pixels, math.ceil(min_area * h * w))
    if area < need:
        return _fail("too_small", f"the product covers {area} pixels of {w} x {h}, fewer "
                                  f"than {need} (min_area={min_area}, min_pixels={min_pixels}); "
                                  "use a larger image or a tighter bbox")
    x1, y1, x2, y2 = box
    rgba = np.dstack([rgb[y1:y2, x1:x2], alpha[y1:y2, x1:x2]])
    return Cutout(status="ok", reason="", rgba=np.ascontiguousarray(rgba), box=box,
                  quality=float(min(1.0, max(0.0, quality))))


def _quality(mask: np.ndarray, d: np.ndarray, trimap_fg: np.ndarray, bg: _Background,
             *, max_spread: float) -> float:
    """The product of edge contrast, trimap agreement, border plainness and framing."""
    inner = mask & ~(cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8),
                               borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0)
    frame = np.zeros_like(mask)
    frame[0], frame[-1], frame[:, 0], frame[:, -1] = True, True, True, True
    edge = inner & ~frame
    contrast = float(np.mean(d[edge] > bg.t_fg)) if edge.any() else 0.0
    union = int((mask | trimap_fg).sum())
    agreement = float((mask & trimap_fg).sum()) / union if union else 0.0
    plain = max(0.0, 1.0 - bg.spread / max_spread)
    framing = 1.0 - float((inner & frame).sum()) / max(1, int(inner.sum()))
    return contrast * agreement * plain * framing


def cut_out(
    image: np.ndarray,
    bbox: Sequence[float] | None = None,
    *,
    refine: str = "grabcut",
    border: int = 3,
    iterations: int = 2,
    max_spread: float = 8.0,
    max_outliers: float = 0.35,
    shadow_floor: float = 0.6,
    max_hole: float = 0.03,
    min_part: float = 0.05,
    min_area: float = 0.01,
    min_pixels: int = 64,
    matting_radius: int = 1,
) -> Cutout:
    """Cut the product out of a shop image.

    Args:
        image: ``uint8 [H, W, 3]`` RGB, or ``[H, W, 4]`` RGBA (straight alpha). An RGBA image
            with some alpha < 255 is used as its own cut-out.
        bbox: optional ``(x1, y1, x2, y2)`` of the product in pixels (x2/y2 exclusive, as in
            the catalog); clipped to the image; pixels outside it are background.
        refine: ``"grabcut"`` (hard alpha 0/255, fast) or ``"matting"`` (grabCut, then
            closed-form matting: a soft edge and un-mixed edge colours, ~2x slower).
        border: width in pixels of the frame band that samples the background.
        iterations: grabCut iterations.
        max_spread: largest median colour distance (YCbCr, 0..255 per axis) of the border
            pixels to their median colour for the background to count as plain.
        max_outliers: largest share of border pixels far from that colour (the product
            may touch the frame) for the background to count as plain.
        shadow_floor: a cast shadow is the background colour with its luma times a factor
            in [shadow_floor, 1); such a blob lying against the background in the lower
            half of the product, at least as wide as tall, is background. 1.0 turns shadow
            handling off.
        max_hole: holes in the product smaller than this share of its area are filled
            (logos in the background's colour); larger, empty holes of the background's
            colour stay background (handles).
        min_part: parts smaller than this share of the largest part are dropped.
        min_area, min_pixels: a product covering less than ``min_area`` of the image or
            fewer than ``min_pixels`` pixels is ``"too_small"``.
        matting_radius: half-width in pixels of the unknown band of the matting trimap.

    Returns:
        A :class:`Cutout`. Bad image content never raises: it gives a status and a reason.

    Raises:
        TypeError, ValueError: ``image`` is not a uint8 ``[H, W, 3|4]`` array, ``bbox`` is
            not a sequence of numbers, ``refine`` or another argument is out of range.
    """
    rgb, alpha = _check_image(image)
    make_alpha = _ALPHA.get(refine)
    if make_alpha is None:
        raise ValueError(f"refine must be one of {sorted(_ALPHA)}, got {refine!r}")
    if border < 1 or iterations < 1 or matting_radius < 1:
        raise ValueError("border, iterations and matting_radius must be >= 1, got "
                         f"{border}, {iterations}, {matting_radius}")
    if not (0.0 < max_outliers <= 1.0 and max_spread > 0 and 0.0 <= max_hole <= 1.0
            and 0.0 <= min_part <= 1.0 and 0.0 <= min_area <= 1.0 and shadow_floor > 0.0):
        raise ValueError("max_outliers in (0, 1], max_spread > 0, shadow_floor > 0 and "
                         "max_hole, min_part, min_area in [0, 1] are required")
    h, w = rgb.shape[:2]
    inside = None
    if bbox is not None:
        box = _check_bbox(bbox, w, h, min_overlap=min(3, w, h))
        if isinstance(box, str):
            return _fail("bad_bbox", box)
        inside = np.zeros((h, w), bool)
        inside[box[1]:box[3], box[0]:box[2]] = True
    size_kw = {"min_area": min_area, "min_pixels": min_pixels}

    if alpha is not None and (alpha < 255).any():
        if int(alpha.max()) <= 2:
            return _fail("transparent", "fully transparent image: nothing to cut out")
        if inside is not None:
            alpha = np.where(inside, alpha, 0).astype(np.uint8)
        return _finish(rgb, alpha, 1.0, **size_kw)

    if min(h, w) < 2 * border + 3:
        return _fail("too_small", f"image is {w} x {h}: too small to tell a {border} px "
                                  "border from a product")
    if inside is None:
        band = np.ones((h, w), bool)
        band[border:h - border, border:w - border] = False
    else:
        band = ~cv2.dilate(inside.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    if band.sum() < 4 * min(h, w):
        return _fail("not_plain", f"the bbox leaves only {int(band.sum())} background pixels "
                                  f"of {w} x {h} to estimate the background from; nothing "
                                  "to tell the product from")
    bg = _background(rgb[band].astype(np.float32))
    where = "outside the bbox" if inside is not None else f"in the {border} px border"
    if bg.spread > max_spread:
        return _fail("not_plain", (
            f"background is not plain: the pixels {where} are a median distance of "
            f"{bg.spread:.1f} from their median colour {tuple(int(v) for v in bg.color)} "
            f"(max_spread={max_spread}): texture or clutter, not a backdrop; use another "
            "image of the product or a segmentation model"))
    if bg.outliers > max_outliers:
        return _fail("not_plain", (
            f"background is not plain: {bg.outliers:.0%} of the pixels {where} differ from "
            f"their median colour {tuple(int(v) for v in bg.color)} (max_outliers="
            f"{max_outliers}): the product or other objects fill the frame; pass the "
            "product's bbox or use another image"))

    gc, d = _trimap(rgb, bg, inside, shadow_floor=shadow_floor, max_hole=max_hole)
    if not (gc == cv2.GC_FGD).any():
        return _fail("empty", (
            f"no pixel differs from the background colour {tuple(int(v) for v in bg.color)} "
            f"by more than {bg.t_fg:.0f}: the image shows no product"))
    trimap_fg = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
    mask = _clean(_grabcut(rgb, gc.copy(), iterations), min_part=min_part, max_hole=max_hole)
    if inside is not None:
        mask &= inside
    if not mask.any():
        return _fail("empty", "the segmentation kept no foreground: nothing to cut out")
    quality = _quality(mask, d, trimap_fg, bg, max_spread=max_spread)
    alpha, colours = make_alpha(rgb, mask, matting_radius=matting_radius)
    if inside is not None:
        alpha[~inside] = 0
    return _finish(colours, alpha, quality, **size_kw)


def cut_out_file(
    path: ImageSource, bbox: Sequence[float] | None = None, **kwargs: object
) -> Cutout:
    """:func:`load_rgba` then :func:`cut_out` (``kwargs`` go to it); an unreadable or
    undecodable file gives status ``"decode_error"`` instead of raising. ``path`` may be
    any ``ImageSource`` (an image in the store: a damaged store raises)."""
    try:
        image = load_rgba(path)
    except ImageDecodeError as exc:
        return _fail("decode_error", f"{exc}; check or re-download the file")
    return cut_out(image, bbox, **kwargs)  # type: ignore[arg-type]
