"""Training the retrieval embedder (library side: objects and typed args in).

This module holds the embedder's data (P x K batches of augmented crops), model set-up
(frozen blocks, parameter groups, imprinted classifiers) and loss; the loop, optimiser,
schedule, AMP and checkpoints are :class:`visearch.training.Trainer`'s.

One epoch = ``len(sampler)`` P x K batches. After each epoch: optional validation (user-photo
queries against the gallery, Recall@k by label) and a checkpoint holding everything needed to
continue bit-for-bit: model, loss (its class weights), optimiser, scheduler, AMP scaler,
epoch, config, RNG states and history. On CUDA it trains in fp16 autocast with channels_last.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from visearch.catalog import CatalogRow
from visearch.device import choose_device
from visearch.embedding import embed_arrays, load_crop, model_device, model_transform
from visearch.embedding.heads import TaskHeads
from visearch.embedding.losses import CosineSoftmaxLoss, SoftmaxLoss, WeightedLoss, mutual_kl
from visearch.embedding.model import Embedder, save_embedder
from visearch.embedding.sampler import LookalikePKSampler, PKSampler, lookalike_neighbours
from visearch.fileio import atomic_open
from visearch.imageio import ImageSource
from visearch.metrics import retrieval_metrics
from visearch.training import (
    EpochStats,
    Trainer,
    WarmupCosine,
    read_checkpoint,
    seed_rngs,
    seed_worker,
)
from visearch.transforms import train_transform

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
MODEL_FILE = "embedder.pt"
BEST_FILE = "best.pt"
#: batch samplers: plain P x K, or P x K in families of look-alike SKUs
SAMPLERS = ("pk", "lookalike")

Box = Sequence[float]


@dataclass
class ImageSet:
    """Images with labels. ``sources[i]`` is a path, bytes or RGB ``uint8 [H, W, 3]`` array,
    ``boxes[i]`` an ``(x1, y1, x2, y2)`` pixel crop or None, ``labels[name]`` an ``int64 [N]``
    (or ``[N, A]`` for attributes) array; ``labels["sku"]`` is required."""

    sources: Sequence[ImageSource | np.ndarray]
    boxes: Sequence[Box | None]
    labels: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.sources) != len(self.boxes):
            raise ValueError(f"{len(self.sources)} sources but {len(self.boxes)} boxes")
        if "sku" not in self.labels:
            raise ValueError("ImageSet.labels needs an 'sku' int64 [N] array")
        for name, arr in self.labels.items():
            if len(arr) != len(self.sources):
                raise ValueError(f"labels[{name!r}] has {len(arr)} rows for {len(self)} images")

    def __len__(self) -> int:
        return len(self.sources)

    def crops(self) -> list[np.ndarray]:
        """All images decoded and cropped, ``uint8 [h, w, 3]`` each."""
        return [load_crop(s, b) for s, b in zip(self.sources, self.boxes, strict=True)]

    def subset(self, index: Sequence[int] | np.ndarray) -> ImageSet:
        """The images at ``index`` (positions), with their labels."""
        idx = [int(i) for i in index]
        return ImageSet([self.sources[i] for i in idx], [self.boxes[i] for i in idx],
                        {k: np.asarray(v)[idx] for k, v in self.labels.items()})


def hold_out(images: ImageSet, fraction: float, *, max_images: int = 256, min_per_sku: int = 3,
             seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Split ``images`` into (train, held-out): a seeded ``fraction`` of the images (at most
    ``max_images``), drawn only from SKUs with at least ``min_per_sku`` images and at most
    one per SKU, so every SKU keeps training images. The held-out images measure the
    auxiliary tasks' validation-loss trends (:class:`~visearch.embedding.losses.TrendWeights`)
    without touching the evaluation queries."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    sku = np.asarray(images.labels["sku"])
    labels, counts = np.unique(sku, return_counts=True)
    eligible = labels[counts >= min_per_sku]
    n = min(max_images, int(round(fraction * len(images))), len(eligible))
    chosen = rng.choice(eligible, size=n, replace=False) if n else np.empty(0, sku.dtype)
    held = np.sort([int(rng.choice(np.flatnonzero(sku == lab))) for lab in chosen]).astype(int)
    keep = np.setdiff1d(np.arange(len(images)), held)
    return images.subset(keep), images.subset(held)


def early_stop_split(images: ImageSet, *, queries: int = 256, gallery_skus: int = 300,
                     seed: int = 0) -> tuple[ImageSet, tuple[ImageSet, ImageSet]]:
    """Split catalog images for early stopping: ``(train, (gallery, queries))``.

    ``queries`` is one held-out image from each of (at most) ``queries`` SKUs that have at
    least 2 images (:func:`hold_out`), never trained on. ``gallery`` is a subset of
    ``train``: every training image of those SKUs plus the images of seeded other SKUs, up
    to ``gallery_skus`` SKUs in all, so the per-epoch check costs the same on any catalog.
    Held-out Recall@k / mAP@k measure how well unseen views of catalog products are found.
    """
    if queries < 1 or gallery_skus < 1:
        raise ValueError(f"queries and gallery_skus must be >= 1, got {queries}, {gallery_skus}")
    fraction = min(0.5, queries / max(1, len(images)))
    train, held = hold_out(images, fraction, max_images=queries, min_per_sku=2, seed=seed)
    sku = np.asarray(train.labels["sku"])
    held_skus = np.unique(held.labels["sku"])
    others = np.setdiff1d(np.unique(sku), held_skus)
    rng = np.random.default_rng([seed, 1])
    n_other = max(0, min(len(others), gallery_skus - len(held_skus)))
    chosen = np.concatenate([held_skus, rng.choice(others, size=n_other, replace=False)])
    gallery = train.subset(np.flatnonzero(np.isin(sku, chosen)))
    return train, (gallery, held)


@dataclass
class LabelVocab:
    """String labels -> contiguous ids: ``skus[i]`` is SKU label ``i``, likewise categories
    and the values of each attribute in ``attributes`` (names in a fixed order)."""

    skus: list[str]
    categories: list[str]
    attributes: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_rows(
        cls, rows: Sequence[CatalogRow], attribute_names: Sequence[str] = ()
    ) -> LabelVocab:
        """Sorted vocabularies of the SKUs, categories and named attributes in ``rows``."""
        return cls(
            skus=sorted({r.sku for r in rows}),
            categories=sorted({r.category for r in rows}),
            attributes={
                a: sorted({r.attributes[a] for r in rows if a in r.attributes})
                for a in attribute_names
            },
        )

    def image_set(self, rows: Sequence[CatalogRow]) -> ImageSet:
        """``rows`` as an :class:`ImageSet` (``row.source``: the stored image or the file,
        + bbox) with ``"sku"``, ``"category"`` and, when attributes are named,
        ``"attributes"`` ``[N, A]`` labels; unknown values -> -1."""
        sku = {v: i for i, v in enumerate(self.skus)}
        cat = {v: i for i, v in enumerate(self.categories)}
        labels = {
            "sku": np.array([sku.get(r.sku, -1) for r in rows], dtype=np.int64),
            "category": np.array([cat.get(r.category, -1) for r in rows], dtype=np.int64),
        }
        if self.attributes:
            index = {a: {v: i for i, v in enumerate(vals)} for a, vals in self.attributes.items()}
            labels["attributes"] = np.array(
                [[index[a].get(r.attributes.get(a, ""), -1) for a in index] for r in rows],
                dtype=np.int64,
            ).reshape(len(rows), len(index))
        return ImageSet([r.source for r in rows], [r.bbox for r in rows], labels)


@dataclass
class TrainResult:
    """What :func:`train_embedder` did. ``history`` has one dict per epoch (loss, parts,
    images_per_s, lr, and recall@k when validating); ``step_losses`` the losses of the steps
    run in this call (not those restored from a checkpoint)."""

    model_path: Path
    checkpoint_path: Path
    history: list[dict[str, Any]]
    step_losses: list[float]


class _TrainDataset(Dataset):
    def __init__(self, images: ImageSet, transform: Callable[[np.ndarray], torch.Tensor]):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        crop = load_crop(self.images.sources[i], self.images.boxes[i])
        return self.transform(crop), i


def _labels_to_tensors(labels: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v), dtype=torch.int64) for k, v in labels.items()}


def rank_labels(
    query_feats: np.ndarray,
    gallery_feats: np.ndarray,
    gallery_labels: np.ndarray,
    depth: int,
) -> tuple[list[list[int]], list[list[float]]]:
    """Per query, the first ``depth`` *distinct* gallery labels ranked by inner product, and
    each label's best score. Feats ``float32 [n, d]`` L2-normalised, labels ``int64 [G]``."""
    sims = query_feats @ gallery_feats.T
    order = np.argsort(-sims, axis=1, kind="stable")
    ranked: list[list[int]] = []
    scores: list[list[float]] = []
    for q in range(len(query_feats)):
        labels = gallery_labels[order[q]]
        # The first occurrence of each label along the item ranking gives the label ranking.
        _, first = np.unique(labels, return_index=True)
        keep = order[q][np.sort(first)[:depth]]
        ranked.append([int(v) for v in gallery_labels[keep]])
        scores.append([float(v) for v in sims[q, keep]])
    return ranked, scores


