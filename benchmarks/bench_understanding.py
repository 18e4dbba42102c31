"""Product understanding on user photos: category top-k and attribute accuracy, the latency
the heads add to Search, and automatic vs fixed task weights.

Two measurements:

``serve``: over a built index version (``visearch-index rebuild`` with the default heads),
every user photo of the world is searched in-process, as served (detector, vote, re-rank).
One search gives every source's share of the vote (``CategoryVote``), so the category
top-1/3/5 accuracies of each source mix come from the same run: the detector alone, the
neighbours alone, the vote (detector + neighbours, no head) and the vote + category head
(what is served). Attribute top-1/top-3 accuracy per attribute is the heads' prediction
against the photo's catalog attributes. The heads' latency is the median Search time with
the heads on against the same pipeline with ``heads=False``, the photos interleaved, in the
same run.

    python -m benchmarks.bench_understanding serve --index-root R --world W [--json F]

``weights``: two trainings of the embedder on the world's shop images (the rebuild's
recipe and step count, heads on), one with fixed task weights and one with
``task_weights="auto"`` (:class:`visearch.embedding.losses.TrendWeights`), then user-photo
R@1 (true boxes, against the shop images) and head accuracies of each, side by side.

    python -m benchmarks.bench_understanding weights --world W --out DIR [--steps 400]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.machine import machine
from visearch.catalog import CatalogRow, read_manifest
from visearch.imageio import read_source

KS = (1, 3, 5)
SOURCES = ("detector", "neighbours", "vote", "vote+head")


def _hit_at(ranked: Sequence[str], truth: str, k: int) -> bool:
    return truth in list(ranked)[:k]


def _ranked(votes: Sequence[Any], source: str) -> list[str]:
    """Categories ranked by one source mix of a search's votes (ties by name)."""
    def score(v: Any) -> float:
        if source == "detector":
            return v.detector
        if source == "neighbours":
            return v.neighbours
        if source == "vote":
            return v.detector + v.neighbours
        return v.combined

    ordered = sorted(votes, key=lambda v: (-score(v), v.category))
    return [v.category for v in ordered if score(v) > 0]


