"""The RetinaNet product detector: training, coordinates across resizes, main object, files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visearch.detection import train as train_mod
from visearch.detection.data import coco_samples, write_coco
from visearch.detection.main_object import MAIN_LABEL, select_main_object
from visearch.detection.model import (
    DETECTOR_BACKBONES,
    Detections,
    build_detector,
    load_detector,
    save_detector,
)
from visearch.detection.train import evaluate_detector, train_detector

CATEGORIES = ["ball", "box"]


def _scene(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, list, list]:
    """Noise with one red square ("box", label 1) or blue disc ("ball", label 0)."""
    img = rng.integers(60, 140, (size, size, 3), dtype=np.uint8)
    side = int(rng.integers(size // 4, size // 2))
    x1, y1 = (int(v) for v in rng.integers(2, size - side - 2, 2))
    label = int(rng.integers(0, 2))
    if label == 1:
        img[y1 : y1 + side, x1 : x1 + side] = (220, 30, 30)
    else:
        yy, xx = np.mgrid[:size, :size]
        c, r = (x1 + side / 2, y1 + side / 2), side / 2
        img[(xx + 0.5 - c[0]) ** 2 + (yy + 0.5 - c[1]) ** 2 <= r * r] = (30, 30, 220)
    return img, [x1, y1, side, side], [label + 1]


def _write_set(root: Path, name: str, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    images, anns = [], []
    (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, bbox, (cat,) = _scene(rng)
        file_name = f"{name}/{i:04d}.png"
        Image.fromarray(img).save(root / file_name)
        images.append({"id": i + 1, "file_name": file_name, "width": 64, "height": 64})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": cat, "bbox": bbox,
                     "area": bbox[2] * bbox[3], "iscrowd": 0})
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "ball"}, {"id": 2, "name": "box"}]}
    write_coco(root / f"{name}.json", coco)
    return coco


def _tiny(**kw) -> object:
    torch.manual_seed(0)
    return build_detector("tiny_fpn", CATEGORIES, min_size=64, max_size=64, **kw)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("scenes")
    return root, _write_set(root, "train", 48, seed=1), _write_set(root, "val", 16, seed=2)


@pytest.fixture(scope="module")
def trained(scenes, tmp_path_factory: pytest.TempPathFactory):
    root, train, val = scenes
    model = _tiny()
    result = train_detector(
        model, coco_samples(train, root), tmp_path_factory.mktemp("run"),
        val_coco=val, val_samples=coco_samples(val, root),
        epochs=12, batch_size=8, lr=3e-3, seed=0,
    )
    return result


def test_training_lowers_loss_and_learns_the_boxes(trained) -> None:
    h = trained.history
    assert len(h) == 12
    assert h[-1]["loss"] < 0.6 * h[0]["loss"]
    # Seeded, and easy enough that a few CPU epochs find the squares and discs.
    assert h[-1]["map50"] > 0.6 and h[-1]["map"] > h[0]["map"] + 0.15
    assert set(h[-1]) >= {"classification", "bbox_regression", "map", "map50", "lr"}


def test_resume_after_a_crash_matches_an_uninterrupted_run(scenes, tmp_path, monkeypatch) -> None:
    root, train, _ = scenes
    samples = coco_samples(train, root)[:16]
    kw = {"epochs": 3, "batch_size": 8, "lr": 5e-3, "seed": 3}
    straight = train_detector(_tiny(), samples, tmp_path / "a", **kw)

    def crash(epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_after_epoch_hook", crash)
    with pytest.raises(KeyboardInterrupt):
        train_detector(_tiny(), samples, tmp_path / "b", **kw)
    monkeypatch.setattr(train_mod, "_after_epoch_hook", None)
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and set(ckpt) >= {
        "model", "optimiser", "scheduler", "scaler", "rng", "config", "history",
    }  # fmt: skip

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = train_detector(
        build_detector("tiny_fpn", CATEGORIES, min_size=64, max_size=64),
        samples, tmp_path / "b", resume=True, **kw,
    )
    # Bit for bit: the same losses and weights, not approximately.
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    for (k, a), b in zip(straight.model.state_dict().items(),
                         resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k

    other = build_detector("tiny_fpn", CATEGORIES, min_size=64, max_size=96)
    with pytest.raises(ValueError, match="was trained with detector config .* another out_dir"):
        train_detector(other, samples, tmp_path / "b", resume=True, **kw)


def test_each_epoch_visits_the_seeded_shuffle(scenes, tmp_path, monkeypatch) -> None:
    """The data order of a seed: per epoch, a permutation from a generator seeded with
    ``seed * 1000 + epoch`` after two base-seed draws (one by a dropped iterator, kept so
    that earlier seeds reproduce the same weights; one by the real one)."""
    root, train, _ = scenes
    samples = coco_samples(train, root)[:20]
    seen: list[int] = []

    class Recording(train_mod.DetectionDataset):
        def __getitem__(self, i: int):
            seen.append(i)
            return super().__getitem__(i)

    monkeypatch.setattr(train_mod, "DetectionDataset", Recording)
    train_detector(_tiny(), samples, tmp_path, epochs=2, batch_size=8, lr=1e-3, seed=3)

    def oracle(epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(3 * 1000 + epoch)
        for _ in range(2):
            torch.empty((), dtype=torch.int64).random_(generator=g)
        return torch.randperm(20, generator=g).tolist()

    assert seen == oracle(0) + oracle(1)


def test_transform_maps_boxes_both_ways_by_hand() -> None:
    """96x64 (HxW) image, min=max=128: scale min(128/64, 128/96) = 4/3 -> 128 x 85."""
    model = build_detector("tiny_fpn", CATEGORIES, min_size=128, max_size=128)
    t = model.eval().retinanet.transform  # postprocess maps boxes back only in eval mode
    image = torch.rand(3, 96, 64)
    box = torch.tensor([[8.0, 12.0, 40.0, 60.0]])
    batch, targets = t([image], [{"boxes": box.clone(), "labels": torch.tensor([0])}])
    assert batch.image_sizes == [(128, 85)]
    rw, rh = 85 / 64, 128 / 96
    expected = torch.tensor([[8 * rw, 12 * rh, 40 * rw, 60 * rh]])
    assert torch.allclose(targets[0]["boxes"], expected, atol=1e-4)
    back = t.postprocess([{"boxes": targets[0]["boxes"]}], batch.image_sizes, [(96, 64)])
    assert torch.allclose(back[0]["boxes"], box, atol=1e-4)


def test_detect_returns_original_pixels_at_any_scale(trained, scenes) -> None:
    """A scene at 64 px and at 160 px (both resized to 64 inside): boxes scale by 2.5."""
    root, _, val = scenes
    model = trained.model
    found = 0
    for im, ann in zip(val["images"], val["annotations"], strict=True):
        small = np.asarray(Image.open(root / im["file_name"]).convert("RGB"))
        big = np.asarray(Image.fromarray(small).resize((160, 160), Image.NEAREST))
        d_small, d_big = model.detect([small, big], score_thresh=0.2)
        x, y, w, h = ann["bbox"]
        gt = np.array([x, y, x + w, y + h], dtype=np.float32)
        if not len(d_small) or np.abs(d_small.boxes[0] - gt).max() > 3.0:
            continue  # judge the mapping only where the small scale found the product
        found += 1
        assert len(d_big) and d_big.labels[0] == d_small.labels[0]
        assert np.abs(d_big.boxes[0] - 2.5 * gt).max() < 2.5 * 4.0
        assert np.abs(d_big.boxes[0] / 2.5 - d_small.boxes[0]).max() < 3.0
    assert found >= 3


def test_select_main_object_takes_the_top_score_and_votes_overlaps() -> None:
    dets = Detections(
        boxes=np.array([[10, 10, 50, 50], [12, 10, 50, 52], [60, 60, 90, 90]], np.float32),
        scores=np.array([0.6, 0.9, 0.95], np.float32),
        labels=np.array([0, 1, 0], np.int64),
        categories=CATEGORIES,
    )
    main = select_main_object(dets, (100, 120, 3), score_thresh=0.5, area_weight=0.0)
    assert main.box == (60.0, 60.0, 90.0, 90.0) and main.category == "ball"
    assert main.score == pytest.approx(0.95) and not main.fallback
    assert main.category_scores == {"ball": pytest.approx(0.95)}
    # With a higher threshold on a two-box image: the 0.9 "box" wins, "ball" votes 0.6.
    two = Detections(dets.boxes[:2], dets.scores[:2], dets.labels[:2], CATEGORIES)
    main = select_main_object(two, (100, 120), score_thresh=0.5)
    assert main.category == "box"
    assert main.category_scores == {"box": pytest.approx(0.9), "ball": pytest.approx(0.6)}


def test_select_main_object_prefers_the_large_product_to_a_confident_distractor() -> None:
    # Image 100 x 120 = 12000 px. score x (area / 12000) ** 0.5:
    #   product   [10, 10, 70, 90]  area 4800, 0.40 x 0.632 = 0.253
    #   distractor [80, 5, 110, 35] area  900, 0.90 x 0.274 = 0.246
    #   weak box  [0, 0, 120, 100]  area 12000, 0.08: under the 0.1 floor
    dets = Detections(
        boxes=np.array([[80, 5, 110, 35], [10, 10, 70, 90], [0, 0, 120, 100]], np.float32),
        scores=np.array([0.9, 0.4, 0.08], np.float32),
        labels=np.array([0, 1, 0], np.int64),
        categories=CATEGORIES,
    )
    main = select_main_object(dets, (100, 120, 3))  # defaults: floor 0.1, area weight 0.5
    assert main.box == (10.0, 10.0, 70.0, 90.0) and main.category == "box"
    assert main.score == pytest.approx(0.4) and not main.fallback
    # A little more confidence flips it back: 0.93 x 0.274 = 0.2546 > 0.253.
    dets.scores[0] = 0.93
    assert select_main_object(dets, (100, 120, 3)).category == "ball"
    # The plain highest-score rule (area weight 0) takes the distractor outright.
    dets.scores[0] = 0.9
    assert select_main_object(dets, (100, 120), area_weight=0.0).box == (80.0, 5.0, 110.0, 35.0)
    with pytest.raises(ValueError, match="area_weight must be >= 0"):
        select_main_object(dets, (100, 120), area_weight=-1.0)


def test_a_main_object_detector_names_the_main_object_itself() -> None:
    # Classes "main" / "other" (scenes that mark the photographed product): the "main" box
    # wins over a larger, more confident "other" box; without a passing "main" box the
    # area-weighted rule decides among the others.
    dets = Detections(
        boxes=np.array([[0, 0, 100, 100], [10, 10, 40, 40], [60, 60, 70, 70]], np.float32),
        scores=np.array([0.9, 0.3, 0.05], np.float32),
        labels=np.array([1, 0, 0], np.int64),
        categories=[MAIN_LABEL, "other"],
    )
    main = select_main_object(dets, (100, 100))
    assert main.box == (10.0, 10.0, 40.0, 40.0) and main.category == MAIN_LABEL
    main = select_main_object(dets, (100, 100), score_thresh=0.5)
    assert main.box == (0.0, 0.0, 100.0, 100.0) and main.category == "other"
    assert not main.fallback


def test_no_detection_falls_back_to_the_whole_image() -> None:
    weak = Detections(np.array([[1, 2, 3, 4]], np.float32), np.array([0.2], np.float32),
                      np.array([1], np.int64), CATEGORIES)
    main = select_main_object(weak, (40, 70, 3), score_thresh=0.5)
    assert main.fallback and main.box == (0.0, 0.0, 70.0, 40.0) and main.score == 0.0
    assert main.category == "box" and main.category_scores == {"box": pytest.approx(0.2)}
    empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                       np.zeros(0, np.int64), CATEGORIES)
    main = select_main_object(empty, (40, 70), score_thresh=0.5)
    assert main.fallback and main.category is None and main.category_scores == {}


def test_save_load_round_trip_gives_the_same_detections(trained, scenes, tmp_path) -> None:
    root, _, val = scenes
    images = [np.asarray(Image.open(root / im["file_name"]).convert("RGB"))
              for im in val["images"][:4]]
    path = tmp_path / "det.pt"
    save_detector(trained.model, path)
    loaded = load_detector(path)
    assert loaded.config == trained.model.config and loaded.categories == CATEGORIES
    for a, b in zip(trained.model.detect(images), loaded.detect(images), strict=True):
        assert np.array_equal(a.labels, b.labels)
        assert np.allclose(a.boxes, b.boxes, atol=1e-4) and np.allclose(a.scores, b.scores)
    metrics = evaluate_detector(loaded, val, coco_samples(val, root))
    assert metrics["map50"] == pytest.approx(trained.history[-1]["map50"], abs=1e-6)


def test_a_failed_save_leaves_the_previous_file(tmp_path, monkeypatch) -> None:
    old = _tiny()
    path = tmp_path / "detector.pt"
    save_detector(old, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space left"):
        save_detector(build_detector("tiny_fpn", CATEGORIES, min_size=64, max_size=64), path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["detector.pt"]  # no temp file left
    loaded = load_detector(path)
    for name, value in old.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_every_backbone_builds_and_maps_images_to_detections() -> None:
    image = np.zeros((48, 80, 3), np.uint8)
    for name in DETECTOR_BACKBONES.names():
        model = build_detector(name, CATEGORIES, min_size=64, max_size=96)
        (dets,) = model.detect([image])
        assert dets.boxes.dtype == np.float32 and dets.boxes.shape[1] == 4
        assert dets.labels.dtype == np.int64 and dets.categories == CATEGORIES


def test_caller_errors_say_what_to_do(tmp_path) -> None:
    with pytest.raises(KeyError, match="mobilenet_v2_fpn"):
        build_detector("nope", CATEGORIES, min_size=64, max_size=64)
    with pytest.raises(ValueError, match="unique"):
        build_detector("tiny_fpn", ["a", "a"], min_size=64, max_size=64)
    with pytest.raises(FileNotFoundError, match="local file"):
        build_detector("mobilenet_v2_fpn", CATEGORIES, min_size=64, max_size=64,
                       backbone_weights=tmp_path / "missing.pth")
    with pytest.raises(TypeError, match="uint8"):
        _tiny().detect([np.zeros((8, 8, 3), np.float32)])


def test_cli_train_resume_label_and_crop(scenes, tmp_path) -> None:
    from index_builder.cli import main

    root, _, _ = scenes
    common = ["--backbone", "tiny_fpn", "--min-size", "64", "--max-size", "64", "--lr", "3e-3",
              "--batch-size", "8", "--quiet"]
    out = tmp_path / "det"
    args = ["train-detector", "--train", str(root / "train.json"), "--val", str(root / "val.json"),
            "--images-root", str(root), "--out", str(out), *common]
    assert main([*args, "--epochs", "1"]) == 0
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    history = torch.load(out / "checkpoint.pt", weights_only=True)["history"]
    assert [int(h["epoch"]) for h in history] == [0, 1] and "map50" in history[-1]

    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": str(root / "val" / "0000.png"), "sku": "S1", "category": "box"},
        {"image": str(root / "val" / "0001.png"), "sku": "S2", "category": "ball",
         "bbox": [1, 2, 30, 40]},
    ]))
    rows_out = tmp_path / "crops" / "catalog.jsonl"
    assert main(["crop", "--catalog", str(catalog), "--detector", str(out / "detector.pt"),
                 "--out", str(rows_out), "--quiet"]) == 0
    rows = [json.loads(x) for x in rows_out.read_text().splitlines()]
    assert len(rows[0]["bbox"]) == 4 and rows[1]["bbox"] == [1, 2, 30, 40]
    assert (rows_out.parent / rows[0]["image"]).resolve() == (root / "val" / "0000.png")

    lab = tmp_path / "lab"
    assert main(["label-detection", "--labelled", str(root / "val.json"), "--unlabelled",
                 str(root / "train"), "--images-root", str(root), "--val", str(root / "val.json"),
                 "--rounds", "1", "--out", str(lab), "--epochs", "1", *common]) == 0
    stats = json.loads((lab / "rounds.json").read_text())
    assert [s["round"] for s in stats] == [0, 1] and stats[0]["train_images"] == 16
    assert stats[0]["kept_images"] + stats[0]["queued_images"] == 48
    assert stats[1]["train_images"] == 16 + stats[0]["kept_images"]