def evaluate(
    model: Embedder,
    gallery: ImageSet,
    queries: ImageSet,
    *,
    relevant: Sequence[Collection[int]] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 64,
    device: torch.device | str | None = None,
    gallery_crops: Sequence[np.ndarray] | None = None,
    query_crops: Sequence[np.ndarray] | None = None,
) -> dict[str, float]:
    """Query -> gallery retrieval by ``"sku"`` label: ``recall@k``, ``map@k``, ``ndcg@k``
    (:func:`visearch.metrics.retrieval_metrics`, tie-aware) over the distinct gallery labels.

    ``relevant`` gives each query's correct labels (default: its own ``"sku"`` label; pass
    several when one product has several SKUs). Images are cropped to their boxes;
    pre-decoded crops may be passed to skip decoding.
    """
    gc = gallery_crops if gallery_crops is not None else gallery.crops()
    qc = query_crops if query_crops is not None else queries.crops()
    gf = embed_arrays(model, gc, batch_size=batch_size, device=device)
    qf = embed_arrays(model, qc, batch_size=batch_size, device=device)
    if relevant is None:
        relevant = [{int(v)} for v in queries.labels["sku"]]
    ranked, scores = rank_labels(qf, gf, np.asarray(gallery.labels["sku"]), max(ks))
    return retrieval_metrics(
        [[str(v) for v in r] for r in ranked],
        [{str(v) for v in rel} for rel in relevant],
        ks,
        scores=scores,
    )