def _accuracy_table(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """rows: per query {"truth": category, "ranked": {source: [...]}} -> top-k accuracy."""
    out: dict[str, dict[str, float]] = {}
    for source in SOURCES:
        ranked = [r["ranked"].get(source) for r in rows]
        if not any(ranked):
            continue
        out[source] = {f"top{k}": float(np.mean([_hit_at(rk or [], r["truth"], k)
                                                for rk, r in zip(ranked, rows, strict=True)]))
                       for k in KS}
    return out


def _attribute_table(
    predictions: list[dict[str, Any]], queries: list[CatalogRow]
) -> dict[str, dict[str, float]]:
    """Per attribute: top-1/top-3 accuracy over the queries that have it."""
    out: dict[str, dict[str, float]] = {}
    names = sorted({n for p in predictions for n in p})
    for name in names:
        hits = {1: [], 3: []}  # type: dict[int, list[bool]]
        for pred, q in zip(predictions, queries, strict=True):
            truth = q.attributes.get(name)
            if truth is None or name not in pred:
                continue
            for k in hits:
                hits[k].append(truth in list(pred[name])[:k])
        if hits[1]:
            out[name] = {"top1": float(np.mean(hits[1])), "top3": float(np.mean(hits[3])),
                         "n": len(hits[1])}
    return out


# ------------------------------------------------------------------------------ serve
def run_serve(args: argparse.Namespace) -> dict[str, Any]:
    from visearch.index import IndexRoot
    from visearch.search.pipeline import RerankParams, SearchPipeline

    torch.set_num_threads(args.threads)
    queries = read_manifest(args.world / "queries.jsonl").rows[: args.limit or None]
    images = [read_source(q.source)[0] for q in queries]
    root = IndexRoot(args.index_root)
    on = SearchPipeline.from_version(root.open(args.version), device="cpu",
                                     rerank=RerankParams(), heads=True)
    off = SearchPipeline.from_version(root.open(args.version), device="cpu",
                                      rerank=RerankParams(), heads=False)
    try:
        if not on.head_labels:
            raise SystemExit(f"{on.version.version} has no heads: rebuild with "
                             "embedder.category_weight / attribute_weight > 0")
        boxes = [q.bbox if args.gt_box else None for q in queries]
        for image, box in zip(images[:3], boxes[:3], strict=False):  # warm-up: allocations
            on.search(image, bbox=box)
            off.search(image, bbox=box)
        cat_rows, attr_preds, t_on, t_off, t_post = [], [], [], [], []
        for q, image, box in zip(queries, images, boxes, strict=True):
            # Interleaved, alternating which goes first, so drift and caches hit both alike.
            order = [(on, t_on), (off, t_off)] if len(t_on) % 2 == 0 else [(off, t_off),
                                                                            (on, t_on)]
            for pipe, times in order:
                t0 = time.perf_counter()
                res = pipe.search(image, bbox=box)
                times.append((time.perf_counter() - t0) * 1000.0)
                if pipe is on:
                    t_post.append(res.timings.get("heads", 0.0))
                    votes = res.category.votes
                    cat_rows.append({"truth": q.category,
                                     "ranked": {s: _ranked(votes, s) for s in SOURCES}})
                    attr_preds.append({n: p.values for n, p in res.attributes.items()})
        report = {
            "version": on.version.version, "queries": len(queries),
            "boxes": "true" if args.gt_box else "detector",
            "category": _accuracy_table(cat_rows),
            "attributes": _attribute_table(attr_preds, queries),
            "latency_ms": {"heads_on_median": statistics.median(t_on),
                           "heads_off_median": statistics.median(t_off),
                           "added_median": statistics.median(t_on) - statistics.median(t_off),
                           "added_mean_paired": float(np.mean(np.subtract(t_on, t_off))),
                           "heads_stage_median": statistics.median(t_post),
                           "forward_added_median": _forward_cost(on, queries[0], images[0])},
            "machine": machine(),
        }
    finally:
        on.close()
        off.close()
    _print_serve(report)
    return report


def _forward_cost(pipe: Any, query: CatalogRow, image: bytes, reps: int = 200) -> float:
    """Median extra ms of one crop's forward pass with the heads against without, the
    two interleaved ``reps`` times (the Search medians above are too noisy on a shared
    machine to resolve a fraction of a millisecond)."""
    from visearch.embedding import embed_arrays, embed_arrays_with_heads
    from visearch.imageio import crop, decode_image

    region = np.array(crop(decode_image(image), query.bbox))
    model = pipe.embedder
    diffs = []
    for rep in range(reps):  # alternate which goes first
        t = {}
        for heads in ((True, False) if rep % 2 == 0 else (False, True)):
            t0 = time.perf_counter()
            if heads:
                embed_arrays_with_heads(model, [region], batch_size=1)
            else:
                embed_arrays(model, [region], batch_size=1)
            t[heads] = time.perf_counter() - t0
        diffs.append((t[True] - t[False]) * 1000.0)
    return statistics.median(diffs)


def _print_serve(r: dict[str, Any]) -> None:
    print(f"\n{r['queries']} user photos ({r['boxes']} boxes), index {r['version']}")
    print("\n| category source | top-1 | top-3 | top-5 |\n|---|---|---|---|")
    for source, acc in r["category"].items():
        print(f"| {source} | {acc['top1']:.3f} | {acc['top3']:.3f} | {acc['top5']:.3f} |")
    print("\n| attribute | top-1 | top-3 | photos |\n|---|---|---|---|")
    for name, acc in r["attributes"].items():
        print(f"| {name} | {acc['top1']:.3f} | {acc['top3']:.3f} | {acc['n']} |")
    lat = r["latency_ms"]
    print(f"\nSearch median {lat['heads_on_median']:.2f} ms with heads vs "
          f"{lat['heads_off_median']:.2f} ms without: {lat['added_median']:+.3f} ms "
          f"(paired mean {lat['added_mean_paired']:+.3f} ms); the heads' own cost: forward "
          f"{lat['forward_added_median']:+.3f} ms (median of 200 interleaved pairs), "
          f"post-processing (softmax, top-k) {lat['heads_stage_median']:.3f} ms")


# ------------------------------------------------------------------------------ weights
def _evaluate_model(model_path: Path, world: Path) -> dict[str, Any]:
    from visearch.embedding import embed_arrays_with_heads, load_crop, load_embedder
    from visearch.embedding.heads import top_k_prediction
    from visearch.embedding.train import rank_labels

    model = load_embedder(model_path)
    gallery = read_manifest(world / "catalog.jsonl").rows
    queries = read_manifest(world / "queries.jsonl").rows
    gf, _ = embed_arrays_with_heads(model, [load_crop(r.source, r.bbox) for r in gallery])
    qf, logits = embed_arrays_with_heads(model, [load_crop(r.source, r.bbox) for r in queries])
    skus = sorted({r.sku for r in gallery})
    sku_id = {s: i for i, s in enumerate(skus)}
    ranked, _ = rank_labels(qf, gf, np.array([sku_id[r.sku] for r in gallery]), 1)
    r1 = float(np.mean([skus[rk[0]] == q.sku for rk, q in zip(ranked, queries, strict=True)]))
    assert model.heads is not None
    cat = [list(top_k_prediction(logits["category"][i], model.heads.categories, 5).values)
           for i in range(len(queries))]
    attrs = [{a: top_k_prediction(logits[f"attr.{a}"][i], vals, 3).values
              for a, vals in model.heads.attributes.items()} for i in range(len(queries))]
    return {
        "recall@1": r1,
        "category_head": {f"top{k}": float(np.mean([_hit_at(c, q.category, k)
                                                    for c, q in zip(cat, queries, strict=True)]))
                          for k in KS},
        "attributes": _attribute_table(attrs, queries),
    }


def run_weights(args: argparse.Namespace) -> dict[str, Any]:
    from index_builder.cmd_embedder import train_embedder_on_catalog
    from index_builder.cmd_rebuild import embedder_params
    from index_builder.config import load_config

    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"world": str(args.world), "steps": args.steps, "arms": {},
                              "machine": machine()}
    for mode in ("fixed", "auto"):
        cfg = load_config(overrides={"seed": args.seed, "embedder": {"task_weights": mode}})
        params = dataclasses.replace(embedder_params(cfg, epochs=1, steps=args.steps),
                                     trend_every=args.trend_every)
        out = args.out / mode
        t0 = time.perf_counter()
        trained = train_embedder_on_catalog(args.world / "catalog.jsonl", out, params)
        arm = _evaluate_model(trained.model_path, args.world)
        arm["seconds"] = round(time.perf_counter() - t0, 1)
        arm["task_weights"] = trained.history[-1].get(
            "task_weights", {"category": params.category_weight,
                             "attributes": params.attribute_weight})
        report["arms"][mode] = arm
        print(json.dumps({mode: arm}), flush=True)
    _print_weights(report)
    return report


