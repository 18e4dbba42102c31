"""Catalog cleaning scored against the synthetic world's truth, with baselines in the same run.

    .venv/bin/python -m benchmarks.bench_cleaning                      # 200 SKUs, a few minutes
    .venv/bin/python -m benchmarks.bench_cleaning --world DIR --embedder runs/embedder.pt
    .venv/bin/python -m benchmarks.bench_cleaning --skus 1000 --hashes 1000000 --out out/clean
    # a clean look-alike world: no duplicates, mislabels or splits; colourway families
    .venv/bin/python -m benchmarks.bench_cleaning --skus 300 --image-size 128 \
        --dup-rate 0 --mislabel-rate 0 --split-rate 0 --colourway-rate 0.5

0. Rules today and now, side by side: dedup (grey dHash over the whole catalog vs within a
   SKU with the colour check; cross-SKU deletions, i.e. removals whose kept image is of
   another SKU), merging (confusion schedule vs calibrated at several false-merge rates).
1. Dedup: precision of the removals and recall per injected transform (rotation is expected
   to be missed: dHash is not rotation invariant), over a radius sweep for 64- and 256-bit
   dHash; hashing images/s per core (and with the pool), JPEG draft decode vs a full decode.
2. Hamming range search over ``--hashes`` random codes: faiss flat and multi-index hashing vs
   a NumPy popcount-of-XOR brute force (capped at ``--bf-queries`` queries), same results
   checked.
3. Denoising: precision/recall of removed images (the mislabelled ones are the positives):
   no cleaning, plain DBSCAN (drop noise), step 1 (largest cluster), step 1 + 2.
4. Merging: precision/recall of merged SKU pairs (split SKUs are the positives) and the
   look-alike pairs (different products of one family) wrongly merged, on the denoised rows.

Embeddings: a trained embedder (``--embedder``) when given, else ImageNet MobileNetV2 features
(``weights/mobilenet_v2-b0353104.pth``, global-average-pooled, L2-normalised) of the bbox
crops. ``--out DIR`` writes report.json and report.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from PIL import Image

from benchmarks.machine import machine
from visearch.catalog import CatalogRow, read_manifest
from visearch.cleaning import calibrated_merge, dbscan_baseline, denoise_skus, merge_skus
from visearch.cleaning.dedup import (
    COLOR_TOL,
    DHASH_RADIUS,
    RADIUS,
    DedupResult,
    build_binary_index,
    find_duplicates,
    hamming_range_search,
    hash_images,
    multihash_params,
)
from visearch.cleaning.denoise import EPS, RETURN_THRESH
from visearch.cleaning.merge import THRESHOLDS
from visearch.device import choose_device
from visearch.embedding import load_crop
from visearch.unionfind import UnionFind

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "weights" / "mobilenet_v2-b0353104.pth"


def prf(tp: int, n_pred: int, n_true: int) -> dict[str, float]:
    p = tp / n_pred if n_pred else float("nan")
    r = tp / n_true if n_true else float("nan")
    f = 2 * p * r / (p + r) if n_pred and n_true and p + r > 0 else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4)}


# ---- 1. dedup ---------------------------------------------------------------------------------


def dedup_scores(result: DedupResult, rows: Sequence[CatalogRow], truth: dict) -> dict[str, Any]:
    """Removal precision/recall against the injected near-duplicates, recall per transform.

    A removal is right when the removed image and its representative are copies of one
    source in the truth (connected through truth pairs). Recall per transform: the share of
    truth (image, source) pairs of that transform that ended in one predicted group.
    Precision per transform is not defined: a wrong removal has no transform.
    """
    pos = {r.image: i for i, r in enumerate(rows)}
    uf = UnionFind(len(rows))
    for d in truth["near_duplicates"]:
        uf.union(pos[d["image"]], pos[d["source"]])
    truth_label = uf.labels()
    n_true = sum(len(g) - 1 for g in uf.groups(min_size=2))
    tp = sum(truth_label[pos[r.image]] == truth_label[pos[r.duplicate_of]] for r in result.removed)
    group_of = {m: k for k, g in enumerate(result.groups) for m in g.members}
    per: dict[str, list[bool]] = defaultdict(list)
    for d in truth["near_duplicates"]:
        a, b = group_of.get(d["image"], -1), group_of.get(d["source"], -2)
        per[d["transform"]].append(a == b)
    return {
        "removed": len(result.removed),
        **prf(int(tp), len(result.removed), n_true),
        "recall_per_transform": {t: round(float(np.mean(v)), 3) for t, v in sorted(per.items())},
        "truth_pairs_per_transform": {t: len(v) for t, v in sorted(per.items())},
    }


def dedup_rules(rows: Sequence[CatalogRow], truth: dict) -> dict[str, Any]:
    """The earlier rule (grey dHash, any two images) beside the SKU- and colour-aware ones."""
    paths = [r.path for r in rows]
    dh = hash_images(paths, kind="dhash", workers=1)
    ph = hash_images(paths, kind="phash", workers=1)
    names = [r.image for r in rows]
    skus = [r.sku for r in rows]
    sku = dict(zip(names, skus, strict=True))
    rules = {
        f"dHash r{DHASH_RADIUS}, any SKUs (before)": find_duplicates(
            dh, names, radius=DHASH_RADIUS, color_tol=None),
        f"dHash r{DHASH_RADIUS} within a SKU": find_duplicates(
            dh, names, skus=skus, radius=DHASH_RADIUS, color_tol=None),
        f"dHash r{DHASH_RADIUS} + colour {COLOR_TOL}, within a SKU": find_duplicates(
            dh, names, skus=skus, radius=DHASH_RADIUS),
        f"pHash r{RADIUS} + colour {COLOR_TOL}, within a SKU (now)": find_duplicates(
            ph, names, skus=skus, radius=RADIUS),
    }
    for radius in (14, 16, 20, 22):
        rules[f"pHash r{radius} + colour {COLOR_TOL}, within a SKU"] = find_duplicates(
            ph, names, skus=skus, radius=radius)
    out = {}
    for name, res in rules.items():
        sc = dedup_scores(res, rows, truth) if truth["near_duplicates"] else {
            "removed": len(res.removed)}
        per = sc.get("recall_per_transform", {})
        npairs = sc.get("truth_pairs_per_transform", {})
        easy = [t for t in per if t not in ("rotate", "crop")]
        if easy:
            hit = sum(per[t] * npairs[t] for t in easy)
            sc["recall_without_rotate_crop"] = round(hit / sum(npairs[t] for t in easy), 4)
        sc["cross_sku_deletions"] = sum(sku[r.image] != sku[r.duplicate_of] for r in res.removed)
        sc["cross_sku_pairs_reported"] = len(res.cross_sku)
        sc["rejected_by_color"] = res.rejected_by_color
        out[name] = sc
    return out


def _big_jpegs(rows: Sequence[CatalogRow], n: int, side: int) -> list[Path]:
    """``n`` catalog images upsized to ``side`` px JPEGs (to time draft decoding)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_clean_"))
    out = []
    for i, r in enumerate(rows[:n]):
        p = tmp / f"{i}.jpg"
        Image.open(r.path).convert("RGB").resize((side, side), Image.BICUBIC).save(p, quality=90)
        out.append(p)
    return out


