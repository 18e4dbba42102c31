"""Product cut-outs from user photos (cluttered background) given the product's box, and
:func:`cut_out_product`, the one entry point for shop images and user photos alike.

A user photo has no plain backdrop to subtract: the background is clutter, other products,
a hand over an edge, under perspective, colour casts, blur and strong JPEG. What it has is
the product's box (given by the caller, or the detector's main object):

1. The box is validated (``"bad_bbox"``) and clipped to the image; the work is done on a
   crop around it with a margin of ``margin`` x its longer side (the pixels outside the
   box are the background's colour sample; 0.3 rather than 0.15: +0.04 mean IoU on seed
   7), scaled so that its longer side is at most ``work_side`` pixels.
2. An edge-preserving smoothing (``cv2.bilateralFilter``) for the segmentation only.
3. OpenCV's ``cv2.grabCut`` initialised with the rectangle (outside it sure background,
   inside probable foreground), then the tight-box prior by pinpointing (see
   :func:`_segment`): a product crosses every row and column of its own true box.
4. The mask is cleaned as the shop path does (specks dropped, small holes filled).
5. pymatting's closed-form matting (``estimate_alpha_cf``) over a band ``matting_radius``
   pixels either side of the mask's edge gives the soft alpha (not a threshold), and
   ``estimate_foreground_ml`` the un-mixed edge colours; the alpha is scaled back to the
   photo's pixels and is 0 outside the box.

Only the box prior's pinpointing and the quality score are written here (no library has
them); segmentation, smoothing and matting are OpenCV's and pymatting's. ``cv2.grabCut``
seeds its k-means from OpenCV's global generator, which is seeded before every call, so a
photo always gives the same cut-out.

``quality`` in [0, 1] ranks photo cut-outs (:func:`_photo_quality`): fill of the box x
colour separation from the surroundings x agreement of the first cut with the box prior.

Measured (``benchmarks/bench_cutout.py --skus 200 --seed 29``, 200 user photos at 128 px,
a seed not tuned on; shared 2-core CPU): mean mask IoU 0.810 against the drawn mask of the
product's visible part given the true box (plain grabCut from the rectangle: 0.766),
SAD 0.50 (0.61), 1.2x the plain grabCut's time (110-190 ms per photo); quality ranks IoU
with Spearman rho 0.70. Given a box 10 % too loose on each side: IoU 0.750.

What it cannot do: an occluder (a thumb over the product's edge) inside the box that
looks like part of the product is kept, and a product part of the clutter's colours
between two pins may be lost. The box must be the product's: a loose detector box gives
a looser cut-out (the box prior assumes tightness).
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
    _clean,
    _fail,
    _finish,
    _soft_alpha,
    cut_out,
    plain_border,
)

logger = logging.getLogger(__name__)

#: Statuses of the shop path that the photo path would give too (the box is unusable).
_FINAL = ("bad_bbox", "transparent")


def _check_size(image: np.ndarray, max_pixels: int) -> None:
    h, w = image.shape[:2]
    if h * w > max_pixels:
        raise ValueError(f"image is {w} x {h} = {w * h} pixels, above max_pixels={max_pixels} "
                         "(the limit load_rgba applies); downscale it first")


def _crossed(mask: np.ndarray, rect: tuple[int, int, int, int]) -> float:
    """Share of the rows and columns of ``rect`` that ``mask`` crosses (mean of both)."""
    x1, y1, x2, y2 = rect
    sub = mask[y1:y2, x1:x2]
    return 0.5 * float(sub.any(axis=1).mean() + sub.any(axis=0).mean())


def _colour_histogram(pixels: np.ndarray) -> np.ndarray:
    """Normalised 8 x 8 x 8 RGB histogram (float32 ``[512]``) of ``uint8 [N, 3]`` pixels."""
    hist = cv2.calcHist([np.ascontiguousarray(pixels).reshape(-1, 1, 3)], [0, 1, 2], None,
                        [8, 8, 8], [0, 256, 0, 256, 0, 256]).ravel()
    return hist / max(1.0, float(hist.sum()))


def _photo_quality(work: np.ndarray, first: np.ndarray, mask: np.ndarray,
                   rect: tuple[int, int, int, int]) -> float:
    """How much to trust a photo cut-out, in [0, 1]: the product of three factors.

    - fill: the share of the box the mask covers (a product fills a good part of its own
      tight box; a cut-out keeping one small part of it is usually wrong);
    - separation: 1 minus the Bhattacharyya coefficient of the colour histograms of the
      mask and of everything else in the crop (a product unlike its surroundings is cut
      cleanly; one sharing their colours is a guess);
    - agreement: how much of the box grabCut crossed before any pin (:func:`_segment`):
      low when the box prior had to overrule the colour models.

    Chosen on the synthetic world's seed 7 (Spearman rho with mask IoU ~0.69; each factor
    alone 0.24-0.57); ``benchmarks/bench_cutout.py`` reports it on another seed.
    """
    if not mask.any() or mask.all():
        return 0.0
    x1, y1, x2, y2 = rect
    fill = float(mask[y1:y2, x1:x2].mean())
    h_fg, h_bg = _colour_histogram(work[mask]), _colour_histogram(work[~mask])
    separation = max(0.0, 1.0 - float(np.sqrt(h_fg * h_bg).sum()))
    return fill * separation * _crossed(first, rect)


def _gmm_log_likelihood(model: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Log-likelihood of ``pixels`` (float64 ``[N, 3]``) under a grabCut colour model
    (``cv2.grabCut``'s float64 ``[1, 65]``: 5 weights, 5 x 3 means, 5 x 3 x 3 covariances,
    OpenCV's layout); OpenCV does not expose its own evaluation."""
    weights = model[0, :5]
    means = model[0, 5:20].reshape(5, 3)
    covs = model[0, 20:65].reshape(5, 3, 3)
    out = np.full((pixels.shape[0], 5), -np.inf)
    for k in np.nonzero(weights > 0)[0]:
        cov = covs[k] + 1e-6 * np.eye(3)
        diff = pixels - means[k]
        sol = np.linalg.solve(cov, diff.T).T
        _, logdet = np.linalg.slogdet(cov)
        out[:, k] = (np.log(weights[k]) - 0.5 * (np.einsum("ij,ij->i", diff, sol) + logdet
                                                  + 3.0 * np.log(2.0 * np.pi)))
    top = out.max(axis=1, keepdims=True)
    top[~np.isfinite(top)] = 0.0
    with np.errstate(divide="ignore"):  # no component: log 0 = -inf, as it should
        return (top + np.log(np.exp(out - top).sum(axis=1, keepdims=True)))[:, 0]


