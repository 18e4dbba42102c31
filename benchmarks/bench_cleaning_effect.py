"""The end effect of catalog cleaning: user-photo Recall@1 of models trained on raw, cleaned
and cleaned + merged catalogs, side by side in one run.

Each arm is one ``visearch-index rebuild`` of the same world with the same seed, recipe and
number of training steps; only the cleaning stages differ:

- ``raw``: no dedup, no denoising, no merging; train and gallery are the catalog as crawled.
- ``cleaned``: dHash dedup + hierarchical-DBSCAN denoising (removed rows leave the training
  set and the gallery).
- ``cleaned+merged``: the same, plus confusion-matrix SKU merging (merged SKUs share one
  training label; the gallery keeps the catalog's SKUs).

The detector is off in every arm and queries are searched with their true box (the
``gt_box`` ablation of ``visearch-bench recall``); voting and re-ranking are on, as served.
Cleaning changes two things, the training set and the gallery, so each arm is measured
twice: with its own gallery (what the rebuild serves) and with its model indexing the whole
raw catalog (the training effect alone, same gallery for every arm). A split SKU of the
same product counts as correct (truth.json). The world's default noise is light (3%
mislabelled rows, 3% split products); ``--mislabel-rate`` / ``--split-rate`` make a
noisier, crawled-like catalog.

    python -m benchmarks.bench_cleaning_effect --skus 300 --mislabel-rate 0.1 --split-rate 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import machine
from benchmarks.recall import InProcess, relevant_skus, run_ablation, summarise
from index_builder.cli import main as index_main
from visearch.catalog import read_manifest
from visearch.index import IndexRoot

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "weights" / "mobilenet_v2-b0353104.pth"
ARMS: dict[str, dict[str, bool]] = {
    "raw": {"dedup": False, "clean": False, "merge": False},
    "cleaned": {"dedup": True, "clean": True, "merge": False},
    "cleaned+merged": {"dedup": True, "clean": True, "merge": True},
}


def _world(args: argparse.Namespace) -> Path:
    if args.world:
        return args.world
    from visearch.synth import generate_world

    out = args.out / (f"world_{args.skus}_{args.seed}_m{args.mislabel_rate}"
                      f"_s{args.split_rate}")
    if not (out / "world.json").is_file():
        print(f"generating a {args.skus}-SKU world in {out} ...", flush=True)
        generate_world(out, skus=args.skus, seed=args.seed, image_size=args.world_size,
                       photos_per_sku=args.photos_per_sku, scenes=0,
                       mislabel_rate=args.mislabel_rate, split_rate=args.split_rate)
    return out


def _evaluate(root: Path, queries: list, images: list[bytes], relevant: list[set[str]]
              ) -> dict[str, dict[str, float]]:
    """True-box search of every query, re-ranking on and off, over the root's version."""
    backend = InProcess(root, None, "cpu")
    try:
        boxed = run_ablation(backend, "gt_box", queries, images, 20, None)
        # the true box without re-ranking: run_ablation's no_rerank has no box
        boxed_plain = [dict(backend.search(d, top_k=20, bbox=list(q.bbox), rerank=False),
                            latency_ms=0.0) for q, d in zip(queries, images, strict=True)]
    finally:
        backend.close()
    keys = ("recall@1", "recall@5", "recall@10", "map@10", "category_accuracy")
    results = {}
    for name, recs in (("gt_box", boxed), ("no_rerank", boxed_plain)):
        s = summarise(recs, queries, relevant)
        results[name] = {k: s[k] for k in keys}
    return results