def _print_weights(r: dict[str, Any]) -> None:
    arms = r["arms"]
    names = sorted({a for arm in arms.values() for a in arm["attributes"]})
    head = ["weights", "final task weights (category, attributes)", "R@1", "category top-1",
            "category top-3", *[f"{a} top-1" for a in names]]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for mode, arm in arms.items():
        w = arm["task_weights"]
        cells = [mode, f"{w.get('category', 0):.3f}, {w.get('attributes', 0):.3f}",
                 f"{arm['recall@1']:.3f}", f"{arm['category_head']['top1']:.3f}",
                 f"{arm['category_head']['top3']:.3f}",
                 *[f"{arm['attributes'][a]['top1']:.3f}" for a in names]]
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="category/attribute accuracy and heads latency")
    s.add_argument("--index-root", type=Path, required=True)
    s.add_argument("--version", help="default: the active one")
    s.add_argument("--world", type=Path, required=True, help="the world (queries.jsonl)")
    s.add_argument("--limit", type=int, default=0, help="first N photos (0: all)")
    s.add_argument("--gt-box", action="store_true",
                   help="search with each photo's true box instead of the detector's")
    w = sub.add_parser("weights", help="automatic vs fixed task weights")
    w.add_argument("--world", type=Path, required=True)
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--steps", type=int, default=400)
    w.add_argument("--trend-every", type=int, default=50)
    w.add_argument("--seed", type=int, default=0)
    for p in (s, w):
        p.add_argument("--threads", type=int, default=1, help="torch threads")
        p.add_argument("--json", type=Path, help="write the report here too")
    args = parser.parse_args(argv)
    report = run_serve(args) if args.cmd == "serve" else run_weights(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