def _segment(work: np.ndarray, rect: tuple[int, int, int, int], *, iterations: int,
             pin_rounds: int) -> tuple[np.ndarray, np.ndarray] | None:
    """grabCut from the rectangle, with the tight-box prior enforced by pinpointing.

    A true product box is tight: the product crosses every row and column of it. grabCut
    alone often keeps only the most distinctive part of a product whose other parts share
    the clutter's colours. Lempitsky et al. (ICCV 2009, "Image segmentation with a
    bounding box prior") enforce the prior by "pinpointing": for each row or column of the
    box that the mask misses, the pixel of it most likely foreground under the colour
    models is made sure foreground, and the cut is run again (``pin_rounds`` times at
    most). Written here because OpenCV has no box-prior option.

    Args:
        work: ``uint8 [h, w, 3]`` RGB, the crop at the working scale.
        rect: ``(x1, y1, x2, y2)``, the box in ``work``'s pixels (x2/y2 exclusive).

    Returns:
        ``(first, final)``: grabCut's foreground before any pin and after the last
        (bool ``[h, w]``, False outside ``rect``); None when grabCut cannot fit its colour
        models (no background pixel outside ``rect``, or too few pixels).
    """
    h, w = work.shape[:2]
    x1, y1, x2, y2 = rect
    gc = np.zeros((h, w), np.uint8)
    bgd = np.zeros((1, 65), np.float64)
    fgd = np.zeros((1, 65), np.float64)
    # grabCut seeds its k-means from OpenCV's global generator: seed it, or the same photo
    # can give another cut-out on another call.
    cv2.setRNGSeed(0)
    try:
        cv2.grabCut(work, gc, (x1, y1, x2 - x1, y2 - y1), bgd, fgd, iterations,
                    cv2.GC_INIT_WITH_RECT)
    except cv2.error as exc:  # no background sample (the box covers the crop), or tiny
        logger.debug("grabCut failed: %s", exc)
        return None
    inside = np.zeros((h, w), bool)
    inside[y1:y2, x1:x2] = True
    first = ((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)) & inside
    for _ in range(pin_rounds):
        mask = ((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)) & inside
        sub = mask[y1:y2, x1:x2]
        rows, cols = np.nonzero(~sub.any(axis=1))[0], np.nonzero(~sub.any(axis=0))[0]
        if rows.size == 0 and cols.size == 0:
            break
        pixels = work[y1:y2, x1:x2].reshape(-1, 3).astype(np.float64)
        llr = (_gmm_log_likelihood(fgd, pixels) - _gmm_log_likelihood(bgd, pixels)).reshape(
            y2 - y1, x2 - x1)
        for r in rows:
            gc[y1 + r, x1 + int(np.argmax(llr[r]))] = cv2.GC_FGD
        for c in cols:
            gc[y1 + int(np.argmax(llr[:, c])), x1 + c] = cv2.GC_FGD
        # 2 iterations after a pin: as good as 5 (seed 7: IoU 0.831 either way), 40 % faster
        cv2.setRNGSeed(0)
        cv2.grabCut(work, gc, None, bgd, fgd, min(2, iterations), cv2.GC_INIT_WITH_MASK)
    return first, ((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)) & inside