def bench_dedup(rows: Sequence[CatalogRow], truth: dict, args: argparse.Namespace) -> dict:
    paths = [r.path for r in rows]
    names = [r.image for r in rows]
    out: dict[str, Any] = {"images": len(rows)}
    sweeps = {8: (2, 3, 4, 6, 8), 16: (8, 12, 16, 20, 24)}
    for hash_size, radii in sweeps.items():
        t0 = time.perf_counter()
        hashes = hash_images(paths, hash_size=hash_size, kind="dhash", workers=1)
        secs = time.perf_counter() - t0
        key = f"dhash{hash_size * hash_size}"
        out[key] = {"hash_images_per_s_one_core": round(len(rows) / secs, 1), "radius": {}}
        for radius in radii:
            res = find_duplicates(hashes, names, radius=radius, color_tol=None)
            out[key]["radius"][radius] = dedup_scores(res, rows, truth)
    exact = find_duplicates(hashes, names, radius=-1, color_tol=None)
    out["md5_only"] = dedup_scores(exact, rows, truth)
    workers = os.cpu_count() or 1
    t0 = time.perf_counter()
    hash_images(paths, workers=workers)
    out["hash_images_per_s_pool"] = {
        "workers": workers,
        "images_per_s": round(len(rows) / (time.perf_counter() - t0), 1),
    }
    big = _big_jpegs(rows, args.draft_images, 1024)
    try:
        t0 = time.perf_counter()
        hash_images(big, workers=1)
        draft = time.perf_counter() - t0
        t0 = time.perf_counter()
        hash_images(big, workers=1, draft=(1024, 1024))
        full = time.perf_counter() - t0
    finally:
        shutil.rmtree(big[0].parent, ignore_errors=True)
    out["draft_1024px"] = {
        "images": len(big),
        "draft_images_per_s": round(len(big) / draft, 1),
        "full_decode_images_per_s": round(len(big) / full, 1),
    }
    return out


