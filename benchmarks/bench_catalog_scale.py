"""Same-item accuracy as the catalog grows (issue 22): embedder recipes side by side.

Each recipe is a set of overrides of the ``rebuild`` config's ``embedder`` section (what ops
would put in a config file), trained exactly as ``rebuild`` trains its final embedder
(:func:`index_builder.cmd_embedder.train_embedder_on_catalog` with
:func:`index_builder.cmd_rebuild.embedder_params`) on a synthetic world's catalog. User photos,
cropped to their true box, are searched against every catalog image: Recall@1/10 and mAP@10
over SKUs (every SKU of a split product counts as correct), training time, and the exported
ONNX embedder's batch-1 latency on one CPU thread. The first recipe is the baseline, measured
in the same run.

    python -m benchmarks.bench_catalog_scale --world W3000 --recipes today,chosen
    python -m benchmarks.bench_catalog_scale --world W1000 --recipes today \\
        --recipe 'px128={"image_size": 128}' --recipe 'fam={"sampler": "families"}'
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_embedder import _relevant
from benchmarks.machine import machine as describe_machine
from index_builder.cmd_embedder import train_embedder_on_catalog
from index_builder.cmd_rebuild import embedder_params
from index_builder.config import load_config
from visearch.catalog import read_manifest
from visearch.embedding import embed_arrays, load_crop, load_embedder
from visearch.embedding.train import LabelVocab, rank_labels
from visearch.metrics import retrieval_metrics

REPO = Path(__file__).resolve().parent.parent

#: named recipes: overrides of the ``embedder`` config section of the profile given by
#: ``--profile`` (or by the recipe's own ``"profile"`` key). "today" is the ``cpu-small``
#: recipe before issue 22 (400 fixed steps at 96 px, whatever the catalog's size).
RECIPES: dict[str, dict[str, Any]] = {
    "today": {"profile": "cpu-small", "epochs": 1, "steps_per_epoch": 400, "image_size": 96,
              "frozen_blocks": 7, "patience": None, "budget_minutes": None},
    "default": {},  # the profile's current defaults
}


def parse_recipe(text: str) -> tuple[str, dict[str, Any]]:
    """``name=<json object>`` (a new recipe) or a known recipe's name."""
    if "=" not in text:
        if text not in RECIPES:
            raise ValueError(f"unknown recipe {text!r}; known: {sorted(RECIPES)}")
        return text, RECIPES[text]
    name, _, body = text.partition("=")
    value = json.loads(body)
    if not isinstance(value, dict):
        raise ValueError(f"recipe {name!r} must be a JSON object")
    return name, value


