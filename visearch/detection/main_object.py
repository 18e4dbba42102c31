"""Which detection is the product the shopper photographed (the main-object rule)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.ops import box_iou

from visearch.detection.model import Detections

#: main-object selection (``select_main_object``): the lowest score a main object may have
#: and how much its size counts. Chosen on a 400-SKU world (seed 1) and checked on the demo's
#: 300-SKU world: hit rate 0.815 / 0.807 at (0.1, 0.5), 0.53 / 0.57 at a 0.3 floor (the
#: photographed product, partly occluded, often scores under 0.3).
MAIN_SCORE_THRESH = 0.1
MAIN_AREA_WEIGHT = 0.5


@dataclass(frozen=True)
class MainObject:
    """The product the search is about.

    ``box``: (x1, y1, x2, y2) in original pixels (the whole image when ``fallback``);
    ``score``: its detection score (0.0 when ``fallback``); ``category``: its category (in a
    fallback, the best weak detection's, or None when there is none); ``category_scores``:
    per category, the highest score among detections overlapping ``box`` with IoU >= 0.5 (in
    a fallback, among all detections); ``fallback``: no detection passed the threshold.
    """

    box: tuple[float, float, float, float]
    score: float
    category: str | None
    category_scores: dict[str, float] = field(default_factory=dict)
    fallback: bool = False


#: The class of a detector that labels the photographed product itself (its other boxes
#: are "other"): see ``select_main_object``.
MAIN_LABEL = "main"


def select_main_object(
    dets: Detections,
    image_shape: Sequence[int],
    *,
    score_thresh: float = MAIN_SCORE_THRESH,
    area_weight: float = MAIN_AREA_WEIGHT,
) -> MainObject:
    """The object the shopper photographed: among detections at or above ``score_thresh``,
    the one with the highest ``score * (box area / image area) ** area_weight``.

    A shopper fills the frame with the product, while distractors in the background are
    smaller and often detected more confidently (they are whole and unoccluded). The
    plain rule, the top score alone, is ``area_weight=0``: it found the main
    object (IoU >= 0.5) in 0.31 of 400 synthetic user photos where this rule finds 0.815,
    and in 0.26 vs 0.81 of the demo's 300 (``benchmarks.bench_detector`` prints both).

    A detector with a ``MAIN_LABEL`` class (trained on scenes that mark the photographed
    product, ``visearch.scenes.main_categories``) has learnt which object that is: its
    boxes of that label are ranked first, the others only when none passes.

    Args:
        dets: detections of one image.
        image_shape: ``(H, W)`` or ``(H, W, C)`` of the original image.
        score_thresh: minimum score of a main object; when none reaches it the whole image is
            returned with ``fallback=True``.
        area_weight: exponent of the box's relative area in the ranking (0: top score).
    """
    if len(image_shape) < 2:
        raise ValueError(f"image_shape must be (H, W) or (H, W, C), got {tuple(image_shape)}")
    if area_weight < 0:
        raise ValueError(f"area_weight must be >= 0, got {area_weight}")
    h, w = int(image_shape[0]), int(image_shape[1])
    scores = np.asarray(dets.scores, dtype=np.float32)
    passing = np.flatnonzero(scores >= score_thresh)
    if MAIN_LABEL in dets.categories:
        # A detector trained to tell the photographed product from the others names it.
        main = passing[np.asarray(dets.labels)[passing] == dets.categories.index(MAIN_LABEL)]
        passing = main if main.size else passing
    if passing.size:
        boxes = np.asarray(dets.boxes, dtype=np.float64)[passing]
        area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(
            boxes[:, 3] - boxes[:, 1], 0, None
        )
        rank = scores[passing] * (area / max(h * w, 1)) ** area_weight
        i = int(passing[np.argmax(rank)])  # first of equals: the higher score (dets sorted)
        box = tuple(float(v) for v in dets.boxes[i])
        iou = box_iou(
            torch.as_tensor(dets.boxes[i : i + 1], dtype=torch.float32),
            torch.as_tensor(dets.boxes, dtype=torch.float32),
        )[0].numpy()
        return MainObject(
            box=box,  # type: ignore[arg-type]
            score=float(scores[i]),
            category=dets.categories[int(dets.labels[i])],
            category_scores=_max_per_category(dets, iou >= 0.5),
            fallback=False,
        )
    weak = _max_per_category(dets, np.ones(len(dets), dtype=bool))
    category = max(weak, key=weak.__getitem__) if weak else None
    return MainObject(
        box=(0.0, 0.0, float(w), float(h)),
        score=0.0,
        category=category,
        category_scores=weak,
        fallback=True,
    )


def _max_per_category(dets: Detections, mask: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    for label, score in zip(dets.labels[mask], dets.scores[mask], strict=True):
        name = dets.categories[int(label)]
        out[name] = max(out.get(name, 0.0), float(score))
    return out