# ---- 2. Hamming search ------------------------------------------------------------------------


def bench_hamming(n: int, nbytes: int, radius: int, queries: int, bf_queries: int, seed: int):
    # One thread for faiss, like the NumPy loop: per-query cost on one core, comparable.
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(seed)
    xb = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    # Queries: database codes with a few bits flipped, so every query has answers.
    xq = xb[rng.choice(n, queries, replace=False)].copy()
    bits = np.unpackbits(xq, axis=1)
    for row in bits:
        row[rng.choice(bits.shape[1], rng.integers(0, radius + 1), replace=False)] ^= 1
    xq = np.packbits(bits, axis=1)
    res: dict[str, Any] = {
        "n": n,
        "bits": nbytes * 8,
        "radius": radius,
        "queries": queries,
        "threads": 1,
    }
    answers = {}
    for method in ("flat", "multihash"):
        if method == "multihash" and multihash_params(n, nbytes * 8, radius) is None:
            continue
        t0 = time.perf_counter()
        index = build_binary_index(xb, radius=radius, method=method)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        lims, dist, ids = hamming_range_search(xb, xq, radius, index=index)
        secs = time.perf_counter() - t0
        answers[method] = (lims, ids)
        res[method] = {
            "build_s": round(build, 3),
            "ms_per_query": round(1000 * secs / queries, 4),
            "results": int(lims[-1]),
        }
        if method == "multihash":
            res[method]["params_nhash_b_nflip"] = multihash_params(n, nbytes * 8, radius)
    # NumPy brute force: popcount of XOR over 64-bit words, one query at a time.
    words = xb.view(np.uint64)
    qwords = xq[:bf_queries].view(np.uint64)
    t0 = time.perf_counter()
    bf = [np.flatnonzero(np.bitwise_count(words ^ q).sum(axis=1) <= radius) for q in qwords]
    secs = time.perf_counter() - t0
    res["numpy_bruteforce"] = {
        "queries": len(qwords),
        "ms_per_query": round(1000 * secs / max(len(qwords), 1), 4),
    }
    for method, (lims, ids) in answers.items():
        same = all(
            set(ids[lims[q] : lims[q + 1]].tolist()) == set(bf[q].tolist())
            for q in range(len(qwords))
        )
        res[method]["equals_bruteforce"] = same
        res[method]["speedup_vs_numpy"] = round(
            res["numpy_bruteforce"]["ms_per_query"] / max(res[method]["ms_per_query"], 1e-9), 1
        )
    return res


