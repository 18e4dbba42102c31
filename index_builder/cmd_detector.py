"""``visearch-index train-detector``, ``label-detection`` and ``crop``.

Backbone names are resolved here (the CLI edge) through ``DETECTOR_BACKBONES``; the library
receives plain arguments. The typed functions :func:`train_detector_on_coco`,
:func:`label_detection` and :func:`crop_catalog` are what ``rebuild`` calls; the
subcommands are thin wrappers over them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from index_builder.cmd_ingest import add_store_argument
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
from visearch.device import choose_device
from visearch.imageio import image_files
from visearch.store import store_lookup

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


@dataclass(frozen=True)
class DetectorTrainParams:
    """The detector's model and training schedule (defaults: the subcommands' flags).

    ``backbone`` is looked up in ``DETECTOR_BACKBONES``; ``backbone_weights`` is a resolved
    local ImageNet state_dict (None: from scratch; :func:`default_backbone_weights` gives
    the shipped one)."""

    backbone: str = "mobilenet_v2_fpn"
    backbone_weights: Path | None = None
    min_size: int = 128  # short side after resize, px
    max_size: int = 128  # long side cap after resize, px
    fpn_channels: int | None = None  # None: the backbone's
    epochs: int = 12
    batch_size: int = 8
    lr: float = 3e-3  # AdamW peak learning rate
    seed: int = 0
    workers: int = 0  # image-decoding processes
    device: str | None = None  # None: cuda when available, else cpu
    threads: int | None = None  # torch CPU threads (None: torch's default)
    progress: bool = True


@dataclass(frozen=True)
class DetectorTraining:
    """A finished :func:`train_detector_on_coco`: its files, wall time and history."""

    detector_path: Path
    checkpoint: Path
    seconds: float
    history: list[dict[str, float]]

    def summary(self) -> dict[str, Any]:
        """The JSON summary ``train-detector`` prints."""
        return {
            "detector": str(self.detector_path),
            "checkpoint": str(self.checkpoint),
            "seconds": round(self.seconds, 1),
            "last_epoch": self.history[-1] if self.history else None,
        }


@dataclass(frozen=True)
class Labelling:
    """A finished :func:`label_detection`: one stats row per round, and its files."""

    stats: list[dict[str, Any]]
    out: Path
    rounds: int

    def table(self) -> str:
        """The per-round table and the output files, as ``label-detection`` prints them."""
        return (f"{_rounds_table(self.stats)}\n"
                f"labels: {self.out / 'train.json'}  review queue: "
                f"{self.out / 'review_queue.jsonl'}  "
                f"detector: {self.out / f'round_{self.rounds}' / 'model' / 'detector.pt'}")


@dataclass(frozen=True)
class CropResult:
    """What :func:`crop_catalog` wrote: the rows, the manifest, how each row got its box."""

    rows: int
    out: str
    sources: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary ``crop`` prints."""
        return {"rows": self.rows, "out": self.out, **self.sources}


def _images_root(images_root: str | os.PathLike[str] | None,
                 coco_path: str | os.PathLike[str]) -> Path:
    # The synthetic world's layout: DIR/detection/train.json names images relative to DIR.
    return Path(images_root) if images_root else Path(coco_path).resolve().parent.parent


def _build(params: DetectorTrainParams, categories: list[str]) -> ProductDetector:
    if params.threads:
        torch.set_num_threads(params.threads)
    torch.manual_seed(params.seed)
    return build_detector(
        params.backbone,
        categories,
        min_size=params.min_size,
        max_size=params.max_size,
        backbone_weights=params.backbone_weights,
        fpn_channels=params.fpn_channels,
    )


def _epoch_line(r: dict[str, float]) -> str:
    line = f"epoch {int(r['epoch']) + 1}: loss {r['loss']:.4f} ({r['seconds']:.1f} s)"
    if "map" in r:
        line += f", val mAP {r['map']:.4f}, mAP@.5 {r['map50']:.4f}"
    return line


def _train_kwargs(params: DetectorTrainParams) -> dict[str, Any]:
    return {
        "epochs": params.epochs,
        "batch_size": params.batch_size,
        "lr": params.lr,
        "seed": params.seed,
        "workers": params.workers,
        "device": choose_device(params.device),
        "progress": params.progress,
    }