def onnx_latency_ms(model_path: Path | torch.nn.Module, *, runs: int = 60) -> float:
    """Median batch-1 latency (ms) of the exported embedder (a file or a model) on ONNX
    Runtime, one thread."""
    from visearch.runtime.onnx import OrtEmbedder, export_embedder

    model = load_embedder(model_path) if isinstance(model_path, Path) else model_path
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "embedder.onnx"
        export_embedder(model, path)
        ort = OrtEmbedder(path, model.config, providers=["CPUExecutionProvider"],
                          intra_op_threads=1)
        size = int(model.config["input_size"])
        x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
        for _ in range(5):
            ort.run(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            ort.run(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def evaluate_world(model_path: Path, world: Path,
                   crops: tuple[list[np.ndarray], list[np.ndarray]] | None = None
                   ) -> dict[str, Any]:
    """True-box user photos against all catalog images: Recall@1/10, mAP@10 over SKUs, and
    the per-query first-ranked labels (``"top1"``) and their cosine scores."""
    catalog = read_manifest(world / "catalog.jsonl").rows
    queries = read_manifest(world / "queries.jsonl").rows
    vocab = LabelVocab.from_rows(catalog)
    gallery = vocab.image_set(catalog)
    if crops is None:
        crops = ([load_crop(r.path, r.bbox) for r in catalog],
                 [load_crop(r.path, r.bbox) for r in queries])
    model = load_embedder(model_path)
    gf = embed_arrays(model, crops[0])
    qf = embed_arrays(model, crops[1])
    ranked, scores = rank_labels(qf, gf, np.asarray(gallery.labels["sku"]), 10)
    relevant = _relevant(world, vocab, [r.sku for r in queries])
    metrics = retrieval_metrics([[str(v) for v in r] for r in ranked],
                                [{str(v) for v in rel} for rel in relevant], (1, 10),
                                scores=scores)
    return {k: metrics[k] for k in ("recall@1", "recall@10", "map@10")}


def run_recipe(name: str, overrides: Mapping[str, Any], world: Path, out: Path, *,
               seed: int, crops: Any, latency: bool, profile: str = "cpu-small",
               resume: bool = False) -> dict[str, Any]:
    """Train one recipe on ``world``'s catalog and measure it."""
    embedder = dict(overrides)
    profile = embedder.pop("profile", profile)
    cfg = load_config(profile=profile, overrides={"seed": seed, "embedder": embedder})
    e = cfg.embedder
    params = embedder_params(cfg, epochs=e.epochs, steps=e.steps_per_epoch)
    params = type(params)(**{**params.__dict__, "progress": False})
    t0 = time.perf_counter()
    trained = train_embedder_on_catalog(world / "catalog.jsonl", out / name, params,
                                        resume=resume)
    seconds = time.perf_counter() - t0
    row: dict[str, Any] = {"recipe": name, "profile": profile, "overrides": dict(overrides),
                           "world": str(world), "device": str(params.device or "auto"),
                           "train_s": round(seconds, 1), "epochs_run": len(trained.history),
                           "steps": sum(int(h.get("steps", 0)) for h in trained.history)}
    row.update(evaluate_world(trained.model_path, world, crops))
    if latency:
        row["onnx_ms"] = round(onnx_latency_ms(trained.model_path), 2)
    return row


def latency_grid(backbones: Sequence[str], sizes: Sequence[int], *, runs: int = 100,
                 rounds: int = 3) -> list[dict[str, Any]]:
    """ONNX batch-1 latency (ms, one thread) of untrained embedders (latency does not depend
    on the weights) for each backbone x input size: the median of ``rounds`` interleaved
    rounds of ``runs`` calls each, so that a load change hits every cell alike."""
    from visearch.embedding import build_embedder

    cells = [(b, s) for b in backbones for s in sizes]
    models = {}
    for b, size in cells:
        torch.manual_seed(0)
        models[b, size] = build_embedder(b, input_size=size)
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cells}
    for _ in range(rounds):
        for c in cells:
            times[c].append(onnx_latency_ms(models[c], runs=runs))
    return [{"backbone": b, "image_size": size, "onnx_ms": float(np.median(times[b, size]))}
            for b, size in cells]


GATES = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.01)


