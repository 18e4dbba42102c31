"""Training the RetinaNet product detector on COCO samples, with resumable checkpoints.

Each epoch writes ``<out_dir>/checkpoint.pt`` ({model, optimiser, scheduler, epoch, config,
history}) and ``<out_dir>/detector.pt`` (``save_detector``, loadable on its own), then scores
the validation set with pycocotools. ``resume=True`` continues from the checkpoint's next
epoch with the same data order (shuffles and flips are seeded per epoch, not per process).
Mixed precision (fp16 autocast + gradient scaling) is used on CUDA.
"""

from __future__ import annotations

import logging
import math
import os
import time
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

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
DETECTOR = "detector.pt"

# Called with the epoch index after each epoch's files are written; tests set it to simulate
# a crash between epochs (STYLE.md: crashes are tested through a private hook).
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


def _lr_factor(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return 0.001 + (1 - 0.001) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))


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
        device: None picks CUDA when available.
        resume: continue from ``out_dir/checkpoint.pt`` when it exists (its detector config
            must match ``model``'s).
        progress: show a tqdm bar per epoch.
        extra_config: JSON-like values stored in the checkpoint's config (e.g. CLI flags).
        callback: called with each epoch's history row (e.g. for a CLI to print it).
    """
    if not train_samples:
        raise ValueError("no training images; check the COCO file and --images-root")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    if (val_coco is None) != (val_samples is None):
        raise ValueError("give both val_coco and val_samples, or neither")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    )
    torch.manual_seed(seed)
    model.to(dev)
    use_amp = dev.type == "cuda"

    dataset = DetectionDataset(train_samples, hflip=hflip, seed=seed)
    steps_per_epoch = math.ceil(len(dataset) / batch_size)
    total = steps_per_epoch * epochs
    warmup = min(200, max(1, total // 10))
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: _lr_factor(step, warmup=warmup, total=total)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
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
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt["config"]["detector"] != model.config:
            raise ValueError(
                f"{ckpt_path} was trained with detector config {ckpt['config']['detector']}, "
                f"not {model.config}; use another --out or drop --resume"
            )
        model.load_state_dict(ckpt["model"])
        optimiser.load_state_dict(ckpt["optimiser"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt and use_amp:
            scaler.load_state_dict(ckpt["scaler"])
        history = list(ckpt.get("history", []))
        start_epoch = int(ckpt["epoch"]) + 1
        logger.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
    elif resume:
        logger.info("no checkpoint in %s; starting from scratch", out)

    for epoch in range(start_epoch, epochs):
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
        row = _train_epoch(model, loader, optimiser, scheduler, scaler, dev, use_amp,
                           desc=f"epoch {epoch + 1}/{epochs}", progress=progress)
        row["epoch"] = float(epoch)
        if val_coco is not None and val_samples is not None:
            row.update(evaluate_detector(model, val_coco, val_samples, batch_size=batch_size))
        history.append(row)
        logger.info(
            "epoch %d/%d: loss %.4f%s (%.1f s)", epoch + 1, epochs, row["loss"],
            f", val mAP {row['map']:.4f} mAP@.5 {row['map50']:.4f}" if "map" in row else "",
            row["seconds"],
        )
        ckpt = {
            "model": model.state_dict(),
            "optimiser": optimiser.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "config": config,
            "history": history,
        }
        if use_amp:
            ckpt["scaler"] = scaler.state_dict()
        tmp = ckpt_path.with_name(CHECKPOINT + ".tmp")
        torch.save(ckpt, tmp)
        os.replace(tmp, ckpt_path)
        save_detector(model, out / DETECTOR)
        if callback is not None:
            callback(row)
        if _after_epoch_hook is not None:
            _after_epoch_hook(epoch)
    model.eval()
    return DetectorTrainResult(model, history, ckpt_path, out / DETECTOR)


def _train_epoch(
    model: ProductDetector,
    loader: DataLoader,
    optimiser: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    use_amp: bool,
    *,
    desc: str,
    progress: bool,
) -> dict[str, float]:
    from tqdm.auto import tqdm

    model.train()
    t0 = time.perf_counter()
    sums: dict[str, float] = {}
    n = 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    for images, targets in bar:
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"detector loss is {loss.item()} ({ {k: v.item() for k, v in losses.items()} }); "
                "lower --lr"
            )
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimiser)
        torch.nn.utils.clip_grad_norm_(
            [p for g in optimiser.param_groups for p in g["params"]], max_norm=10.0
        )
        scaler.step(optimiser)
        scaler.update()
        scheduler.step()
        n += 1
        sums["loss"] = sums.get("loss", 0.0) + float(loss.item())
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.item())
        bar.set_postfix(loss=f"{sums['loss'] / n:.3f}")
    row = {k: v / max(n, 1) for k, v in sums.items()}
    row["lr"] = float(optimiser.param_groups[0]["lr"])
    row["seconds"] = time.perf_counter() - t0
    return row

