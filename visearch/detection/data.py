"""COCO detection sets: reading and writing them, and loading them as training samples.

Annotations are COCO JSON (``bbox`` as x, y, w, h in pixels); inside visearch boxes are
``x1, y1, x2, y2``. A category's label index is its position among the categories sorted by
COCO id, so ids 1..C in sorted-name order map to labels 0..C-1. Scoring lives in
``visearch.detection.evaluate``.
"""

from __future__ import annotations

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

from visearch.fileio import atomic_write_text
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
    atomic_write_text(path, json.dumps(coco))


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
