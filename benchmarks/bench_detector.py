"""Detector benchmark: accuracy on synthetic user photos, speed per backbone and size, and
semi-supervised labelling (10% of boxes labelled, N rounds) against 100% labelled.

    .venv/bin/python -m benchmarks.bench_detector                 # generates a small world
    .venv/bin/python -m benchmarks.bench_detector --world DIR --device cuda --rounds 3

Figures, each beside a baseline measured in the same run:
- val mAP@[.5:.95] / mAP@.5 (all boxes of the detection val scenes);
- on the user photos (queries.jsonl, one ground-truth product each): main-product mAP (the
  main object as the single prediction), main-object hit rate (IoU >= 0.5), category accuracy;
  baseline: the whole image as the box (what the search does without a detector);
- ms per image (CPU, batch 1) per backbone and input size, untrained weights; on CUDA also
  images/s at batch 1 and 8 in fp32 and fp16 (autocast); baseline: resnet50_fpn, the
  usual RetinaNet backbone;
- semi-supervised: val mAP after each round from a 10% labelled subset, and the 100% run.
Trainings use the same number of optimiser steps whatever the set size, so rows compare.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.machine import machine
from visearch.catalog import read_manifest
from visearch.detection.data import coco_categories, coco_samples, read_coco
from visearch.detection.evaluate import evaluate_coco, main_object_hit_rate
from visearch.detection.main_object import MAIN_AREA_WEIGHT, MAIN_SCORE_THRESH, select_main_object
from visearch.detection.model import (
    DETECTOR_BACKBONES,
    ProductDetector,
    build_detector,
    load_detector,
)
from visearch.detection.pseudo_label import UnlabelledImage, run_rounds
from visearch.detection.train import evaluate_detector, train_detector
from visearch.device import choose_device
from visearch.imageio import decode_image

_REPO = Path(__file__).resolve().parent.parent
MOBILENET = _REPO / "weights" / "mobilenet_v2-b0353104.pth"


def _weights(backbone: str, pretrained: bool) -> Path | None:
    use = pretrained and backbone == "mobilenet_v2_fpn" and MOBILENET.is_file()
    return MOBILENET if use else None


def _build(args: argparse.Namespace, categories: list[str]) -> ProductDetector:
    torch.manual_seed(args.seed)
    return build_detector(
        args.backbone, categories, min_size=args.size, max_size=args.size,
        backbone_weights=_weights(args.backbone, not args.scratch),
    )


def _train(args: argparse.Namespace, coco: dict, root: Path, out: Path) -> ProductDetector:
    samples = coco_samples(coco, root)
    epochs = max(1, math.ceil(args.steps * args.batch_size / len(samples)))
    model = _build(args, coco_categories(coco)[0])
    t0 = time.perf_counter()
    train_detector(
        model, samples, out, epochs=epochs, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, device=args.device, progress=not args.quiet,
    )
    print(f"  trained on {len(samples)} images, {epochs} epochs "
          f"({epochs * math.ceil(len(samples) / args.batch_size)} steps) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return model


def query_metrics(
    model: ProductDetector | None, world: Path, thresh: float, area_weight: float
) -> dict[str, float]:
    """Main-object metrics on queries.jsonl; ``model=None`` is the whole-image baseline."""
    rows = [r for r in read_manifest(world / "queries.jsonl").rows if r.bbox is not None]
    categories = model.categories if model is not None else sorted({r.category for r in rows})
    images = [decode_image(r.path) for r in rows]
    gt = np.array([r.bbox for r in rows], np.float32)
    if model is not None:
        dets = model.detect(images, batch_size=16)
        mains = [select_main_object(d, im.shape, score_thresh=thresh, area_weight=area_weight)
                 for d, im in zip(dets, images, strict=True)]
    else:
        mains = None
    pred = np.array([m.box for m in mains] if mains else
                    [(0, 0, im.shape[1], im.shape[0]) for im in images], np.float32)
    coco_gt = {
        "images": [{"id": i + 1, "file_name": r.image, "width": im.shape[1],
                    "height": im.shape[0]}
                   for i, (r, im) in enumerate(zip(rows, images, strict=True))],
        "annotations": [{"id": i + 1, "image_id": i + 1,
                         "category_id": categories.index(r.category) + 1,
                         "bbox": [r.bbox[0], r.bbox[1], r.bbox[2] - r.bbox[0],
                                  r.bbox[3] - r.bbox[1]], "iscrowd": 0}
                        for i, r in enumerate(rows)],
        "categories": [{"id": i + 1, "name": c} for i, c in enumerate(categories)],
    }
    if mains is not None:
        results = [{"image_id": i + 1, "category_id": categories.index(m.category) + 1,
                    "bbox": [m.box[0], m.box[1], m.box[2] - m.box[0], m.box[3] - m.box[1]],
                    "score": m.score} for i, m in enumerate(mains) if not m.fallback]
        cat_acc = float(np.mean([m.category == r.category
                                 for m, r in zip(mains, rows, strict=True)]))
        fallback = float(np.mean([m.fallback for m in mains]))
    else:
        # The whole image, scored once per category (category unknown without a detector).
        results = [{"image_id": i + 1, "category_id": c + 1,
                    "bbox": [0, 0, im.shape[1], im.shape[0]], "score": 1.0}
                   for i, im in enumerate(images) for c in range(len(categories))]
        cat_acc, fallback = 1.0 / len(categories), 1.0
    m = evaluate_coco(coco_gt, results)
    return {
        "main_map": m["map"], "main_map50": m["map50"],
        "hit_rate": main_object_hit_rate(pred, gt), "category_acc": cat_acc,
        "fallback_rate": fallback, "queries": len(rows),
    }


def timing(args: argparse.Namespace, categories: list[str], images: list[np.ndarray]) -> list[dict]:
    """ms per image (batch 1) on CPU; images/s at batch 1 and 8, fp32/fp16 on CUDA."""
    rows = []
    configs = [(b, p) for b in args.time_backbones for p in ([1, 8] if args.device.type == "cuda"
                                                              else [1])]
    for backbone, batch in configs:
        for size in args.time_sizes:
            torch.manual_seed(0)
            model = build_detector(
                backbone, categories, min_size=size, max_size=size,
                backbone_weights=_weights(backbone, True),
            ).to(args.device).eval()
            for precision in (["fp32", "fp16"] if args.device.type == "cuda" else ["fp32"]):
                n = args.time_images
                batch_imgs = [images[i % len(images)] for i in range(batch)]

                def run(model=model, batch_imgs=batch_imgs, precision=precision) -> None:
                    with torch.autocast(args.device.type, dtype=torch.float16,
                                        enabled=precision == "fp16"):
                        model.detect(batch_imgs, batch_size=len(batch_imgs))
                    if args.device.type == "cuda":
                        torch.cuda.synchronize()

                for _ in range(2):
                    run()
                reps = max(1, n // batch)
                t0 = time.perf_counter()
                for _ in range(reps):
                    run()
                sec = (time.perf_counter() - t0) / (reps * batch)
                rows.append({"backbone": backbone, "size": size, "batch": batch,
                             "precision": precision, "ms_per_image": 1000 * sec,
                             "images_per_s": 1.0 / sec})
                print(f"  {backbone:17s} {size:4d}px b{batch} {precision}: "
                      f"{1000 * sec:7.1f} ms/img", flush=True)
    return rows


def semi_supervised(args: argparse.Namespace, world: Path, train: dict, val: dict,
                    out: Path) -> list[dict]:
    rng = random.Random(args.seed)
    ids = sorted(im["id"] for im in train["images"])
    labelled_ids = set(rng.sample(ids, max(1, round(args.labelled_fraction * len(ids)))))
    labelled = {
        **train,
        "images": [im for im in train["images"] if im["id"] in labelled_ids],
        "annotations": [a for a in train["annotations"] if a["image_id"] in labelled_ids],
    }
    unlabelled = [UnlabelledImage(im["file_name"], world / im["file_name"])
                  for im in train["images"] if im["id"] not in labelled_ids]
    print(f"semi-supervised: {len(labelled['images'])} labelled images "
          f"({len(labelled['annotations'])}/{len(train['annotations'])} boxes), "
          f"{len(unlabelled)} unlabelled, {args.rounds} round(s)", flush=True)
    val_samples = coco_samples(val, world)
    return run_rounds(
        labelled, unlabelled, out / "ssl", rounds=args.rounds,
        train=lambda r, coco: _train(args, coco, world, out / "ssl" / f"round_{r}" / "model"),
        evaluate=lambda m: evaluate_detector(m, val, val_samples),
        keep_thresh=args.keep_thresh, review_thresh=args.review_thresh,
    )


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _speed_table(timings: list[dict]) -> str:
    base = {(r["size"], r["batch"], r["precision"]): r["ms_per_image"]
            for r in timings if r["backbone"] == "resnet50_fpn"}
    return "\n## Detector speed (ms per image; baseline resnet50_fpn)\n" + _table(
        ["backbone", "size", "batch", "precision", "ms/img", "img/s", "vs resnet50_fpn"],
        [[r["backbone"], r["size"], r["batch"], r["precision"], round(r["ms_per_image"], 1),
          round(r["images_per_s"], 1),
          f"{base[(r['size'], r['batch'], r['precision'])] / r['ms_per_image']:.1f}x"
          if (r["size"], r["batch"], r["precision"]) in base else "-"]
         for r in timings],
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_detector", description=__doc__.splitlines()[0])
    p.add_argument("--world", type=Path, default=None,
                   help="a synthetic world; default: generate one under --out")
    p.add_argument("--skus", type=int, default=200)
    p.add_argument("--scenes", type=int, default=500)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--out", type=Path, default=Path("runs/bench_detector"))
    p.add_argument("--backbone", default="mobilenet_v2_fpn", choices=DETECTOR_BACKBONES.names())
    p.add_argument("--scratch", action="store_true", help="no ImageNet start for mobilenet")
    p.add_argument("--size", type=int, default=96, help="detector input size for training")
    p.add_argument("--steps", type=int, default=600, help="optimiser steps per training")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--main-thresh", type=float, default=MAIN_SCORE_THRESH,
                   help="main-object score threshold")
    p.add_argument("--area-weight", type=float, default=MAIN_AREA_WEIGHT,
                   help="main object: exponent of the relative box area in the ranking")
    p.add_argument("--detector", type=Path,
                   help="evaluate this trained detector on the world's queries (no training)")
    p.add_argument("--rounds", type=int, default=1, help="semi-supervised rounds (0 skips)")
    p.add_argument("--labelled-fraction", type=float, default=0.1)
    p.add_argument("--keep-thresh", type=float, default=0.5)
    p.add_argument("--review-thresh", type=float, default=0.3)
    p.add_argument("--time-backbones",
                   default="tiny_fpn,mobilenet_v2_fpn,resnet18_fpn,resnet50_fpn")
    p.add_argument("--time-sizes", default="96,128,160")
    p.add_argument("--time-images", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: two-thread ops crawl on a shared 2-core CPU)")
    p.add_argument("--only-timing", action="store_true", help="skip the trainings")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.device = choose_device(args.device)
    args.time_backbones = [b for b in args.time_backbones.split(",") if b]
    args.time_sizes = [int(s) for s in args.time_sizes.split(",") if s]
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine(["torchvision"]) | {"device": str(args.device)},
                              "args": {
        k: str(v) for k, v in vars(args).items()}}
    print(json.dumps(report["machine"]))

    world = args.world
    if world is None:
        from visearch.synth import generate_world

        world = args.out / "world"
        if not (world / "detection" / "val.json").is_file():
            print(f"generating a world in {world} ...", flush=True)
            generate_world(world, skus=args.skus, seed=args.seed, image_size=args.image_size,
                           scenes=args.scenes)
    train = read_coco(world / "detection" / "train.json")
    val = read_coco(world / "detection" / "val.json")
    categories = coco_categories(train)[0]
    val_samples = coco_samples(val, world)

    print("timing (untrained weights):", flush=True)
    sample_images = [decode_image(s.path) for s in val_samples[: max(8, args.time_images)]]
    report["timing"] = timing(args, categories, sample_images)
    if args.only_timing:
        (args.out / "bench_detector.json").write_text(json.dumps(report, indent=1))
        print(_speed_table(report["timing"]))
        return 0

    if args.detector:
        full = load_detector(args.detector, device=args.device)
        args.rounds, args.steps = 0, 0
    else:
        print(f"training {args.backbone} at {args.size}px on 100% of the boxes:", flush=True)
        full = _train(args, train, world, args.out / "full")
    full_val = evaluate_detector(full, val, val_samples)
    report["full"] = {"val": full_val, "queries": query_metrics(
        full, world, args.main_thresh, args.area_weight)}
    # The plain rule (top score, 0.3 floor, box area ignored) on the same detections.
    report["top_score"] = query_metrics(full, world, 0.3, 0.0)
    report["baseline_whole_image"] = query_metrics(None, world, args.main_thresh, 0.0)

    if args.rounds > 0:
        report["semi_supervised"] = semi_supervised(args, world, train, val, args.out)
    (args.out / "bench_detector.json").write_text(json.dumps(report, indent=1))

    print(_speed_table(report["timing"]))
    q, b, t = report["full"]["queries"], report["baseline_whole_image"], report["top_score"]
    print(f"\n## Accuracy ({args.backbone}, {args.size}px, {args.steps} steps, "
          f"{len(train['images'])} train scenes)")
    print(_table(
        ["method", "val mAP", "val mAP@.5", "main mAP", "main mAP@.5", "hit rate", "cat acc",
         "fallback"],
        [[f"{args.backbone}, main = score x area^{args.area_weight} (>= {args.main_thresh})",
          full_val["map"], full_val["map50"], q["main_map"], q["main_map50"],
          q["hit_rate"], q["category_acc"], q["fallback_rate"]],
         [f"{args.backbone}, main = top score (>= 0.3, reference rule)", full_val["map"],
          full_val["map50"], t["main_map"], t["main_map50"], t["hit_rate"], t["category_acc"],
          t["fallback_rate"]],
         ["whole image (baseline)", "-", "-", b["main_map"], b["main_map50"], b["hit_rate"],
          b["category_acc"], b["fallback_rate"]]],
    ))
    if args.rounds > 0:
        print(f"\n## Semi-supervised ({args.labelled_fraction:.0%} labelled, keep >= "
              f"{args.keep_thresh}, review >= {args.review_thresh}) vs 100% labelled")
        rows = [[f"round {s['round']}", s["train_images"], s["train_boxes"], s["map"],
                 s["map50"], s.get("kept_boxes", "-"), s.get("queued_images", "-")]
                for s in report["semi_supervised"]]
        rows.append(["100% labelled", len(train["images"]), len(train["annotations"]),
                     full_val["map"], full_val["map50"], "-", "-"])
        print(_table(["training", "images", "boxes", "val mAP", "val mAP@.5",
                      "pseudo boxes kept", "queued"], rows))
    print(f"\nreport: {args.out / 'bench_detector.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
