"""Semi-supervised box labelling: train, pseudo-label, queue the doubtful, retrain, repeat.

The loop grows a small hand-labelled set into a large one: people label only the images the
detector is unsure of. One round: a detector trained on the labelled set (plus earlier rounds'
pseudo-labels) labels the unlabelled images; per image

- every box scoring ``>= keep_thresh`` is *confident*; boxes in ``[review_thresh,
  keep_thresh)`` are *doubtful* unless they overlap a confident box (IoU >= 0.5: the same
  object under another class or a looser box, which NMS per class leaves behind);
- an image with confident boxes and no doubtful one is *kept*: its confident boxes become
  pseudo-labels for the next training;
- any other image goes to the review queue (JSONL) with a reason: ``low_confidence`` (only
  doubtful boxes), ``ambiguous`` (confident and doubtful boxes: training on it would teach the
  doubtful object as background), ``no_detection`` (nothing above ``review_thresh``).

A person corrects queue rows (edits ``boxes``/``categories``, sets ``"reviewed": true``) and
feeds the file back; reviewed rows then count as labelled (``read_reviewed``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from visearch.detection.data import coco_categories, write_coco
from visearch.detection.evaluate import box_iou
from visearch.detection.model import Detections
from visearch.errors import ImageDecodeError
from visearch.fileio import atomic_open
from visearch.imageio import decode_image

logger = logging.getLogger(__name__)

REVIEW_QUEUE = "review_queue.jsonl"


class Detector(Protocol):
    """What pseudo-labelling needs from a detector (``ProductDetector`` is one)."""

    categories: list[str]

    def detect(
        self, images: Sequence[np.ndarray], *, score_thresh: float | None = None
    ) -> list[Detections]: ...


@dataclass(frozen=True)
class ImageLabels:
    """Boxes of one image: ``boxes`` float32 [N, 4] x1y1x2y2 pixels, ``scores`` float32 [N]
    (1.0 for human labels), ``categories`` [N] names. ``image`` is the path as it will be
    written in a COCO ``file_name`` (relative to the images root, or absolute)."""

    image: str
    width: int
    height: int
    boxes: np.ndarray
    scores: np.ndarray
    categories: list[str]


@dataclass(frozen=True)
class ReviewItem:
    """An image for a person to label; ``boxes``/``scores``/``categories`` are the detector's
    proposals at or above ``review_thresh`` (possibly none), ``reason`` says why it is here."""

    labels: ImageLabels
    reason: str

    def to_json(self) -> dict[str, Any]:
        lab = self.labels
        return {
            "image": lab.image,
            "width": lab.width,
            "height": lab.height,
            "boxes": [[round(float(v), 2) for v in b] for b in lab.boxes],
            "scores": [round(float(s), 4) for s in lab.scores],
            "categories": list(lab.categories),
            "reason": self.reason,
            "reviewed": False,
        }


@dataclass
class PseudoLabels:
    """The outcome of one pseudo-labelling pass."""

    kept: list[ImageLabels] = field(default_factory=list)
    queued: list[ReviewItem] = field(default_factory=list)

    @property
    def kept_boxes(self) -> int:
        return sum(len(k.scores) for k in self.kept)

    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for q in self.queued:
            out[q.reason] = out.get(q.reason, 0) + 1
        return out


def pseudo_label(
    detector: Detector,
    images: Iterable[tuple[str, np.ndarray]],
    *,
    keep_thresh: float,
    review_thresh: float,
    batch_size: int = 8,
) -> PseudoLabels:
    """Split detections on ``images`` (``(key, RGB uint8 [H, W, 3])``) into kept and queued.

    ``key`` becomes ``ImageLabels.image``. See the module docstring for the rules.
    """
    if not 0.0 <= review_thresh <= keep_thresh <= 1.0:
        raise ValueError(
            f"need 0 <= review_thresh <= keep_thresh <= 1, got {review_thresh}, {keep_thresh}"
        )
    out = PseudoLabels()
    for batch in _batched(images, batch_size):
        dets = detector.detect([im for _, im in batch], score_thresh=review_thresh)
        for (key, image), det in zip(batch, dets, strict=True):
            _split(out, key, image.shape, det, keep_thresh, review_thresh)
    return out


def _split(
    out: PseudoLabels,
    key: str,
    shape: tuple[int, ...],
    det: Detections,
    keep_thresh: float,
    review_thresh: float,
) -> None:
    h, w = int(shape[0]), int(shape[1])
    above = det.scores >= review_thresh
    names = det.category_names()
    proposals = ImageLabels(
        key, w, h, det.boxes[above], det.scores[above], [names[i] for i in np.flatnonzero(above)]
    )
    strong = det.scores >= keep_thresh
    doubtful = above & ~strong
    if doubtful.any() and strong.any():
        # A doubtful box on top of a confident one is the same object, not a missed one.
        overlap = box_iou(det.boxes[doubtful], det.boxes[strong]).max(axis=1) >= 0.5
        doubtful[np.flatnonzero(doubtful)[overlap]] = False
    if not strong.any():
        reason = "low_confidence" if above.any() else "no_detection"
        out.queued.append(ReviewItem(proposals, reason))
    elif doubtful.any():
        out.queued.append(ReviewItem(proposals, "ambiguous"))
    else:
        out.kept.append(
            ImageLabels(
                key, w, h, det.boxes[strong], det.scores[strong],
                [names[i] for i in np.flatnonzero(strong)],
            )
        )


def _batched(
    items: Iterable[tuple[str, np.ndarray]], n: int
) -> Iterator[list[tuple[str, np.ndarray]]]:
    batch: list[tuple[str, np.ndarray]] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def write_review_queue(path: str | os.PathLike[str], items: Sequence[ReviewItem]) -> None:
    """Write the queue as JSONL, one ``ReviewItem.to_json()`` per line (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as f:
        for item in items:
            f.write(json.dumps(item.to_json()) + "\n")


def read_reviewed(path: str | os.PathLike[str], categories: Sequence[str]) -> list[ImageLabels]:
    """Rows of a corrected review file marked ``"reviewed": true``, as human labels.

    Raises ValueError naming the line for a malformed row or an unknown category.
    """
    known = set(categories)
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not row.get("reviewed", False):
                    continue
                boxes = np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4)
                cats = [str(c) for c in row["categories"]]
                lab = ImageLabels(
                    str(row["image"]), int(row["width"]), int(row["height"]), boxes,
                    np.ones(len(cats), dtype=np.float32), cats,
                )
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: malformed review row ({e})") from e
            if len(cats) != len(boxes):
                raise ValueError(f"{path}:{line_no}: {len(boxes)} boxes but {len(cats)} categories")
            unknown = set(cats) - known
            if unknown:
                raise ValueError(
                    f"{path}:{line_no}: unknown categories {sorted(unknown)}; "
                    f"valid: {sorted(known)}"
                )
            out.append(lab)
    return out