# ---- embeddings -------------------------------------------------------------------------------


def imagenet_features(rows: Sequence[CatalogRow], input_size: int, batch: int) -> np.ndarray:
    """``float32 [N, 1280]``: ImageNet MobileNetV2 features of the bbox crops, GAP, L2."""
    import torchvision

    net = torchvision.models.mobilenet_v2(weights=None)
    net.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    dev = choose_device()
    trunk = net.features.eval().to(dev)
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1)
    feats = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch):
            ims = []
            for r in rows[start : start + batch]:
                x = torch.from_numpy(load_crop(r.path, r.bbox)).permute(2, 0, 1)[None].float()
                ims.append(
                    torch.nn.functional.interpolate(
                        x / 255.0, size=(input_size, input_size), mode="bilinear", antialias=True
                    )
                )
            x = (torch.cat(ims).to(dev) - mean) / std
            f = trunk(x).mean(dim=(2, 3))
            feats.append(torch.nn.functional.normalize(f, dim=1).cpu().numpy())
    return np.concatenate(feats).astype(np.float32)


def embeddings_for(rows: Sequence[CatalogRow], args: argparse.Namespace) -> tuple[np.ndarray, str]:
    if args.embeddings_cache and args.embeddings_cache.is_file():
        with np.load(args.embeddings_cache) as z:
            if [str(s) for s in z["images"]] == [r.image for r in rows]:
                return z["embeddings"], str(z["source"])
    if args.embedder:
        from visearch.embedding import embed_items, load_embedder

        model = load_embedder(args.embedder)
        items = ((i, r.path, r.bbox) for i, r in enumerate(rows))
        parts = list(embed_items(model, items, batch_size=64))
        emb = np.concatenate([f for _, f in parts])
        source = f"trained embedder {args.embedder}"
    else:
        emb = imagenet_features(rows, args.input_size, 64)
        source = f"ImageNet mobilenet_v2 GAP features ({args.input_size} px crops)"
    if args.embeddings_cache:
        np.savez(
            args.embeddings_cache,
            embeddings=emb,
            source=source,
            images=np.array([r.image for r in rows]),
        )
    return emb, source


# ---- 3. denoise -------------------------------------------------------------------------------


def bench_denoise(emb: np.ndarray, rows: Sequence[CatalogRow], truth: dict) -> dict:
    mislabelled = {d["image"] for d in truth["mislabelled"]}
    y = np.array([r.image in mislabelled for r in rows])
    skus = [r.sku for r in rows]

    def score(keep: np.ndarray) -> dict:
        removed = ~keep
        return {
            "removed": int(removed.sum()),
            **prf(int((removed & y).sum()), int(removed.sum()), int(y.sum())),
        }

    out: dict[str, Any] = {"images": len(rows), "mislabelled": int(y.sum())}
    out["no_cleaning"] = score(np.ones(len(rows), dtype=bool))
    grid = []
    for eps in (0.1, 0.15, 0.2, 0.25, 0.3):
        row = {
            "eps": eps,
            "plain_dbscan": score(dbscan_baseline(emb, skus, eps=eps)),
            "step1": score(denoise_skus(emb, skus, eps=eps, return_thresh=None).keep),
        }
        for t2 in (0.25, 0.3, 0.35, 0.4):
            row[f"step1+2@{t2}"] = score(denoise_skus(emb, skus, eps=eps, return_thresh=t2).keep)
        grid.append(row)
    out["grid"] = grid
    out["defaults"] = {"eps": EPS, "return_thresh": RETURN_THRESH}
    return out


# ---- 4. merge ---------------------------------------------------------------------------------


