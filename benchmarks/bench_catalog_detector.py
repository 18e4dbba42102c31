"""Photo search on a catalog without detection annotations, side by side with its baselines.

``python -m benchmarks.bench_catalog_detector --skus 300 --seed 11 --work runs/b15``

1. Generate a synthetic world of a seed not used in development, and delete its
   ``detection/`` folder: the catalog is all a user has.
2. ``visearch-index rebuild`` (default profile: the detector trains on copy-paste scenes
   made from the catalog's cut-outs, the embedder also on the scenes' crops) and the
   variants named by ``--variants``, each one more index version built from the same work
   directory (only the stages whose inputs changed rerun):
   - ``default``: the default config (a main-vs-other detector, query-domain training);
   - ``category`` / ``product`` / ``main``: the detector's classes (``detector.labels``):
     the catalog's categories, one "product" class (the category is voted anyway), or
     "main" vs "other" (it learns which object the photo is of);
   - ``no_query_domain``: the embedder trained on shop images with strong augmentation alone.
3. ``visearch-bench recall`` in-process on each version: full (photo only), gt_box, and
   whole_image (what a catalog without annotations got before: no detector).
4. With ``--real-backgrounds DIR`` (e.g. Debian's gnome-backgrounds photos, never seen in
   training): the same world's user photos re-rendered on those photos, scored on the
   default version.

Prints one table with the main-object hit rate, full R@1, gt_box R@1 and their ratio (the
target: hit rate >= 0.75 and full >= 0.85 x gt_box), plus the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import machine

BIN = Path(sys.executable).parent

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "category": {"detector": {"labels": "category"}},
    "product": {"detector": {"labels": "product"}},
    "main": {"detector": {"labels": "main"}},
    "no_query_domain": {"scenes": {"query_domain": False}},
}


def _run(cmd: list[str], log: Path | None = None) -> float:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    if log is None:
        code = subprocess.run(cmd).returncode
    else:
        with open(log, "a") as f:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}" + (f"; see {log}" if log else ""))
    return time.perf_counter() - t0


def _current(root: Path) -> str:
    return (root / "CURRENT").read_text().strip()


def _recall(root: Path, version: str, queries: Path, out: Path, ablations: str) -> dict:
    _run([str(BIN / "visearch-bench"), "recall", "--index-root", str(root), "--version",
          version, "--queries", str(queries), "--out", str(out), "--ablations", ablations],
         out.parent / f"{out.name}.log")
    return json.loads((out / "report.json").read_text())["ablations"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skus", type=int, default=300)
    ap.add_argument("--seed", type=int, default=11, help="a seed not used in development")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_catalog_detector"))
    ap.add_argument("--variants", default="default,category,product,no_query_domain")
    ap.add_argument("--real-backgrounds", type=Path,
                    help="photos for the real-background query variant (never trained on)")
    ap.add_argument("--config", type=Path, help="a rebuild config JSON under the variants")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)
    work: Path = args.work.resolve()
    world, root, stages = work / "world", work / "indexes", work / "work"
    work.mkdir(parents=True, exist_ok=True)
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")

    if not (world / "world.json").is_file():
        _run([str(BIN / "visearch-synth"), "--out", str(world), "--skus", str(args.skus),
              "--seed", str(args.seed), "--workers", "2", "-q"])
    shutil.rmtree(world / "detection", ignore_errors=True)
    real_queries = None
    if args.real_backgrounds is not None:
        real = work / "world_realbg"
        if not (real / "world.json").is_file():
            _run([str(BIN / "visearch-synth"), "--out", str(real), "--skus", str(args.skus),
                  "--seed", str(args.seed), "--workers", "2", "--scenes", "0",
                  "--photo-backgrounds", str(args.real_backgrounds), "-q"])
        if (real / "catalog.jsonl").read_bytes() != (world / "catalog.jsonl").read_bytes():
            raise SystemExit("the real-background world's catalog differs from the world's")
        real_queries = real / "queries.jsonl"

    base = json.loads(args.config.read_text()) if args.config else {}
    rows: list[dict[str, Any]] = []
    for name in names:
        cfg = json.loads(json.dumps(base))
        for section, values in VARIANTS[name].items():
            cfg.setdefault(section, {}).update(values)
        cfg_path = work / f"config_{name}.json"
        cfg_path.write_text(json.dumps(cfg))
        seconds = _run([str(BIN / "visearch-index"), "rebuild", "--catalog",
                        str(world / "catalog.jsonl"), "--root", str(root), "--work",
                        str(stages), "--config", str(cfg_path)], work / f"rebuild_{name}.log")
        version = _current(root)
        abl = "full,gt_box" + (",whole_image" if name == names[0] else "")
        rep = _recall(root, version, world / "queries.jsonl", work / f"recall_{name}", abl)
        rows.append({"variant": name, "queries": "synthetic clutter", "version": version,
                     "rebuild_s": round(seconds, 1), **_figures(rep)})
        if "whole_image" in rep:
            w = rep["whole_image"]
            rows.append({"variant": "no detector (before: whole photo)", "queries":
                         "synthetic clutter", "version": version, "rebuild_s": None,
                         "hit_rate": w.get("main_object_hit_rate"), "full_r1": w["recall@1"],
                         "full_r10": w["recall@10"], "gt_box_r1": rep["gt_box"]["recall@1"],
                         "ratio": w["recall@1"] / max(rep["gt_box"]["recall@1"], 1e-9),
                         "category": w["category_accuracy"]})
        if real_queries is not None and name == names[0]:
            rep = _recall(root, version, real_queries, work / f"recall_{name}_realbg",
                          "full,gt_box")
            rows.append({"variant": name, "queries": "real photo backgrounds",
                         "version": version, "rebuild_s": None, **_figures(rep)})

    print(f"\n## Catalog-only photo search: {args.skus}-SKU world, seed {args.seed}, "
          "no detection annotations\n")
    print("| variant | query photos | main-object hit rate | full R@1 | full R@10 | "
          "gt_box R@1 | full / gt_box | category acc | rebuild s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        hit = r["hit_rate"]
        print(f"| {r['variant']} | {r['queries']} | {'-' if hit is None else f'{hit:.3f}'} | "
              f"{r['full_r1']:.3f} | {r['full_r10']:.3f} | {r['gt_box_r1']:.3f} | "
              f"{r['ratio']:.2f} | {r['category']:.3f} | "
              f"{'-' if r['rebuild_s'] is None else r['rebuild_s']} |")
    measured_on = machine() | {"date": time.strftime("%Y-%m-%d")}
    print(f"\nmachine: {measured_on}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "machine": measured_on,
                                         "skus": args.skus, "seed": args.seed}, indent=1))
    return 0


def _figures(rep: dict[str, Any]) -> dict[str, Any]:
    full, gt = rep["full"], rep["gt_box"]
    return {"hit_rate": full.get("main_object_hit_rate"), "full_r1": full["recall@1"],
            "full_r10": full["recall@10"], "gt_box_r1": gt["recall@1"],
            "ratio": full["recall@1"] / max(gt["recall@1"], 1e-9),
            "category": full["category_accuracy"]}


if __name__ == "__main__":
    sys.exit(main())