def imprint_classifiers(
    model: Embedder,
    loss: WeightedLoss,
    train: ImageSet,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    calibrate_neck: bool = True,
) -> list[str]:
    """Initialise each classifier term of ``loss`` (cosine-softmax family, plain softmax) with
    its classes' mean normalised embedding under the current model ("weight imprinting",
    Qi, Brown & Lowe 2018). A random classifier's first gradients would pull every embedding
    toward a random direction and scramble the pretrained geometry; imprinted centres start
    training where the pretrained features already are. Returns the names of imprinted terms.
    Classes without images keep their random weights.

    With ``calibrate_neck`` the BN-neck's running statistics are first set from the training
    images (:func:`calibrate_bn_neck`), so the imprinted centres live in the same (centred)
    space as the batch-normalised features the loss sees in training.
    """
    terms = []
    for name, term in loss.losses.items():
        labels = np.asarray(train.labels.get(loss.targets[name], np.empty(0)))
        if labels.ndim != 1 or len(labels) != len(train):
            continue
        if isinstance(term, CosineSoftmaxLoss):
            weight = term.weight
        elif isinstance(term, SoftmaxLoss):
            weight = term.fc.weight
        else:
            continue
        terms.append((name, weight, labels))
    if not terms and not calibrate_neck:
        return []
    z = _neck_inputs(model, train.crops(), batch_size=batch_size, device=device)
    if calibrate_neck:
        _set_neck_stats(model, z)
    if not terms:
        return []
    was_training = model.neck.training
    with torch.no_grad():
        feats = F.normalize(model.neck.eval()(z), dim=1).cpu().numpy()
    model.neck.train(was_training)
    for _, weight, labels in terms:
        n_classes, dim = weight.shape
        if dim != feats.shape[1]:
            raise ValueError(f"classifier dim {dim} != embedding dim {feats.shape[1]}")
        ok = (labels >= 0) & (labels < n_classes)
        sums = np.zeros((n_classes, dim), dtype=np.float64)
        np.add.at(sums, labels[ok], feats[ok])
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        has = norms[:, 0] > 0
        centres = torch.as_tensor((sums[has] / norms[has]).astype(np.float32))
        with torch.no_grad():
            scale = weight[has].norm(dim=1, keepdim=True).mean()  # keep the init's norm
            weight[torch.as_tensor(has)] = (centres * scale).to(weight.device, weight.dtype)
    return [name for name, _, _ in terms]


