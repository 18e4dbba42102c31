"""Product cut-outs from user photos (cluttered background) given the product's box, and
:func:`cut_out_product`, the one entry point for shop images and user photos alike.

A user photo has no plain backdrop to subtract: the background is clutter, other products,
a hand over an edge, under perspective, colour casts, blur and strong JPEG. What it has is
the product's box (given by the caller, or the detector's main object):

1. The box is validated (``"bad_bbox"``) and the work is done on a crop around it with a
   margin (the pixels just outside the box are the background's colour sample), scaled so
   that its longer side is at most ``work_side`` pixels (photos of any size cost the same).
2. OpenCV's ``cv2.grabCut``, initialised with the rectangle: outside it sure background,
   inside it probable foreground, colour GMMs and a graph cut decide.
3. The mask is cleaned (the largest part and the parts near it; small holes filled).
4. pymatting's closed-form matting (``estimate_alpha_cf``) over an unknown band around the
   mask's edge gives the soft alpha, ``estimate_foreground_ml`` the un-mixed edge colours;
   the alpha is scaled back to the photo's resolution.

``quality`` in [0, 1] ranks photo cut-outs (see :func:`_photo_quality`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import cv2
import numpy as np

from visearch.imageio import MAX_PIXELS
from visearch.scenes.cutout import (
    Cutout,
    _check_bbox,
    _check_image,
    _fail,
    _finish,
    _soft_alpha,
    cut_out,
)

logger = logging.getLogger(__name__)


def _check_size(image: np.ndarray, max_pixels: int) -> None:
    h, w = image.shape[:2]
    if h * w > max_pixels:
        raise ValueError(f"image is {w} x {h} = {w * h} pixels, above max_pixels={max_pixels} "
                         "(the limit load_rgba applies); downscale it first")


def _photo_quality(mask: np.ndarray, rect: tuple[int, int, int, int]) -> float:
    """How much to trust a photo cut-out: the product of box fill (the mask reaches each
    side of the box: a true product box is tight) and mask coverage of the box (a product
    fills a good part of its own box)."""
    x1, y1, x2, y2 = rect
    inner = mask[y1:y2, x1:x2]
    if not inner.any():
        return 0.0
    touches = [inner[:, 0].any(), inner[:, -1].any(), inner[0].any(), inner[-1].any()]
    fill = float(inner.mean())
    return float(np.mean(touches)) * min(1.0, fill / 0.35)


def cut_out_photo(
    image: np.ndarray,
    bbox: Sequence[float],
    *,
    work_side: int = 320,
    margin: float = 0.15,
    iterations: int = 5,
    matting_radius: int = 2,
    max_pixels: int = MAX_PIXELS,
    min_pixels: int = 64,
) -> Cutout:
    """Cut the product in ``bbox`` out of a user photo (cluttered background).

    Args:
        image: ``uint8 [H, W, 3]`` RGB or ``[H, W, 4]`` RGBA (alpha ignored).
        bbox: ``(x1, y1, x2, y2)`` of the product in pixels (x2/y2 exclusive); clipped to
            the image; nothing outside it is product.
        work_side: the crop around the box is scaled so its longer side is at most this
            many pixels for the segmentation and the matting.
        margin: share of the box's size added on each side of it as background sample.
        iterations: grabCut iterations.
        matting_radius: half-width in pixels (at the working scale) of the matting's
            unknown band around the segmentation's edge.
        max_pixels: images above this many pixels are refused (``load_rgba``'s limit).
        min_pixels: a product of fewer pixels (at the photo's scale) is ``"too_small"``.

    Returns:
        A :class:`Cutout`: ``rgba`` cropped to the tight box of alpha >= 128, in the
        photo's pixels; ``"bad_bbox"`` with a reason for an unusable box.

    Raises:
        TypeError, ValueError: ``image`` is not a uint8 ``[H, W, 3|4]`` array or is above
            ``max_pixels``; ``bbox`` is not a sequence of numbers.
    """
    rgb, _ = _check_image(image)
    _check_size(rgb, max_pixels)
    if work_side < 16 or iterations < 1 or matting_radius < 1 or margin < 0:
        raise ValueError("work_side >= 16, iterations >= 1, matting_radius >= 1 and "
                         f"margin >= 0 are required, got {work_side}, {iterations}, "
                         f"{matting_radius}, {margin}")
    h, w = rgb.shape[:2]
    box = _check_bbox(bbox, w, h, min_overlap=min(3, w, h))
    if isinstance(box, str):
        return _fail("bad_bbox", box)
    bx1, by1, bx2, by2 = box
    pad = int(round(margin * max(bx2 - bx1, by2 - by1))) + 2
    cx1, cy1 = max(0, bx1 - pad), max(0, by1 - pad)
    cx2, cy2 = min(w, bx2 + pad), min(h, by2 + pad)
    crop = rgb[cy1:cy2, cx1:cx2]
    scale = min(1.0, work_side / max(cx2 - cx1, cy2 - cy1))
    if scale < 1.0:
        size = (max(1, round((cx2 - cx1) * scale)), max(1, round((cy2 - cy1) * scale)))
        work = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
    else:
        work = np.ascontiguousarray(crop)
    wh, ww = work.shape[:2]
    sx, sy = ww / (cx2 - cx1), wh / (cy2 - cy1)
    rx1, ry1 = int(np.floor((bx1 - cx1) * sx)), int(np.floor((by1 - cy1) * sy))
    rx2, ry2 = int(np.ceil((bx2 - cx1) * sx)), int(np.ceil((by2 - cy1) * sy))
    rx2, ry2 = max(rx2, rx1 + 2), max(ry2, ry1 + 2)
    gc = np.zeros((wh, ww), np.uint8)
    bgd = np.zeros((1, 65), np.float64)
    fgd = np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(work, gc, (rx1, ry1, rx2 - rx1, ry2 - ry1), bgd, fgd, iterations,
                    cv2.GC_INIT_WITH_RECT)
        mask = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
    except cv2.error as exc:  # a box covering the whole crop: no background sample
        logger.debug("grabCut failed (%s); using the box", exc)
        mask = np.zeros((wh, ww), bool)
        mask[ry1:ry2, rx1:rx2] = True
    if not mask.any():
        return _fail("empty", "the segmentation kept no foreground in the box: nothing to "
                              "cut out; check the box")
    quality = _photo_quality(mask, (rx1, ry1, rx2, ry2))
    alpha_w, colours_w = _soft_alpha(work, mask, matting_radius=matting_radius)
    inside = np.zeros((wh, ww), bool)
    inside[ry1:ry2, rx1:rx2] = True
    alpha_w[~inside] = 0
    alpha = np.zeros((h, w), np.uint8)
    colours = rgb.copy()
    if scale < 1.0:
        full = (cx2 - cx1, cy2 - cy1)
        alpha[cy1:cy2, cx1:cx2] = cv2.resize(alpha_w, full, interpolation=cv2.INTER_LINEAR)
    else:
        alpha[cy1:cy2, cx1:cx2] = alpha_w
        colours[cy1:cy2, cx1:cx2] = colours_w
    alpha[:by1] = 0
    alpha[by2:] = 0
    alpha[:, :bx1] = 0
    alpha[:, bx2:] = 0
    return _finish(colours, alpha, quality, min_area=0.0, min_pixels=min_pixels)


def cut_out_product(
    image: np.ndarray, bbox: tuple[float, float, float, float] | None = None
) -> Cutout:
    """Cut the product out of a shop image or a user photo; the one entry point.

    - An RGBA image with real transparency, or an image whose background (its border, or
      everything outside ``bbox``) is plain: :func:`visearch.scenes.cut_out` with
      ``refine="matting"`` (the shop-image path).
    - A cluttered background with ``bbox``: :func:`cut_out_photo` (the user-photo path).
    - A cluttered background without ``bbox``: status ``"needs_bbox"``: pass the
      product's box (the server passes the detector's main object).

    Args:
        image: ``uint8 [H, W, 3]`` RGB or ``[H, W, 4]`` RGBA (straight alpha), at most
            ``MAX_PIXELS`` pixels (the limit of :func:`visearch.scenes.load_rgba`).
        bbox: ``(x1, y1, x2, y2)`` of the product in pixels, x2/y2 exclusive; or None.

    Returns:
        A :class:`Cutout` (alpha always refined with pymatting, except an image's own
        alpha); a bad box gives ``"bad_bbox"`` with a reason.

    Raises:
        TypeError, ValueError: ``image`` is not a uint8 ``[H, W, 3|4]`` array or has more
            than ``MAX_PIXELS`` pixels; ``bbox`` is not a sequence of numbers.
    """
    _check_image(image)
    _check_size(image, MAX_PIXELS)
    shop = cut_out(image, bbox, refine="matting")
    if shop.status != "not_plain":
        return shop
    if bbox is None:
        return _fail("needs_bbox", f"{shop.reason}. A cluttered photo needs the product's "
                                   "box: pass bbox (the detector's main object)")
    return cut_out_photo(image, bbox)