def train_detector_on_coco(
    train: str | os.PathLike[str],
    out: str | os.PathLike[str],
    params: DetectorTrainParams,
    *,
    val: str | os.PathLike[str] | None = None,
    images_root: str | os.PathLike[str] | None = None,
    resume: bool = False,
) -> DetectorTraining:
    """Train the RetinaNet product detector on COCO annotations.

    Writes ``<out>/checkpoint.pt`` each epoch, ``detector.pt`` and ``history.json``;
    prints a header and one line per epoch (val mAP with pycocotools when ``val`` is given).

    Args:
        train: COCO annotations (train.json); its categories are the classes.
        out: output folder.
        params: model and schedule.
        val: COCO annotations with the same categories, scored each epoch.
        images_root: the folder COCO ``file_name``s are relative to (default: the parent
            of the folder holding ``train``, the synthetic world's layout).
        resume: continue from ``<out>/checkpoint.pt``.

    Raises:
        ValueError: ``val``'s categories differ from ``train``'s.
    """
    coco = read_coco(train)
    root = _images_root(images_root, train)
    categories, _ = coco_categories(coco)
    val_coco = read_coco(val) if val else None
    if val_coco is not None and coco_categories(val_coco)[0] != categories:
        raise ValueError(f"--val categories {coco_categories(val_coco)[0]} differ from "
                         "--train's")
    val_root = Path(images_root) if images_root else _images_root(None, val or "")
    model = _build(params, categories)
    weights = params.backbone_weights
    samples = coco_samples(coco, root)
    print(
        f"training {params.backbone} "
        f"({'from ' + str(weights) if weights else 'from scratch'}) "
        f"at {params.min_size}-{params.max_size} px on {len(samples)} images, "
        f"{len(coco['annotations'])} boxes, {len(categories)} categories"
    )
    t0 = time.perf_counter()
    result = train_detector(
        model,
        samples,
        out,
        val_coco=val_coco,
        val_samples=coco_samples(val_coco, val_root) if val_coco is not None else None,
        resume=resume,
        extra_config={"train_file": str(train), "val_file": str(val or "")},
        callback=lambda r: print(_epoch_line(r), flush=True),
        **_train_kwargs(params),
    )
    seconds = time.perf_counter() - t0
    Path(out, "history.json").write_text(json.dumps(result.history, indent=1))
    return DetectorTraining(result.detector_path, result.checkpoint, seconds,
                            list(result.history))


def _unlabelled_images(src: Path, root: Path, lenient: bool) -> list[UnlabelledImage]:
    """Images of a folder (recursive, sorted) or of a catalog/queries manifest."""
    if src.is_dir():
        paths = image_files(src, what="--unlabelled")
    elif src.suffix == ".jsonl":
        paths = [row.path for row in read_manifest(src, strict=not lenient).rows]
    else:
        raise ValueError(f"--unlabelled must be a folder of images or a .jsonl manifest: {src}")
    root = root.resolve()
    out = []
    for p in dict.fromkeys(paths):  # a manifest may list an image twice
        p = p.resolve()
        key = os.path.relpath(p, root) if p.is_relative_to(root) else str(p)
        out.append(UnlabelledImage(key, p))
    return out


def label_detection(
    labelled: str | os.PathLike[str],
    unlabelled: Path,
    out: Path,
    params: DetectorTrainParams,
    *,
    rounds: int = 2,
    keep_thresh: float = 0.5,
    review_thresh: float = 0.3,
    val: str | os.PathLike[str] | None = None,
    images_root: str | os.PathLike[str] | None = None,
    reviewed: Sequence[str | os.PathLike[str]] = (),
    resume: bool = False,
    lenient: bool = False,
) -> Labelling:
    """Semi-supervised box labelling (``visearch.detection.pseudo_label.run_rounds``):
    train on ``labelled`` COCO, pseudo-label the ``unlabelled`` images (a folder, or a
    catalog/queries .jsonl) for ``rounds`` rounds, retraining on the boxes at or above
    ``keep_thresh``; images with boxes from ``review_thresh`` up go to the review queue.

    Writes ``<out>/train.json``, ``review_queue.jsonl``, ``rounds.json`` and each round's
    detector (``round_<r>/model/detector.pt``); prints each round's training.

    Args:
        reviewed: corrected review queues whose reviewed rows are added as labels.
        val: COCO annotations scored after each round (mAP).
        images_root: the folder ``labelled``'s file names are relative to (default: the
            parent of the folder holding it).

    Raises:
        ValueError: ``unlabelled`` is neither a folder nor a .jsonl manifest.
    """
    coco = read_coco(labelled)
    root = _images_root(images_root, labelled)
    categories, _ = coco_categories(coco)
    extra = []
    for path in reviewed:
        extra.extend(read_reviewed(path, categories))
    if extra:
        print(f"adding {len(extra)} reviewed image(s) to the labelled set")
        coco = merge_coco(coco, extra)
    known = {im["file_name"] for im in coco["images"]}
    images = [u for u in _unlabelled_images(Path(unlabelled), root, lenient)
              if u.key not in known]
    val_coco = read_coco(val) if val else None
    val_samples = coco_samples(val_coco, root) if val_coco is not None else None
    out = Path(out)
    weights = params.backbone_weights
    print(
        f"labelling {len(images)} image(s) from {len(coco['images'])} labelled "
        f"({len(coco['annotations'])} boxes), {rounds} round(s), "
        f"keep >= {keep_thresh}, review >= {review_thresh}"
    )

    def train(r: int, round_coco: dict[str, Any]) -> ProductDetector:
        print(f"round {r}: training on {len(round_coco['images'])} images, "
              f"{len(round_coco['annotations'])} boxes", flush=True)
        model = _build(params, categories)
        result = train_detector(
            model,
            coco_samples(round_coco, root),
            out / f"round_{r}" / "model",
            resume=resume,
            extra_config={"round": r, "backbone_weights": str(weights or "")},
            callback=lambda row: print("  " + _epoch_line(row), flush=True),
            **_train_kwargs(params),
        )
        return result.model

    def evaluate(model: Any) -> dict[str, float]:
        assert val_coco is not None and val_samples is not None
        return evaluate_detector(model, val_coco, val_samples, batch_size=params.batch_size)

    stats = run_rounds(
        coco,
        images,
        out,
        rounds=rounds,
        train=train,
        evaluate=evaluate if val_coco is not None else None,
        keep_thresh=keep_thresh,
        review_thresh=review_thresh,
        batch_size=params.batch_size,
        progress=params.progress,
    )
    return Labelling(stats, out, rounds)


