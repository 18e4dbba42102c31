"""``visearch-index train-detector``, ``label-detection`` and ``crop``.

Backbone names are resolved here (the CLI edge) through ``DETECTOR_BACKBONES``; the library
receives plain arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from visearch.catalog import read_manifest, write_manifest
from visearch.detection.crops import main_object_boxes
from visearch.detection.data import coco_categories, coco_samples, read_coco
from visearch.detection.model import (
    DETECTOR_BACKBONES,
    ProductDetector,
    build_detector,
    load_detector,
)
from visearch.detection.pseudo_label import UnlabelledImage, merge_coco, read_reviewed, run_rounds
from visearch.detection.train import evaluate_detector, train_detector
from visearch.imageio import image_files

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = {"mobilenet_v2_fpn": "mobilenet_v2-b0353104.pth"}
_REPO = Path(__file__).resolve().parent.parent


def default_backbone_weights(backbone: str) -> Path | None:
    """The local ImageNet weights file shipped for ``backbone`` (``weights/``), else None."""
    name = DEFAULT_WEIGHTS.get(backbone)
    if name is None:
        return None
    for root in (Path.cwd(), _REPO):
        if (root / "weights" / name).is_file():
            return root / "weights" / name
    return None


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _images_root(args: argparse.Namespace, coco_path: str) -> Path:
    # The synthetic world's layout: DIR/detection/train.json names images relative to DIR.
    return Path(args.images_root) if args.images_root else Path(coco_path).resolve().parent.parent


def _backbone_weights(args: argparse.Namespace) -> Path | None:
    if args.backbone_weights == "none":
        return None
    if args.backbone_weights:
        return Path(args.backbone_weights)
    return default_backbone_weights(args.backbone)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and training")
    g.add_argument("--backbone", default="mobilenet_v2_fpn", choices=DETECTOR_BACKBONES.names())
    g.add_argument(
        "--backbone-weights",
        default=None,
        help="local ImageNet state_dict for the backbone; default: weights/ file shipped for "
        "the backbone if any ('none' trains from scratch)",
    )
    g.add_argument("--min-size", type=int, default=128, help="short side after resize, px")
    g.add_argument("--max-size", type=int, default=128, help="long side cap after resize, px")
    g.add_argument("--fpn-channels", type=int, default=None, help="default: the backbone's")
    g.add_argument("--epochs", type=int, default=12)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=0, help="image-decoding processes")
    g.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is fastest on a CPU shared with other jobs)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _build(args: argparse.Namespace, categories: list[str]) -> ProductDetector:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return build_detector(
        args.backbone,
        categories,
        min_size=args.min_size,
        max_size=args.max_size,
        backbone_weights=_backbone_weights(args),
        fpn_channels=args.fpn_channels,
    )


def _epoch_line(r: dict[str, float]) -> str:
    line = f"epoch {int(r['epoch']) + 1}: loss {r['loss']:.4f} ({r['seconds']:.1f} s)"
    if "map" in r:
        line += f", val mAP {r['map']:.4f}, mAP@.5 {r['map50']:.4f}"
    return line


def _train_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "workers": args.workers,
        "device": _device(args.device),
        "progress": not args.quiet,
    }


def cmd_train(args: argparse.Namespace) -> int:
    train = read_coco(args.train)
    root = _images_root(args, args.train)
    categories, _ = coco_categories(train)
    val = read_coco(args.val) if args.val else None
    if val is not None and coco_categories(val)[0] != categories:
        raise SystemExit(f"--val categories {coco_categories(val)[0]} differ from --train's")
    val_root = Path(args.images_root) if args.images_root else _images_root(args, args.val or "")
    model = _build(args, categories)
    weights = _backbone_weights(args)
    samples = coco_samples(train, root)
    print(
        f"training {args.backbone} ({'from ' + str(weights) if weights else 'from scratch'}) "
        f"at {args.min_size}-{args.max_size} px on {len(samples)} images, "
        f"{len(train['annotations'])} boxes, {len(categories)} categories"
    )
    t0 = time.perf_counter()
    result = train_detector(
        model,
        samples,
        args.out,
        val_coco=val,
        val_samples=coco_samples(val, val_root) if val is not None else None,
        resume=args.resume,
        extra_config={"train_file": str(args.train), "val_file": str(args.val or "")},
        callback=lambda r: print(_epoch_line(r), flush=True),
        **_train_kwargs(args),
    )
    summary = {
        "detector": str(result.detector_path),
        "checkpoint": str(result.checkpoint),
        "seconds": round(time.perf_counter() - t0, 1),
        "last_epoch": result.history[-1] if result.history else None,
    }
    Path(args.out, "history.json").write_text(json.dumps(result.history, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


def _unlabelled_images(src: Path, root: Path, lenient: bool) -> list[UnlabelledImage]:
    """Images of a folder (recursive, sorted) or of a catalog/queries manifest."""
    if src.is_dir():
        paths = image_files(src, what="--unlabelled")
    elif src.suffix == ".jsonl":
        paths = [row.path for row in read_manifest(src, strict=not lenient).rows]
    else:
        raise SystemExit(f"--unlabelled must be a folder of images or a .jsonl manifest: {src}")
    root = root.resolve()
    out = []
    for p in dict.fromkeys(paths):  # a manifest may list an image twice
        p = p.resolve()
        key = os.path.relpath(p, root) if p.is_relative_to(root) else str(p)
        out.append(UnlabelledImage(key, p))
    return out


def cmd_label(args: argparse.Namespace) -> int:
    labelled = read_coco(args.labelled)
    root = _images_root(args, args.labelled)
    categories, _ = coco_categories(labelled)
    reviewed = []
    for path in args.reviewed or []:
        reviewed.extend(read_reviewed(path, categories))
    if reviewed:
        print(f"adding {len(reviewed)} reviewed image(s) to the labelled set")
        labelled = merge_coco(labelled, reviewed)
    known = {im["file_name"] for im in labelled["images"]}
    unlabelled = [
        u for u in _unlabelled_images(Path(args.unlabelled), root, args.lenient)
        if u.key not in known
    ]
    val = read_coco(args.val) if args.val else None
    val_samples = coco_samples(val, root) if val is not None else None
    out = Path(args.out)
    weights = _backbone_weights(args)
    print(
        f"labelling {len(unlabelled)} image(s) from {len(labelled['images'])} labelled "
        f"({len(labelled['annotations'])} boxes), {args.rounds} round(s), "
        f"keep >= {args.keep_thresh}, review >= {args.review_thresh}"
    )

    def train(r: int, coco: dict[str, Any]) -> ProductDetector:
        print(f"round {r}: training on {len(coco['images'])} images, "
              f"{len(coco['annotations'])} boxes", flush=True)
        model = _build(args, categories)
        result = train_detector(
            model,
            coco_samples(coco, root),
            out / f"round_{r}" / "model",
            resume=args.resume,
            extra_config={"round": r, "backbone_weights": str(weights or "")},
            callback=lambda row: print("  " + _epoch_line(row), flush=True),
            **_train_kwargs(args),
        )
        return result.model

    def evaluate(model: Any) -> dict[str, float]:
        assert val is not None and val_samples is not None
        return evaluate_detector(model, val, val_samples, batch_size=args.batch_size)

    stats = run_rounds(
        labelled,
        unlabelled,
        out,
        rounds=args.rounds,
        train=train,
        evaluate=evaluate if val is not None else None,
        keep_thresh=args.keep_thresh,
        review_thresh=args.review_thresh,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    print(_rounds_table(stats))
    print(f"labels: {out / 'train.json'}  review queue: {out / 'review_queue.jsonl'}  "
          f"detector: {out / f'round_{args.rounds}' / 'model' / 'detector.pt'}")
    return 0


def _rounds_table(stats: list[dict[str, Any]]) -> str:
    cols = ["round", "train_images", "train_boxes", "map", "map50", "kept_boxes",
            "queued_images"]
    lines = [" | ".join(cols)]
    for s in stats:
        lines.append(" | ".join(
            f"{s[c]:.4f}" if isinstance(s.get(c), float) else str(s.get(c, "-")) for c in cols
        ))
    return "\n".join(lines)


def cmd_crop(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.catalog, strict=not args.lenient)
    detector = load_detector(args.detector, device=_device(args.device))
    boxes = main_object_boxes(
        detector,
        manifest.rows,
        score_thresh=args.score_thresh,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    rows = [dataclasses.replace(r, bbox=b.box) for r, b in zip(manifest.rows, boxes, strict=True)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_manifest(args.out, rows)
    counts: dict[str, int] = {}
    for b in boxes:
        counts[b.source] = counts.get(b.source, 0) + 1
    print(json.dumps({"rows": len(rows), "out": str(args.out), **counts}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train-detector``, ``label-detection`` and ``crop`` to ``sub``."""
    p = sub.add_parser(
        "train-detector",
        help="train the RetinaNet product detector on COCO annotations",
        description="Train the RetinaNet product detector (checkpoints each epoch, --resume, "
        "val mAP with pycocotools).",
    )
    p.add_argument("--train", required=True, help="COCO annotations (train.json)")
    p.add_argument("--val", default=None, help="COCO annotations for per-epoch mAP")
    p.add_argument(
        "--images-root",
        default=None,
        help="folder COCO file_names are relative to (default: the parent of the folder "
        "holding --train, the synthetic world's layout)",
    )
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, detector.pt")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    _add_model_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "label-detection",
        help="semi-supervised box labelling: train, pseudo-label, queue doubts, retrain",
        description="Start from labelled COCO, pseudo-label unlabelled images for N rounds; "
        "writes OUT/train.json (labelled + pseudo-labelled), OUT/review_queue.jsonl, "
        "OUT/rounds.json and each round's detector.",
    )
    p.add_argument("--labelled", required=True, help="COCO annotations of the labelled subset")
    p.add_argument("--unlabelled", required=True,
                   help="a folder of images or a catalog/queries .jsonl manifest")
    p.add_argument("--images-root", default=None,
                   help="folder --labelled file_names are relative to (default: the parent of "
                   "the folder holding --labelled)")
    p.add_argument("--val", default=None, help="COCO annotations to score each round (mAP)")
    p.add_argument("--reviewed", action="append", default=None,
                   help="a corrected review_queue.jsonl (rows with \"reviewed\": true are "
                   "added as labels); repeatable")
    p.add_argument("--rounds", type=int, default=2, help="pseudo-labelling rounds")
    p.add_argument("--keep-thresh", type=float, default=0.5,
                   help="boxes at or above this score become pseudo-labels")
    p.add_argument("--review-thresh", type=float, default=0.3,
                   help="boxes from here up to --keep-thresh send their image to review")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="resume each round's training")
    p.add_argument("--lenient", action="store_true", help="skip bad manifest rows")
    _add_model_flags(p)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser(
        "crop",
        help="fill in the main-product bbox of catalog rows that have none, with the detector",
        description="Rows with a bbox keep it; the others get the detector's main object (or "
        "the whole image when nothing passes --score-thresh). Writes a manifest with a bbox "
        "on every row.",
    )
    p.add_argument("--catalog", required=True, help="catalog.jsonl")
    p.add_argument("--detector", required=True, help="detector.pt from train-detector")
    p.add_argument("--out", required=True, help="output manifest (rows with bbox)")
    p.add_argument("--score-thresh", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--lenient", action="store_true", help="skip bad manifest rows")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_crop)