def bench_merge(emb: np.ndarray, rows: Sequence[CatalogRow], truth: dict) -> dict:
    split = set()
    for g in truth["split_skus"]:
        split |= {tuple(sorted(p)) for p in itertools.combinations(g["skus"], 2)}
    lookalike = set()
    for g in truth["lookalike_families"]:
        lookalike |= {tuple(sorted(p)) for p in itertools.combinations(g["skus"], 2)}
    lookalike -= split  # a split product's SKUs are one product, not look-alikes
    skus = [r.sku for r in rows]
    cats = [r.category for r in rows]
    out: dict[str, Any] = {
        "skus": len(set(skus)),
        "split_pairs": len(split),
        "lookalike_pairs": len(lookalike),
    }
    configs = {
        f"soft, default {THRESHOLDS}": {"soft": True, "thresholds": THRESHOLDS},
        "soft, (0.3, 0.25, 0.2)": {"soft": True, "thresholds": (0.3, 0.25, 0.2)},
        f"hard counts, default {THRESHOLDS}": {"soft": False, "thresholds": THRESHOLDS},
    }
    colourway = set()
    for g in truth.get("colourway_families", []):
        colourway |= {tuple(sorted(p)) for p in itertools.combinations(g["skus"], 2)}
    runs = [(name, lambda kw=kw: merge_skus(emb, skus, categories=cats, **kw))
            for name, kw in configs.items()]
    colors = hash_images([r.path for r in rows]).color
    for rate in (0.001, 0.003, 0.01, 0.03):
        for name, col in (("", None), (" + colour", colors)):
            runs.append((f"calibrated{name}, false-merge rate {rate}",
                         lambda rate=rate, col=col: calibrated_merge(
                             emb, skus, categories=cats, false_merge_rate=rate,
                             review_rate=max(rate, 0.1), colors=col)))
    for name, run in runs:
        t0 = time.perf_counter()
        res = run()
        pairs = res.merged_pairs()
        out[name] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "merged_pairs": len(pairs),
            "merge_groups": len(res.groups),
            **prf(len(pairs & split), len(pairs), len(split)),
            "lookalike_pairs_wrongly_merged": len(pairs & lookalike),
            "colourway_pairs_wrongly_merged": len(pairs & colourway),
            "review_pairs": res.summary()["review_pairs"],
            "split_pairs_in_review": sum(c.decision == "review" and c.key in split
                                         for c in res.candidates),
            "rounds": [(r.threshold, r.merged_pairs) for r in res.rounds],
        }
    return out


# ---- main -------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render(report: dict) -> str:
    m = report["machine"]
    parts = [
        "# Catalog cleaning benchmark",
        f"machine: {m['cpu_count']} CPUs, {m['platform']}, torch {m['torch']}, faiss "
        f"{m['faiss']}, sklearn {m['scikit-learn']}, numpy {m['numpy']}, cuda {m['cuda']}",
        f"world: {report['world']} ({report['rows']} catalog rows)",
    ]
    if "dedup_rules" in report:
        parts += _render_dedup_rules(report["dedup_rules"])
    if "dedup" in report:
        parts += _render_dedup(report["dedup"])
    if "hamming" in report:
        parts += _render_hamming(report["hamming"])
    if "denoise" in report:
        parts += _render_denoise(report["denoise"], report["embeddings"])
    if "merge" in report:
        parts += _render_merge(report["merge"])
    return "\n".join(parts) + "\n"


def _render_dedup_rules(d: dict) -> list[str]:
    rows = [[name, s["removed"], s.get("precision", "-"), s.get("recall", "-"),
             s.get("recall_without_rotate_crop", "-"), s["cross_sku_deletions"],
             s["cross_sku_pairs_reported"], s["rejected_by_color"],
             " ".join(f"{t} {v}" for t, v in s.get("recall_per_transform", {}).items())]
            for name, s in d.items()]
    return ["\n## Dedup rules, before and now",
            _table(["rule", "removed", "P", "R", "R w/o rotate+crop", "cross-SKU deletions",
                    "cross-SKU pairs reported", "rejected by colour", "recall per transform"],
                   rows)]


