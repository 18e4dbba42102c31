"""``visearch-index train-embedder`` and ``visearch-index embed``.

Loss and backbone names are resolved here (the CLI edge) through registries; the library
receives objects and plain arguments.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from index_builder.cmd_ingest import add_store_argument
from visearch.catalog import read_manifest
from visearch.device import choose_device
from visearch.embedding import BACKBONES, POOLINGS, build_embedder, embed_items, load_embedder
from visearch.embedding.losses import (
    ArcFaceLoss,
    AttributeLoss,
    BatchHardTripletLoss,
    CosFaceLoss,
    HardAwareCascadeLoss,
    LossTerm,
    NormFaceLoss,
    SoftmaxLoss,
    TrendWeights,
    WeightedLoss,
)
from visearch.embedding.train import (
    SAMPLERS,
    ImageSet,
    LabelVocab,
    early_stop_split,
    hold_out,
    train_embedder,
)
from visearch.registry import Registry
from visearch.store import store_lookup
from visearch.transforms import AUGMENTS, train_transform

logger = logging.getLogger(__name__)

#: backbone -> its ImageNet weights file in weights/ (installed by scripts/fetch_weights.py)
DEFAULT_WEIGHTS = {
    "mobilenet_v2": "mobilenet_v2-b0353104.pth",
    "efficientnet_lite0": "efficientnet-lite0-57934424.pth",
}
_REPO = Path(__file__).resolve().parent.parent

# name -> factory(dim, num_classes, margin | None, scale | None) -> loss module
LossFactory = Callable[[int, int, float | None, float | None], nn.Module]
LOSSES: Registry[LossFactory] = Registry("loss")
#: how the auxiliary heads' loss weights are set: as configured, or from validation trends
TASK_WEIGHTS = ("fixed", "auto")


def _kw(margin: float | None, scale: float | None) -> dict[str, float]:
    out = {}
    if margin is not None:
        out["margin"] = margin
    if scale is not None:
        out["scale"] = scale
    return out


LOSSES.register("arcface")(lambda d, c, m, s: ArcFaceLoss(d, c, **_kw(m, s)))
LOSSES.register("cosface")(lambda d, c, m, s: CosFaceLoss(d, c, **_kw(m, s)))
LOSSES.register("normface")(lambda d, c, m, s: NormFaceLoss(d, c, **_kw(None, s)))
LOSSES.register("softmax")(lambda d, c, m, s: SoftmaxLoss(d, c))


def default_pretrained(backbone: str) -> Path | None:
    """The local ImageNet weights file for ``backbone`` when one is shipped, else None."""
    name = DEFAULT_WEIGHTS.get(backbone)
    if name is None:
        return None
    for root in (Path.cwd(), _REPO):
        if (root / "weights" / name).is_file():
            return root / "weights" / name
    return None


def build_loss(
    name: str,
    dim: int,
    vocab: LabelVocab,
    *,
    margin: float | None = None,
    scale: float | None = None,
    triplet_weight: float = 0.0,
    triplet_margin: float = 0.3,
    category_weight: float = 0.0,
    attribute_weight: float = 0.0,
    task_weights: str = "fixed",
    hdc_weight: float = 0.0,
) -> WeightedLoss:
    """The training loss from CLI choices: ``name`` on SKUs (+ optional triplet and
    hard-aware cascade (:class:`HardAwareCascadeLoss`, ``"hdc"``) on SKUs, category head,
    attribute heads). ``task_weights="auto"`` lets the heads' weights follow
    their validation-loss trends (:class:`TrendWeights`, starting from the given weights);
    ``"fixed"`` keeps them."""
    if task_weights not in TASK_WEIGHTS:
        raise ValueError(f"task_weights must be one of {TASK_WEIGHTS}, got {task_weights!r}")
    terms = [LossTerm(name, LOSSES.get(name)(dim, len(vocab.skus), margin, scale))]
    if triplet_weight > 0:
        terms.append(LossTerm("triplet", BatchHardTripletLoss(triplet_margin), triplet_weight))
    if hdc_weight > 0:
        terms.append(LossTerm("hdc", HardAwareCascadeLoss(), hdc_weight))
    if category_weight > 0 and len(vocab.categories) > 1:
        terms.append(
            LossTerm(
                "category",
                SoftmaxLoss(dim, len(vocab.categories)),
                category_weight,
                target="category",
            )
        )
    if attribute_weight > 0 and vocab.attributes:
        sizes = [max(1, len(v)) for v in vocab.attributes.values()]
        terms.append(
            LossTerm("attributes", AttributeLoss(dim, sizes), attribute_weight, target="attributes")
        )
    aux = [t for t in terms if t.name in ("category", "attributes")]
    trend = None
    if task_weights == "auto" and aux:
        trend = TrendWeights([t.name for t in aux], [t.weight for t in aux])
    return WeightedLoss(terms, trend=trend)


@dataclass(frozen=True)
class EmbedderTrainParams:
    """``train-embedder``'s model, loss and schedule (its defaults are the subcommand's).

    Names (``backbone``, ``pooling``, ``loss``, ``augment``) are looked up in their
    registries here, at the edge; ``pretrained`` is a resolved local weights file (None:
    from scratch; see :func:`default_pretrained`)."""

    backbone: str = "mobilenet_v2"
    dim: int = 256
    pooling: str = "gem"
    attention: bool = False
    pretrained: Path | None = None
    image_size: int = 224  # square input side, pixels
    loss: str = "arcface"
    margin: float | None = None  # None: the loss's default
    scale: float | None = None
    triplet_weight: float = 0.0
    category_weight: float = 0.0
    attribute_weight: float = 0.0
    #: attribute names for the attribute heads (used when ``attribute_weight`` > 0)
    attributes: tuple[str, ...] = ("color", "pattern", "material")
    #: "fixed" (the weights above) or "auto" (validation-loss trends on held-out images)
    task_weights: str = "fixed"
    trend_every: int = 50  # steps between two "auto" reweightings
    trend_fraction: float = 0.05  # held-out share of the training images for "auto"
    erasing: float = 0.5
    augment: str = "strong"
    epochs: int = 10
    p: int = 32  # SKUs per batch
    k: int = 4  # images per SKU in a batch
    steps_per_epoch: int | None = None  # None: #SKUs // p, raised to reach min_steps
    #: with steps_per_epoch None: a small catalog's epochs are lengthened so that all of
    #: them together make at least this many steps (epochs stay passes over the SKUs above)
    min_steps: int = 0
    lr: float = 1e-3
    backbone_lr_mult: float = 0.1
    frozen_blocks: int = 0
    freeze_bn: bool = True
    seed: int = 0
    #: early stopping: stop once held-out catalog images' mAP@10 has not improved for this
    #: many epochs, keeping the best epoch's weights (None: run every epoch)
    patience: int | None = None
    holdout_queries: int = 256  # held-out catalog images (one per SKU) for early stopping
    #: wall-clock budget of this training in minutes: the epochs are cut to fit the
    #: estimate measured before training starts (None: no budget)
    budget_minutes: float | None = None
    workers: int = 0  # DataLoader decode processes
    device: str | None = None  # None: cuda when available
    progress: bool = True
    hdc_weight: float = 0.0  # hard-aware cascaded contrastive term on SKUs (0: none)
    #: "pk" or "lookalike" (batches in families of look-alike SKUs, nearest by class centres)
    sampler: str = "pk"
    lookalike_group: int = 4  # SKUs per look-alike family in a batch
    #: deep mutual learning: a peer embedder of this backbone (its shipped weights) trained
    #: alongside with a KL term of this weight; only the main model is kept (None: no peer)
    peer_backbone: str | None = None
    mutual_weight: float = 1.0


@dataclass(frozen=True)
class EmbedderTraining:
    """A finished :func:`train_embedder_on_catalog`: the model file, the wall time, and the
    per-epoch history (also in ``<out>/history.json``)."""

    model_path: Path
    seconds: float
    history: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        """The JSON summary ``train-embedder`` prints."""
        return {
            "model": str(self.model_path),
            "seconds": round(self.seconds, 1),
            "last_epoch": {k: v for k, v in self.history[-1].items() if k != "parts"}
            if self.history
            else None,
        }


def train_embedder_on_catalog(
    catalog: Path,
    out: Path,
    params: EmbedderTrainParams,
    *,
    val_queries: Path | None = None,
    resume: bool = False,
    lenient: bool = False,
    store: Path | None = None,
) -> EmbedderTraining:
    """Train the margin-loss embedder on a catalog's images (cropped to their boxes).

    Writes ``<out>/labels.json`` (the label vocabulary), ``checkpoint.pt`` after every
    epoch, ``embedder.pt`` and ``history.json``; prints a header and one line per epoch
    (Recall@1/5 on ``val_queries`` against the catalog, when given).

    Args:
        catalog: training catalog.jsonl; its SKUs are the classes.
        out: output folder (created).
        params: model, loss and schedule.
        val_queries: queries.jsonl scored after each epoch.
        resume: continue from ``<out>/checkpoint.pt``.
        lenient: skip bad manifest rows instead of failing.
        store: read the catalog's images from this image store (as ingested), not from
            their files; rows it does not hold (the scenes' crops) read their files.
    """
    manifest = read_manifest(catalog, strict=not lenient, images=store_lookup(store))
    attr_names = list(params.attributes) if params.attribute_weight else []
    vocab = LabelVocab.from_rows(manifest.rows, attr_names)
    train = vocab.image_set(manifest.rows)
    trend_set = None
    if params.task_weights == "auto" and (params.category_weight or params.attribute_weight):
        train, trend_set = hold_out(train, params.trend_fraction, seed=params.seed)
    val = None
    if val_queries:
        queries = read_manifest(val_queries, strict=not lenient)
        val = (train, vocab.image_set(queries.rows))
    early = None
    if params.patience is not None:
        train, early = early_stop_split(train, queries=params.holdout_queries, seed=params.seed)
    pretrained = params.pretrained
    # The projection, neck and classifier weights are drawn here, before train_embedder
    # seeds its own RNGs: seed first, or two runs with one seed start apart.
    torch.manual_seed(params.seed)
    model = build_embedder(
        params.backbone,
        dim=params.dim,
        pooling=params.pooling,
        attention=params.attention,
        pretrained=pretrained,
        input_size=params.image_size,
    )
    loss = build_loss(
        params.loss,
        params.dim,
        vocab,
        margin=params.margin,
        scale=params.scale,
        triplet_weight=params.triplet_weight,
        category_weight=params.category_weight,
        attribute_weight=params.attribute_weight,
        task_weights=params.task_weights,
        hdc_weight=params.hdc_weight,
    )
    peer = None
    if params.peer_backbone is not None:
        peer_model = build_embedder(params.peer_backbone, dim=params.dim,
                                    pooling=params.pooling, attention=params.attention,
                                    pretrained=default_pretrained(params.peer_backbone),
                                    input_size=params.image_size)
        peer = (peer_model, build_loss(
            params.loss, params.dim, vocab, margin=params.margin, scale=params.scale,
            triplet_weight=params.triplet_weight, category_weight=params.category_weight,
            attribute_weight=params.attribute_weight, hdc_weight=params.hdc_weight))
    cfg = model.config
    transform = train_transform(
        params.image_size,
        mean=cfg["mean"],
        std=cfg["std"],
        erasing=params.erasing,
        augment=params.augment,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "labels.json").write_text(
        json.dumps(
            {"skus": vocab.skus, "categories": vocab.categories, "attributes": vocab.attributes}
        )
    )
    print(
        f"training {params.backbone} "
        f"({'pretrained ' + str(pretrained) if pretrained else 'scratch'})"
        f" on {len(train)} images of {len(vocab.skus)} SKUs; loss {list(loss.losses)}"
    )
    epochs = params.epochs
    if params.budget_minutes is not None or params.progress:
        epochs = _plan_epochs(model, train, params, transform, len(vocab.skus))
    t0 = time.perf_counter()
    result = train_embedder(
        model,
        loss,
        train,
        out_dir=out,
        val=val,
        epochs=epochs,
        p=params.p,
        k=params.k,
        steps_per_epoch=steps_per_epoch(params, len(vocab.skus)),
        sampler=params.sampler,
        lookalike_group=params.lookalike_group,
        peer=peer,
        mutual_weight=params.mutual_weight,
        lr=params.lr,
        backbone_lr_mult=params.backbone_lr_mult,
        frozen_blocks=params.frozen_blocks,
        freeze_bn=params.freeze_bn,
        transform=transform,
        seed=params.seed,
        resume=resume,
        device=choose_device(params.device),
        num_workers=params.workers,
        progress=params.progress,
        callback=lambda r: print(_epoch_line(r), flush=True),
        vocab=vocab,
        trend_set=trend_set,
        trend_every=params.trend_every,
        early_stop=early,
        patience=params.patience,
        # at most one held-out check per ~100 steps: on a small catalog an epoch is short
        check_every=max(1, math.ceil(100 / steps_per_epoch(params, len(vocab.skus)))),
    )
    seconds = time.perf_counter() - t0
    (out / "history.json").write_text(json.dumps(result.history, indent=1))
    return EmbedderTraining(Path(result.model_path), seconds, list(result.history))


def steps_per_epoch(params: EmbedderTrainParams, n_skus: int) -> int:
    """Batches per epoch: ``params.steps_per_epoch`` when set, else one pass over the SKUs
    (``n_skus // p``), lengthened on a small catalog so that ``params.epochs`` epochs make at
    least ``params.min_steps`` steps."""
    if params.steps_per_epoch is not None:
        return int(params.steps_per_epoch)
    return max(1, n_skus // params.p, math.ceil(params.min_steps / max(1, params.epochs)))


def measure_train_rate(model: nn.Module, train: ImageSet, params: EmbedderTrainParams,
                       transform: Callable[[np.ndarray], torch.Tensor], *,
                       steps: int = 2) -> float:
    """Training images/s of ``model`` on this machine: ``steps`` timed P x K batches of real
    training crops (decode, augmentation, forward and backward of the unfrozen part) after
    one warm-up batch, on a copy of the model (its weights and BN statistics untouched)."""
    probe = copy.deepcopy(model).to(choose_device(params.device)).train()
    dev = next(probe.parameters()).device
    for block in list(probe.trunk.children())[: params.frozen_blocks]:
        block.requires_grad_(False)
    n = min(len(train), params.p * params.k)
    rng = np.random.default_rng(0)
    seconds = 0.0
    for i in range(steps + 1):
        t0 = time.perf_counter()
        idx = rng.choice(len(train), size=n, replace=False)
        x = torch.stack([transform(c) for c in train.subset(idx).crops()]).to(dev)
        probe.forward_features(x).square().mean().backward()
        probe.zero_grad(set_to_none=True)
        if i:
            seconds += time.perf_counter() - t0
    return steps * n / max(seconds, 1e-9)


def _plan_epochs(model: nn.Module, train: ImageSet, params: EmbedderTrainParams,
                 transform: Callable[[np.ndarray], torch.Tensor], n_skus: int) -> int:
    """Print the training's estimated time (measured rate) before it starts; returns the
    epochs to run: ``params.epochs``, cut to fit ``params.budget_minutes`` when given."""
    per_epoch = steps_per_epoch(params, n_skus)
    images = per_epoch * params.p * params.k
    rate = measure_train_rate(model, train, params, transform)
    minutes = params.epochs * images / rate / 60
    stop = (f", early stopping after {params.patience} epochs without held-out gain"
            if params.patience is not None else "")
    budget = (f" (budget {params.budget_minutes:g} min)"
              if params.budget_minutes is not None else "")
    print(f"embedder training: up to {params.epochs} epochs x {per_epoch} steps of "
          f"{params.p} x {params.k} images ({n_skus} SKUs){stop}; measured "
          f"{rate:.0f} images/s here -> about {minutes:.1f} min{budget}", flush=True)
    epochs = params.epochs
    if params.budget_minutes is not None and minutes > params.budget_minutes:
        epochs = max(1, int(params.budget_minutes * 60 * rate / images))
        print(f"embedder training: over budget; cut to {epochs} epochs (about "
              f"{epochs * images / rate / 60:.1f} min). Raise embedder.budget_minutes to "
              "train the full schedule.", flush=True)
    return epochs


def cmd_train(args: argparse.Namespace) -> int:
    if args.pretrained == "none":
        pretrained = None
    elif args.pretrained:
        pretrained = Path(args.pretrained)
    else:
        pretrained = default_pretrained(args.backbone)
    params = EmbedderTrainParams(
        backbone=args.backbone, dim=args.dim, pooling=args.pooling, attention=args.attention,
        pretrained=pretrained, image_size=args.image_size, loss=args.loss,
        margin=args.margin, scale=args.scale, triplet_weight=args.triplet_weight,
        category_weight=args.category_weight, attribute_weight=args.attribute_weight,
        attributes=tuple(a for a in args.attributes.split(",") if a),
        task_weights=args.task_weights, trend_every=args.trend_every, erasing=args.erasing,
        augment=args.augment, epochs=args.epochs, p=args.p, k=args.k,
        steps_per_epoch=args.steps_per_epoch, lr=args.lr,
        backbone_lr_mult=args.backbone_lr_mult, frozen_blocks=args.frozen_blocks,
        freeze_bn=args.freeze_bn, seed=args.seed, patience=args.patience,
        holdout_queries=args.holdout_queries, budget_minutes=args.budget_minutes,
        workers=args.workers, device=args.device, progress=not args.quiet,
        hdc_weight=args.hdc_weight, sampler=args.sampler, lookalike_group=args.lookalike_group,
        peer_backbone=args.peer_backbone, mutual_weight=args.mutual_weight,
    )
    result = train_embedder_on_catalog(args.catalog, args.out, params,
                                       val_queries=args.val_queries, resume=args.resume,
                                       lenient=args.lenient, store=args.store)
    print(json.dumps(result.summary(), indent=1))
    return 0


def _epoch_line(r: dict) -> str:
    line = f"epoch {r['epoch']}: loss {r['loss']:.4f}, {r['images_per_s']:.1f} img/s"
    if "recall@1" in r:
        line += f", val R@1 {r['recall@1']:.4f} R@5 {r['recall@5']:.4f}"
    if "held_out" in r:
        line += f", held-out mAP@10 {r['held_out']['map@10']:.4f}"
        line += " (stopping)" if r.get("stopped") else ""
    if "task_weights" in r:
        line += ", task weights " + ", ".join(f"{k} {v:.3f}" for k, v in
                                               r["task_weights"].items())
    return line


def cmd_embed(args: argparse.Namespace) -> int:
    catalog = read_manifest(args.catalog, strict=not args.lenient,
                            images=store_lookup(args.store))
    model = load_embedder(args.model, device=choose_device(args.device))
    items = ((r.line, r.source, r.bbox if not args.no_crop else None) for r in catalog.rows)
    feats = np.zeros((len(catalog.rows), model.dim), dtype=np.float32)
    ids = np.zeros(len(catalog.rows), dtype=np.int64)
    n = 0
    t0 = time.perf_counter()
    for batch_ids, batch_feats in embed_items(
        model,
        items,
        batch_size=args.batch_size,
        num_workers=args.workers,
        progress=not args.quiet,
    ):
        ids[n : n + len(batch_ids)] = batch_ids
        feats[n : n + len(batch_ids)] = batch_feats
        n += len(batch_ids)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, feats)
    ids_path = out.with_name(out.stem + ".ids.npy")
    np.save(ids_path, ids)
    print(
        f"embedded {n} images ({n / max(seconds, 1e-9):.1f} img/s) -> {out} and {ids_path}"
        " (ids = catalog line numbers)"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train-embedder`` and ``embed`` to ``sub``."""
    t = sub.add_parser("train-embedder", help="train the margin-loss retrieval embedder")
    t.add_argument("--catalog", required=True, type=Path, help="catalog.jsonl (shop images)")
    t.add_argument("--val-queries", type=Path, help="queries.jsonl for Recall@k each epoch")
    t.add_argument("--out", required=True, type=Path, help="output dir (checkpoint, model)")
    t.add_argument("--backbone", default="mobilenet_v2", choices=BACKBONES.names())
    t.add_argument("--dim", type=int, default=256, help="embedding dimension")
    t.add_argument("--pooling", default="gem", choices=sorted(POOLINGS))
    t.add_argument("--attention", action="store_true", help="add the spatial attention block")
    t.add_argument("--loss", default="arcface", choices=LOSSES.names())
    t.add_argument("--margin", type=float, help="margin (loss default when unset)")
    t.add_argument("--scale", type=float, help="logit scale s (loss default when unset)")
    t.add_argument("--triplet-weight", type=float, default=0.0, help="batch-hard triplet term")
    t.add_argument("--hdc-weight", type=float, default=0.0,
                   help="hard-aware cascaded contrastive term (HDC) on SKUs")
    t.add_argument("--category-weight", type=float, default=0.0, help="auxiliary category head")
    t.add_argument("--attribute-weight", type=float, default=0.0, help="auxiliary attribute heads")
    t.add_argument(
        "--attributes",
        default="color,pattern,material",
        help="comma-separated attribute names for the attribute heads",
    )
    t.add_argument(
        "--task-weights",
        default="fixed",
        choices=TASK_WEIGHTS,
        help="the heads' loss weights: fixed (as given) or auto (from each head's "
        "validation-loss trend on 5%% held-out training images; the SKU loss stays fixed)",
    )
    t.add_argument("--trend-every", type=int, default=50, help="steps between auto reweights")
    t.add_argument("--erasing", type=float, default=0.5, help="random erasing probability")
    t.add_argument(
        "--augment",
        default="strong",
        choices=AUGMENTS,
        help="training augmentation: light (crop, flip, jitter) or strong (+ perspective, "
        "rotation, hue, grayscale, blur, JPEG, noise: for photos taken in the wild; on the "
        "synthetic world's user photos R@1 0.34 vs 0.21 for light)",
    )
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--p", type=int, default=32, help="SKUs per batch")
    t.add_argument("--k", type=int, default=4, help="images per SKU in a batch")
    t.add_argument("--steps-per-epoch", type=int, help="default: #SKUs // p")
    t.add_argument("--sampler", default="pk", choices=SAMPLERS,
                   help="pk: random SKUs per batch; lookalike: families of look-alike SKUs "
                   "(nearest by the SKU classifier's centres) for hard negatives")
    t.add_argument("--lookalike-group", type=int, default=4,
                   help="SKUs per look-alike family in a batch (--sampler lookalike)")
    t.add_argument("--peer-backbone", choices=BACKBONES.names(),
                   help="deep mutual learning with a peer of this backbone (not kept)")
    t.add_argument("--mutual-weight", type=float, default=1.0,
                   help="weight of each network's KL term toward the other (--peer-backbone)")
    t.add_argument("--image-size", type=int, default=224, help="square input side, pixels")
    t.add_argument("--lr", type=float, default=1e-3, help="peak AdamW lr (head, loss)")
    t.add_argument("--backbone-lr-mult", type=float, default=0.1, help="trunk lr = lr * this")
    t.add_argument(
        "--frozen-blocks",
        type=int,
        default=0,
        help="freeze the first N trunk blocks (faster CPU training; mobilenet_v2 has 19)",
    )
    t.add_argument(
        "--freeze-bn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the trunk's BatchNorm statistics at their pretrained values (default; "
        "re-estimating them on clean catalog images hurts user-photo recall)",
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--patience", type=int,
                   help="early stopping: epochs without held-out catalog mAP@10 gain "
                   "(default: run every epoch)")
    t.add_argument("--holdout-queries", type=int, default=256,
                   help="held-out catalog images for early stopping")
    t.add_argument("--budget-minutes", type=float,
                   help="cut the epochs to fit this many minutes (rate measured first)")
    t.add_argument(
        "--pretrained",
        help="torchvision weights file, or 'none' (default: "
        "weights/mobilenet_v2-b0353104.pth for mobilenet_v2 when present)",
    )
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--workers", type=int, default=0, help="DataLoader decode processes")
    t.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    t.add_argument("--lenient", action="store_true", help="skip bad manifest rows")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    add_store_argument(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("embed", help="embed a catalog's images with a trained embedder")
    e.add_argument("--catalog", required=True, type=Path)
    e.add_argument("--model", required=True, type=Path, help="embedder.pt")
    e.add_argument(
        "--out",
        required=True,
        type=Path,
        help="features .npy (float32 [N, dim]); ids go to <stem>.ids.npy",
    )
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=0)
    e.add_argument("--device")
    e.add_argument("--no-crop", action="store_true", help="ignore bboxes")
    e.add_argument("--lenient", action="store_true", help="skip bad manifest rows")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    add_store_argument(e)
    e.set_defaults(func=cmd_embed)