def gate_sweep(model_path: Path, world: Path, out: Path,
               gates: Sequence[float] = GATES) -> list[dict[str, float]]:
    """Confidence-gated category restriction, swept: build an index of ``world``'s catalog
    with the embedder at ``model_path`` (as ``build`` does), search every true-box user
    photo through :class:`~visearch.search.pipeline.SearchPipeline` (re-ranking on, no
    detector) once restricted to the voted category and once over the whole index, and
    score each gate ``g`` (restrict only when the vote's score >= g; 0: always, > 1: never)
    by Recall@1/10 over SKUs. Returns one row per gate."""
    import shutil

    from benchmarks.recall import relevant_skus
    from index_builder.cmd_index import BuildParams, build_index
    from visearch.index import IndexRoot
    from visearch.search.pipeline import RerankParams, SearchPipeline

    root = out / "gate_index"
    shutil.rmtree(root, ignore_errors=True)
    build_index(root, world / "catalog.jsonl", model_path, BuildParams(k1=21))
    queries = read_manifest(world / "queries.jsonl").rows
    relevant = relevant_skus(queries, world / "truth.json")
    version = IndexRoot(root).open()
    pipe = SearchPipeline.from_version(version, use_detector=False, rerank=RerankParams())
    per_query = []
    try:
        for q, rel in zip(queries, relevant, strict=True):
            data = Path(q.path).read_bytes()
            kw = {"top_k": 10, "bbox": list(q.bbox) if q.bbox else None}
            only = pipe.search(data, **kw)
            every = pipe.search(data, all_categories=True, **kw)
            per_query.append((only.category.score, only.category.category == q.category,
                              [h.sku for h in only.results], [h.sku for h in every.results],
                              rel))
    finally:
        pipe.close()
    rows = []
    for gate in gates:
        r1 = r10 = restricted = 0
        for score, _, only, every, rel in per_query:
            use = only if score >= gate else every
            restricted += score >= gate
            r1 += bool(use[:1]) and use[0] in rel
            r10 += bool(rel.intersection(use[:10]))
        n = len(per_query)
        rows.append({"gate": gate, "restricted": restricted / n, "recall@1": r1 / n,
                     "recall@10": r10 / n,
                     "category_accuracy": float(np.mean([c for _, c, *_ in per_query]))})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, help="a visearch-synth world (required unless "
                    "--latency-grid)")
    ap.add_argument("--recipes", default="today,default",
                    help=f"comma list of named recipes ({', '.join(RECIPES)})")
    ap.add_argument("--recipe", action="append", default=[], metavar="NAME=JSON",
                    help="an extra recipe: overrides of the embedder config section")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--profile", default="cpu-small",
                    help="the rebuild profile the recipes override (e.g. gpu)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--no-latency", action="store_true", help="skip the ONNX latency")
    ap.add_argument("--resume", action="store_true",
                    help="continue each recipe from its checkpoint in --out (train_s then "
                    "counts only the resumed part)")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench_catalog_scale")
    ap.add_argument("--json", type=Path, help="append each result row to this JSON-lines file")
    ap.add_argument("--latency-grid", default="",
                    help="only print ONNX latency for BACKBONES:SIZES, e.g. "
                    "mobilenet_v2,efficientnet_lite0:96,128,160 (no training)")
    ap.add_argument("--gate-sweep", action="store_true",
                    help="also sweep the confidence gate of the category restriction with "
                    "the last recipe's model (builds an index, searches each photo twice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.latency_grid:
        names, _, sizes = args.latency_grid.partition(":")
        print(f"machine: {describe_machine() | {'loadavg_start': os.getloadavg()}}")
        grid = latency_grid(names.split(","), [int(v) for v in sizes.split(",")])
        base = grid[0]["onnx_ms"]
        print(f"\n| backbone | px | ONNX ms (batch 1, 1 thread) | x {grid[0]['backbone']} "
              f"{grid[0]['image_size']} px |")
        print("|---|---|---|---|")
        for g in grid:
            print(f"| {g['backbone']} | {g['image_size']} | {g['onnx_ms']:.2f} | "
                  f"{g['onnx_ms'] / base:.2f} |")
        return 0
    if args.world is None:
        ap.error("--world is required")
    recipes = [parse_recipe(t) for t in args.recipes.split(",") if t]
    recipes += [parse_recipe(t) for t in args.recipe]
    print(f"machine: {describe_machine() | {'loadavg_start': os.getloadavg()}}", flush=True)
    catalog = read_manifest(args.world / "catalog.jsonl").rows
    queries = read_manifest(args.world / "queries.jsonl").rows
    crops = ([load_crop(r.path, r.bbox) for r in catalog],
             [load_crop(r.path, r.bbox) for r in queries])
    skus = len({r.sku for r in catalog})
    print(f"world {args.world}: {skus} SKUs, {len(catalog)} catalog images, "
          f"{len(queries)} true-box user photos", flush=True)
    rows = []
    for name, overrides in recipes:
        out = args.out / args.world.name
        row = run_recipe(name, overrides, args.world, out, seed=args.seed, crops=crops,
                         latency=not args.no_latency, profile=args.profile,
                         resume=args.resume)
        row["skus"] = skus
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")
    if args.gate_sweep:
        last = args.out / args.world.name / rows[-1]["recipe"]
        gates = gate_sweep(last / "embedder.pt", args.world, last)
        print("\n| gate (restrict when vote >= g) | restricted | R@1 | R@10 |")
        print("|---|---|---|---|")
        for g in gates:
            print(f"| {g['gate']:g} | {g['restricted']:.3f} | {g['recall@1']:.3f} | "
                  f"{g['recall@10']:.3f} |")
        print(f"category accuracy of the vote: {gates[0]['category_accuracy']:.3f}")
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps({"recipe": rows[-1]["recipe"], "gates": gates}) + "\n")
    base = rows[0]["recall@1"] or float("nan")
    print(f"\n| recipe | epochs | steps | R@1 | x {rows[0]['recipe']} | R@10 | mAP@10 | "
          "train min | ONNX ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['epochs_run']} | {r['steps']} | {r['recall@1']:.3f} | "
              f"{r['recall@1'] / base:.2f} | {r['recall@10']:.3f} | {r['map@10']:.3f} | "
              f"{r['train_s'] / 60:.1f} | {r.get('onnx_ms', '-')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
