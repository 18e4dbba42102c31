"""Training the RetinaNet product detector on COCO samples, with resumable checkpoints.

This module holds the detector's data (shuffled, flipped COCO samples), model and loss
(RetinaNet's own); the loop, optimiser, schedule, AMP and checkpoints are
:class:`visearch.training.Trainer`'s.

Each epoch scores the validation set with pycocotools, then writes
``<out_dir>/checkpoint.pt`` ({model, optimiser, scheduler, scaler, rng, epoch (0-based index
of the epoch just finished), config, history}) and ``<out_dir>/detector.pt``
(``save_detector``, loadable on its own). ``resume=True`` continues from the checkpoint's next
epoch with the same data order (shuffles and flips are seeded per epoch, not per process).
Mixed precision (fp16 autocast + gradient scaling) is used on CUDA.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from visearch.detection.data import (
    DetectionDataset,
    DetectionSample,
    coco_categories,
    collate_detection,
)
from visearch.detection.evaluate import detections_to_results, evaluate_coco
from visearch.detection.model import ProductDetector, save_detector
from visearch.imageio import decode_image
from visearch.training import EpochStats, Trainer, WarmupCosine, read_checkpoint, seed_rngs

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
DETECTOR = "detector.pt"

# Called with the epoch index after each epoch's files are written; tests set it to simulate
# a crash between epochs (a private hook, so the public signature carries no test-only knob).
_after_epoch_hook: Callable[[int], None] | None = None


@dataclass
class DetectorTrainResult:
    """The trained model, one history row per epoch, and where the files are."""

    model: ProductDetector
    history: list[dict[str, float]]
    checkpoint: Path
    detector_path: Path


def evaluate_detector(
    model: ProductDetector,
    coco_gt: dict[str, Any],
    samples: Sequence[DetectionSample],
    *,
    batch_size: int = 8,
) -> dict[str, float]:
    """mAP@[.5:.95] / mAP@.5 / mAP@.75 of ``model`` on ``samples`` (images of ``coco_gt``)."""
    names, cat_ids = coco_categories(coco_gt)
    if names != model.categories:
        raise ValueError(
            f"validation categories {names} differ from the detector's "
            f"{model.categories}; use annotations with the same categories"
        )
    results: list[dict[str, Any]] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        dets = model.detect([decode_image(s.path) for s in chunk], batch_size=batch_size)
        results.extend(detections_to_results([s.image_id for s in chunk], dets, cat_ids))
    return evaluate_coco(coco_gt, results)


def train_detector(
    model: ProductDetector,
    train_samples: Sequence[DetectionSample],
    out_dir: str | os.PathLike[str],
    *,
    val_coco: dict[str, Any] | None = None,
    val_samples: Sequence[DetectionSample] | None = None,
    epochs: int = 10,
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    hflip: bool = True,
    seed: int = 0,
    workers: int = 0,
    device: str | torch.device | None = None,
    resume: bool = False,
    progress: bool = False,
    extra_config: dict[str, Any] | None = None,
    callback: Callable[[dict[str, float]], None] | None = None,
) -> DetectorTrainResult:
    """Train ``model`` with AdamW, linear warm-up then cosine decay (stepped per batch).

    Args:
        model: a detector from ``build_detector`` (its categories match the labels).
        train_samples: annotated images (``coco_samples``); label ``i`` is
            ``model.categories[i]``.
        out_dir: where ``checkpoint.pt`` and ``detector.pt`` are written each epoch.
        val_coco, val_samples: the validation COCO dict and its samples; when given, each
            epoch's history row has ``map`` and ``map50``.
        epochs, batch_size, lr, weight_decay: the optimisation.
        hflip: random horizontal flips of training images.
        seed: seeds shuffling, flips and the order of everything random.
        workers: DataLoader decoding processes (0 decodes in this process).
        device: a torch device name; None picks CUDA when visible, else CPU
            (:func:`visearch.device.choose_device`).
        resume: continue from ``out_dir/checkpoint.pt`` when it exists (its detector config
            must match ``model``'s).
        progress: show a tqdm bar over all steps with the loss and images/s.
        extra_config: JSON-like values stored in the checkpoint's config (e.g. CLI flags).
        callback: called with each epoch's history row (e.g. for a CLI to print it).

    Each step clips the gradient norm to 10. The learning rate warms up linearly from
    ``0.001 * lr`` over a tenth of the steps (at most 200), then decays along a cosine to
    ``0.02 * lr``.

    Raises:
        ValueError: no training samples, bad sizes, only one of ``val_coco``/``val_samples``,
            ``device`` asks for CUDA but none is visible, or the checkpoint to resume from
            belongs to a detector with another config.
        FloatingPointError: the loss became NaN or infinite.
    """
    if not train_samples:
        raise ValueError(
            "train_samples is empty: no annotated training images (check the COCO file and "
            "the images root its file names are relative to)"
        )
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    if (val_coco is None) != (val_samples is None):
        raise ValueError("give both val_coco and val_samples, or neither")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Torch only: shuffles and flips come from generators seeded by (seed, epoch), so the
    # caller's numpy and python RNG streams are left alone.
    seed_rngs(seed, torch_only=True)

    dataset = DetectionDataset(train_samples, hflip=hflip, seed=seed)
    steps_per_epoch = math.ceil(len(dataset) / batch_size)
    total = steps_per_epoch * epochs
    warmup = min(200, max(1, total // 10))
    engine = Trainer(
        {"model": model},
        [p for p in model.parameters() if p.requires_grad],
        lr=lr,
        weight_decay=weight_decay,
        schedule=WarmupCosine(warmup, total, start=0.001, floor=0.02),
        device=device,
        max_grad_norm=10.0,
    )
    dev = engine.device
    config = {
        "detector": model.config,
        "train": {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "hflip": hflip,
            "seed": seed,
            "train_images": len(dataset),
            **(extra_config or {}),
        },
    }
    history: list[dict[str, float]] = []
    start_epoch = 0
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.is_file():
        ckpt = read_checkpoint(ckpt_path)
        if ckpt["config"]["detector"] != model.config:
            raise ValueError(
                f"{ckpt_path} was trained with detector config {ckpt['config']['detector']}, "
                f"not {model.config}; train into another out_dir or start without resume"
            )
        engine.load_state_dict(ckpt)
        history = list(ckpt.get("history", []))
        start_epoch = int(ckpt["epoch"]) + 1
        logger.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
    elif resume:
        logger.info("no checkpoint in %s; starting from scratch", out)

    def batches(epoch: int) -> DataLoader:
        dataset.set_epoch(epoch)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            collate_fn=collate_detection,
            generator=torch.Generator().manual_seed(seed * 1000 + epoch),
            drop_last=False,
        )
        # One iterator is created and dropped before the real one, as the loop before the
        # training engine did (its tqdm.auto wrapper called iter() on the loader): that draws a
        # base seed from the loader's generator (with workers, also the first prefetched
        # indices) and so fixes the shuffle order. Keeping it keeps a seed's data order, and
        # the trained weights, the same as before.
        iter(loader)
        model.train()
        return loader

    def batch_loss(
        batch: tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        images, targets = batch
        images = [im.to(dev, non_blocking=True) for im in images]
        targets = [{k: v.to(dev) for k, v in t.items()} for t in targets]
        with engine.autocast():
            losses = model(images, targets)
        return sum(losses.values()), losses, len(images)

    def end_epoch(stats: EpochStats) -> None:
        epoch = stats.epoch
        row = {"loss": stats.loss, **stats.parts}
        row["lr"] = float(engine.optimiser.param_groups[0]["lr"])
        row["seconds"] = stats.seconds
        row["epoch"] = float(epoch)
        if val_coco is not None and val_samples is not None:
            row.update(evaluate_detector(model, val_coco, val_samples, batch_size=batch_size))
        history.append(row)
        logger.info(
            "epoch %d/%d: loss %.4f%s (%.1f s)", epoch + 1, epochs, row["loss"],
            f", val mAP {row['map']:.4f} mAP@.5 {row['map50']:.4f}" if "map" in row else "",
            row["seconds"],
        )
        engine.save_checkpoint(ckpt_path, epoch=epoch, config=config, history=history)
        save_detector(model, out / DETECTOR)
        if callback is not None:
            callback(row)
        if _after_epoch_hook is not None:
            _after_epoch_hook(epoch)

    engine.fit(
        epochs,
        batches,
        batch_loss,
        steps_per_epoch=steps_per_epoch,
        start_epoch=start_epoch,
        end_epoch=end_epoch,
        progress=progress,
        desc="train-detector",
    )
    model.eval()
    return DetectorTrainResult(model, history, ckpt_path, out / DETECTOR)
