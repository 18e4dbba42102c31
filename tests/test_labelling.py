"""Semi-supervised labelling with a stub detector (fixed detections per image key)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from visearch.catalog import CatalogRow
from visearch.detection.crops import main_object_boxes
from visearch.detection.data import read_coco
from visearch.detection.model import Detections
from visearch.detection.pseudo_label import (
    REVIEW_QUEUE,
    UnlabelledImage,
    merge_coco,
    pseudo_label,
    read_reviewed,
    run_rounds,
    write_review_queue,
)

CATEGORIES = ["bag", "shoe"]


class StubDetector:
    """Returns fixed detections chosen by the image's first pixel value (its id)."""

    def __init__(self, table: dict[int, list[tuple[list[float], float, int]]]):
        self.categories = list(CATEGORIES)
        self.table = table
        self.calls: list[float | None] = []

    def detect(
        self, images: Sequence[np.ndarray], *, score_thresh: float | None = None
    ) -> list[Detections]:
        self.calls.append(score_thresh)
        out = []
        for im in images:
            rows = [r for r in self.table.get(int(im[0, 0, 0]), [])
                    if score_thresh is None or r[1] >= score_thresh]
            rows.sort(key=lambda r: -r[1])
            out.append(Detections(
                np.array([r[0] for r in rows], np.float32).reshape(-1, 4),
                np.array([r[1] for r in rows], np.float32),
                np.array([r[2] for r in rows], np.int64), self.categories))
        return out


TABLE = {
    # kept: two confident boxes, plus a doubtful one sitting on a confident box (same object).
    1: [([10, 10, 50, 50], 0.95, 1), ([60, 60, 90, 90], 0.8, 0), ([11, 10, 50, 52], 0.4, 0)],
    2: [([5, 5, 40, 40], 0.5, 1)],  # low confidence only
    3: [([5, 5, 40, 40], 0.9, 1), ([60, 5, 90, 40], 0.45, 0)],  # ambiguous: a second object?
    4: [([5, 5, 40, 40], 0.1, 1)],  # nothing above review_thresh
    5: [([20, 20, 70, 80], 0.99, 0)],
}


def _image(i: int, h: int = 100, w: int = 120) -> np.ndarray:
    im = np.zeros((h, w, 3), np.uint8)
    im[0, 0, 0] = i
    return im


def test_pseudo_label_keeps_confident_boxes_and_queues_the_rest() -> None:
    det = StubDetector(TABLE)
    images = [(f"img/{i}.jpg", _image(i)) for i in (1, 2, 3, 4, 5)]
    out = pseudo_label(det, images, keep_thresh=0.7, review_thresh=0.3, batch_size=2)
    assert det.calls == [0.3, 0.3, 0.3]
    assert [k.image for k in out.kept] == ["img/1.jpg", "img/5.jpg"]
    first = out.kept[0]
    assert first.boxes.tolist() == [[10, 10, 50, 50], [60, 60, 90, 90]]
    assert first.categories == ["shoe", "bag"] and (first.width, first.height) == (120, 100)
    assert out.kept_boxes == 3
    assert [(q.labels.image, q.reason) for q in out.queued] == [
        ("img/2.jpg", "low_confidence"), ("img/3.jpg", "ambiguous"), ("img/4.jpg", "no_detection")
    ]
    assert out.queued[1].labels.scores.tolist() == pytest.approx([0.9, 0.45])
    assert len(out.queued[2].labels.boxes) == 0
    assert out.reasons() == {"low_confidence": 1, "ambiguous": 1, "no_detection": 1}
    with pytest.raises(ValueError, match="review_thresh"):
        pseudo_label(det, images, keep_thresh=0.3, review_thresh=0.7)