def cut_out_photo(
    image: np.ndarray,
    bbox: Sequence[float],
    *,
    work_side: int = 320,
    margin: float = 0.3,
    iterations: int = 5,
    matting_radius: int = 1,
    pin_rounds: int = 3,
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
    rect = (rx1, ry1, rx2, ry2)
    # An edge-preserving smoothing for the segmentation only: phone noise and JPEG blocks
    # otherwise spread the colour models (+0.01 mean IoU on seed 7); the matting and the
    # colours use the photo itself.
    seg = cv2.bilateralFilter(work, 5, 30, 5)
    segmented = _segment(seg, rect, iterations=iterations, pin_rounds=pin_rounds)
    if segmented is None:
        return _fail("not_plain", (
            f"the box {box} leaves too few pixels of the {w} x {h} image around it to learn "
            "the background from: pass the product's own box, not (nearly) the whole image"))
    first, mask = segmented
    mask = _clean(mask, min_part=0.05, max_hole=0.03)
    if not mask.any():
        return _fail("empty", "the segmentation kept no foreground in the box: nothing to "
                              "cut out; check the box")
    quality = _photo_quality(work, first, mask, rect)
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


def _shop_cut_out(image: np.ndarray, bbox: Sequence[float] | None, work_side: int) -> Cutout:
    """:func:`cut_out` with ``refine="matting"`` on ``image`` scaled so that its longer
    side is at most ``work_side`` (grabCut and closed-form matting over a full-resolution
    photo take seconds to minutes), its alpha scaled back (bilinear) to the image."""
    h, w = image.shape[:2]
    scale = work_side / max(h, w)
    if scale >= 1.0:
        return cut_out(image, bbox, refine="matting")
    box = None
    if bbox is not None:
        box = _check_bbox(bbox, w, h, min_overlap=min(3, w, h))
        if isinstance(box, str):
            return _fail("bad_bbox", box)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    sx, sy = size[0] / w, size[1] / h
    small = cv2.resize(np.ascontiguousarray(image[..., :3]), size, interpolation=cv2.INTER_AREA)
    small_box = None if box is None else (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    c = cut_out(small, small_box, refine="matting")
    if not c.ok:
        return c
    alpha_small = np.zeros((size[1], size[0]), np.uint8)
    x1, y1, x2, y2 = c.box
    alpha_small[y1:y2, x1:x2] = c.rgba[..., 3]
    alpha = cv2.resize(alpha_small, (w, h), interpolation=cv2.INTER_LINEAR)
    if box is not None:
        inside = np.zeros((h, w), bool)
        inside[box[1]:box[3], box[0]:box[2]] = True
        alpha[~inside] = 0
    return _finish(np.ascontiguousarray(image[..., :3]), alpha, c.quality, min_area=0.0,
                   min_pixels=1)


def cut_out_product(
    image: np.ndarray,
    bbox: tuple[float, float, float, float] | None = None,
    *,
    work_side: int = 512,
) -> Cutout:
    """Cut the product out of a shop image or a user photo; the one entry point.

    - An RGBA image with real transparency: its own alpha (:func:`visearch.scenes.cut_out`).
    - An image whose frame is a plain backdrop (:func:`visearch.scenes.plain_border`):
      :func:`visearch.scenes.cut_out` with ``refine="matting"`` (the shop-image path,
      mean mask IoU 0.98 on shop images); if that finds no usable backdrop or product
      around a given ``bbox`` (a product on a cluttered table top), the photo path.
    - A cluttered frame with ``bbox``: :func:`cut_out_photo` (the user-photo path).
    - A cluttered frame without ``bbox``: status ``"needs_bbox"``: pass the product's box
      (the server passes the detector's main object).

    Both paths work on the image (shop path) or the crop around the box (photo path)
    scaled to at most ``work_side`` pixels on its longer side, and scale the alpha back:
    a 40-megapixel photo costs about what a small one does; the colours under the soft
    edge are then the photo's own (not un-mixed). A status's reason may then quote the
    scaled image's size.

    Args:
        image: ``uint8 [H, W, 3]`` RGB or ``[H, W, 4]`` RGBA (straight alpha), at most
            ``MAX_PIXELS`` pixels (the limit of :func:`visearch.scenes.load_rgba`).
        bbox: ``(x1, y1, x2, y2)`` of the product in pixels, x2/y2 exclusive; or None.
        work_side: the longest side, in pixels, that the segmentation and matting see.

    Returns:
        A :class:`Cutout` (alpha always refined with pymatting, except an image's own
        alpha); a bad box gives ``"bad_bbox"`` with a reason.

    Raises:
        TypeError, ValueError: ``image`` is not a uint8 ``[H, W, 3|4]`` array or has more
            than ``MAX_PIXELS`` pixels; ``bbox`` is not a sequence of numbers;
            ``work_side`` < 16.
    """
    rgb, alpha = _check_image(image)
    _check_size(image, MAX_PIXELS)
    if work_side < 16:
        raise ValueError(f"work_side must be >= 16 pixels, got {work_side}")
    if alpha is not None and bool((alpha < 255).any()):
        return cut_out(image, bbox)  # its own alpha, exact: nothing to segment or matte
    if plain_border(rgb):
        shop = _shop_cut_out(rgb, bbox, work_side)
        # A plain frame with a cluttered box (a product on a table top) or a box the
        # backdrop test cannot use: the photo path, which needs only the box.
        if shop.ok or bbox is None or shop.status in _FINAL:
            return shop
        logger.debug("shop path gave %s (%s); trying the photo path", shop.status,
                     shop.reason)
        return cut_out_photo(rgb, bbox, work_side=work_side)
    if bbox is None:
        return _fail("needs_bbox", "the image's border is not a plain backdrop (a photo "
                                   "with clutter): pass the product's bbox (the server "
                                   "passes the detector's main object)")
    return cut_out_photo(rgb, bbox, work_side=work_side)
