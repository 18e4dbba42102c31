"""faiss (embedded) against Milvus Lite on the same gallery: Recall@10 against exact search
and queries/s at batch 1, each through the product's own gallery class (``GalleryIndex``,
``MilvusGallery``), plus the Milvus insert time.

    .venv/bin/python -m benchmarks.bench_milvus                 # N=100k, d=256
    .venv/bin/python -m benchmarks.bench_milvus --n 20000 --types FLAT

The gallery and queries are ``bench_index``'s clustered mixture. Index types are paired:
faiss ``Flat`` with Milvus ``FLAT`` (both exact), faiss ``IVF{nlist},Flat`` with Milvus
``IVF_FLAT`` (same nlist and nprobe), faiss ``HNSW32`` with Milvus ``HNSW`` (M=32, ef 64).
Milvus Lite runs its server in-process over local gRPC; a Milvus cluster adds a network
hop per query but spreads the gallery over query nodes.
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

from benchmarks.bench_index import mixture, recall_at, time_search
from benchmarks.machine import machine
from visearch.index import GalleryIndex
from visearch.index.gallery import default_nlist, default_nprobe
from visearch.index.milvus import MilvusGallery

PAIRS = {"FLAT": "Flat", "IVF_FLAT": "IVF{nlist},Flat", "HNSW": "HNSW32"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    faiss.omp_set_num_threads(args.threads)
    info = machine(["pymilvus", "milvus-lite"])
    print(json.dumps(info), flush=True)
    x = mixture(args.n + args.queries, args.dim, args.clusters, args.seed, 0.6, 16)
    xb, xq = x[: args.n], x[args.n :]
    ids = np.arange(args.n, dtype=np.int64)
    rng = np.random.default_rng(args.seed)
    cats = np.array([f"c{i}" for i in range(args.categories)])[
        rng.integers(0, args.categories, args.n)].tolist()
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(xb)
    _, I_ref = exact.search(xq, args.k)
    del exact
    nlist = default_nlist(args.n)
    out: dict[str, Any] = {"machine": info, "n": args.n, "d": args.dim, "k": args.k,
                           "nlist": nlist, "nprobe": default_nprobe(nlist), "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-milvus-") as tmp:
        uri = str(Path(tmp) / "bench.db")
        for mtype in args.types.split(","):
            factory = PAIRS[mtype].format(nlist=nlist)
            t0 = time.perf_counter()
            fi = GalleryIndex.build(xb, ids, cats, factory=factory, partitioned=False)
            f_build = time.perf_counter() - t0
            t0 = time.perf_counter()
            mi = MilvusGallery.build(uri, f"bench_{mtype.lower()}", xb, ids, cats,
                                     index_type=mtype)
            m_build = time.perf_counter() - t0
            for name, index, build_s in (("faiss " + factory, fi, f_build),
                                         ("Milvus Lite " + mtype, mi, m_build)):
                _, I = index.search(xq, args.k)  # noqa: E741

                def search(q: np.ndarray, k: int, index: Any = index) -> Any:
                    return index.search(q, k)

                qps = time_search(search, xq, args.k, 1, args.max_queries)
                row = {"index": name, "build_s": round(build_s, 1),
                       "recall_at_10": round(recall_at(I, I_ref, args.k), 4),
                       "qps_batch1": round(qps, 1)}
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
            # category-restricted search in one call (the partition key filter)
            t0 = time.perf_counter()
            for q in xq[: args.max_queries // 4]:
                mi.search(q[None], args.k, category="c0")
            out.setdefault("milvus_category_qps", {})[mtype] = round(
                (args.max_queries // 4) / (time.perf_counter() - t0), 1)
            mi.drop()
            del fi
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--clusters", type=int, default=300)
    p.add_argument("--categories", type=int, default=8)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--max-queries", type=int, default=300, help="queries timed at batch 1")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--types", default="FLAT,IVF_FLAT", help=f"of {','.join(PAIRS)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
