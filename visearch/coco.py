"""COCO detection sets: loading them as training samples, and scoring detections.

Annotations are COCO JSON (``bbox`` as x, y, w, h in pixels); inside visearch boxes are
``x1, y1, x2, y2``. A category's label index is its position among the categories sorted by
COCO id, so ids 1..C in sorted-name order map to labels 0..C-1. Scoring is pycocotools'
``COCOeval`` (mAP@[.5:.95] and mAP@.5); only the main-object hit rate is computed here.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from visearch.imageio import decode_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectionSample:
    """One annotated image: ``boxes`` float32 [N, 4] x1y1x2y2 pixels, ``labels`` int64 [N]."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray


def read_coco(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and sanity-check a COCO detection file (images, annotations, categories)."""
    path = Path(path)
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read COCO annotations {path}: {e}") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise ValueError(f"{path}: not a COCO detection file (no {key!r} list)")
    if not coco["categories"]:
        raise ValueError(f"{path}: no categories")
    return coco


def write_coco(path: str | os.PathLike[str], coco: dict[str, Any]) -> None:
    """Write a COCO dict atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(coco), encoding="utf-8")
    os.replace(tmp, path)


def coco_categories(coco: dict[str, Any]) -> tuple[list[str], list[int]]:
    """Category names and COCO ids, sorted by id: label ``i`` is ``names[i]`` / ``ids[i]``."""
    cats = sorted(coco["categories"], key=lambda c: int(c["id"]))
    return [str(c["name"]) for c in cats], [int(c["id"]) for c in cats]


def coco_samples(
    coco: dict[str, Any], images_root: str | os.PathLike[str]
) -> list[DetectionSample]:
    """One sample per COCO image (images without boxes included, as negatives).

    Boxes are converted to x1y1x2y2 and clipped to the image; crowd and degenerate boxes
    (no area after clipping) are skipped and counted in the log.
    """
    root = Path(images_root)
    _, ids = coco_categories(coco)
    label_of = {cid: i for i, cid in enumerate(ids)}
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    samples = []
    skipped = 0
    for img in coco["images"]:
        w, h = int(img["width"]), int(img["height"])
        boxes, labels = [], []
        for ann in by_image.get(int(img["id"]), []):
            if ann.get("iscrowd", 0):
                skipped += 1
                continue
            if int(ann["category_id"]) not in label_of:
                raise ValueError(
                    f"annotation {ann.get('id')} has category_id {ann['category_id']} "
                    f"that is not in the file's categories {ids}"
                )
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h)
            x2, y2 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
            if x2 - x1 < 1.0 or y2 - y1 < 1.0:
                skipped += 1
                continue
            boxes.append((x1, y1, x2, y2))
            labels.append(label_of[int(ann["category_id"])])
        samples.append(
            DetectionSample(
                image_id=int(img["id"]),
                path=root / img["file_name"],
                width=w,
                height=h,
                boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                labels=np.asarray(labels, dtype=np.int64),
            )
        )
    if skipped:
        logger.info("skipped %d crowd or degenerate box(es)", skipped)
    return samples


class DetectionDataset(Dataset):
    """Decoded samples for RetinaNet: ``(float [3, H, W] in 0..1, {"boxes", "labels"})``.

    ``hflip`` mirrors each image with probability 0.5 (seeded per item and epoch through
    ``set_epoch``, so runs are reproducible whatever the worker count).
    """

    def __init__(self, samples: Sequence[DetectionSample], *, hflip: bool = False, seed: int = 0):
        self.samples = list(samples)
        self.hflip = hflip
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.samples[i]
        image = decode_image(s.path)
        if image.shape[:2] != (s.height, s.width):
            raise ValueError(
                f"{s.path}: image is {image.shape[1]}x{image.shape[0]} but the annotations say "
                f"{s.width}x{s.height}; fix the COCO file"
            )
        boxes = s.boxes.copy()
        rng = np.random.default_rng((self.seed, self.epoch, i))
        if self.hflip and rng.random() < 0.5:
            image = image[:, ::-1]
            boxes[:, [0, 2]] = s.width - boxes[:, [2, 0]]
        x = torch.from_numpy(image.copy()).permute(2, 0, 1).float().div_(255.0)
        return x, {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(s.labels)}


def collate_detection(batch: list) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Keep images as a list (RetinaNet batches images of different sizes itself)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


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


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix float [N, M] of x1y1x2y2 boxes ``a`` [N, 4] and ``b`` [M, 4]."""
    from torchvision.ops import box_iou

    return box_iou(
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
    iou = np.diag(box_iou_np(pred, gt))
    return float(np.mean(iou >= iou_thresh))