def _render_dedup(d: dict) -> list[str]:
    parts = []
    parts.append("\n## Dedup (removal precision/recall; recall per transform)")
    transforms = list(d["dhash256"]["radius"][16]["recall_per_transform"])
    rows = [
        [
            "md5 only",
            "-",
            d["md5_only"]["removed"],
            d["md5_only"]["precision"],
            d["md5_only"]["recall"],
            *[d["md5_only"]["recall_per_transform"][t] for t in transforms],
        ]
    ]
    for key in ("dhash64", "dhash256"):
        for radius, s in d[key]["radius"].items():
            rows.append(
                [
                    key,
                    radius,
                    s["removed"],
                    s["precision"],
                    s["recall"],
                    *[s["recall_per_transform"][t] for t in transforms],
                ]
            )
    parts.append(_table(["hash", "radius", "removed", "P", "R", *transforms], rows))
    parts.append(
        f"truth pairs per transform: {d['dhash256']['radius'][16]['truth_pairs_per_transform']}\n"
        f"hashing, one core: {d['dhash64']['hash_images_per_s_one_core']} img/s (64-bit), "
        f"{d['dhash256']['hash_images_per_s_one_core']} img/s (256-bit); pool of "
        f"{d['hash_images_per_s_pool']['workers']}: {d['hash_images_per_s_pool']['images_per_s']}"
        f" img/s; 1024 px JPEGs, one core: draft {d['draft_1024px']['draft_images_per_s']} img/s"
        f" vs full decode {d['draft_1024px']['full_decode_images_per_s']} img/s"
    )
    return parts


def _render_hamming(hamming: list[dict]) -> list[str]:
    parts = ["\n## Hamming range search (ms per query, one thread)"]
    hrows = []
    for h in hamming:
        hrows.append(
            [
                h["n"],
                h["bits"],
                h["radius"],
                h["flat"]["ms_per_query"],
                h.get("multihash", {}).get("ms_per_query", "-"),
                h["numpy_bruteforce"]["ms_per_query"],
                h["flat"]["equals_bruteforce"]
                and h.get("multihash", {}).get("equals_bruteforce", True),
            ]
        )
    parts.append(
        _table(
            [
                "N",
                "bits",
                "radius",
                "faiss flat",
                "faiss multihash",
                "numpy brute force",
                "same results",
            ],
            hrows,
        )
    )
    return parts


def _render_denoise(dn: dict, embeddings: str) -> list[str]:
    parts = [
        f"\n## Denoising ({dn['mislabelled']} mislabelled of {dn['images']}; "
        f"embeddings: {embeddings})"
    ]
    parts.append(
        f"no cleaning: removed 0, recall 0; defaults eps {dn['defaults']['eps']}, "
        f"return {dn['defaults']['return_thresh']}"
    )
    drows = []
    for g in dn["grid"]:
        for k, v in g.items():
            if k == "eps":
                continue
            drows.append([g["eps"], k, v["removed"], v["precision"], v["recall"], v["f1"]])
    parts.append(_table(["eps", "method", "removed", "P", "R", "F1"], drows))
    return parts