def calibrate_bn_neck(
    model: Embedder,
    crops: Sequence[np.ndarray],
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> None:
    """Set ``model.neck``'s running mean/variance to those of its inputs over ``crops``
    (RGB ``uint8 [H, W, 3]``, eval transform), leaving every other weight and statistic alone.

    A fresh BN-neck has running mean 0 and variance 1, while in training it normalises with
    batch statistics: pooled trunk features are all positive, so the two differ by a large
    common offset and the eval-mode embeddings (used for imprinting and retrieval) point in
    other directions than the train-mode ones the loss shapes.
    """
    _set_neck_stats(model, _neck_inputs(model, crops, batch_size=batch_size, device=device))


def _neck_inputs(
    model: Embedder,
    crops: Sequence[np.ndarray],
    *,
    batch_size: int,
    device: torch.device | str | None,
) -> torch.Tensor:
    """The BN-neck's inputs ``float32 [N, dim]`` for ``crops`` (``model.forward_features``
    without the neck, eval mode, eval transform); ``device=None`` uses the model's device."""
    transform = model_transform(model)
    dev = choose_device(device) if device is not None else model_device(model)
    was_training = model.training
    model.to(dev).eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(crops), batch_size):
            x = torch.stack([transform(c) for c in crops[start : start + batch_size]]).to(dev)
            chunks.append(model.forward_features(x, neck=False).float())
    model.train(was_training)
    return torch.cat(chunks)


def _set_neck_stats(model: Embedder, z: torch.Tensor) -> None:
    neck = model.neck
    if not isinstance(neck, torch.nn.BatchNorm1d) or len(z) < 2:
        return
    with torch.no_grad():
        neck.running_mean.copy_(z.mean(0).to(neck.running_mean))
        neck.running_var.copy_(z.var(0, unbiased=True).to(neck.running_var))
    logger.debug("calibrated the BN-neck on %d images", len(z))


def _best_epoch(history: Sequence[Mapping[str, Any]], monitor: str) -> int | None:
    """The 1-based epoch with the highest held-out ``monitor`` (the first of ties), or None."""
    scored = [(h["held_out"][monitor], -int(h["epoch"])) for h in history if "held_out" in h]
    return -max(scored)[1] if scored else None


def _save_best(path: Path, model: Embedder, loss: WeightedLoss, epoch: int) -> None:
    """The model's and loss's weights at ``epoch``, written atomically."""
    with atomic_open(path, "wb") as f:
        torch.save({"epoch": epoch, "model": model.state_dict(), "loss": loss.state_dict()}, f)


def _sku_logits(loss: WeightedLoss, feats: torch.Tensor) -> torch.Tensor:
    """Margin-free SKU class scores ``float [B, C]`` of ``loss``'s SKU classifier."""
    for name, term in loss.losses.items():
        if loss.targets[name] == "sku" and isinstance(term, CosineSoftmaxLoss | SoftmaxLoss):
            return term.logits(feats)
    raise ValueError("mutual learning needs a cosine-softmax or softmax term on 'sku'")


def _sku_centres(loss: WeightedLoss) -> torch.Tensor:
    """The class weights ``[C, dim]`` of ``loss``'s first SKU classifier term (cosine-softmax
    family or plain softmax): the SKUs' centres in embedding space."""
    for name, term in loss.losses.items():
        if loss.targets[name] != "sku":
            continue
        if isinstance(term, CosineSoftmaxLoss):
            return term.weight
        if isinstance(term, SoftmaxLoss):
            return term.fc.weight
    raise ValueError(
        "sampler='lookalike' finds look-alike SKUs by the SKU classifier's class centres; "
        "add a cosine-softmax (ArcFace, CosFace, NormFace) or softmax term on 'sku'"
    )