def merge_coco(base: dict[str, Any], extra: Sequence[ImageLabels]) -> dict[str, Any]:
    """``base`` (COCO) plus ``extra`` images and boxes, with fresh image/annotation ids.

    Extra annotations carry ``"score"`` and ``"pseudo": true`` (human-reviewed ones have
    score 1.0). Categories stay ``base``'s; an unknown category name raises ValueError.
    """
    names, ids = coco_categories(base)
    cat_id = dict(zip(names, ids, strict=True))
    images = [dict(im) for im in base["images"]]
    annotations = [dict(a) for a in base["annotations"]]
    next_image = max((int(im["id"]) for im in images), default=0) + 1
    next_ann = max((int(a["id"]) for a in annotations), default=0) + 1
    for lab in extra:
        images.append(
            {"id": next_image, "file_name": lab.image, "width": lab.width, "height": lab.height}
        )
        for box, score, name in zip(lab.boxes, lab.scores, lab.categories, strict=True):
            if name not in cat_id:
                raise ValueError(f"category {name!r} of {lab.image} is not one of {names}")
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": next_ann,
                    "image_id": next_image,
                    "category_id": cat_id[name],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                    "score": float(score),
                    "pseudo": True,
                }
            )
            next_ann += 1
        next_image += 1
    return {**base, "images": images, "annotations": annotations}


