"""Product cut-outs against the synthetic world's drawn masks: IoU, SAD, statuses, speed.

    .venv/bin/python -m benchmarks.bench_cutout --skus 200 --seed 7 [--image-size 128]
        [--photos-per-sku 1] [--work DIR] [--json out.json]
        [--methods threshold,grabcut,matting,product]
        [--photo-methods rect,cut_out,product,product_loose]
        [-q]

Generates a world with ``shop_masks=True`` (drawn masks of the shop images and of the user
photos' products; no detection scenes) into ``--work`` (reused when it already holds that
world) or a temporary folder.

**Shop images.** Every original shop image (near-duplicates have no drawn mask) is cut out
without and with its catalog bbox, with:

- ``threshold``: the plain baseline, measured in the same run: pixels whose colour is more
  than 30 (RGB Euclidean) from the median colour of the 3 px border, inside the bbox if
  given; no shadow, hole or speck handling, no statuses beyond "empty".
- ``grabcut``: ``visearch.scenes.cut_out(refine="grabcut")`` (the default).
- ``matting``: ``cut_out(refine="matting")`` (grabCut, then pymatting closed-form matting).
- ``product``: ``visearch.scenes.cut_out_product`` (the entry point the Cutout RPC uses).

**User photos** (cluttered background, perspective, lighting, occlusion) are cut out given
the TRUE box (the query bbox: the whole product, occluded parts included) and scored
against the drawn mask of the product's visible part, with:

- ``rect``: the plain baseline, measured in the same run: ``cv2.grabCut`` initialised with
  the box as its rectangle on the whole photo, 5 iterations, hard mask; no box prior, no
  smoothing, no cleaning, no matting.
- ``cut_out``: today's shop-image method, ``cut_out(bbox, refine="matting")`` (it answers
  ``not_plain`` for clutter: IoU 0).
- ``product``: ``cut_out_product`` (its photo path: box-prior grabCut + pymatting).
- ``product_loose``: the same given the true box grown by 10 % of its size on each side,
  as a detector's box may be (the box prior assumes a tight box).

Per method and bbox setting: mean / median mask IoU (alpha >= 128 against the drawn mask;
a failed cut-out counts 0), the share with IoU >= 0.9 (and >= 0.75), SAD (sum of absolute
alpha differences over the image / 1000, as alphamatting.com reports it) and mean absolute
alpha error, the share of cut-out boxes within 2 px of the catalog bbox, ms per image
(cut-out only: the image is decoded before the clock starts), the statuses, and the
Spearman rank correlation of ``quality`` with IoU. Close-ups (the catalog bbox touches the
frame: the product is cut by the frame, and the drawn mask there is not a whole product)
are left out of the shop IoU figures and reported on their own line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from benchmarks.machine import machine
from visearch.progress import progress_bar
from visearch.scenes import CUTOUT_STATUSES, Cutout, cut_out, cut_out_product, load_rgba
from visearch.synth import generate_world
from visearch.synth.world import mask_path

#: method name -> fn(image, bbox) -> (status, full-frame alpha uint8 [H, W] or None, quality)
Method = Callable[[np.ndarray, Sequence[float] | None], tuple[str, np.ndarray | None, float]]


def threshold_baseline(image: np.ndarray, bbox: Sequence[float] | None, *,
                       thresh: float = 30.0, border: int = 3) -> tuple[str, np.ndarray | None,
                                                                       float]:
    """The plain baseline: alpha 255 where the RGB distance to the border's median colour
    exceeds ``thresh`` (inside ``bbox`` when given). Returns (status, alpha, quality=1)."""
    img = image[..., :3].astype(np.float32)
    h, w = img.shape[:2]
    band = np.ones((h, w), bool)
    band[border:h - border, border:w - border] = False
    colour = np.median(img[band], axis=0)
    mask = np.linalg.norm(img - colour, axis=2) > thresh
    if bbox is not None:
        x1, y1, x2, y2 = (int(round(v)) for v in bbox)
        inside = np.zeros_like(mask)
        inside[max(0, y1):y2, max(0, x1):x2] = True
        mask &= inside
    if not mask.any():
        return "empty", None, 0.0
    return "ok", mask.astype(np.uint8) * 255, 1.0


def _library(refine: str) -> Method:
    def run(image: np.ndarray, bbox: Sequence[float] | None):
        c = cut_out(image, bbox, refine=refine)
        if not c.ok:
            return c.status, None, 0.0
        alpha = np.zeros(image.shape[:2], np.uint8)
        x1, y1, x2, y2 = c.box
        alpha[y1:y2, x1:x2] = c.rgba[..., 3]
        return c.status, alpha, c.quality
    return run


def _full_alpha(c: Cutout, shape: tuple[int, int]) -> np.ndarray:
    """A Cutout's alpha pasted back into a frame of ``shape`` (uint8 [H, W])."""
    alpha = np.zeros(shape, np.uint8)
    x1, y1, x2, y2 = c.box
    alpha[y1:y2, x1:x2] = c.rgba[..., 3]
    return alpha