def _rounds_table(stats: list[dict[str, Any]]) -> str:
    cols = ["round", "train_images", "train_boxes", "map", "map50", "kept_boxes",
            "queued_images"]
    lines = [" | ".join(cols)]
    for s in stats:
        lines.append(" | ".join(
            f"{s[c]:.4f}" if isinstance(s.get(c), float) else str(s.get(c, "-")) for c in cols
        ))
    return "\n".join(lines)


def crop_catalog(
    catalog: Path,
    detector: Path,
    out: str | os.PathLike[str],
    *,
    score_thresh: float = 0.1,
    batch_size: int = 16,
    device: str | None = None,
    lenient: bool = False,
    store: Path | None = None,
    progress: bool = True,
) -> CropResult:
    """Fill in the main-product bbox of catalog rows that have none, with the detector:
    rows with a bbox keep it; the others get the detector's main object, or the whole
    image when nothing scores ``score_thresh``. Writes the manifest ``out``. With
    ``store`` the rows carry their stored images (``CatalogRow.stored``)."""
    manifest = read_manifest(catalog, strict=not lenient, images=store_lookup(store))
    model = load_detector(detector, device=choose_device(device))
    boxes = main_object_boxes(
        model,
        manifest.rows,
        score_thresh=score_thresh,
        batch_size=batch_size,
        progress=progress,
    )
    rows = [dataclasses.replace(r, bbox=b.box) for r, b in zip(manifest.rows, boxes, strict=True)]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_manifest(out, rows)
    counts: dict[str, int] = {}
    for b in boxes:
        counts[b.source] = counts.get(b.source, 0) + 1
    return CropResult(len(rows), str(out), counts)


# -- CLI ------------------------------------------------------------------------------------


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


def _params(args: argparse.Namespace) -> DetectorTrainParams:
    if args.backbone_weights == "none":
        weights = None
    elif args.backbone_weights:
        weights = Path(args.backbone_weights)
    else:
        weights = default_backbone_weights(args.backbone)
    return DetectorTrainParams(
        backbone=args.backbone, backbone_weights=weights, min_size=args.min_size,
        max_size=args.max_size, fpn_channels=args.fpn_channels, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, workers=args.workers,
        device=args.device, threads=args.threads, progress=not args.quiet,
    )


def cmd_train(args: argparse.Namespace) -> int:
    result = train_detector_on_coco(args.train, args.out, _params(args), val=args.val,
                                    images_root=args.images_root, resume=args.resume)
    print(json.dumps(result.summary(), indent=1))
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    result = label_detection(
        args.labelled, Path(args.unlabelled), Path(args.out), _params(args),
        rounds=args.rounds, keep_thresh=args.keep_thresh, review_thresh=args.review_thresh,
        val=args.val, images_root=args.images_root, reviewed=args.reviewed or (),
        resume=args.resume, lenient=args.lenient,
    )
    print(result.table())
    return 0


def cmd_crop(args: argparse.Namespace) -> int:
    result = crop_catalog(args.catalog, args.detector, args.out,
                          score_thresh=args.score_thresh, batch_size=args.batch_size,
                          device=args.device, lenient=args.lenient, store=args.store,
                          progress=not args.quiet)
    print(json.dumps(result.to_dict()))
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
    add_store_argument(p)
    p.set_defaults(func=cmd_crop)