def train_embedder(
    model: Embedder,
    loss: WeightedLoss,
    train: ImageSet,
    *,
    out_dir: str | os.PathLike[str],
    val: tuple[ImageSet, ImageSet] | None = None,
    epochs: int = 10,
    p: int = 16,
    k: int = 4,
    steps_per_epoch: int | None = None,
    sampler: str = "pk",
    lookalike_group: int = 4,
    peer: tuple[Embedder, WeightedLoss] | None = None,
    mutual_weight: float = 1.0,
    mutual_temperature: float = 1.0,
    lr: float = 1e-3,
    backbone_lr_mult: float = 0.1,
    frozen_blocks: int = 0,
    freeze_bn: bool = False,
    imprint: bool = True,
    calibrate_neck: bool = True,
    weight_decay: float = 5e-4,
    warmup_steps: int | None = None,
    transform: Callable[[np.ndarray], torch.Tensor] | None = None,
    seed: int = 0,
    resume: bool = False,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    amp: bool = True,
    progress: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
    vocab: LabelVocab | None = None,
    trend_set: ImageSet | None = None,
    trend_every: int = 50,
    early_stop: tuple[ImageSet, ImageSet] | None = None,
    patience: int | None = None,
    monitor: str = "map@10",
    check_every: int = 1,
) -> TrainResult:
    """Train ``model`` with ``loss`` on ``train`` using P x K batches; write checkpoints.

    Args:
        model: the embedder to train (in place); its ``forward_features`` feeds ``loss``.
        loss: the weighted loss; its terms read ``train.labels`` by target name.
        train: training images, cropped to their boxes, labels incl. ``"sku"`` (0..C-1).
        out_dir: receives ``checkpoint.pt`` (after every epoch) and ``embedder.pt`` (the final
            model, :func:`~visearch.embedding.save_embedder` format).
        val: ``(gallery, queries)`` for Recall@k after each epoch (by ``"sku"`` label).
        epochs: total epochs (a resumed run continues up to this number).
        p, k: labels per batch and images per label; batch size ``p * k``.
        steps_per_epoch: batches per epoch; default ``#labels // p``.
        sampler: ``"pk"`` (:class:`~visearch.embedding.sampler.PKSampler`) or
            ``"lookalike"``: each batch in families of ``lookalike_group`` SKUs, an anchor and
            its nearest SKUs by the SKU classifier's class centres at the start of the epoch
            (:class:`~visearch.embedding.sampler.LookalikePKSampler`; needs a cosine-softmax or
            softmax term on ``"sku"``).
        lr: peak learning rate (AdamW) of the head and loss parameters; the trunk uses
            ``lr * backbone_lr_mult``. Linear warm-up (default: a tenth of all steps, at most 100)
            then cosine decay to 0 over all steps.
        imprint: start the classifiers from class-mean embeddings
            (:func:`imprint_classifiers`; skipped when resuming from a checkpoint).
        calibrate_neck: with ``imprint``, first set the BN-neck's running statistics from the
            training images (see :func:`imprint_classifiers`).
        frozen_blocks: freeze the first this many children of ``model.trunk`` (weights and
            BatchNorm statistics): no backward pass through them, so CPU training is faster
            (MobileNetV2's trunk has 19 blocks, the ResNets' 8).
        freeze_bn: keep every trunk BatchNorm layer in eval mode (its ImageNet running
            statistics are not re-estimated on the training images; the affine weights still
            train). Helps when training images (clean catalog shots) differ from the queries.
        transform: ``uint8 [H, W, 3] -> float [3, S, S]``; default
            :func:`visearch.transforms.train_transform` at the model's input size.
        seed: seeds torch, numpy and python RNGs and the sampler; on CPU two runs with the
            same arguments give identical weights.
        resume: continue from ``out_dir/checkpoint.pt`` when it exists.
        device: a torch device name; None picks CUDA when visible, else CPU
            (:func:`visearch.device.choose_device`).
        num_workers: DataLoader decode/augment processes.
        amp: fp16 autocast + GradScaler on CUDA (ignored on CPU).
        progress: show a tqdm bar with loss and images/s (for CLIs).
        callback: called after each epoch with that epoch's history dict.
        vocab: the label vocabulary of ``train``; when given, the trained category and
            attribute classifiers of ``loss`` are copied into the saved model as its
            :class:`~visearch.embedding.heads.TaskHeads` (served with it).
        trend_set: held-out images (labels as ``train``'s) on which the terms governed by
            ``loss.trend`` are measured every ``trend_every`` steps to update their weights
            (:class:`~visearch.embedding.losses.TrendWeights`); each epoch's history records
            the weights (``"task_weights"``).
        early_stop: ``(gallery, queries)`` of held-out catalog images
            (:func:`early_stop_split`), scored after each epoch (history ``"held_out"``).
            The weights of the best epoch by ``monitor`` are kept (``best.pt`` beside the
            checkpoint) and are the ones saved as the final model.
        patience: with ``early_stop``, stop once ``monitor`` has not improved for this many
            epochs (None: run all ``epochs``). A resumed run that had stopped stays stopped.
        monitor: the held-out metric that decides (``recall@1``, ``map@10``, ...).
        check_every: score ``early_stop`` after every this many epochs (and the last one),
            so the check's cost stays small beside a small catalog's short epochs; patience
            is still counted in epochs (training stops at the first check at least
            ``patience`` epochs after the best).
        peer: deep mutual learning (:func:`~visearch.embedding.losses.mutual_kl`): a second
            embedder (another backbone) with its own loss, trained alongside on the same
            batches (its ``frozen_blocks``, ``freeze_bn`` and learning rates as ``model``'s;
            the batch re-normalised to its mean/std). Each adds ``mutual_weight`` x the KL
            divergence to the other's SKU posterior (margin-free classifier logits at
            ``mutual_temperature``). Only ``model`` is saved as the final model; the peer's
            state is in the checkpoint, so a resumed run continues both.

    Raises:
        ValueError: ``device`` asks for CUDA but none is visible; bad ``p``/``k``/
            ``frozen_blocks`` for this data and model.
        FloatingPointError: the loss became NaN or infinite.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = choose_device(device)
    seed_rngs(seed)

    cfg = model.config
    if transform is None:
        transform = train_transform(int(cfg["input_size"]), mean=cfg["mean"], std=cfg["std"])
    if trend_every < 1:
        raise ValueError(f"trend_every must be >= 1, got {trend_every}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1 or None, got {patience}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    targets_all = _labels_to_tensors(train.labels)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    centres = _sku_centres(loss) if sampler == "lookalike" else None
    pk = (LookalikePKSampler(train.labels["sku"], p, k, group=lookalike_group, seed=seed,
                             steps_per_epoch=steps_per_epoch)
          if centres is not None
          else PKSampler(train.labels["sku"], p, k, seed=seed, steps_per_epoch=steps_per_epoch))
    total_steps = epochs * len(pk)
    if warmup_steps is None:
        warmup_steps = max(1, min(100, total_steps // 10))

    blocks = list(model.trunk.children())
    if not 0 <= frozen_blocks <= len(blocks):
        raise ValueError(f"frozen_blocks must be in [0, {len(blocks)}], got {frozen_blocks}")
    frozen = blocks[:frozen_blocks]
    for block in frozen:
        block.requires_grad_(False)
    model.to(dev)
    loss.to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    modules: dict[str, torch.nn.Module] = {"model": model, "loss": loss}
    peer_frozen: list[torch.nn.Module] = []
    if peer is not None:
        if mutual_weight < 0 or mutual_temperature <= 0:
            raise ValueError(f"need mutual_weight >= 0 and mutual_temperature > 0, got "
                             f"{mutual_weight}, {mutual_temperature}")
        peer_blocks = list(peer[0].trunk.children())
        if frozen_blocks > len(peer_blocks):
            raise ValueError(f"frozen_blocks {frozen_blocks} > the peer's {len(peer_blocks)}")
        peer_frozen = peer_blocks[:frozen_blocks]
        for block in peer_frozen:
            block.requires_grad_(False)
        peer[0].to(dev)
        peer[1].to(dev)
        modules |= {"peer": peer[0], "peer_loss": peer[1]}
    groups = []
    for net, net_loss in [(model, loss)] + ([peer] if peer is not None else []):
        trunk_ids = {id(q) for q in net.trunk.parameters()}
        head = [q for q in net.parameters() if id(q) not in trunk_ids and q.requires_grad]
        groups += [
            {
                "params": [q for q in net.trunk.parameters() if q.requires_grad],
                "lr": lr * backbone_lr_mult,
            },
            {"params": head + [q for q in net_loss.parameters() if q.requires_grad], "lr": lr},
        ]
    engine = Trainer(
        modules,
        groups,
        lr=lr,
        weight_decay=weight_decay,
        schedule=WarmupCosine(warmup_steps, total_steps, offset=1),
        device=dev,
        amp=amp,
    )

    run_config = {
        "model": dict(cfg),
        "epochs": epochs,
        "p": p,
        "k": k,
        "steps_per_epoch": len(pk),
        "sampler": sampler,
        "lookalike_group": lookalike_group if sampler == "lookalike" else None,
        "mutual": {"peer": dict(peer[0].config), "weight": mutual_weight,
                   "temperature": mutual_temperature} if peer is not None else None,
        "lr": lr,
        "backbone_lr_mult": backbone_lr_mult,
        "frozen_blocks": frozen_blocks,
        "freeze_bn": freeze_bn,
        "imprint": imprint,
        "calibrate_neck": calibrate_neck,
        "weight_decay": weight_decay,
        "warmup_steps": warmup_steps,
        "seed": seed,
        "amp": engine.amp,
        "loss_terms": {
            n: [loss.weights[n], loss.targets[n], type(m).__name__] for n, m in loss.losses.items()
        },
        "patience": patience,
        "monitor": monitor if early_stop is not None else None,
    }
    start_epoch = 0
    history: list[dict[str, Any]] = []
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.is_file():
        ckpt = read_checkpoint(ckpt_path)
        engine.load_state_dict(ckpt)
        start_epoch = int(ckpt["epoch"])
        history = list(ckpt["history"])
        logger.info("resumed from %s at epoch %d/%d", ckpt_path, start_epoch, epochs)
    else:
        if resume:
            logger.info("no checkpoint at %s; starting from scratch", ckpt_path)
        if imprint:
            done = imprint_classifiers(
                model, loss, train, device=dev, calibrate_neck=calibrate_neck
            )
            logger.info("imprinted classifier weights of %s", done)
            if peer is not None:
                imprint_classifiers(peer[0], peer[1], train, device=dev,
                                    calibrate_neck=calibrate_neck)

    gen = torch.Generator()
    loader = DataLoader(
        _TrainDataset(train, transform),
        batch_sampler=pk,
        num_workers=num_workers,
        worker_init_fn=seed_worker,
        generator=gen,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
    )
    val_crops = (val[0].crops(), val[1].crops()) if val is not None else None
    stop_crops = (early_stop[0].crops(), early_stop[1].crops()) if early_stop else None
    best_path = out / BEST_FILE
    if start_epoch == 0 and best_path.exists():
        best_path.unlink()  # a stale file from an earlier run in this folder
    trend_data = None
    if loss.trend is not None and trend_set is not None and len(trend_set):
        tf = model_transform(model)
        trend_data = (torch.stack([tf(c) for c in trend_set.crops()]),
                      _labels_to_tensors(trend_set.labels))
    step_count = [0]

    def update_trend() -> None:
        assert loss.trend is not None and trend_data is not None
        modes = {m: m.training for m in model.modules()}
        model.eval()
        x_all, labels = trend_data
        with torch.no_grad():
            feats = torch.cat([model.forward_features(x_all[i : i + 64].to(dev)).float()
                               for i in range(0, len(x_all), 64)])
            vals = {n: float(loss.losses[n](feats, labels[loss.targets[n]].to(dev)))
                    for n in loss.trend.names}
        for m, mode in modes.items():
            m.train(mode)
        weights = loss.trend.update(vals)
        logger.debug("task weights %s from validation losses %s", weights, vals)

    def to_peer(x: torch.Tensor) -> torch.Tensor:
        """A batch normalised for ``model`` -> the same pixels normalised for the peer."""
        assert peer is not None
        a_mean, a_std, b_mean, b_std = (
            torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            for v in (cfg["mean"], cfg["std"], peer[0].config["mean"], peer[0].config["std"]))
        return (x * a_std + a_mean - b_mean) / b_std

    def batches(epoch: int) -> DataLoader:
        if isinstance(pk, LookalikePKSampler) and centres is not None:
            # From the weights at this epoch's start: a resumed run restores the same ones.
            table = lookalike_neighbours(centres.detach().float().cpu().numpy(),
                                         m=2 * lookalike_group)
            pk.set_neighbours(table)
        pk.set_epoch(epoch)
        # Worker seeds come from this generator; derive it from the main RNG stream so a
        # resumed run (RNG restored) draws the same augmentations.
        gen.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        for net, net_loss, net_frozen in [(model, loss, frozen)] + (
                [(peer[0], peer[1], peer_frozen)] if peer is not None else []):
            net.train()
            for block in net_frozen:
                block.eval()
            if freeze_bn:
                for m in net.trunk.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                        m.eval()
            net_loss.train()
        return loader

    def batch_loss(
        batch: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        x, idx = batch
        if trend_data is not None and step_count[0] % trend_every == 0:
            update_trend()
        step_count[0] += 1
        x = x.to(dev, non_blocking=True)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        targets = {name: t[idx].to(dev) for name, t in targets_all.items()}
        with engine.autocast():
            feats = model.forward_features(x)
        total, parts = loss(feats.float(), targets)
        if peer is not None:
            with engine.autocast():
                peer_feats = peer[0].forward_features(to_peer(x))
            peer_total, peer_parts = peer[1](peer_feats.float(), targets)
            kl_a, kl_b = mutual_kl(_sku_logits(loss, feats.float()),
                                   _sku_logits(peer[1], peer_feats.float()),
                                   temperature=mutual_temperature)
            total = total + peer_total + mutual_weight * (kl_a + kl_b)
            parts = {**parts, "peer": peer_total.detach(), "mutual": (kl_a + kl_b).detach()}
        return total, parts, len(x)

    def end_epoch(stats: EpochStats) -> None:
        epoch = stats.epoch
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "steps": stats.steps,
            "loss": stats.loss,
            "parts": stats.parts,
            "images_per_s": stats.images_per_s,
            "seconds": stats.seconds,
            "lr": engine.scheduler.get_last_lr()[-1],
        }
        if loss.trend is not None:
            record["task_weights"] = loss.trend.as_dict()
        if val is not None and val_crops is not None:
            # Val queries of labels absent from the gallery count as misses.
            record.update(
                evaluate(
                    model,
                    val[0],
                    val[1],
                    device=dev,
                    gallery_crops=val_crops[0],
                    query_crops=val_crops[1],
                )
            )
        stop = False
        if (early_stop is not None and stop_crops is not None
                and ((epoch + 1) % check_every == 0 or epoch + 1 == epochs)):
            held = evaluate(model, early_stop[0], early_stop[1], device=dev,
                            gallery_crops=stop_crops[0], query_crops=stop_crops[1])
            record["held_out"] = held
            best = _best_epoch(history, monitor)
            if best is None or held[monitor] > history[best - 1]["held_out"][monitor]:
                _save_best(best_path, model, loss, epoch + 1)
            elif patience is not None and epoch + 1 - best >= patience:
                record["stopped"] = True
                stop = True
        history.append(record)
        logger.info(
            "epoch %d/%d %s",
            epoch + 1,
            epochs,
            {k_: v for k_, v in record.items() if k_ != "parts"},
        )
        engine.save_checkpoint(ckpt_path, epoch=epoch + 1, config=run_config, history=history)
        if callback is not None:
            callback(record)
        return stop

    if history and history[-1].get("stopped"):
        start_epoch = epochs  # it had stopped early: nothing left to run
    step_losses = engine.fit(
        epochs,
        batches,
        batch_loss,
        steps_per_epoch=len(pk),
        start_epoch=start_epoch,
        end_epoch=end_epoch,
        progress=progress,
        desc="train-embedder",
    )
    best = _best_epoch(history, monitor) if early_stop is not None else None
    if best is not None and best != len(history) and best_path.is_file():
        state = torch.load(best_path, map_location=dev, weights_only=True)
        model.load_state_dict(state["model"])
        loss.load_state_dict(state["loss"])
        logger.info("kept epoch %d's weights (best held-out %s %.4f)", best, monitor,
                    history[best - 1]["held_out"][monitor])
    model_path = out / MODEL_FILE
    if vocab is not None:
        heads = TaskHeads.from_loss(model.dim, loss, vocab.categories, vocab.attributes)
        model.set_heads(heads.to(dev) if heads is not None else None)
    save_embedder(model, model_path)
    return TrainResult(model_path, ckpt_path, history, step_losses)