def product_method(image: np.ndarray, bbox: Sequence[float] | None):
    """``cut_out_product``, the one entry point (shop path or photo path)."""
    c = cut_out_product(image, None if bbox is None else tuple(bbox))
    if not c.ok:
        return c.status, None, 0.0
    return c.status, _full_alpha(c, image.shape[:2]), c.quality


def rect_baseline(image: np.ndarray, bbox: Sequence[float] | None, *,
                  iterations: int = 5) -> tuple[str, np.ndarray | None, float]:
    """The plain photo baseline: ``cv2.grabCut`` initialised with ``bbox`` as its rectangle
    on the whole image, hard mask (quality 1). Without a bbox: status "bad_bbox"."""
    if bbox is None:
        return "bad_bbox", None, 0.0
    rgb = np.ascontiguousarray(image[..., :3])
    h, w = rgb.shape[:2]
    x1, y1 = max(0, int(bbox[0])), max(0, int(bbox[1]))
    x2, y2 = min(w, int(np.ceil(bbox[2]))), min(h, int(np.ceil(bbox[3])))
    gc = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # grabCut's k-means draws from OpenCV's global generator
    try:
        cv2.grabCut(rgb, gc, (x1, y1, x2 - x1, y2 - y1), bgd, fgd, iterations,
                    cv2.GC_INIT_WITH_RECT)
    except cv2.error:
        return "empty", None, 0.0
    mask = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
    if not mask.any():
        return "empty", None, 0.0
    return "ok", mask.astype(np.uint8) * 255, 1.0


METHODS: dict[str, Method] = {
    "threshold": threshold_baseline,
    "grabcut": _library("grabcut"),
    "matting": _library("matting"),
    "product": product_method,
}

def loose_product_method(image: np.ndarray, bbox: Sequence[float] | None, *,
                         grow: float = 0.1):
    """``cut_out_product`` given the box grown by ``grow`` x its size on each side (a
    detector's box is rarely tight; the box prior assumes it is)."""
    if bbox is None:
        return product_method(image, None)
    x1, y1, x2, y2 = bbox
    dx, dy = grow * (x2 - x1), grow * (y2 - y1)
    return product_method(image, (x1 - dx, y1 - dy, x2 + dx, y2 + dy))


#: methods for the user photos (always given the true box; ``product_loose`` grows it)
PHOTO_METHODS: dict[str, Method] = {
    "rect": rect_baseline,
    "cut_out": _library("matting"),
    "product": product_method,
    "product_loose": loose_product_method,
}


