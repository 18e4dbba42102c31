"""Ray Data (a local Ray with ``--workers`` actors) against the local pool on a synthetic
catalog: wall time of the offline stages that take a runner, and whether their outputs are
identical.

    .venv/bin/python -m benchmarks.bench_ray                    # the demo's world: 300 SKUs
    .venv/bin/python -m benchmarks.bench_ray --skus 100 --workers 2

Stages, each run by ``LocalRunner`` (today's pool: ``--workers`` processes for hashing; the
embedder in this process with ``--workers`` torch threads and DataLoader decoders) and by
``RayRunner("local", workers=--workers)``:

- dHash (``hash_images(kind="dhash")``): MD5s, hash codes and colour signatures must be
  bit-identical;
- gallery embedding (``Runner.embed``, an actor pool holding the model): max |difference|;
- the neighbour graph (``build_neighbour_graph(runner=...)``, exact, k1 = 21) of the same
  vectors (the local runner's embeddings): rows must be identical.
- with ``--stages ingest,cutout,...``: ingest's decode check (``ImageStore.ingest``) and the
  product cut-outs (``cut_out_catalog``), today's path in this process against Ray: the
  stores' items and every cut-out file must be identical.

Ray's start-up (``ray.init``) is timed apart: a cluster pays it once, not per stage. The
per-worker rates printed here are what docs/scale.md extrapolates to N workers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from benchmarks.machine import machine
from index_builder.cmd_scenes import cut_out_catalog
from visearch.catalog import read_manifest
from visearch.cleaning.dedup import hash_images
from visearch.embedding import build_embedder, save_embedder
from visearch.index import build_neighbour_graph
from visearch.parallel import LocalRunner, RayRunner
from visearch.store import ImageStore

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "weights" / "mobilenet_v2-b0353104.pth"


def _timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    stages = set(args.stages.split(","))
    torch.set_num_threads(args.workers)
    faiss.omp_set_num_threads(1)
    info = machine(["ray"])
    print(json.dumps(info), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        world = args.world
        if world is None:
            from visearch.synth import generate_world

            world = Path(tmp) / "world"
            _, s = _timed(lambda: generate_world(world, skus=args.skus, seed=args.seed))
            print(f"world: {args.skus} SKUs in {s:.0f} s", flush=True)
        rows = read_manifest(world / "catalog.jsonl").rows
        paths = [r.path for r in rows]
        torch.manual_seed(0)
        model = build_embedder("mobilenet_v2", dim=256, input_size=args.input_size,
                               pretrained=WEIGHTS if WEIGHTS.is_file() else None).eval()
        weights = Path(tmp) / "embedder.pt"
        save_embedder(model, weights)
        items = [(i, r.path, r.bbox) for i, r in enumerate(rows)]
        out: dict[str, Any] = {"machine": info, "rows": len(rows), "workers": args.workers,
                               "input_size": args.input_size, "stages": {}}
        local = LocalRunner(args.workers)
        ray, ray_init = _timed(lambda: RayRunner("local", workers=args.workers,
                                                 num_cpus=args.workers,
                                                 temp_dir=Path(tmp) / "ray"))
        out["ray_init_s"] = round(ray_init, 1)
        print(f"ray.init: {ray_init:.1f} s", flush=True)
        try:
            results: dict[str, dict[str, Any]] = {}
            for name, runner in (("local", local), ("ray", ray)):
                r: dict[str, Any] = {}
                via = None if runner is local else runner
                if "ingest" in stages:
                    with ImageStore(Path(tmp) / f"store-{name}") as st:
                        _, r["ingest_s"] = _timed(lambda st=st, via=via: st.ingest(
                            rows, runner=via))
                        r["ingest"] = list(st.iter_items())
                if "cutout" in stages:
                    cut = Path(tmp) / f"cut-{name}"
                    _, r["cutout_s"] = _timed(lambda cut=cut, via=via: cut_out_catalog(
                        rows, cut, runner=via))
                    r["cutout"] = {p.relative_to(cut): p.read_bytes()
                                   for p in sorted(cut.rglob("*")) if p.is_file()}
                r["hash"], r["hash_s"] = _timed(lambda runner=runner: hash_images(
                    paths, kind="dhash", workers=args.workers,
                    runner=None if runner is local else runner))
                if "embed" in stages:
                    (ids, xb), r["embed_s"] = _timed(lambda runner=runner: runner.embed(
                        weights, items, batch_size=args.batch_size))
                else:  # the graph stage's input: seeded vectors, one per catalog row
                    ids = np.arange(len(rows), dtype=np.int64)
                    xb = np.random.default_rng(args.seed).standard_normal(
                        (len(rows), 256)).astype(np.float32)
                    faiss.normalize_L2(xb)
                r["ids"], r["xb"] = ids, xb
                # Both runners build the graph of the same vectors (the local runner's):
                # the stage's input is fixed, its output must not depend on the runner.
                xg = results["local"]["xb"] if "local" in results else xb
                r["graph"], r["graph_s"] = _timed(lambda runner=runner, xg=xg, ids=ids:
                                                  build_neighbour_graph(xg, ids, 21,
                                                                        batch_size=256,
                                                                        runner=runner))
                results[name] = r
                print(f"{name}: ingest {r.get('ingest_s', 0):.1f} s, cut-outs "
                      f"{r.get('cutout_s', 0):.1f} s, hash {r['hash_s']:.1f} s, embed "
                      f"{r.get('embed_s', 0):.1f} s, graph {r['graph_s']:.1f} s", flush=True)
        finally:
            ray.close()
    a, b = results["local"], results["ray"]
    same_hash = (a["hash"].md5 == b["hash"].md5 and np.array_equal(a["hash"].codes,
                                                                    b["hash"].codes)
                 and np.array_equal(a["hash"].color, b["hash"].color))
    emb_diff = float(np.abs(a["xb"] - b["xb"]).max())
    same_graph = np.array_equal(a["graph"].I, b["graph"].I) and np.array_equal(
        a["graph"].D, b["graph"].D)
    n = len(rows)
    for stage in [s for s in ("ingest", "cutout", "hash", "embed", "graph") if s in stages]:
        out["stages"][stage] = {
            "local_s": round(a[f"{stage}_s"], 2), "ray_s": round(b[f"{stage}_s"], 2),
            "ray_per_worker_per_s": round(n / b[f"{stage}_s"] / args.workers, 1)}
    out["identical"] = {"hashes": bool(same_hash), "graph": bool(same_graph),
                        "ids": bool(np.array_equal(a["ids"], b["ids"])),
                        "embedding_max_abs_diff": emb_diff}
    for stage in ("ingest", "cutout"):
        if stage in stages:
            out["identical"][stage] = bool(a[stage] == b[stage]) and len(a[stage]) > 0
    out["total_s"] = {"local": round(sum(a[f"{s}_s"] for s in out["stages"]), 1),
                      "ray": round(sum(b[f"{s}_s"] for s in out["stages"]), 1)}
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=1), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=Path, help="an existing world (default: generate one)")
    p.add_argument("--skus", type=int, default=300, help="SKUs of the generated world (demo)")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--input-size", type=int, default=128, help="embedder input side (px)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--stages", default="hash,embed,graph",
                   help="stages to run (hash and graph always; without embed the graph "
                   "is built over seeded vectors; add ingest, cutout)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
