"""Capacity figures for docs/scale.md: bytes per vector and queries/s per core of the two
compressed index types a shard would hold, IVF-SQ8 and IVF-PQ with an SQ8 (or SQ4) refine, at N
synthetic vectors, beside exact search (Flat) as the baseline.

    .venv/bin/python -m benchmarks.bench_scale --n 1000000
    .venv/bin/python -m benchmarks.bench_scale --n 1000000 --replicate 10  # + timing at 10M
    .venv/bin/python -m benchmarks.bench_scale --n 10000000 --nlist 2048 --nprobe 128 \
        --no-pq --no-flat --chunk 500000                   # IVF-SQ8 at 10M: ~6 GB of RAM

The gallery is ``bench_index``'s clustered mixture, generated in chunks (``--chunk``) from
fixed centres, so N can exceed memory as float32: the indexes are filled chunk by chunk and
the exact top-k of the queries is merged chunk by chunk (the Recall@10 oracle). Both indexes
share one coarse quantizer and each chunk's list assignment, as Milvus shares nothing but
the cost is what a shard build pays. The quantizer's k-means trains on a sample of
``--train-per-list`` points per list (visearch's own rule, 64; faiss itself caps k-means at
256 per centroid), never on all N: at 10M the cost of a build is the coarse assignment of
every vector (N x nlist x d), not the training.

Memory per vector is the serialized index size / N (codes, ids, lists, quantizer: what the
shard holds in RAM). Queries/s are at batch 1 on ``--threads`` faiss threads (default 1:
per core; a node serves one query per core in parallel).
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

from benchmarks.bench_index import recall_at, rss_bytes, time_search
from benchmarks.machine import machine
from visearch.index.gallery import IVF_TRAIN_POINTS_PER_LIST, default_nlist, default_nprobe


class MixtureStream:
    """``bench_index.mixture``'s model (clusters of low-dimensional Gaussians on the unit
    sphere) with the centres fixed by ``seed`` and each chunk drawn from its own seed, so a
    gallery of any size is generated chunk by chunk, reproducibly."""

    def __init__(self, d: int, clusters: int, seed: int, spread: float = 0.6,
                 intrinsic: int = 16) -> None:
        rng = np.random.default_rng(seed)
        self.d, self.seed = d, seed
        self.centres = rng.standard_normal((clusters, d)).astype(np.float32)
        scale = spread * np.sqrt(d) / np.sqrt(intrinsic * d)
        self.bases = (scale * rng.standard_normal((clusters, intrinsic, d))).astype(np.float32)

    def chunk(self, index: int, n: int) -> np.ndarray:
        """float32 [n, d], L2-normalised: chunk ``index`` (queries use negative indexes)."""
        rng = np.random.default_rng([self.seed, index + (1 << 20)])
        c = rng.integers(0, len(self.centres), n)
        z = rng.standard_normal((n, self.bases.shape[1]), dtype=np.float32)
        out = self.centres[c]
        for s in range(0, n, 20_000):  # bases[c] is n x intrinsic x d: bound it to ~330 MB
            out[s:s + 20_000] += np.einsum("nr,nrd->nd", z[s:s + 20_000],
                                           self.bases[c[s:s + 20_000]])
        out += 0.05 * rng.standard_normal((n, self.d), dtype=np.float32)
        faiss.normalize_L2(out)
        return out


def _merge_topk(D: np.ndarray, I: np.ndarray, D2: np.ndarray, I2: np.ndarray, k: int  # noqa: E741, N803
                ) -> tuple[np.ndarray, np.ndarray]:
    Dc, Ic = np.concatenate([D, D2], axis=1), np.concatenate([I, I2], axis=1)
    top = np.argsort(-Dc, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(Dc, top, axis=1), np.take_along_axis(Ic, top, axis=1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    faiss.omp_set_num_threads(args.threads)
    info = machine()
    info["faiss_threads"] = faiss.omp_get_max_threads()
    print(json.dumps(info), flush=True)
    n, d, k = args.n, args.dim, args.k
    gen = MixtureStream(d, args.clusters, args.seed)
    xq = gen.chunk(-1, args.queries)
    nlist = args.nlist or default_nlist(n)
    nprobe = args.nprobe or default_nprobe(nlist)
    refines = [r for r in args.refines.split(",") if r]
    m = d // 4 if args.pq_m is None else args.pq_m
    out: dict[str, Any] = {"machine": info, "n": n, "d": d, "nlist": nlist, "nprobe": nprobe,
                           "pq_m": m, "queries": len(xq), "k": k, "rows": []}
    t0 = time.perf_counter()
    ntrain = min(n, nlist * args.train_per_list)
    xtrain = gen.chunk(0, min(ntrain, args.chunk))  # the first chunk's head: a random sample
    quantizer = faiss.IndexFlatIP(d)
    ivf_sq = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                           faiss.METRIC_INNER_PRODUCT)
    ivf_sq.by_residual = False  # as GalleryIndex builds it
    ivf_sq.cp.max_points_per_centroid = args.train_per_list
    ivf_sq.cp.niter = args.train_iters
    ivf_sq.train(xtrain)
    ivf_pq = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    ivf_pq.do_polysemous_training = False
    if args.pq:
        ivf_pq.train(xtrain)  # the quantizer is trained: PQ codebooks only
    else:
        refines = []
    refine = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit,
                                        faiss.METRIC_INNER_PRODUCT)
    refine.train(xtrain)
    refine4 = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_4bit,
                                         faiss.METRIC_INNER_PRODUCT)
    if "SQ4" in refines:
        refine4.train(xtrain)
    train_s = time.perf_counter() - t0
    print(f"trained nlist={nlist} on {len(xtrain)} vectors in {train_s:.0f} s", flush=True)
    flat = faiss.IndexFlatIP(d) if args.flat else None
    D_ref = np.full((len(xq), k), -np.inf, dtype=np.float32)
    I_ref = np.full((len(xq), k), -1, dtype=np.int64)
    # The baseline in the same run: IVF-SQ8 over the gallery's first --baseline-n vectors
    # (same quantizer, nlist, nprobe), with its own exact top-k, timed beside the full one.
    base_n = args.baseline_n if 0 < args.baseline_n < n else 0
    base_sq = faiss.clone_index(ivf_sq) if base_n else None
    D_base, I_base = D_ref.copy(), I_ref.copy()
    t0 = time.perf_counter()
    add_s = {"sq8": 0.0, "pq": 0.0, "assign": 0.0}
    for ci, start in enumerate(range(0, n, args.chunk)):
        x = gen.chunk(ci, min(args.chunk, n - start))
        ids = np.arange(start, start + len(x), dtype=np.int64)
        t = time.perf_counter()
        _, assign = quantizer.search(x, 1)
        add_s["assign"] += time.perf_counter() - t
        t = time.perf_counter()
        ivf_sq.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(assign))
        add_s["sq8"] += time.perf_counter() - t
        t = time.perf_counter()
        if args.pq:
            ivf_pq.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids),
                            faiss.swig_ptr(assign))
        if "SQ8" in refines:
            refine.add(x)
        if "SQ4" in refines:
            refine4.add(x)
        add_s["pq"] += time.perf_counter() - t
        if flat is not None:
            flat.add(x)
        Dc, Ic = faiss.knn(xq, x, k, metric=faiss.METRIC_INNER_PRODUCT)
        D_ref, I_ref = _merge_topk(D_ref, I_ref, Dc, Ic + start, k)
        if base_sq is not None and start < base_n:
            m_n = min(len(x), base_n - start)
            base_sq.add_core(m_n, faiss.swig_ptr(x), faiss.swig_ptr(ids),
                             faiss.swig_ptr(assign))
            Dc, Ic = faiss.knn(xq, x[:m_n], k, metric=faiss.METRIC_INNER_PRODUCT)
            D_base, I_base = _merge_topk(D_base, I_base, Dc, Ic + start, k)
        print(f"  {start + len(x)}/{n} added ({time.perf_counter() - t0:.0f} s)", flush=True)
    out["build_s"] = {"train": round(train_s, 1), **{k2: round(v, 1) for k2, v in add_s.items()}}
    # The refine index is filled in the same id order as the IVF-PQ ids (0..N-1).
    ivf_pqr = faiss.IndexRefine(ivf_pq, refine)
    ivf_pqr.k_factor = args.k_factor
    ivf_pq.nprobe = ivf_sq.nprobe = nprobe

    def row(label: str, index: faiss.Index, nbytes: int, search: Any, *, size: int = n,
            truth: np.ndarray = I_ref) -> None:
        _, I = search(xq, k)  # noqa: E741
        qps = time_search(search, xq, k, 1, args.max_queries)
        r = {"index": label, "n": size, "bytes_per_vector": round(nbytes / size, 1),
             "gb_per_100m": round(nbytes / size * 1e8 / 1e9, 1),
             "recall_at_10": round(recall_at(I, truth, k), 4), "qps_batch1": round(qps, 1)}
        out["rows"].append(r)
        print(json.dumps(r), flush=True)

    if base_sq is not None:
        base_sq.nprobe = nprobe
        row(f"IVF{nlist},SQ8 nprobe={nprobe} at the first {base_n} (baseline)", base_sq,
            faiss.serialize_index(base_sq).nbytes, base_sq.search, size=base_n,
            truth=I_base)
        del base_sq

    if flat is not None:
        row("Flat (exact)", flat, d * 4 * n, flat.search)
        del flat
    row(f"IVF{nlist},SQ8 nprobe={nprobe}", ivf_sq,
        faiss.serialize_index(ivf_sq).nbytes, ivf_sq.search)
    if args.pq:
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        row(f"IVF{nlist},PQ{m} nprobe={nprobe}", ivf_pq, faiss.serialize_index(ivf_pq).nbytes,
            lambda q, kk: ivf_pq.search(q, kk, params=params))
        pq_bytes = faiss.serialize_index(ivf_pq).nbytes
    if "SQ8" in refines:
        row(f"IVF{nlist},PQ{m}+refine SQ8 (k_factor {args.k_factor})", ivf_pqr,
            pq_bytes + faiss.serialize_index(refine).nbytes, ivf_pqr.search)
    if "SQ4" in refines:
        ivf_pqr4 = faiss.IndexRefine(ivf_pq, refine4)
        ivf_pqr4.k_factor = args.k_factor
        row(f"IVF{nlist},PQ{m}+refine SQ4 (k_factor {args.k_factor})", ivf_pqr4,
            pq_bytes + faiss.serialize_index(refine4).nbytes, ivf_pqr4.search)
    if args.replicate > 1:
        # Timing at R x N: every inverted list (and the refine store) holds R copies of its
        # N-gallery entries under new ids, the list sizes a gallery R times larger would
        # have, without paying R x N coarse assignments. Recall stays the N-gallery's.
        r_n = n * args.replicate
        sq_r = faiss.clone_index(ivf_sq)
        pq_r = faiss.clone_index(ivf_pq)
        refine_r = faiss.clone_index(refine) if "SQ8" in refines else None
        for copy in range(1, args.replicate):
            sq_r.merge_from(faiss.clone_index(ivf_sq), copy * n)
            pq_r.merge_from(faiss.clone_index(ivf_pq), copy * n)
            if refine_r is not None:
                refine_r.merge_from(faiss.clone_index(refine))  # merge_from empties its source
        sq_r.nprobe = pq_r.nprobe = nprobe
        for label, index, nbytes in (
                (f"IVF{nlist},SQ8 nprobe={nprobe} at {r_n} (x{args.replicate} lists)", sq_r,
                 faiss.serialize_index(sq_r).nbytes),
                (f"IVF{nlist},PQ{m}+refine SQ8 at {r_n} (x{args.replicate} lists)",
                 faiss.IndexRefine(pq_r, refine_r) if refine_r is not None else pq_r,
                 faiss.serialize_index(pq_r).nbytes + (
                     faiss.serialize_index(refine_r).nbytes if refine_r is not None else 0))):
            if isinstance(index, faiss.IndexRefine):
                index.k_factor = args.k_factor
            qps = time_search(index.search, xq, k, 1, args.max_queries)
            r = {"index": label, "bytes_per_vector": round(nbytes / r_n, 1),
                 "qps_batch1": round(qps, 1), "recall_at_10": None}
            out["rows"].append(r)
            print(json.dumps(r), flush=True)
            del index
    out["rss_gb"] = round(rss_bytes() / 1e9, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="gallery vectors")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--max-queries", type=int, default=300, help="queries timed at batch 1")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nlist", type=int, help="default: visearch's default_nlist(N)")
    p.add_argument("--nprobe", type=int, help="default: visearch's default_nprobe(nlist)")
    p.add_argument("--refines", default="SQ8,SQ4", help="IVF-PQ refine stores to measure")
    p.add_argument("--pq-m", type=int, help="PQ bytes per vector (default d/4)")
    p.add_argument("--k-factor", type=int, default=4, help="IVF-PQ candidates re-scored, x k")
    p.add_argument("--train-per-list", type=int, default=IVF_TRAIN_POINTS_PER_LIST)
    p.add_argument("--train-iters", type=int, default=faiss.ClusteringParameters().niter,
                   help="k-means iterations of the coarse quantizer")
    p.add_argument("--no-pq", dest="pq", action="store_false",
                   help="IVF-SQ8 only (PQ encoding is the slowest part of a build)")
    p.add_argument("--chunk", type=int, default=250_000)
    p.add_argument("--replicate", type=int, default=1,
                   help="also time search at R x N: each list holding R copies of its entries")
    p.add_argument("--baseline-n", type=int, default=0,
                   help="also build and time IVF-SQ8 over the first B vectors (same run)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--no-flat", dest="flat", action="store_false",
                   help="no exact Flat baseline row (it holds N x d float32 in memory)")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    if args.replicate > 1 and not args.pq:
        p.error("--replicate times the IVF-PQ copies too: drop --no-pq")
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