def test_review_queue_round_trip_takes_only_reviewed_rows(tmp_path) -> None:
    out = pseudo_label(StubDetector(TABLE), [(f"{i}.jpg", _image(i)) for i in (2, 3)],
                       keep_thresh=0.7, review_thresh=0.3)
    path = tmp_path / REVIEW_QUEUE
    write_review_queue(path, out.queued)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0] == {"image": "2.jpg", "width": 120, "height": 100, "boxes": [[5, 5, 40, 40]],
                       "scores": [0.5], "categories": ["shoe"], "reason": "low_confidence",
                       "reviewed": False}
    assert read_reviewed(path, CATEGORIES) == []
    # A person fixes the second image: drops the doubt, relabels it a bag, marks it reviewed.
    rows[1].update(boxes=[[5, 5, 40, 40], [60, 5, 90, 40]], categories=["shoe", "bag"],
                   reviewed=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (lab,) = read_reviewed(path, CATEGORIES)
    assert lab.image == "3.jpg" and lab.categories == ["shoe", "bag"]
    assert lab.scores.tolist() == [1.0, 1.0]
    rows[1]["categories"] = ["shoe", "hat"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r":2: unknown categories \['hat'\]"):
        read_reviewed(path, CATEGORIES)


def _labelled() -> dict:
    return {
        "images": [{"id": 4, "file_name": "l/0.jpg", "width": 120, "height": 100}],
        "annotations": [{"id": 10, "image_id": 4, "category_id": 2, "bbox": [1, 2, 30, 40],
                         "area": 1200, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "bag"}, {"id": 2, "name": "shoe"}],
    }


def test_merge_coco_appends_with_fresh_ids_and_category_ids() -> None:
    out = pseudo_label(StubDetector(TABLE), [("u/1.jpg", _image(1))], keep_thresh=0.7,
                       review_thresh=0.3)
    merged = merge_coco(_labelled(), out.kept)
    assert merged["images"][1] == {"id": 5, "file_name": "u/1.jpg", "width": 120, "height": 100}
    new = merged["annotations"][1:]
    assert [a["id"] for a in new] == [11, 12] and {a["image_id"] for a in new} == {5}
    assert [a["category_id"] for a in new] == [2, 1]
    assert new[0]["bbox"] == [10.0, 10.0, 40.0, 40.0] and new[0]["pseudo"] is True
    assert _labelled()["annotations"] == merged["annotations"][:1]


def test_rounds_retrain_on_labelled_plus_confident_pseudo_labels(tmp_path) -> None:
    for i in (1, 2, 5):
        Image.fromarray(_image(i)).save(tmp_path / f"{i}.png")
    unlabelled = [UnlabelledImage(f"u/{i}.png", tmp_path / f"{i}.png") for i in (1, 2, 5)]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    unlabelled.append(UnlabelledImage("u/broken.png", tmp_path / "broken.png"))
    seen: list[tuple[int, int, int]] = []

    def train(r: int, coco: dict) -> StubDetector:
        seen.append((r, len(coco["images"]), len(coco["annotations"])))
        return StubDetector(TABLE)

    stats = run_rounds(
        _labelled(), unlabelled, tmp_path / "out", rounds=2, train=train,
        evaluate=lambda d: {"map": 0.5}, keep_thresh=0.7, review_thresh=0.3,
    )
    # Round 0 trains on the one labelled image; rounds 1 and 2 add images 1 and 5 (3 boxes).
    assert seen == [(0, 1, 1), (1, 3, 4), (2, 3, 4)]
    assert [s["round"] for s in stats] == [0, 1, 2]
    assert stats[0]["kept_boxes"] == 3 and stats[0]["queued_images"] == 1
    assert stats[0]["queued_low_confidence"] == 1 and stats[0]["unreadable"] == 1
    assert stats[2]["map"] == 0.5 and "kept_boxes" not in stats[2]
    out = tmp_path / "out"
    assert len(read_coco(out / "train.json")["annotations"]) == 4
    assert json.loads((out / "rounds.json").read_text()) == stats
    queue = [json.loads(x) for x in (out / REVIEW_QUEUE).read_text().splitlines()]
    assert [q["image"] for q in queue] == ["u/2.png"]


def test_crops_use_the_given_bbox_or_the_main_object(tmp_path) -> None:
    for i in (4, 5):
        Image.fromarray(_image(i)).save(tmp_path / f"{i}.png")

    def row(i: int, bbox=None) -> CatalogRow:
        return CatalogRow(line=i, image=f"{i}.png", path=tmp_path / f"{i}.png", sku=f"S{i}",
                          category="bag", bbox=bbox)

    boxes = main_object_boxes(StubDetector(TABLE), [row(5), row(9, (1, 2, 3, 4)), row(4)],
                              score_thresh=0.3)
    assert [b.source for b in boxes] == ["detector", "given", "fallback"]
    assert boxes[0].box == (20.0, 20.0, 70.0, 80.0) and boxes[0].category == "bag"
    assert boxes[1].box == (1, 2, 3, 4) and boxes[2].box == (0.0, 0.0, 120.0, 100.0)
