"""Scoring detections: COCO mAP (pycocotools' ``COCOeval``), box IoU and the main-object hit
rate, the figure the search depends on (is the photographed product the box we embed?).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from torchvision.ops import box_iou as tv_box_iou

logger = logging.getLogger(__name__)


def detections_to_results(
    image_ids: Sequence[int], detections: Sequence[Any], category_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """COCO result dicts (``bbox`` x, y, w, h) from ``Detections``.

    A detection's label ``i`` becomes ``category_ids[i]``.
    """
    if len(image_ids) != len(detections):
        raise ValueError(f"{len(image_ids)} image ids for {len(detections)} detections")
    out = []
    for image_id, det in zip(image_ids, detections, strict=True):
        for box, score, label in zip(det.boxes, det.scores, det.labels, strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            out.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(category_ids[int(label)]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    return out


def evaluate_coco(coco_gt: dict[str, Any], results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """pycocotools bbox evaluation over all of ``coco_gt``'s images.

    Returns ``{"map": mAP@[.5:.95], "map50": mAP@.5, "map75": mAP@.75}`` (0.0 when there are
    no results; pycocotools' -1 for "no ground truth" is passed through).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {"map": 0.0, "map50": 0.0, "map75": 0.0}
    gt_dict = copy.deepcopy(coco_gt)
    for i, ann in enumerate(gt_dict["annotations"]):
        ann.setdefault("id", i + 1)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
    # pycocotools prints progress to stdout; a library must not, so it goes to the debug log.
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        dt = gt.loadRes(copy.deepcopy(list(results)))
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    logger.debug("COCOeval:\n%s", sink.getvalue())
    return {"map": float(ev.stats[0]), "map50": float(ev.stats[1]), "map75": float(ev.stats[2])}


def box_iou(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """IoU matrix float32 [N, M] of x1y1x2y2 pixel boxes ``a`` [N, 4] and ``b`` [M, 4]
    (a single box may be given as [4]); torchvision's ``box_iou`` on numpy input."""
    return tv_box_iou(
        torch.as_tensor(np.asarray(a, dtype=np.float32).reshape(-1, 4)),
        torch.as_tensor(np.asarray(b, dtype=np.float32).reshape(-1, 4)),
    ).numpy()


def main_object_hit_rate(
    pred_boxes: np.ndarray, gt_boxes: np.ndarray, *, iou_thresh: float = 0.5
) -> float:
    """Fraction of images whose main-object box overlaps the ground truth with IoU >= thresh.

    ``pred_boxes`` and ``gt_boxes`` are float [N, 4] x1y1x2y2, row ``i`` for image ``i``.
    """
    pred = np.asarray(pred_boxes, dtype=np.float32).reshape(-1, 4)
    gt = np.asarray(gt_boxes, dtype=np.float32).reshape(-1, 4)
    if pred.shape != gt.shape:
        raise ValueError(
            f"need one predicted box per ground-truth box, got {pred.shape}, {gt.shape}"
        )
    if not len(gt):
        return 0.0
    iou = np.diag(box_iou(pred, gt))
    return float(np.mean(iou >= iou_thresh))
