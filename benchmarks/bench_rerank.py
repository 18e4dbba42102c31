"""k-reciprocal re-ranking: ms per query with the precomputed gallery graph against the naive
O(N^2) method on the same gallery, their agreement, and Recall@K with and without it.

    .venv/bin/python -m benchmarks.bench_rerank [--n 2000 --dim 64 --queries 50]
    .venv/bin/python -m benchmarks.bench_rerank --index-root ROOT --world DIR

Synthetic (default): a seeded gallery of ``n / per`` SKUs in families of look-alikes, ``per``
images each around the SKU's centre; queries are noisier draws of a SKU's centre (a domain
gap like user photos vs shop images). With ``--index-root`` the gallery is a real index
version and the queries are the world's user photos (ground-truth boxes), embedded with the
version's embedder; split SKUs count as correct. Candidates are the query's top
``--shortlist`` over the whole gallery.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from benchmarks.machine import machine
from visearch.index.blas import small_batch_blas
from visearch.search.rerank import KReciprocalReranker, k_reciprocal_bruteforce


def synthetic(n: int, dim: int, per: int, queries: int, seed: int, noise: float,
              query_noise: float, family: int, spread: float
              ) -> tuple[np.ndarray, list[str], np.ndarray, list[set[str]]]:
    """Families of ``family`` look-alike SKUs (centres ``spread`` apart around a family
    centre), ``per`` gallery images per SKU; queries are noisier draws of a SKU."""
    rng = np.random.default_rng(seed)
    skus = n // per
    fam = rng.normal(size=(skus // family + 1, dim))
    centres = fam[np.arange(skus) // family] + spread * rng.normal(size=(skus, dim))
    xb = np.repeat(centres, per, axis=0) + noise * rng.normal(size=(skus * per, dim))
    xb = xb.astype(np.float32)
    faiss.normalize_L2(xb)
    sku_of = [f"S{i // per:05d}" for i in range(len(xb))]
    target = rng.integers(0, skus, size=queries)
    xq = (centres[target] + query_noise * rng.normal(size=(queries, dim))).astype(np.float32)
    faiss.normalize_L2(xq)
    return xb, sku_of, xq, [{f"S{t:05d}"} for t in target]


def from_index(root: Path, world: Path, limit: int) -> tuple[np.ndarray, list[str], np.ndarray,
                                                              list[set[str]]]:
    from visearch.embedding import embed_items, load_embedder
    from visearch.index import IndexRoot

    version = IndexRoot(root).open()
    ids = np.asarray(version.graph.ids)
    xb = version.index.reconstruct(ids)
    sku_of = [m["sku"] for m in version.items.get_many(ids.tolist())]
    rows = [json.loads(line) for line in (world / "queries.jsonl").read_text().splitlines()
            if line.strip()][:limit]
    truth = json.loads((world / "truth.json").read_text())
    same: dict[str, set[str]] = {}
    for group in truth.get("split_skus", []):
        for s in group["skus"]:
            same[s] = set(group["skus"])
    model = load_embedder(version.embedder_path)
    feats = [f for _, f in embed_items(
        model, [(i, str(world / r["image"]), r.get("bbox")) for i, r in enumerate(rows)])]
    version.close()
    return xb, sku_of, np.concatenate(feats), [same.get(r["sku"], {r["sku"]}) for r in rows]


def _sku_ranking(ids: np.ndarray, sku_of: list[str], k: int) -> list[str]:
    out: list[str] = []
    for i in ids:
        s = sku_of[int(i)]
        if s not in out:
            out.append(s)
            if len(out) == k:
                break
    return out


def run_bench(xb: np.ndarray, sku_of: list[str], xq: np.ndarray, truth: list[set[str]], *,
              k1: int, k2: int, lambda_value: float, shortlist: int, naive_queries: int,
              ks: tuple[int, ...] = (1, 5)) -> dict[str, Any]:
    n = len(xb)
    ids = np.arange(n, dtype=np.int64)
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    t0 = time.perf_counter()
    with small_batch_blas():  # the path the product's exact searches take
        _, graph = index.search(xb, k1 + 1)
    t_graph = time.perf_counter() - t0
    t0 = time.perf_counter()
    rr = KReciprocalReranker(ids, graph, xb, k1=k1, k2=k2, lambda_value=lambda_value)
    t_init = time.perf_counter() - t0
    with small_batch_blas():
        D, I = index.search(xq, max(shortlist, k1))  # noqa: E741
    hits = {f"R@{k}": [0, 0] for k in ks}
    graph_ms = []
    for q in range(len(xq)):
        cands = I[q, :shortlist]
        t0 = time.perf_counter()
        final, _ = rr.rerank(xq[q], I[q, :k1], cands)
        graph_ms.append((time.perf_counter() - t0) * 1000.0)
        reranked = cands[np.argsort(final, kind="stable")]
        for k in ks:
            hits[f"R@{k}"][0] += bool(set(_sku_ranking(cands, sku_of, k)) & truth[q])
            hits[f"R@{k}"][1] += bool(set(_sku_ranking(reranked, sku_of, k)) & truth[q])
    naive_ms, diffs, same_order = [], [], 0
    for q in range(min(naive_queries, len(xq))):
        t0 = time.perf_counter()
        full = k_reciprocal_bruteforce(xq[q], xb, k1=k1, k2=k2, lambda_value=lambda_value)
        naive_ms.append((time.perf_counter() - t0) * 1000.0)
        cands = I[q, :shortlist]
        final, _ = rr.rerank(xq[q], I[q, :k1], cands)
        diffs.append(float(np.abs(final - full[cands]).max()))
        same_order += bool(np.array_equal(np.argsort(final, kind="stable"),
                                          np.argsort(full[cands], kind="stable")))
    nq = len(xq)
    return {
        "gallery": n, "dim": int(xb.shape[1]), "queries": nq, "k1": k1, "k2": k2,
        "lambda": lambda_value, "shortlist": shortlist,
        "graph_build_s": t_graph, "reranker_init_s": t_init,
        "graph_ms_per_query": {"median": float(np.median(graph_ms)),
                               "mean": float(np.mean(graph_ms))},
        "naive_ms_per_query": {"median": float(np.median(naive_ms)) if naive_ms else None,
                               "queries": len(naive_ms)},
        "max_abs_diff_vs_naive": max(diffs) if diffs else None,
        "same_order_as_naive": f"{same_order}/{len(naive_ms)}",
        "recall_without": {k: v[0] / nq for k, v in hits.items()},
        "recall_with": {k: v[1] / nq for k, v in hits.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.bench_rerank",
                                description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="synthetic gallery size")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--per", type=int, default=4, help="images per synthetic SKU")
    p.add_argument("--family", type=int, default=5, help="look-alike SKUs per family")
    p.add_argument("--spread", type=float, default=0.15, help="SKU spread within a family")
    p.add_argument("--noise", type=float, default=0.15, help="gallery image noise")
    p.add_argument("--query-noise", type=float, default=0.4, help="query (photo) noise")
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index-root", type=Path, help="use this index's active version")
    p.add_argument("--world", type=Path, help="its world (queries.jsonl, truth.json)")
    p.add_argument("--k1", type=int, default=20)
    p.add_argument("--k2", type=int, default=6)
    p.add_argument("--lambda", dest="lambda_value", type=float, default=0.3)
    p.add_argument("--shortlist", type=int, default=50)
    p.add_argument("--naive-queries", type=int, default=5,
                   help="queries timed the O(N^2) way (>= 1)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.naive_queries < 1:
        p.error("--naive-queries must be >= 1 (the baseline)")
    if args.index_root:
        if not args.world:
            p.error("--index-root needs --world")
        data = from_index(args.index_root, args.world, args.queries)
        source = f"index {args.index_root} + {args.world} photos"
    else:
        data = synthetic(args.n, args.dim, args.per, args.queries, args.seed, args.noise,
                         args.query_noise, args.family, args.spread)
        source = f"synthetic seed {args.seed}"
    res = run_bench(*data, k1=args.k1, k2=args.k2, lambda_value=args.lambda_value,
                    shortlist=args.shortlist, naive_queries=args.naive_queries)
    res["source"] = source
    res["machine"] = machine()
    m = res["machine"]
    print(f"machine: {m['cpu_count']} CPUs, torch {m['torch']}, faiss {m['faiss']}")
    print(f"{source}: gallery {res['gallery']} x {res['dim']}, {res['queries']} queries, "
          f"k1={res['k1']} k2={res['k2']} lambda={res['lambda']}, shortlist {res['shortlist']}")
    print(f"gallery graph (faiss flat, k1+1): {res['graph_build_s']:.2f} s, "
          f"reranker init {res['reranker_init_s'] * 1000:.0f} ms")
    naive = res["naive_ms_per_query"]["median"]
    graph = res["graph_ms_per_query"]["median"]
    print(f"ms/query   graph {graph:.2f}   naive O(N^2) {naive:.1f} "
          f"({res['naive_ms_per_query']['queries']} queries)   speed-up {naive / graph:.0f}x")
    print(f"agreement  max |d*_graph - d*_naive| = {res['max_abs_diff_vs_naive']:.2e}, "
          f"same shortlist order {res['same_order_as_naive']}")
    for k in res["recall_without"]:
        print(f"{k:<5} without re-ranking {res['recall_without'][k]:.3f}   "
              f"with {res['recall_with'][k]:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
