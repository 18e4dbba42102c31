"""Index types side by side: build time, memory, queries/s at batch 1 and 256, Recall@10
against exact search, and the gallery neighbour graph's build time.

    .venv/bin/python -m benchmarks.bench_index                # N=100k, d=256 (a few minutes)
    .venv/bin/python -m benchmarks.bench_index --n 1000000 --types ivf,ivfpq --graph-rows 20000

The gallery is a seeded Gaussian mixture on the unit sphere (``--clusters`` centres, points
scattered around them), queries are fresh draws from the same mixture: clustered like real
embeddings, unlike uniform noise, on which every IVF partition looks alike. Each index is
built through ``GalleryIndex.build(..., partitioned=False)`` (the product's code path and
defaults: nlist, nprobe, efSearch) and is the whole-gallery index only. The exact baseline is
the ``Flat`` row (faiss brute force); on a GPU a plain torch matmul + topk row is added.
The neighbour graph rows are timed on ``--graph-rows`` items and extrapolated to N when fewer.

``--drift`` builds each index on the half of the gallery on one side of its first principal
direction and adds the other half afterwards with ``GalleryIndex.add`` (what ``visearch-index
add`` does with new products: no retraining), then also reports Recall@k of the queries on
the added side, where the trained quantisers (IVF centroids, SQ ranges, PQ codebooks) have
never seen the data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from benchmarks.machine import machine
from visearch.index import GalleryIndex, build_neighbour_graph
from visearch.index.blas import small_batch_blas
from visearch.index.gallery import DEFAULT_EF_SEARCH, default_nlist, default_nprobe


def mixture(n: int, d: int, clusters: int, seed: int, spread: float, intrinsic: int
            ) -> np.ndarray:
    """float32 [n, d] L2-normalised draws of a mixture of low-dimensional Gaussians.

    Each cluster is its centre plus a random ``intrinsic``-dimensional subspace of spread
    ``spread`` (relative to the centre's norm) and a little isotropic noise: neighbours are
    then decided by position within the cluster, as with real embeddings, rather than by
    high-dimensional noise (on which every method finds the same few hub points).
    Made in 64k-row chunks.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    scale = spread * np.sqrt(d) / np.sqrt(intrinsic * d)
    bases = (scale * rng.standard_normal((clusters, intrinsic, d))).astype(np.float32)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 1 << 16):
        stop = min(n, start + (1 << 16))
        c = rng.integers(0, clusters, stop - start)
        z = rng.standard_normal((stop - start, intrinsic), dtype=np.float32)
        out[start:stop] = centres[c] + np.einsum("nr,nrd->nd", z, bases[c])
        out[start:stop] += 0.05 * rng.standard_normal((stop - start, d), dtype=np.float32)
    faiss.normalize_L2(out)
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def recall_at(I: np.ndarray, I_ref: np.ndarray, k: int) -> float:  # noqa: E741, N803
    """Mean |top-k ∩ exact top-k| / k."""
    hits = [len(np.intersect1d(a[:k], b[:k])) for a, b in zip(I, I_ref, strict=True)]
    return float(np.mean(hits)) / k


def _ints(text: str) -> list[int]:
    """``"8,32"`` -> ``[8, 32]``; empty -> ``[]``."""
    return [int(t) for t in text.split(",") if t.strip()]


def time_search(search, xq: np.ndarray, k: int, batch: int, max_queries: int) -> float:
    """Queries per second over up to ``max_queries`` queries sent ``batch`` at a time."""
    xq = xq[:max_queries]
    search(xq[:batch], k)  # warm-up (GPU copy, caches)
    t0 = time.perf_counter()
    for start in range(0, len(xq), batch):
        search(xq[start : start + batch], k)
    return len(xq) / (time.perf_counter() - t0)


