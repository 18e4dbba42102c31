"""COCO loading and pycocotools scoring against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from visearch.detection.data import coco_categories, coco_samples, read_coco, write_coco
from visearch.detection.evaluate import detections_to_results, evaluate_coco, main_object_hit_rate
from visearch.detection.model import Detections


def _gt() -> dict:
    # Category ids deliberately not 1..C and not in name order: labels follow the id order.
    return {
        "images": [
            {"id": 7, "file_name": "a.jpg", "width": 200, "height": 100},
            {"id": 9, "file_name": "sub/b.jpg", "width": 200, "height": 200},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [0, 0, 100, 100]},
            {"id": 2, "image_id": 9, "category_id": 3, "bbox": [50, 50, 100, 100]},
            {"id": 3, "image_id": 9, "category_id": 5, "bbox": [150, 150, 100, 100]},
            {"id": 4, "image_id": 9, "category_id": 3, "bbox": [10, 10, 0.5, 30]},
        ],
        "categories": [{"id": 5, "name": "bag"}, {"id": 3, "name": "shoe"}],
    }


def test_samples_convert_clip_and_label_by_category_id(tmp_path) -> None:
    coco = _gt()
    names, ids = coco_categories(coco)
    assert names == ["shoe", "bag"] and ids == [3, 5]
    a, b = coco_samples(coco, tmp_path)
    assert a.path == tmp_path / "a.jpg" and (a.width, a.height) == (200, 100)
    assert a.boxes.tolist() == [[0, 0, 100, 100]] and a.labels.tolist() == [1]
    # The third box is clipped at 200, the 0.5-px-wide one dropped.
    assert b.boxes.tolist() == [[50, 50, 150, 150], [150, 150, 200, 200]]
    assert b.labels.tolist() == [0, 1] and b.boxes.dtype == np.float32


def test_read_write_round_trip_and_rejects(tmp_path) -> None:
    write_coco(tmp_path / "x.json", _gt())
    assert read_coco(tmp_path / "x.json") == _gt()
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="annotations"):
        read_coco(tmp_path / "bad.json")


def _as_detections(coco: dict, shift: float = 0.0) -> tuple[list[int], list[Detections]]:
    names, ids = coco_categories(coco)
    out = []
    image_ids = [im["id"] for im in coco["images"]]
    for image_id in image_ids:
        anns = [a for a in coco["annotations"] if a["image_id"] == image_id]
        boxes = np.array([[a["bbox"][0] + shift, a["bbox"][1], a["bbox"][0] + a["bbox"][2] + shift,
                           a["bbox"][1] + a["bbox"][3]] for a in anns], np.float32)
        out.append(Detections(boxes, np.full(len(anns), 0.9, np.float32),
                              np.array([ids.index(a["category_id"]) for a in anns]), names))
    return image_ids, out


def test_ground_truth_fed_back_scores_one() -> None:
    coco = _gt()
    image_ids, dets = _as_detections(coco)
    results = detections_to_results(image_ids, dets, coco_categories(coco)[1])
    assert results[0] == {"image_id": 7, "category_id": 5, "bbox": [0.0, 0.0, 100.0, 100.0],
                          "score": pytest.approx(0.9)}
    m = evaluate_coco(coco, results)
    assert m["map"] == pytest.approx(1.0) and m["map50"] == pytest.approx(1.0)


def test_a_shifted_box_scores_what_its_iou_allows() -> None:
    """One 100x100 box shifted 23 px: IoU 77/123 = 0.626 passes the thresholds .50, .55, .60
    of the ten in [.5:.95], so mAP = 3/10 and mAP@.5 = 1."""
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 300, "height": 300}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 100, 100]}],
        "categories": [{"id": 1, "name": "shoe"}],
    }
    image_ids, dets = _as_detections(coco, shift=23.0)
    m = evaluate_coco(coco, detections_to_results(image_ids, dets, [1]))
    assert m["map"] == pytest.approx(0.3) and m["map50"] == pytest.approx(1.0)
    assert m["map75"] == pytest.approx(0.0)
    assert evaluate_coco(coco, []) == {"map": 0.0, "map50": 0.0, "map75": 0.0}


def test_main_object_hit_rate_counts_iou_at_least_half() -> None:
    gt = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    # IoU 1.0, 0.5 exactly (10x5 inside 10x10), 1/3 (5-px shift of a 10-wide box: 50/150).
    pred = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [5, 0, 15, 10]], np.float32)
    assert main_object_hit_rate(pred, gt) == pytest.approx(2 / 3)
    assert main_object_hit_rate(pred, gt, iou_thresh=0.3) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one predicted box"):
        main_object_hit_rate(pred[:2], gt)