def _cleaning_stats(world: Path, arm_dir: Path, arm: dict[str, bool]) -> dict[str, Any]:
    """What the arm's cleaning did (the images its rebuild kept in the gallery and its
    SKU map), scored against truth.json."""
    truth = json.loads((world / "truth.json").read_text())
    mislabelled = {(world / m["image"]).resolve() for m in truth["mislabelled"]}
    gallery = {Path(p) for p in json.loads((arm_dir / "gallery_images.json").read_text())}
    rows = read_manifest(world / "catalog.jsonl").rows
    removed = {r.path.resolve() for r in rows} - gallery
    stats: dict[str, Any] = {
        "rows": len(rows), "removed": len(removed),
        "mislabelled_left": len(mislabelled & gallery), "mislabelled": len(mislabelled),
    }
    if arm["merge"]:
        sku_map = json.loads((arm_dir / "sku_map.json").read_text())
        groups: dict[str, set[str]] = {}
        for old, new in sku_map.items():
            groups.setdefault(new, set()).add(old)
        merged = [g for g in groups.values() if len(g) > 1]
        split = {frozenset(g["skus"]) for g in truth["split_skus"]}
        product = {s: g for g in split for s in g}
        stats["merge_groups"] = len(merged)
        stats["merge_groups_same_product"] = sum(
            all(product.get(s) == product.get(next(iter(g))) is not None for s in g)
            for g in merged)
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, help="an existing world dir (else one is generated)")
    ap.add_argument("--skus", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world-size", type=int, default=96, help="generated image side, px")
    ap.add_argument("--photos-per-sku", type=int, default=2)
    ap.add_argument("--mislabel-rate", type=float, default=0.03)
    ap.add_argument("--split-rate", type=float, default=0.03)
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {list(ARMS)}")
    ap.add_argument("--steps", type=int, default=400, help="final training steps")
    ap.add_argument("--first-pass-steps", type=int, default=150,
                    help="steps of the first-pass model that drives denoising and merging")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--reuse", action="store_true",
                    help="do not rebuild arms whose index already exists in --out (re-score)")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench_cleaning_effect")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        ap.error(f"unknown arms {unknown}; valid: {list(ARMS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    world = _world(args)
    queries = read_manifest(world / "queries.jsonl").rows
    relevant = relevant_skus(queries, world / "truth.json")
    images = [q.path.read_bytes() for q in queries]
    load_start = os.getloadavg()

    report: dict[str, Any] = {"world": str(world), "queries": len(queries), "arms": {}}
    for name in arms:
        arm = ARMS[name]
        config = {
            "workers": 1,
            "dedup": {"enabled": arm["dedup"], "workers": 1},
            "detector": {"enabled": False},
            "clean": {"enabled": arm["clean"]},
            "merge": {"enabled": arm["merge"]},
            # the schedule this benchmark was measured with (issue 17): fixed steps, 96 px
            "embedder": {"epochs": 1, "steps_per_epoch": args.steps, "image_size": 96,
                         "patience": None, "budget_minutes": None,
                         "cleaning_steps_per_epoch": args.first_pass_steps,
                         "pretrained": str(WEIGHTS) if WEIGHTS.is_file() else None},
        }
        arm_dir = args.out / name.replace("+", "_")
        arm_dir.mkdir(parents=True, exist_ok=True)
        work = args.out / "work"  # shared: dedup and the first-pass model are reused
        (arm_dir / "config.json").write_text(json.dumps(config))
        t0 = time.perf_counter()
        root = arm_dir / "indexes"
        built = root.is_dir() and IndexRoot(root).current() is not None
        if not (args.reuse and built and (arm_dir / "gallery_images.json").is_file()):
            rc = index_main(["rebuild", "--catalog", str(world / "catalog.jsonl"),
                             "--root", str(root), "--work", str(work),
                             "--config", str(arm_dir / "config.json")])
            if rc != 0:
                raise SystemExit(f"rebuild of arm {name} failed (exit {rc})")
            # The work dir is shared by the arms: keep this arm's gallery and SKU map.
            gallery = read_manifest(work / "catalogs" / "gallery.jsonl").rows
            (arm_dir / "gallery_images.json").write_text(
                json.dumps(sorted(str(r.path.resolve()) for r in gallery)))
            if arm["merge"]:
                shutil.copy2(work / "merge" / "sku_map.json", arm_dir / "sku_map.json")
            shutil.rmtree(arm_dir / "raw_gallery", ignore_errors=True)
        raw_root = arm_dir / "raw_gallery"
        if not (raw_root.is_dir() and IndexRoot(raw_root).current()):
            # The arm's model over the whole raw catalog: the training effect alone.
            version = IndexRoot(root).open()
            model = version.embedder_path
            version.close()
            rc = index_main(["build", "--root", str(raw_root), "--catalog",
                             str(world / "catalog.jsonl"), "--model", str(model), "--k1", "21",
                             "--quiet"])
            if rc != 0:
                raise SystemExit(f"raw-gallery build of arm {name} failed (exit {rc})")
        rebuild_s = time.perf_counter() - t0
        results = _evaluate(root, queries, images, relevant)
        results["raw_gallery"] = _evaluate(arm_dir / "raw_gallery", queries, images,
                                           relevant)["gt_box"]
        stats = _cleaning_stats(world, arm_dir, arm)
        report["arms"][name] = {"rebuild_s": round(rebuild_s, 1), "cleaning": stats, **results}
        r = results["gt_box"]
        print(f"{name:<16} R@1 {r['recall@1']:.3f} R@10 {r['recall@10']:.3f} "
              f"(no re-rank R@1 {results['no_rerank']['recall@1']:.3f}; raw gallery R@1 "
              f"{results['raw_gallery']['recall@1']:.3f}); removed "
              f"{stats['removed']}, mislabelled left {stats['mislabelled_left']}/"
              f"{stats['mislabelled']}", flush=True)

    report["machine"] = machine() | {"loadavg_start": load_start,
                                     "loadavg_end": os.getloadavg()}
    lines = [
        f"world {world.name}: {report['queries']} user photos, true box, voting + re-ranking",
        "| arm | rows removed | mislabelled left | merge groups (same product) | R@1 | R@5 "
        "| R@10 | mAP@10 | category acc. | R@1 no re-rank | R@1 raw gallery | R@10 raw "
        "gallery |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in report["arms"].items():
        c, r = a["cleaning"], a["gt_box"]
        merges = (f"{c['merge_groups']} ({c['merge_groups_same_product']})"
                  if "merge_groups" in c else "–")
        lines.append(
            f"| {name} | {c['removed']} / {c['rows']} | {c['mislabelled_left']} / "
            f"{c['mislabelled']} | {merges} | {r['recall@1']:.3f} | {r['recall@5']:.3f} | "
            f"{r['recall@10']:.3f} | {r['map@10']:.3f} | {r['category_accuracy']:.3f} | "
            f"{a['no_rerank']['recall@1']:.3f} | {a['raw_gallery']['recall@1']:.3f} | "
            f"{a['raw_gallery']['recall@10']:.3f} |")
    table = "\n".join(lines)
    print("\n" + table + f"\n\nmachine: {report['machine']}")
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    (args.out / "report.md").write_text(table + "\n")
    print(f"wrote {args.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