def _tight_box(alpha: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(alpha >= 128)
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (for Spearman's rho)."""
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v), np.float64)
    r[order] = np.arange(len(v), dtype=np.float64)
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=r)
    return sums[inverse] / counts[inverse]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of ``a`` and ``b``; nan when either is constant."""
    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    if len(ra) < 3 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def evaluate(method: Method, items: list[dict], use_bbox: bool, *, progress: bool,
             desc: str) -> dict:
    """Run ``method`` on every item (dicts with image, mask, bbox, closeup) and score it."""
    ious, sads, maes, box_ok, quality, q_iou = [], [], [], [], [], []
    statuses: Counter[str] = Counter()
    close_ok, close_iou = 0, []
    elapsed = 0.0
    for it in progress_bar(items, desc=desc, unit="img", disable=not progress, leave=False):
        bbox = it["bbox"] if use_bbox else None
        start = time.perf_counter()
        status, alpha, q = method(it["image"], bbox)
        elapsed += time.perf_counter() - start
        statuses[status] += 1
        gt = it["mask"]
        pred = np.zeros(gt.shape, np.uint8) if alpha is None else alpha
        a, g = pred >= 128, gt >= 128
        union = int((a | g).sum())
        iou = float((a & g).sum()) / union if union else 0.0
        if it["closeup"]:
            close_ok += alpha is not None
            if alpha is not None:
                close_iou.append(iou)
            continue
        ious.append(iou)
        err = np.abs(pred.astype(np.float64) - gt.astype(np.float64)) / 255.0
        sads.append(float(err.sum()) / 1000.0)
        maes.append(float(err.mean()))
        if alpha is not None:
            box = _tight_box(alpha)
            box_ok.append(box is not None and
                          max(abs(u - v) for u, v in zip(box, it["bbox"], strict=True)) <= 2)
            quality.append(q)
            q_iou.append(iou)
    n = sum(statuses.values())
    iou_arr = np.asarray(ious)
    return {
        "images": n, "plain_images": len(ious), "closeups": n - len(ious),
        "iou_mean": float(iou_arr.mean()), "iou_median": float(np.median(iou_arr)),
        "iou_ge_0.9": float((iou_arr >= 0.9).mean()),
        "iou_ge_0.75": float((iou_arr >= 0.75).mean()),
        "sad_mean": float(np.mean(sads)), "mae_alpha": float(np.mean(maes)),
        "box_within_2px": float(np.mean(box_ok)) if box_ok else 0.0,
        "ms_per_image": 1000.0 * elapsed / max(1, n),
        "status_share": {s: statuses[s] / n for s in CUTOUT_STATUSES if statuses[s]},
        "quality_iou_spearman": spearman(quality, q_iou),
        "closeup_ok": close_ok,
        "closeup_iou_mean": float(np.mean(close_iou)) if close_iou else float("nan"),
    }


def load_items(world: Path, manifest: str = "catalog.jsonl") -> list[dict]:
    """Every row of ``manifest`` (``catalog.jsonl``: shop images, ``queries.jsonl``: user
    photos) with a drawn mask, decoded: image (uint8 [H, W, 3]), mask (uint8 [H, W]), bbox,
    closeup (a shop image whose bbox touches the frame; never a user photo)."""
    items = []
    for line in (world / manifest).read_text().splitlines():
        row = json.loads(line)
        mpath = world / mask_path(row["image"])
        if not mpath.is_file():
            continue  # a near-duplicate: no drawn mask
        image = load_rgba(world / row["image"])
        with Image.open(mpath) as im:
            mask = np.asarray(im.convert("L"))
        h, w = mask.shape
        x1, y1, x2, y2 = row["bbox"]
        closeup = manifest == "catalog.jsonl" and (x1 <= 0 or y1 <= 0 or x2 >= w or y2 >= h)
        items.append({"name": row["image"], "image": image, "mask": mask, "bbox": row["bbox"],
                      "closeup": closeup})
    return items


def _world(args: argparse.Namespace) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    want = {"skus": args.skus, "seed": args.seed, "image_size": args.image_size,
            "photos_per_sku": args.photos_per_sku, "shop_masks": True}
    if args.work is not None:
        info = args.work / "world.json"
        if info.is_file():
            params = json.loads(info.read_text())["params"]
            if all(params.get(k) == v for k, v in want.items()):
                return args.work, None
        tmp = None
        out = args.work
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_cutout_")
        out = Path(tmp.name)
    generate_world(out, skus=args.skus, seed=args.seed, image_size=args.image_size,
                   photos_per_sku=args.photos_per_sku, scenes=0, shop_masks=True,
                   workers=min(2, os.cpu_count() or 1), progress=not args.quiet)
    return out, tmp


def _names(p: argparse.ArgumentParser, value: str, known: dict[str, Method],
           flag: str) -> list[str]:
    names = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in names if m not in known]
    if unknown:
        p.error(f"unknown {flag} {unknown}; choose from {sorted(known)}")
    return names


def _table(results: dict[str, dict], labels: dict[str, str], min_iou: str) -> None:
    print(f"| method | bbox | mean IoU | median IoU | IoU>={min_iou} | SAD | alpha MAE "
          "| box<=2px | ms/image | quality~IoU rho | statuses (all images) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        name, bb = key.split("/")
        st = ", ".join(f"{s} {v:.1%}" for s, v in r["status_share"].items())
        print(f"| {labels.get(name, name)} | {bb} | {r['iou_mean']:.4f} | "
              f"{r['iou_median']:.4f} | {r[f'iou_ge_{min_iou}']:.1%} | {r['sad_mean']:.3f} | "
              f"{r['mae_alpha']:.4f} | {r['box_within_2px']:.1%} | {r['ms_per_image']:.1f} | "
              f"{r['quality_iou_spearman']:.2f} | {st} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skus", type=int, default=200)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--photos-per-sku", type=int, default=1,
                   help="user photos per SKU for the photo figures (0: shop images only)")
    p.add_argument("--work", type=Path, default=None,
                   help="world folder (reused when it holds this world; default: a temp dir)")
    p.add_argument("--methods", default="threshold,grabcut,matting,product",
                   help=f"shop-image methods, comma-separated, from {sorted(METHODS)}")
    p.add_argument("--photo-methods", default="rect,cut_out,product,product_loose",
                   help=f"user-photo methods, comma-separated, from {sorted(PHOTO_METHODS)}")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    names = _names(p, args.methods, METHODS, "--methods")
    photo_names = _names(p, args.photo_methods, PHOTO_METHODS, "--photo-methods")
    if args.photos_per_sku < 0:
        p.error("--photos-per-sku must be >= 0")

    info = machine(["opencv-python-headless", "pymatting", "numba"])
    info["cv2_threads"] = cv2.getNumThreads()
    print(f"machine: {info}")
    world, tmp = _world(args)
    start = time.perf_counter()
    items = load_items(world)
    photos = load_items(world, "queries.jsonl") if args.photos_per_sku else []
    decode_ms = 1000.0 * (time.perf_counter() - start) / max(1, len(items) + len(photos))
    n_close = sum(it["closeup"] for it in items)
    print(f"world: {world} ({args.skus} SKUs, seed {args.seed}, {args.image_size} px): "
          f"{len(items)} shop images with drawn masks, {n_close} close-ups; {len(photos)} "
          f"user photos with drawn masks; decode + mask load {decode_ms:.2f} ms/image")
    report: dict = {"machine": info, "params": vars(args) | {"work": str(world),
                                                            "json": str(args.json)},
                    "images": len(items), "closeups": n_close, "photos": len(photos),
                    "results": {}, "photo_results": {}}
    if {"matting", "product"} & set(names) or {"cut_out", "product"} & set(photo_names):
        # pymatting compiles its numba kernels on first use; keep that out of ms/image
        start = time.perf_counter()
        METHODS["matting"](items[0]["image"], None)
        report["matting_warmup_s"] = time.perf_counter() - start
        print(f"matting warm-up (numba compilation or cache load): "
              f"{report['matting_warmup_s']:.1f} s")
    for name in names:
        for use_bbox in (False, True):
            key = f"{name}/{'bbox' if use_bbox else 'no bbox'}"
            report["results"][key] = evaluate(METHODS[name], items, use_bbox,
                                              progress=not args.quiet, desc=key)
    for name in photo_names if photos else []:
        key = f"{name}/true box"
        report["photo_results"][key] = evaluate(PHOTO_METHODS[name], photos, True,
                                                progress=not args.quiet, desc=f"photos {key}")

    print("\nPlain-background shop images (close-ups excluded); a failed cut-out counts IoU 0:\n")
    _table(report["results"], {}, "0.9")
    print(f"\nClose-ups ({n_close} images: product cut by the frame, bbox touching it):")
    for key, r in report["results"].items():
        print(f"  {key:20s} ok {r['closeup_ok']}/{r['closeups']}, mean IoU of the ok ones "
              f"{r['closeup_iou_mean']:.3f}")
    if report["photo_results"]:
        print(f"\nUser photos given the true box ({len(photos)} photos; IoU against the "
              "drawn mask of the product's visible part); a failed cut-out counts IoU 0:\n")
        _table(report["photo_results"], {"rect": "grabCut with the rect (baseline)",
                                         "cut_out": "cut_out, matting (today's)",
                                         "product": "cut_out_product",
                                         "product_loose": "cut_out_product, box +10 % "
                                                          "each side"}, "0.75")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"\nwrote {args.json}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