def factories(n: int, d: int, types: list[str]) -> list[tuple[str, str, list[dict[str, int]]]]:
    """(label, factory string, search-option settings) for each requested type."""
    nlist = default_nlist(n)
    probe = default_nprobe(nlist)
    m = d // 4  # as choose_factory: 4 dims per PQ byte, 64 bytes/vector at d=256
    table = {
        "flat": ("Flat", "Flat", [{}]),
        "ivf": ("IVF-Flat", f"IVF{nlist},Flat",
                [{"nprobe": probe}, {"nprobe": max(1, probe // 4)}, {"nprobe": probe * 4}]),
        "ivfpq": ("IVF-PQ", f"IVF{nlist},PQ{m}np", [{"nprobe": probe}, {"nprobe": probe * 4}]),
        "ivfsq8": ("IVF-SQ8", f"IVF{nlist},SQ8",
                   [{"nprobe": probe}, {"nprobe": max(1, probe // 4)}]),
        # faiss's default residual encoding, which GalleryIndex turns off (sq_by_residual)
        "ivfsq8-residual": ("IVF-SQ8 residual", f"IVF{nlist},SQ8", [{"nprobe": probe}]),
        "hnsw": ("HNSW", "HNSW32", [{"ef_search": DEFAULT_EF_SEARCH},
                                    {"ef_search": DEFAULT_EF_SEARCH * 4}]),
    }
    return [table[t] for t in types]


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    info = machine()
    info["faiss_threads"] = faiss.omp_get_max_threads()
    info["faiss_gpus"] = faiss.get_num_gpus()
    print(json.dumps(info), flush=True)
    t0 = time.perf_counter()
    x = mixture(args.n + args.queries, args.dim, args.clusters, args.seed, args.spread,
                args.intrinsic)
    xb, xq = x[: args.n], x[args.n :]
    ids = np.arange(args.n, dtype=np.int64)
    print(f"data: N={args.n} d={args.dim} clusters={args.clusters} "
          f"intrinsic={args.intrinsic} spread={args.spread} queries={len(xq)} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    exact_index = faiss.IndexFlatIP(args.dim)
    exact_index.add(xb)
    t0 = time.perf_counter()
    with small_batch_blas():  # the path GalleryIndex's own exact search takes
        _, I_ref = exact_index.search(xq, args.k)
    print(f"exact ground truth: {time.perf_counter() - t0:.1f} s", flush=True)
    del exact_index

    added_side = np.zeros(len(xq), dtype=bool)
    if args.drift:
        direction = np.linalg.svd(xb[:5000], full_matrices=False)[2][0]
        cut = float(np.median(xb @ direction))
        first = xb @ direction < cut
        added_side = xq @ direction >= cut
        print(f"drift: trained on {int(first.sum())} vectors, {int((~first).sum())} added "
              f"later; {int(added_side.sum())} queries on the added side", flush=True)

    rows: list[dict[str, Any]] = []
    built: dict[str, GalleryIndex] = {}
    for label, factory, settings in factories(args.n, args.dim, args.types.split(",")):
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        build = {"factory": factory, "partitioned": False,
                 "sq_by_residual": label.endswith("residual")}
        if args.drift:
            index = GalleryIndex.build(xb[first], ids[first], ["all"] * int(first.sum()),
                                       **build)
            index.add(xb[~first], ids[~first], ["all"] * int((~first).sum()))
        else:
            index = GalleryIndex.build(xb, ids, ["all"] * args.n, **build)
        build_s = time.perf_counter() - t0
        rss = rss_bytes() - rss0
        index_bytes = index.nbytes()
        for opts in settings:
            def search(q, k, opts=opts, index=index):
                return index.search(q, k, **opts)

            qps1 = time_search(search, xq, args.k, 1, args.batch1_queries)
            qps256 = time_search(search, xq, args.k, 256, len(xq))
            _, I = index.search(xq, args.k, **opts)  # noqa: E741
            row = {"type": label, "factory": factory, "options": opts, "build_s": build_s,
                   "index_mb": index_bytes / 2**20, "rss_delta_mb": rss / 2**20,
                   "qps_batch1": qps1, "qps_batch256": qps256,
                   f"recall@{args.k}": recall_at(I, I_ref, args.k)}
            if args.drift:
                row[f"recall@{args.k}_added_side"] = recall_at(I[added_side],
                                                               I_ref[added_side], args.k)
            rows.append(row)
            print(_fmt(row, args.k), flush=True)
        built[label] = index

    if torch.cuda.is_available():
        dev = torch.device("cuda")
        gb = torch.from_numpy(xb).to(dev)

        def torch_search(q, k):
            s = torch.from_numpy(q).to(dev) @ gb.T
            out = torch.topk(s, k, dim=1)
            torch.cuda.synchronize()
            return out

        _, I_t = torch_search(xq, args.k)
        row = {"type": "torch matmul+topk (GPU)", "factory": "-", "options": {},
               "build_s": 0.0, "index_mb": gb.numel() * 4 / 2**20, "rss_delta_mb": 0.0,
               "qps_batch1": time_search(torch_search, xq, args.k, 1, args.batch1_queries),
               "qps_batch256": time_search(torch_search, xq, args.k, 256, len(xq)),
               f"recall@{args.k}": recall_at(I_t.cpu().numpy(), I_ref, args.k)}
        rows.append(row)
        print(_fmt(row, args.k), flush=True)

    graph_rows = min(args.n, args.graph_rows)
    graphs = []
    if graph_rows > 0:
        # The exact graph of the timed rows, to score the approximate ones against.
        t0 = time.perf_counter()
        with small_batch_blas():
            _, ref_rows = faiss.knn(xb[:graph_rows], xb, args.k1,
                                    metric=faiss.METRIC_INNER_PRODUCT)
        exact_s = time.perf_counter() - t0
        graph_runs: list[tuple[str, dict[str, int]]] = [("Flat", {})]
        graph_runs.append(("IVF-Flat", {}))
        graph_runs += [("IVF-Flat", {"nprobe": p}) for p in _ints(args.graph_nprobe)]
        graph_runs.append(("HNSW", {}))
        for label, opts in graph_runs:
            if label not in built:
                continue
            index = built[label]
            t0 = time.perf_counter()
            graph = build_neighbour_graph(index, ids[:graph_rows], args.k1, **opts)
            seconds = time.perf_counter() - t0
            g = {"source": label, "options": opts, "k1": args.k1, "rows_timed": graph_rows,
                 "seconds_for_N": seconds * args.n / graph_rows,
                 "extrapolated": graph_rows < args.n,
                 "recall": recall_at(graph.I, ids[ref_rows], args.k1)}
            graphs.append(g)
            ext = f", extrapolated from {graph_rows} rows" if g["extrapolated"] else ""
            how = ",".join(f"{a}={b}" for a, b in opts.items()) or "default"
            print(f"neighbour graph via {label:8} {how:10}: {g['seconds_for_N']:.1f} s for "
                  f"N={args.n} (k1={args.k1}{ext}), recall vs exact {g['recall']:.3f}",
                  flush=True)
        print(f"(exact graph of the timed rows with faiss.knn: {exact_s * args.n / graph_rows:.1f}"
              f" s for N={args.n})", flush=True)
    return {"machine": info, "args": vars(args), "rows": rows, "graph": graphs}


def _fmt(row: dict[str, Any], k: int) -> str:
    opts = ",".join(f"{a}={b}" for a, b in row["options"].items()) or "-"
    return (f"{row['type']:10} {row['factory']:16} {opts:14} build {row['build_s']:7.1f} s  "
            f"index {row['index_mb']:7.1f} MB  rss +{row['rss_delta_mb']:7.1f} MB  "
            f"q/s b1 {row['qps_batch1']:8.1f}  b256 {row['qps_batch256']:8.1f}  "
            f"R@{k} {row[f'recall@{k}']:.3f}"
            + (f"  added side {row[f'recall@{k}_added_side']:.3f}"
               if f"recall@{k}_added_side" in row else ""))


def markdown(result: dict[str, Any]) -> str:
    k = result["args"]["k"]
    lines = [f"N={result['args']['n']}, d={result['args']['dim']}, "
             f"{result['args']['queries']} queries, machine: cpu_count "
             f"{result['machine']['cpu_count']}, faiss {result['machine']['faiss']} "
             f"({result['machine']['faiss_threads']} threads), GPUs "
             f"{result['machine']['faiss_gpus']}", "",
             f"| type | factory | search options | build s | index MB | RSS +MB | q/s batch 1 "
             f"| q/s batch 256 | Recall@{k} |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        opts = ", ".join(f"{a}={b}" for a, b in r["options"].items()) or "-"
        lines.append(f"| {r['type']} | {r['factory']} | {opts} | {r['build_s']:.1f} | "
                     f"{r['index_mb']:.0f} | {r['rss_delta_mb']:.0f} | {r['qps_batch1']:.0f} | "
                     f"{r['qps_batch256']:.0f} | {r[f'recall@{k}']:.3f} |"
                     + (f" added side {r[f'recall@{k}_added_side']:.3f} |"
                        if f"recall@{k}_added_side" in r else ""))
    lines.append("")
    for g in result["graph"]:
        ext = f" (extrapolated from {g['rows_timed']} rows)" if g["extrapolated"] else ""
        how = ", ".join(f"{a}={b}" for a, b in g.get("options", {}).items()) or "default search"
        lines.append(f"- neighbour graph (k1={g['k1']}) via {g['source']} ({how}): "
                     f"{g['seconds_for_N']:.1f} s{ext}, recall of the exact graph "
                     f"{g['recall']:.3f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="gallery vectors")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--clusters", type=int, default=100,
                   help="mixture components (N/clusters points each, spread over many IVF lists)")
    p.add_argument("--spread", type=float, default=0.7,
                   help="cluster radius relative to the centre's norm")
    p.add_argument("--intrinsic", type=int, default=16,
                   help="dimension of each cluster's subspace")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--types", default="flat,ivf,ivfpq,hnsw",
                   help="comma-separated: flat, ivf, ivfpq, ivfsq8, ivfsq8-residual, hnsw")
    p.add_argument("--batch1-queries", type=int, default=200,
                   help="queries timed one at a time")
    p.add_argument("--k1", type=int, default=20, help="neighbour graph k1")
    p.add_argument("--drift", action="store_true",
                   help="train on half the gallery, add the other half later (see above)")
    p.add_argument("--graph-nprobe", default="8,32",
                   help="comma-separated nprobe values also timed for the IVF-Flat graph")
    p.add_argument("--graph-rows", type=int, default=20_000,
                   help="graph rows timed (extrapolated to N when fewer; 0: skip the graph)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="faiss OpenMP threads (0: faiss default; 1 on an oversubscribed CPU)")
    p.add_argument("--out", type=Path, default=Path("out/bench_index"),
                   help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
