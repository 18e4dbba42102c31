"""Embedder benchmark: user photo -> SKU retrieval for several losses and options, one run.

Trains each variant for the same fixed number of P x K steps on a synthetic world's catalog
(shop images cropped to their boxes) and evaluates user photos (cropped to their boxes)
against the catalog: Recall@1/5/10 and mAP@10 over SKUs, counting every SKU of a split
product as correct. The baseline, measured in the same run, is the ImageNet-pretrained
backbone without any training (GeM-pooled trunk features). Also reports training and
embedding images/s on this machine.

    python -m benchmarks.bench_embedder                       # small default (CPU, minutes)
    python -m benchmarks.bench_embedder --skus 400 --steps 150 --variants all
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import machine as describe_machine
from visearch.catalog import read_manifest
from visearch.embedding import build_embedder, load_crop
from visearch.embedding.losses import (
    ArcFaceLoss,
    BatchHardTripletLoss,
    CosFaceLoss,
    LossTerm,
    NormFaceLoss,
    SoftmaxLoss,
    WeightedLoss,
)
from visearch.embedding.train import ImageSet, LabelVocab, evaluate, train_embedder
from visearch.transforms import train_transform

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "weights" / "mobilenet_v2-b0353104.pth"

# name -> (loss terms factory(dim, classes, margin), erasing probability, spatial attention);
# ``margin`` holds the ArcFace/CosFace ``margin``/``scale`` given on the command line (the
# loss classes' defaults for those not given).
VARIANTS: dict[str, tuple[Any, float, bool]] = {
    "softmax": (lambda d, c, m: [LossTerm("softmax", SoftmaxLoss(d, c))], 0.5, False),
    "normface": (lambda d, c, m: [LossTerm("normface", NormFaceLoss(d, c))], 0.5, False),
    "cosface": (lambda d, c, m: [LossTerm("cosface", CosFaceLoss(d, c, **m))], 0.5, False),
    "arcface": (lambda d, c, m: [LossTerm("arcface", ArcFaceLoss(d, c, **m))], 0.5, False),
    "arcface+triplet": (
        lambda d, c, m: [
            LossTerm("arcface", ArcFaceLoss(d, c, **m)),
            LossTerm("triplet", BatchHardTripletLoss(0.3)),
        ],
        0.5,
        False,
    ),
    "arcface-no-erasing": (lambda d, c, m: [LossTerm("arcface", ArcFaceLoss(d, c, **m))], 0.0,
                           False),
    "softmax-no-erasing": (lambda d, c, m: [LossTerm("softmax", SoftmaxLoss(d, c))], 0.0,
                           False),
    "arcface+attention": (lambda d, c, m: [LossTerm("arcface", ArcFaceLoss(d, c, **m))], 0.5,
                          True),
}
DEFAULT_VARIANTS = "pretrained,softmax,arcface,arcface+triplet"


def _world(args: argparse.Namespace) -> Path:
    if args.world:
        return args.world
    from visearch.synth import generate_world

    out = REPO / "out" / "bench_embedder" / f"world_{args.skus}_{args.seed}_{args.world_size}"
    if not (out / "world.json").is_file():
        print(f"generating a {args.skus}-SKU world in {out} ...", flush=True)
        generate_world(out, skus=args.skus, seed=args.seed, image_size=args.world_size)
    return out


def _relevant(world: Path, vocab: LabelVocab, query_skus: list[str]) -> list[set[int]]:
    """Per query, the label ids of every SKU of its product (split SKUs are one product)."""
    index = {s: i for i, s in enumerate(vocab.skus)}
    same: dict[str, set[str]] = {}
    truth = world / "truth.json"
    if truth.is_file():
        for group in json.loads(truth.read_text()).get("split_skus", []):
            for s in group["skus"]:
                same[s] = set(group["skus"])
    return [{index[s] for s in same.get(q, {q}) if s in index} or {-1} for q in query_skus]


def _pretrained_baseline(args: argparse.Namespace, input_size: int) -> torch.nn.Module:
    """ImageNet trunk + GeM, no training: the projection is the identity, the BN-neck neutral."""
    probe = build_embedder(args.backbone, pretrained=args.pretrained, input_size=input_size)
    channels = probe.proj.in_features
    model = build_embedder(
        args.backbone, dim=channels, pretrained=args.pretrained, input_size=input_size
    )
    with torch.no_grad():
        model.proj.weight.copy_(torch.eye(channels))
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, help="an existing world dir (else one is generated)")
    ap.add_argument("--skus", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world-size", type=int, default=128, help="generated image side, px")
    ap.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"comma list or 'all' (pretrained,{','.join(VARIANTS)})",
    )
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--pretrained", type=Path, default=WEIGHTS if WEIGHTS.is_file() else None)
    ap.add_argument("--image-size", type=int, default=96, help="model input side, px")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40, help="training steps per variant")
    ap.add_argument("--p", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--backbone-lr-mult", type=float, default=0.3)
    ap.add_argument("--frozen-blocks", type=int, default=7)
    ap.add_argument("--margin", type=float, help="ArcFace/CosFace margin (default: theirs)")
    ap.add_argument("--scale", type=float, help="ArcFace/CosFace scale s (default: theirs)")
    ap.add_argument(
        "--augment",
        default="strong",
        choices=["light", "strong"],
        help="training augmentation strength (visearch.transforms.train_transform)",
    )
    ap.add_argument(
        "--shop-holdout",
        action="store_true",
        help="also hold one shop image per SKU out of training and report held-out "
        "shop -> shop retrieval (a sanity check that training learns anything)",
    )
    ap.add_argument(
        "--freeze-bn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="trunk BN stats stay pretrained (default)",
    )
    ap.add_argument(
        "--no-neck-calibration",
        action="store_true",
        help="imprint without first calibrating the BN-neck (the old behaviour, for ablation)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench_embedder")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    margin = {k: v for k, v in (("margin", args.margin), ("scale", args.scale))
              if v is not None}
    names = ["pretrained", *VARIANTS] if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n != "pretrained" and n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from pretrained,{','.join(VARIANTS)}")

    machine = describe_machine() | {"loadavg_start": os.getloadavg()}
    print(f"machine: {machine}", flush=True)
    world = _world(args)
    catalog = read_manifest(world / "catalog.jsonl").rows
    queries = read_manifest(world / "queries.jsonl").rows
    vocab = LabelVocab.from_rows(catalog)
    gallery = vocab.image_set(catalog)
    query_set = vocab.image_set(queries)
    t0 = time.perf_counter()
    gallery_crops = [load_crop(r.path, r.bbox) for r in catalog]
    query_crops = [load_crop(r.path, r.bbox) for r in queries]
    decode_s = time.perf_counter() - t0
    relevant = _relevant(world, vocab, [r.sku for r in queries])
    # Train on the pre-decoded crops (no re-decoding each epoch).
    train = ImageSet(gallery_crops, [None] * len(gallery_crops), gallery.labels)
    holdout = None
    if args.shop_holdout:
        # The first shop image of each SKU becomes a query; the rest train and form its gallery.
        labels = gallery.labels["sku"]
        first = {}
        for i, lab in enumerate(labels):
            first.setdefault(int(lab), i)
        held = sorted(i for lab, i in first.items() if (labels == lab).sum() > 1)
        kept = [i for i in range(len(labels)) if i not in set(held)]
        sub = {n: v[kept] for n, v in gallery.labels.items()}
        train = ImageSet([gallery_crops[i] for i in kept], [None] * len(kept), sub)
        holdout = (
            train,
            ImageSet(
                [gallery_crops[i] for i in held],
                [None] * len(held),
                {n: v[held] for n, v in gallery.labels.items()},
            ),
        )
        print(f"shop hold-out: {len(held)} query images, {len(kept)} training images", flush=True)
    print(
        f"world {world}: {len(catalog)} shop images, {len(vocab.skus)} SKUs, "
        f"{len(queries)} user photos; decoded in {decode_s:.1f} s",
        flush=True,
    )

    results: dict[str, dict[str, Any]] = {}
    for name in names:
        t_start = time.perf_counter()
        if name == "pretrained":
            model = _pretrained_baseline(args, args.image_size)
            train_s, train_rate = 0.0, None
        else:
            make_terms, erasing, attention = VARIANTS[name]
            torch.manual_seed(args.seed)
            model = build_embedder(
                args.backbone,
                dim=args.dim,
                attention=attention,
                pretrained=args.pretrained,
                input_size=args.image_size,
            )
            loss = WeightedLoss(make_terms(args.dim, len(vocab.skus), margin))
            cfg = model.config
            res = train_embedder(
                model, loss, train, out_dir=args.out / "runs" / name, epochs=1, p=args.p,
                k=args.k, steps_per_epoch=args.steps, lr=args.lr,
                backbone_lr_mult=args.backbone_lr_mult, frozen_blocks=args.frozen_blocks,
                freeze_bn=args.freeze_bn, calibrate_neck=not args.no_neck_calibration,
                transform=train_transform(args.image_size, mean=cfg["mean"], std=cfg["std"],
                                          erasing=erasing, augment=args.augment),
                seed=args.seed, progress=True,
            )  # fmt: skip
            train_s = res.history[-1]["seconds"]
            train_rate = res.history[-1]["images_per_s"]
        t_embed = time.perf_counter()
        metrics = evaluate(model, gallery, query_set, relevant=relevant, ks=(1, 5, 10),
                           gallery_crops=gallery_crops, query_crops=query_crops)  # fmt: skip
        embed_s = time.perf_counter() - t_embed
        if holdout is not None:
            shop = evaluate(
                model,
                holdout[0],
                holdout[1],
                ks=(1, 5, 10),
                gallery_crops=holdout[0].sources,
                query_crops=holdout[1].sources,
            )
            metrics["shop_recall@1"] = shop["recall@1"]
            metrics["shop_recall@10"] = shop["recall@10"]
        row = {
            "recall@1": metrics["recall@1"],
            "recall@5": metrics["recall@5"],
            "recall@10": metrics["recall@10"],
            "map@10": metrics["map@10"],
            "shop_recall@1": metrics.get("shop_recall@1"),
            "shop_recall@10": metrics.get("shop_recall@10"),
            "train_images": 0 if name == "pretrained" else args.steps * args.p * args.k,
            "train_s": round(train_s, 1),
            "train_img_s": train_rate,
            "embed_img_s": (len(gallery_crops) + len(query_crops)) / embed_s,
            "wall_s": round(time.perf_counter() - t_start, 1),
        }
        results[name] = row
        print(f"{name}: {json.dumps(row)}", flush=True)

    machine["loadavg_end"] = os.getloadavg()
    lines = [
        "| variant | R@1 | R@5 | R@10 | mAP@10 | train imgs | train s | train img/s "
        "| embed img/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        rate = f"{r['train_img_s']:.1f}" if r["train_img_s"] else "-"
        lines.append(
            f"| {name} | {r['recall@1']:.3f} | {r['recall@5']:.3f} | {r['recall@10']:.3f} | "
            f"{r['map@10']:.3f} | {r['train_images']} | {r['train_s']} | {rate} | "
            f"{r['embed_img_s']:.1f} |"
        )
    table = "\n".join(lines)
    print(
        f"\nbackbone {args.backbone} @ {args.image_size}px, {args.steps} steps of "
        f"P{args.p} x K{args.k}, lr {args.lr}, frozen blocks {args.frozen_blocks}, "
        f"augment {args.augment}, freeze-bn {args.freeze_bn}; "
        f"world {world.name}\n{table}\nmachine: {machine}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine,
              "world": str(world), "results": results}  # fmt: skip
    (args.out / "bench_embedder.json").write_text(json.dumps(report, indent=1))
    (args.out / "bench_embedder.md").write_text(table + "\n")
    print(f"wrote {args.out / 'bench_embedder.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
