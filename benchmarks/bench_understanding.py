"""Product understanding on user photos: category top-k and attribute accuracy, the latency
the heads add to Search, and automatic vs fixed task weights.

Two measurements:

``serve``: over a built index version (``visearch-index rebuild`` with the default heads),
every user photo of the world is searched in-process, as served (detector, vote, re-rank).
One search gives every source's share of the vote (``CategoryVote``), so the category
top-1/3/5 accuracies of each source mix come from the same run: the detector alone, the
neighbours alone, the vote (detector + neighbours, no head) and the vote + category head
(what is served). Attribute top-1/top-3 accuracy per attribute, per source of the attribute
vote (``AttributeVote``): the heads alone, the neighbours' catalog values alone, and the two
combined (what is served), against the photo's catalog attributes. Every accuracy is given
over all photos and over the even (``tune``: the half the vote weights were chosen on) and
odd (``report``) halves. The heads' latency is the median Search time with the heads on
(heads + attribute vote) against the same pipeline with ``heads=False``, the photos
interleaved, in the same run.

``--runner-ups N`` also tries the category vote of the detector's next ``N`` candidates
(ranked as the main object is), mixed into the main object's at weight ``--runner-up-weight``,
for a photo whose main object is wrong; it reports the accuracy and the time the extra
crops' forward pass and searches take (measured, not served).

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
ATTRIBUTE_SOURCES = ("head", "neighbours", "combined")
HALVES = {"all": slice(None), "tune": slice(0, None, 2), "report": slice(1, None, 2)}


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


def _ranked_values(votes: Sequence[Any], source: str) -> tuple[str, ...]:
    """Attribute values ranked by one source of an ``AttributeVote`` list (ties by value)."""
    ordered = sorted(votes, key=lambda v: (-getattr(v, source), v.value))
    return tuple(v.value for v in ordered if getattr(v, source) > 0)


def _halves(table: Any, rows: list[Any], *rest: list[Any]) -> dict[str, Any]:
    """``table`` over all rows and over the tune (even) and report (odd) halves."""
    return {h: table(rows[sl], *[r[sl] for r in rest]) for h, sl in HALVES.items()}


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
    runner: list[dict[str, Any]] = []
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
        cat_rows, t_on, t_off, t_post = [], [], [], []
        t_vote: dict[bool, list[float]] = {True: [], False: []}
        attr_preds = {s: [] for s in ATTRIBUTE_SOURCES}  # type: dict[str, list[dict[str, Any]]]
        for q, image, box in zip(queries, images, boxes, strict=True):
            # Interleaved, alternating which goes first, so drift and caches hit both alike.
            order = [(on, t_on), (off, t_off)] if len(t_on) % 2 == 0 else [(off, t_off),
                                                                            (on, t_on)]
            for pipe, times in order:
                t0 = time.perf_counter()
                res = pipe.search(image, bbox=box)
                times.append((time.perf_counter() - t0) * 1000.0)
                t_vote[pipe is on].append(res.timings.get("vote", 0.0))
                if pipe is on:
                    t_post.append(res.timings.get("heads", 0.0))
                    votes = res.category.votes
                    cat_rows.append({"truth": q.category,
                                     "ranked": {s: _ranked(votes, s) for s in SOURCES}})
                    for s in ATTRIBUTE_SOURCES:
                        attr_preds[s].append({n: _ranked_values(vs, s)
                                              for n, vs in res.attribute_votes.items()})
                    if args.runner_ups and not args.gt_box:
                        runner.append(_runner_ups(on, image, res, args.runner_ups,
                                                  args.runner_up_weight))
        report = {
            "version": on.version.version, "queries": len(queries),
            "boxes": "true" if args.gt_box else "detector",
            "category": _halves(_accuracy_table, cat_rows),
            "attributes": {s: _halves(_attribute_table, attr_preds[s], queries)
                           for s in ATTRIBUTE_SOURCES},
            "latency_ms": {"heads_on_median": statistics.median(t_on),
                           "heads_off_median": statistics.median(t_off),
                           "added_median": statistics.median(t_on) - statistics.median(t_off),
                           "added_mean_paired": float(np.mean(np.subtract(t_on, t_off))),
                           "heads_stage_median": statistics.median(t_post),
                           # the vote stage: category, plus attributes with heads on
                           "vote_stage_on_median": statistics.median(t_vote[True]),
                           "vote_stage_off_median": statistics.median(t_vote[False]),
                           "forward_added_median": _forward_cost(on, queries[0], images[0])},
            "machine": machine(),
        }
        if runner:
            rows = [{"truth": r["truth"], "ranked": {"vote+head": r2["ranked"]}}
                    for r, r2 in zip(cat_rows, runner, strict=True)]
            report["runner_ups"] = {
                "n": args.runner_ups, "weight": args.runner_up_weight,
                "category": _halves(_accuracy_table, rows),
                "extra_ms_median": statistics.median(r["ms"] for r in runner)}
    finally:
        on.close()
        off.close()
    _print_serve(report)
    return report


def _runner_ups(pipe: Any, image: bytes, res: Any, n: int, weight: float) -> dict[str, Any]:
    """The main object's category vote plus ``weight`` x the votes of the detector's next
    ``n`` candidates (ranked as the main object is: ``score * sqrt(relative area)``, the
    main label first); the categories ranked by that sum, and the ms the extra crops cost
    (one batched forward pass, their searches and votes)."""
    from visearch.detection.main_object import MAIN_AREA_WEIGHT, MAIN_LABEL
    from visearch.embedding import embed_arrays_with_heads
    from visearch.embedding.heads import softmax
    from visearch.imageio import crop, decode_image
    from visearch.search.voting import vote_category

    rgb = decode_image(image)
    h, w = rgb.shape[:2]
    dets = pipe.detect(image).detections

    def rank(d: Any) -> tuple[bool, float]:
        x1, y1, x2, y2 = d.box
        return d.category == MAIN_LABEL, d.score * (max(x2 - x1, 0) * max(y2 - y1, 0)
                                                    / (w * h)) ** MAIN_AREA_WEIGHT

    cands = sorted((d for d in dets if d.score >= pipe.detect_thresh
                    and tuple(d.box) != tuple(res.main_object.box)), key=rank, reverse=True)[:n]
    total = {v.category: v.combined for v in res.category.votes}
    t0 = time.perf_counter()
    if cands:
        vecs, logits = embed_arrays_with_heads(
            pipe.embedder, [np.array(crop(rgb, d.box)) for d in cands], batch_size=len(cands))
        D, I = pipe.index.search(np.asarray(vecs, np.float32), pipe.vote_k)  # noqa: E741
        for j in range(len(cands)):
            p = softmax(logits["category"][j])
            head = {c: float(v) for c, v in zip(pipe.head_labels["category"], p, strict=True)}
            keep = I[j] >= 0
            d = vote_category(None, pipe.index.categories_of(I[j][keep]), D[j][keep],
                              weights=pipe.vote_weights, head_scores=head)
            for v in d.votes:
                total[v.category] = total.get(v.category, 0.0) + weight * v.combined
    ms = (time.perf_counter() - t0) * 1000.0
    ranked = [c for c, _ in sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))]
    return {"ranked": ranked, "ms": ms}


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
    print(f"\n{r['queries']} user photos ({r['boxes']} boxes), index {r['version']}; "
          "top-k accuracy over all photos, the tune (even) half and the report (odd) half")
    print("\n| category source | photos | top-1 | top-3 | top-5 |\n|---|---|---|---|---|")
    cat_rows = [(s, h, acc) for h in HALVES for s, acc in r["category"][h].items()]
    if "runner_ups" in r:
        ru = r["runner_ups"]
        cat_rows += [(f"vote+head + {ru['n']} runner-ups x {ru['weight']}", h, acc["vote+head"])
                     for h, acc in ru["category"].items()]
    for source, half, acc in cat_rows:
        print(f"| {source} | {half} | {acc['top1']:.3f} | {acc['top3']:.3f} | "
              f"{acc['top5']:.3f} |")
    print("\n| attribute | source | photos | top-1 | top-3 |\n|---|---|---|---|---|")
    for source, halves in r["attributes"].items():
        for half, table in halves.items():
            for name, acc in table.items():
                print(f"| {name} | {source} | {half} ({acc['n']}) | {acc['top1']:.3f} | "
                      f"{acc['top3']:.3f} |")
    if "runner_ups" in r:
        print(f"\nrunner-ups' extra cost: {r['runner_ups']['extra_ms_median']:.2f} ms median")
    lat = r["latency_ms"]
    print(f"\nSearch median {lat['heads_on_median']:.2f} ms with heads vs "
          f"{lat['heads_off_median']:.2f} ms without: {lat['added_median']:+.3f} ms "
          f"(paired mean {lat['added_mean_paired']:+.3f} ms); the heads' own cost: forward "
          f"{lat['forward_added_median']:+.3f} ms (median of 200 interleaved pairs), "
          f"post-processing (softmax) {lat['heads_stage_median']:.3f} ms; the vote stage "
          f"{lat['vote_stage_on_median']:.3f} ms with the attribute vote vs "
          f"{lat['vote_stage_off_median']:.3f} ms without")


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
    s.add_argument("--runner-ups", type=int, default=0,
                   help="also vote the detector's next N candidates (detector boxes only)")
    s.add_argument("--runner-up-weight", type=float, default=0.25)
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
