"""How hard is the synthetic world? Trivial retrieval baselines and the generation rate.

    .venv/bin/python -m benchmarks.synth_baseline [--skus 300 --seed 0 --image-size 128]
    .venv/bin/python -m benchmarks.synth_baseline --world DIR     # an existing world

Generates a world with one worker (timing it: images/s per core), then retrieves, for every
user photo, the nearest shop image by raw pixels (16x16 RGB, cosine) and by colour histogram
(8x8x8 RGB bins, Hellinger), on the whole photo and on the ground-truth box (a perfect
detector). A query counts as correct when the top shop image's SKU is one of its product's
SKUs (split SKUs count). Side by side: the same features shop-to-shop (leave-one-out, other
images of the same SKU as targets), which shows the features work on the clean domain,
and chance (1 / SKUs). Low photo Recall@1 means the world is not solvable by trivial matching.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from visearch.synth import generate_world


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _load(world: Path, row: dict, crop: bool) -> Image.Image:
    with Image.open(world / row["image"]) as im:
        img = im.convert("RGB")
    if crop and row.get("bbox"):
        img = img.crop(tuple(row["bbox"]))
    return img


def raw_pixels(img: Image.Image) -> np.ndarray:
    """16x16 RGB thumbnail, mean-centred, L2-normalised: float32 [768]."""
    v = np.asarray(img.resize((16, 16), Image.Resampling.BILINEAR), np.float32).ravel()
    v -= v.mean()
    return v / (np.linalg.norm(v) + 1e-6)


def colour_histogram(img: Image.Image) -> np.ndarray:
    """8x8x8 RGB histogram, square-rooted (Hellinger) and L2-normalised: float32 [512]."""
    q = np.asarray(img, np.uint8) // 32
    idx = (q[..., 0].astype(np.int32) * 64 + q[..., 1] * 8 + q[..., 2]).ravel()
    h = np.sqrt(np.bincount(idx, minlength=512).astype(np.float32))
    return h / (np.linalg.norm(h) + 1e-6)


def recall_at_1(xq: np.ndarray, xb: np.ndarray, ok: list[set[str]], gallery_label: list[str],
                exclude_self: bool = False) -> float:
    """Fraction of queries whose most similar gallery row has one of its accepted labels.

    ``xq`` float32 [M, d] and ``xb`` float32 [N, d] are L2-normalised (cosine similarity).
    """
    sim = xq @ xb.T
    if exclude_self:
        np.fill_diagonal(sim, -np.inf)
    top = sim.argmax(axis=1)
    return float(np.mean([gallery_label[int(t)] in ok[i] for i, t in enumerate(top)]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=Path, default=None, help="use this world (no generation)")
    p.add_argument("--skus", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=1, help="rendering processes for the timing")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)

    print(f"machine: {platform.machine()} {platform.processor() or ''} "
          f"cpus={os.cpu_count()} python={platform.python_version()} "
          f"numpy={np.__version__} pillow={importlib.metadata.version('pillow')} "
          f"torch={importlib.metadata.version('torch')} "
          f"faiss={_version('faiss-gpu', 'faiss-cpu')}")
    report: dict = {}
    tmp = None
    world = args.world
    if world is None:
        tmp = tempfile.TemporaryDirectory(prefix="synth_baseline_")
        world = Path(tmp.name)
        start, cpu_start = time.perf_counter(), time.process_time()
        info = generate_world(world, skus=args.skus, seed=args.seed,
                              image_size=args.image_size, workers=args.workers)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        n = info["counts"]["images"]
        rate = n / elapsed
        report["generation"] = {"images": n, "seconds": round(elapsed, 2),
                                "images_per_s": round(rate, 1), "workers": args.workers,
                                "images_per_s_per_core": round(rate / args.workers, 1)}
        print(f"generated {n} images ({args.skus} SKUs, {args.image_size} px) in "
              f"{elapsed:.1f} s with {args.workers} worker(s): {rate:.0f} images/s, "
              f"{rate / args.workers:.0f} images/s per core (wall clock)")
        if args.workers == 1:
            # On a shared machine the wall clock includes waiting for a core; CPU time not.
            report["generation"]["images_per_cpu_s"] = round(n / cpu, 1)
            print(f"  CPU time {cpu:.1f} s: {n / cpu:.0f} images per CPU-second")

    catalog = _rows(world / "catalog.jsonl")
    queries = _rows(world / "queries.jsonl")
    truth = json.loads((world / "truth.json").read_text())
    same: dict[str, set[str]] = {r["sku"]: {r["sku"]} for r in catalog}
    for split in truth["split_skus"]:
        for s in split["skus"]:
            same[s] = set(split["skus"])
    # Near-duplicates and mislabelled images are left in the gallery, as a catalog has them.
    g_sku = [r["sku"] for r in catalog]
    n_skus = len(set(g_sku))
    print(f"world: {world}  gallery={len(catalog)} shop images, {n_skus} SKUs, "
          f"{len(queries)} user photos")
    g_family = [r["attributes"]["family"] for r in catalog]
    print(f"\n{'Recall@1':18s} {'photo->shop':>12s} {'photo box->shop box':>20s} "
          f"{'same family':>12s} {'shop->shop (LOO)':>17s} {'chance':>8s}")
    features: dict[str, Callable[[Image.Image], np.ndarray]] = {
        "raw pixels": raw_pixels, "colour histogram": colour_histogram,
    }
    report["recall_at_1"] = {}
    for name, fn in features.items():
        xb = np.stack([fn(_load(world, r, False)) for r in catalog])
        xb_crop = np.stack([fn(_load(world, r, True)) for r in catalog])
        ok = [same[q["sku"]] for q in queries]
        r_full = recall_at_1(np.stack([fn(_load(world, q, False)) for q in queries]), xb,
                             ok, g_sku)
        r_crop = recall_at_1(np.stack([fn(_load(world, q, True)) for q in queries]), xb_crop,
                             ok, g_sku)
        # the same boxes, counting any look-alike of the right family as a hit
        x_crop = np.stack([fn(_load(world, q, True)) for q in queries])
        r_fam = recall_at_1(x_crop, xb_crop, [{q["attributes"]["family"]} for q in queries],
                            g_family)
        r_shop = recall_at_1(xb, xb, [same[s] for s in g_sku], g_sku, exclude_self=True)
        chance = 1.0 / n_skus
        report["recall_at_1"][name] = {"photo": r_full, "photo_box": r_crop,
                                       "photo_box_family": r_fam, "shop_loo": r_shop,
                                       "chance": chance}
        print(f"{name:18s} {r_full:12.3f} {r_crop:20.3f} {r_fam:12.3f} {r_shop:17.3f} "
              f"{chance:8.4f}")
    print("\nphoto box: the query cropped to its ground-truth box (a perfect detector). "
          "same family: a look-alike counts as a hit. shop->shop (leave-one-out) is the easy "
          "reference on the clean domain; it counts near-duplicates as hits.")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


def _version(*names: str) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "absent"


if __name__ == "__main__":
    raise SystemExit(main())