def _render_merge(mg: dict) -> list[str]:
    parts = []
    parts.append(
        f"\n## Merging ({mg['skus']} SKUs, {mg['split_pairs']} split pairs, "
        f"{mg['lookalike_pairs']} look-alike pairs)"
    )
    mrows = [
        [
            k,
            v["merge_groups"],
            v["merged_pairs"],
            v["precision"],
            v["recall"],
            v["lookalike_pairs_wrongly_merged"],
            v["colourway_pairs_wrongly_merged"],
            v["review_pairs"],
            v["split_pairs_in_review"],
            v["seconds"],
        ]
        for k, v in mg.items()
        if isinstance(v, dict)
    ]
    parts.append(_table(["config", "groups", "merged pairs", "P", "R", "look-alikes merged",
                         "colourways merged", "review pairs", "split pairs in review", "s"],
                        mrows))
    return parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=Path, help="existing synthetic world (else generated)")
    ap.add_argument("--skus", type=int, default=200)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dup-rate", type=float, default=0.1, help="generated world's rates")
    ap.add_argument("--mislabel-rate", type=float, default=0.03)
    ap.add_argument("--split-rate", type=float, default=0.03)
    ap.add_argument("--colourway-rate", type=float, default=0.0)
    ap.add_argument("--hashes", type=int, default=1_000_000, help="random codes to search")
    ap.add_argument("--hash-queries", type=int, default=1000)
    ap.add_argument("--bf-queries", type=int, default=20, help="NumPy brute-force queries")
    ap.add_argument("--draft-images", type=int, default=100, help="1024 px JPEGs to hash")
    ap.add_argument("--embedder", type=Path, help="trained embedder .pt (else ImageNet)")
    ap.add_argument("--input-size", type=int, default=112, help="ImageNet feature input px")
    ap.add_argument("--embeddings-cache", type=Path, help=".npz to reuse embeddings from")
    ap.add_argument("--skip", default="", help="comma list of sections to skip")
    ap.add_argument("--out", type=Path, help="write report.json and report.md here")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    torch.set_num_threads(os.cpu_count() or 1)

    world = args.world
    if world is None:
        from visearch.synth import generate_world

        world = Path(tempfile.mkdtemp(prefix="bench_clean_world_"))
        print(f"generating a {args.skus}-SKU world in {world} ...", flush=True)
        generate_world(
            world,
            skus=args.skus,
            seed=args.seed,
            image_size=args.image_size,
            photos_per_sku=0,
            scenes=10,
            dup_rate=args.dup_rate,
            mislabel_rate=args.mislabel_rate,
            split_rate=args.split_rate,
            colourway_rate=args.colourway_rate,
        )
    rows = read_manifest(world / "catalog.jsonl").rows
    truth = json.loads((world / "truth.json").read_text())
    report: dict[str, Any] = {
        "machine": machine(["scikit-learn"]),
        "world": str(world),
        "rows": len(rows),
        "args": {k: str(v) for k, v in vars(args).items()},
    }

    if "rules" not in skip:
        print("dedup rules ...", flush=True)
        report["dedup_rules"] = dedup_rules(rows, truth)
    if "dedup" not in skip and truth["near_duplicates"]:
        print("dedup ...", flush=True)
        report["dedup"] = bench_dedup(rows, truth, args)
    if "hamming" not in skip:
        print("hamming search ...", flush=True)
        report["hamming"] = [
            bench_hamming(args.hashes, 8, 8, args.hash_queries, args.bf_queries, args.seed),
            bench_hamming(args.hashes, 32, 16, args.hash_queries, args.bf_queries, args.seed),
        ]
    if not {"denoise", "merge"} <= skip:
        print("embedding ...", flush=True)
        t0 = time.perf_counter()
        emb, source = embeddings_for(rows, args)
        report["embeddings"] = source
        report["embedding_seconds"] = round(time.perf_counter() - t0, 1)
    if "denoise" not in skip:
        print("denoise ...", flush=True)
        report["denoise"] = bench_denoise(emb, rows, truth)
    if "merge" not in skip:
        print("merge ...", flush=True)
        kept = denoise_skus(emb, [r.sku for r in rows]).keep
        kept_rows = [r for r, k in zip(rows, kept, strict=True) if k]
        report["merge"] = bench_merge(emb[kept], kept_rows, truth)

    text = render(report)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (args.out / "report.md").write_text(text)
    if args.world is None:
        shutil.rmtree(world, ignore_errors=True)  # generated here; pass --world to keep one
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
