"""k-reciprocal re-ranking: ms per query of the serving re-ranker (precomputed gallery
vectors, only those the query perturbs recomputed) against the previous one (every set
within three hops recomputed per query, kept here as ``LegacyKReciprocalReranker``) and the
naive O(N^2) method on the same gallery and queries, their agreement, the offline cost and
size of the precomputed vectors, and Recall@K with and without re-ranking.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_rerank [--n 2000 --dim 64]
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_rerank --index-root ROOT --world DIR

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
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import scipy.sparse as sp

from benchmarks.machine import machine
from visearch.index.blas import small_batch_blas
from visearch.index.graph import (
    NeighbourGraph,
    half_k,
    reciprocal_mask,
    self_first_lists,
    with_k_reciprocal,
)
from visearch.search.rerank import KReciprocalReranker, _distance, k_reciprocal_bruteforce


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


# --------------------------------------------------------------------------------------
# the baseline: the re-ranker as it was before issue 18
# --------------------------------------------------------------------------------------


def _expanded_sets(lists: np.ndarray, rows: np.ndarray, k1: int, h: int) -> np.ndarray:
    """int64 [len(rows), W]: ``R*(row)`` members (local numbers, ``-1`` padding, repeats)."""
    r1 = np.where(reciprocal_mask(lists, rows, k1), lists[rows, : k1 + 1], -1)
    # R(c, h) once for every distinct c met in the R(row, k1) sets.
    cands = np.unique(r1[r1 >= 0])
    rch_u = np.where(reciprocal_mask(lists, cands, h), lists[cands, : h + 1], -1)
    at = np.searchsorted(cands, np.maximum(r1, 0))
    rch = np.where((r1 >= 0)[..., None], rch_u[np.minimum(at, len(cands) - 1)], -1)
    # Membership of each R(c, h) member in R(row, k1), through a [rows, local] bit table.
    member = np.zeros((len(rows), lists.shape[0]), bool)
    rr, cc = np.nonzero(r1 >= 0)
    member[rr, r1[rr, cc]] = True
    inside = member[np.arange(len(rows))[:, None, None], np.maximum(rch, 0)] & (rch >= 0)
    size = (rch >= 0).sum(-1)
    accept = (r1 >= 0) & (inside.sum(-1) > 2.0 / 3.0 * size)
    expansion = np.where(accept[..., None], rch, -1).reshape(len(rows), -1)
    return np.concatenate([r1, expansion], axis=1)


class LegacyKReciprocalReranker:
    """The re-ranker before the precomputed vectors (issue 18), kept as the benchmark's
    baseline: it recomputes every set within three hops of the query for each query.

    Args:
        ids: int64 [N], the gallery item ids of the graph rows.
        neighbours: int64 [N, K], each row's nearest gallery item ids by descending
            similarity (``-1`` padding); the row's own id may or may not be included.
            ``K`` must reach ``k1`` (``k1`` is lowered, with a warning, otherwise).
        xb: float32 [N, d], the L2-normalised gallery vectors in ``ids`` order.
        k1, k2, lambda_value: the paper's parameters (defaults are the paper's).
    """

    def __init__(
        self,
        ids: np.ndarray,
        neighbours: np.ndarray,
        xb: np.ndarray,
        *,
        k1: int = 20,
        k2: int = 6,
        lambda_value: float = 0.3,
    ) -> None:
        ids = np.asarray(ids, np.int64).reshape(-1)
        neighbours = np.asarray(neighbours, np.int64)
        xb = np.ascontiguousarray(xb, np.float32)
        n = len(ids)
        if neighbours.ndim != 2 or neighbours.shape[0] != n or xb.ndim != 2 or len(xb) != n:
            raise ValueError(
                f"ids [{n}], neighbours {neighbours.shape} and xb {xb.shape} must have one row "
                "per gallery item"
            )
        if not 0.0 <= lambda_value <= 1.0:
            raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")
        if k1 < 1 or k2 < 1:
            raise ValueError(f"k1 and k2 must be >= 1, got {k1=}, {k2=}")
        self.ids = ids
        self.xb = xb
        self.lambda_value = float(lambda_value)
        self._order = np.argsort(ids, kind="stable")
        self._tls = threading.local()
        self._lists, self._sims = self_first_lists(ids, neighbours, xb)
        width = self._lists.shape[1]
        if k1 + 1 > width:
            print(f"warning: neighbour graph keeps {width - 1} neighbours; "
                  f"lowering k1 {k1} -> {width - 1}")
            k1 = width - 1
        self.k1 = k1
        self.k2 = min(k2, k1 + 1)
        self.h = half_k(k1)
        self._lists = np.ascontiguousarray(self._lists[:, : k1 + 1])
        self._sims = np.ascontiguousarray(self._sims[:, : k1 + 1])

    def _scratch(self) -> np.ndarray:
        """A per-thread int64 [N + 1] global -> local map, all -1 between uses."""
        buf = getattr(self._tls, "remap", None)
        if buf is None:
            buf = self._tls.remap = np.full(len(self.ids) + 1, -1, np.int64)
        return buf

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, item_ids: np.ndarray) -> np.ndarray:
        """int64 [n]: graph row of each item id, ``-1`` for ids the graph does not hold."""
        item_ids = np.asarray(item_ids, np.int64)
        if len(self.ids) == 0:
            return np.full(item_ids.shape, -1, np.int64)
        at = np.searchsorted(self.ids, item_ids, sorter=self._order)
        pos = self._order[np.minimum(at, len(self.ids) - 1)]
        return np.where(self.ids[pos] == item_ids, pos, -1)

    def _augmented(
        self, rows: np.ndarray, xq: np.ndarray, qlist: np.ndarray, width: int
    ) -> np.ndarray:
        """int64 [len(rows), width]: top lists of ``rows`` (global, ``n`` = the query) with
        the query inserted at its similarity rank; row ``n`` gets the query's own list."""
        n = len(self.ids)
        out = np.empty((len(rows), width), np.int64)
        is_q = rows == n
        out[is_q] = qlist[None, :width]
        g = rows[~is_q]
        s_gq = self.xb[g] @ xq
        lists, sims = self._lists[g, :width], self._sims[g, :width]
        at = (sims > s_gq[:, None]).sum(axis=1)  # the query's rank in each list
        col = np.arange(width)[None, :]
        shifted = np.concatenate([lists[:, :1], lists[:, :-1]], axis=1)
        out[~is_q] = np.where(col < at[:, None], lists, np.where(col == at[:, None], n, shifted))
        return out

    def rerank(
        self, xq: np.ndarray, nn_ids: np.ndarray, candidate_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Re-ranked distances from the query to each candidate.

        Args:
            xq: float32 [d], the L2-normalised query.
            nn_ids: int64 [k], the query's nearest gallery ids over the whole gallery, by
                descending similarity (``-1`` padding allowed); ``k >= k1`` for exactness.
            candidate_ids: int64 [m], the items to re-rank (e.g. one category's top hits).

        Returns:
            (final float32 [m], ``d*`` in candidate order, smaller is better;
            similarity float32 [m], each candidate's plain cosine similarity).
        """
        xq = np.asarray(xq, np.float32).reshape(-1)
        n, k1, k2, h = len(self.ids), self.k1, self.k2, self.h
        cpos = self.positions(np.asarray(candidate_ids, np.int64).reshape(-1))
        valid = cpos >= 0
        csim = np.full(len(cpos), -1.0, np.float32)
        csim[valid] = self.xb[cpos[valid]] @ xq
        cdist = _distance(csim)
        qpos = self.positions(np.asarray(nn_ids, np.int64).reshape(-1))
        qpos = qpos[qpos >= 0]
        if len(qpos) == 0 or not valid.any():
            return cdist.astype(np.float32), csim
        qsim = self.xb[qpos] @ xq
        qpos = qpos[np.argsort(-qsim, kind="stable")]
        qlist = np.full(k1 + 1, -1, np.int64)
        qlist[0] = n
        qlist[1 : 1 + min(k1, len(qpos))] = qpos[:k1]

        # The items within reach: candidates and q -> their top-k2 (J) -> J's lists
        # (reciprocity of R(j, k1)) -> those items' (h+1)-lists (the expansion step).
        level0 = np.unique(np.append(cpos[valid], n))
        top0 = self._augmented(level0, xq, qlist, k2)
        level1 = np.unique(top0[top0 >= 0])
        lists1 = self._augmented(level1, xq, qlist, k1 + 1)
        level2 = np.setdiff1d(lists1[lists1 >= 0], level1)
        lists2 = self._augmented(level2, xq, qlist, k1 + 1)
        level3 = np.setdiff1d(lists2[:, : h + 1], np.concatenate([level1, level2]))
        level3 = level3[level3 >= 0]
        lists3 = np.full((len(level3), k1 + 1), -1, np.int64)
        lists3[:, : h + 1] = self._augmented(level3, xq, qlist, h + 1)  # only these are read
        local = np.concatenate([level1, level2, level3])
        glists = np.concatenate([lists1, lists2, lists3])
        remap = self._scratch()
        remap[local] = np.arange(len(local), dtype=np.int64)
        try:
            llists = np.where(glists >= 0, remap[np.maximum(glists, 0)], -1)
        finally:
            remap[local] = -1

        # R*(j) and V_j for j in J (local rows 0..len(level1)-1); column = local number.
        rows = np.arange(len(level1))
        members = _expanded_sets(llists, rows, k1, h)
        rr, cc = np.nonzero(members >= 0)
        key = np.unique(rr * len(local) + members[rr, cc])
        rr, cc = key // len(local), key % len(local)
        vec = np.concatenate([self.xb, xq[None]])  # row n is the query
        s = np.einsum("nd,nd->n", vec[local[rr]], vec[local[cc]])
        w = np.exp(-_distance(s)).astype(np.float64)
        v = sp.csr_matrix((w, (rr, cc)), shape=(len(level1), len(local)))
        v = sp.diags(1.0 / np.asarray(v.sum(axis=1)).ravel()) @ v

        # Local query expansion: V'_p = mean of V over N(p, k2), for q and the candidates.
        at1 = np.searchsorted(level1, top0)  # every top0 entry is in level1
        ri = np.repeat(np.arange(len(level0)), k2)
        expand = sp.csr_matrix((np.full(ri.size, 1.0 / k2), (ri, at1.reshape(-1))),
                               shape=(len(level0), len(level1)))
        vqe = (expand @ v).tocsr()
        qrow = vqe[len(level0) - 1]  # level0 is sorted and n is the largest position
        crow = np.searchsorted(level0, cpos[valid])
        cvals = vqe[crow][:, qrow.indices].toarray()
        overlap = np.minimum(cvals, qrow.data[None, :]).sum(axis=1)
        jaccard = np.ones(len(cpos))
        jaccard[valid] = 1.0 - overlap / (2.0 - overlap)
        final = (1.0 - self.lambda_value) * jaccard + self.lambda_value * cdist
        return final.astype(np.float32), csim


def _ms(fn: Any, runs: int) -> list[float]:
    """Wall-clock ms of each of ``runs`` calls of ``fn()``."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def _or_nan(x: float | None) -> float:
    return float("nan") if x is None else x


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
              repeats: int = 5, dense_below: int = 4096,
              ks: tuple[int, ...] = (1, 5)) -> dict[str, Any]:
    """Time and check the re-rankers on one gallery.

    Args:
        xb: float32 [N, d] L2-normalised gallery (row i is item i).
        sku_of: the SKU of each gallery row.
        xq: float32 [Q, d] L2-normalised queries; ``truth[q]`` their correct SKUs.
        k1, k2, lambda_value: the paper's parameters; ``shortlist`` candidates per query.
        naive_queries: queries also run through the O(N^2) brute force.
        repeats: timed calls per query.
        dense_below: the new re-ranker's switch to its O(1)-in-N path (0: always that path).

    Returns:
        A JSON-able dict of timings (ms per query), agreement, sizes and recall.
    """
    n = len(xb)
    ids = np.arange(n, dtype=np.int64)
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    t0 = time.perf_counter()
    with small_batch_blas():  # the path the product's exact searches take
        D_g, graph = index.search(xb, k1 + 1)
    t_graph = time.perf_counter() - t0
    t0 = time.perf_counter()
    kr = with_k_reciprocal(NeighbourGraph(ids, graph, D_g), xb, k1).kreciprocal
    t_vectors = time.perf_counter() - t0
    assert kr is not None
    t0 = time.perf_counter()
    rr = KReciprocalReranker(ids, graph, xb, k1=k1, k2=k2, lambda_value=lambda_value,
                             vectors=kr, dense_below=dense_below)
    t_init = time.perf_counter() - t0
    legacy = LegacyKReciprocalReranker(ids, graph, xb, k1=k1, k2=k2, lambda_value=lambda_value)
    with small_batch_blas():
        D, I = index.search(xq, max(shortlist, k1))  # noqa: E741
    hits = {f"R@{k}": [0, 0] for k in ks}
    new_ms, old_ms, diff_old = [], [], 0.0
    for q in range(len(xq)):
        cands = I[q, :shortlist]
        final, _ = rr.rerank(xq[q], I[q, :k1], cands)
        before, _ = legacy.rerank(xq[q], I[q, :k1], cands)
        diff_old = max(diff_old, float(np.abs(final - before).max()))
        # Interleaved, so that load from other processes hits both alike.
        new_ms.append(_ms(lambda: rr.rerank(xq[q], I[q, :k1], cands), repeats))  # noqa: B023
        old_ms.append(_ms(lambda: legacy.rerank(xq[q], I[q, :k1], cands), repeats))  # noqa: B023
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
        "lambda": lambda_value, "shortlist": shortlist, "repeats": repeats,
        "dense_below": dense_below,
        "graph_build_s": t_graph, "precompute_s": t_vectors, "reranker_init_s": t_init,
        "vectors_nnz_per_item": len(kr.indices) / max(n, 1),
        "vectors_bytes_per_item": kr.nbytes / max(n, 1),
        # Per query: the best of ``repeats`` calls (least disturbed by other processes on a
        # shared machine) and the median of all calls.
        "ms_per_query": {
            name: {"best_median": float(np.median(np.min(v, axis=1))),
                   "best_p90": float(np.quantile(np.min(v, axis=1), 0.9)),
                   "all_median": float(np.median(v))}
            for name, v in (("new", np.array(new_ms)), ("old", np.array(old_ms)))},
        "naive_ms_per_query": {"median": float(np.median(naive_ms)) if naive_ms else None,
                               "queries": len(naive_ms)},
        "max_abs_diff_vs_old": diff_old,
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
                   help="queries also run the O(N^2) way, the exactness check (0: skip, "
                        "for galleries too large for an N x N matrix)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per query")
    p.add_argument("--dense-below", type=int, default=4096,
                   help="galleries up to this size compare the query with every item; 0 "
                        "times the path of large galleries")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.naive_queries < 0:
        p.error("--naive-queries must be >= 0")
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
                    shortlist=args.shortlist, naive_queries=args.naive_queries,
                    repeats=args.repeats, dense_below=args.dense_below)
    res["source"] = source
    res["machine"] = machine()
    res["load_average_1min"] = os.getloadavg()[0]  # other processes share the CPUs
    m = res["machine"]
    print(f"machine: {m['cpu_count']} CPUs, torch {m['torch']}, faiss {m['faiss']}, "
          f"load average {res['load_average_1min']:.1f} at the end")
    print(f"{source}: gallery {res['gallery']} x {res['dim']}, {res['queries']} queries, "
          f"k1={res['k1']} k2={res['k2']} lambda={res['lambda']}, shortlist {res['shortlist']}, "
          f"dense_below {res['dense_below']}")
    print(f"gallery graph (faiss flat, k1+1): {res['graph_build_s']:.2f} s; precomputed "
          f"k-reciprocal vectors: {res['precompute_s']:.2f} s, "
          f"{res['vectors_nnz_per_item']:.1f} nonzeros = "
          f"{res['vectors_bytes_per_item']:.0f} bytes/item; "
          f"re-ranker init {res['reranker_init_s'] * 1000:.0f} ms")
    t, naive = res["ms_per_query"], res["naive_ms_per_query"]["median"]
    print(f"ms/query, median over {res['queries']} queries of the best of {res['repeats']} "
          f"runs (p90; median of all runs):")
    for name in ("new", "old"):
        print(f"  {name}: {t[name]['best_median']:.3f} (p90 {t[name]['best_p90']:.3f}; "
              f"{t[name]['all_median']:.3f})")
    print(f"  speed-up x{t['old']['best_median'] / t['new']['best_median']:.1f}; "
          + (f"naive O(N^2) {naive:.1f} ({res['naive_ms_per_query']['queries']} queries)"
             if naive is not None else "naive O(N^2) skipped"))
    print(f"agreement  max |d*_new - d*_old| = {res['max_abs_diff_vs_old']:.2e}, "
          f"max |d*_new - d*_naive| = {_or_nan(res['max_abs_diff_vs_naive']):.2e}, "
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