@dataclass(frozen=True)
class UnlabelledImage:
    """An image to pseudo-label: ``key`` as written into COCO, ``path`` to read it from."""

    key: str
    path: Path


def run_rounds(
    labelled: dict[str, Any],
    unlabelled: Sequence[UnlabelledImage],
    out_dir: str | os.PathLike[str],
    *,
    rounds: int,
    train: Callable[[int, dict[str, Any]], Detector],
    evaluate: Callable[[Detector], dict[str, float]] | None = None,
    keep_thresh: float = 0.7,
    review_thresh: float = 0.3,
    batch_size: int = 8,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train on ``labelled``, then ``rounds`` times: pseudo-label, merge, retrain.

    Args:
        labelled: COCO dict of human labels (file names relative to the images root that
            ``train`` reads from; ``UnlabelledImage.key`` uses the same convention).
        unlabelled: images without labels.
        out_dir: gets ``round_<r>/train.json`` (what round r trained on),
            ``round_<r>/review_queue.jsonl`` (round r's model's queue), and at the top
            ``train.json`` + ``review_queue.jsonl`` of the last round and ``rounds.json``.
        rounds: pseudo-labelling passes; there are ``rounds + 1`` trainings (round 0 is
            supervised only).
        train: ``train(round, coco) -> detector`` (e.g. a closure over ``train_detector``).
        evaluate: ``evaluate(detector) -> {"map": ..., "map50": ...}`` on a held-out set.
        keep_thresh, review_thresh: see the module docstring.

    Returns:
        One stats row per round: ``round``, ``train_images``, ``train_boxes``, metrics from
        ``evaluate``, and (for rounds that pseudo-label) ``kept_images``, ``kept_boxes``,
        ``queued_images``, ``queued_<reason>``, ``unreadable``.
    """
    from visearch.progress import progress_bar

    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats: list[dict[str, Any]] = []
    current = labelled
    for r in range(rounds + 1):
        round_dir = out / f"round_{r}"
        write_coco(round_dir / "train.json", current)
        detector = train(r, current)
        row: dict[str, Any] = {
            "round": r,
            "train_images": len(current["images"]),
            "train_boxes": len(current["annotations"]),
        }
        if evaluate is not None:
            row.update(evaluate(detector))
        if r < rounds:
            unreadable = 0

            def decoded(bar: Any) -> Iterator[tuple[str, np.ndarray]]:
                nonlocal unreadable
                for item in bar:
                    try:
                        yield item.key, decode_image(item.path)
                    except ImageDecodeError as e:
                        unreadable += 1
                        logger.warning("skipping unreadable image %s: %s", item.path, e)

            bar = progress_bar(unlabelled, desc=f"pseudo-label r{r}", disable=not progress,
                               leave=False)
            labels = pseudo_label(
                detector, decoded(bar), keep_thresh=keep_thresh, review_thresh=review_thresh,
                batch_size=batch_size,
            )
            write_review_queue(round_dir / REVIEW_QUEUE, labels.queued)
            current = merge_coco(labelled, labels.kept)
            row.update(
                kept_images=len(labels.kept),
                kept_boxes=labels.kept_boxes,
                queued_images=len(labels.queued),
                unreadable=unreadable,
                **{f"queued_{k}": v for k, v in sorted(labels.reasons().items())},
            )
            write_review_queue(out / REVIEW_QUEUE, labels.queued)
        logger.info("labelling round %d: %s", r, row)
        stats.append(row)
        (out / "rounds.json").write_text(json.dumps(stats, indent=2))
    write_coco(out / "train.json", current)
    return stats
