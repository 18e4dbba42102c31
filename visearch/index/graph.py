"""The gallery neighbour graph: every gallery item's top-k1 neighbours, computed offline.

Online k-reciprocal re-ranking needs the neighbour lists of the query's candidates and of
their neighbours; with this graph stored beside the index it never computes an N x N
similarity matrix. Each row includes the item itself (normally at rank 0), because
k-reciprocal sets R(p, k) contain p.

The graph also carries every item's k-reciprocal vector computed in the gallery alone
(:class:`KReciprocalVectors`, ``kreciprocal.npz``): serving corrects only the few the query
perturbs (see :mod:`visearch.search.rerank` for why that is exact). Versions written before
it existed have no such file; the re-ranker then computes the vectors when it loads.
"""

from __future__ import annotations

import logging
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from visearch import fileio
from visearch.errors import IndexFormatError
from visearch.index.blas import small_batch_blas
from visearch.index.gallery import GalleryIndex
from visearch.progress import progress_bar

if TYPE_CHECKING:
    from visearch.parallel import Runner

logger = logging.getLogger(__name__)

IDS_FILE = "neighbours_ids.npy"
I_FILE = "neighbours_I.npy"
D_FILE = "neighbours_D.npy"
KR_FILE = "kreciprocal.npz"

_CHUNK = 1024

# A dense id -> row table is used while ids are at most this many times the row count
# (ids are assigned densely by build_version); sparser ids fall back to a dict.
_DENSE_SLACK = 4


class NeighbourGraph:
    """Top-k1 neighbours of each gallery item.

    Attributes:
        ids: int64 [N], the item of each row.
        I: int64 [N, k1], neighbour item ids, most similar first (-1 padding).
        D: float32 [N, k1], their cosine similarities (descending per row).
        kreciprocal: the rows' k-reciprocal vectors (rows and columns are graph rows), or
            None (graphs saved before they existed, or built with ``kreciprocal=False``).
    """

    def __init__(
        self, ids: np.ndarray, I: np.ndarray, D: np.ndarray,  # noqa: E741
        kreciprocal: KReciprocalVectors | None = None,
    ) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if I.ndim != 2 or I.shape != D.shape or len(I) != len(ids):
            raise ValueError(
                f"graph arrays disagree: ids {ids.shape}, I {I.shape}, D {D.shape}"
            )
        if kreciprocal is not None:
            kreciprocal.check(len(ids))
        self.ids = ids
        self.I = I
        self.D = D
        self.kreciprocal = kreciprocal
        self._dense: np.ndarray | None = None
        self._map: dict[int, int] | None = None
        n = len(ids)
        if n and ids.min() >= 0 and ids.max() < _DENSE_SLACK * n + 1024:
            dense = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
            dense[ids] = np.arange(n)
            self._dense = dense
        else:
            self._map = {int(i): r for r, i in enumerate(ids.tolist())}

    @property
    def k1(self) -> int:
        """Neighbours per item."""
        return int(self.I.shape[1])

    def __len__(self) -> int:
        return int(len(self.ids))

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        """Row of each item id (int64 [n]) in O(1) per id; KeyError for unknown ids."""
        item_ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        if self._dense is not None:
            inside = (item_ids >= 0) & (item_ids < len(self._dense))
            rows = np.full(len(item_ids), -1, dtype=np.int64)
            rows[inside] = self._dense[item_ids[inside]]
        else:
            assert self._map is not None
            rows = np.fromiter((self._map.get(int(i), -1) for i in item_ids), np.int64,
                               count=len(item_ids))
        if (rows < 0).any():
            raise KeyError(f"item ids not in the neighbour graph: "
                           f"{item_ids[rows < 0][:10].tolist()}")
        return rows

    def neighbours(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(D float32 [n, k1], I int64 [n, k1])`` for item ids int64 [n]."""
        rows = self.rows(item_ids)
        return np.asarray(self.D[rows]), np.asarray(self.I[rows])

    def save(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Write ``neighbours_{ids,I,D}.npy`` (and ``kreciprocal.npz`` when the graph has
        the vectors, written atomically) into ``directory``; returns the paths."""
        out = Path(directory)
        written = []
        for name, arr in ((IDS_FILE, self.ids), (I_FILE, self.I), (D_FILE, self.D)):
            fileio.before_write(out / name)
            np.save(out / name, np.ascontiguousarray(arr))
            written.append(out / name)
        kr = self.kreciprocal
        if kr is not None:
            with fileio.atomic_open(out / KR_FILE, "wb") as f:
                np.savez(f, k1=np.int64(kr.k1), indptr=kr.indptr, indices=kr.indices,
                         weights=kr.weights)
            written.append(out / KR_FILE)
        return written

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, mmap: bool = True) -> NeighbourGraph:
        """Read a graph written by ``save`` (memory-mapped by default: rows load on use)."""
        src = Path(directory)
        try:
            mode = "r" if mmap else None
            ids = np.load(src / IDS_FILE)
            I = np.load(src / I_FILE, mmap_mode=mode)  # noqa: E741
            D = np.load(src / D_FILE, mmap_mode=mode)
        except (OSError, ValueError, EOFError) as e:
            raise IndexFormatError(f"cannot read the neighbour graph in {src}: {e}") from e
        if I.dtype != np.int64 or D.dtype != np.float32:
            raise IndexFormatError(f"{src}: neighbour graph has dtypes {I.dtype}/{D.dtype}")
        kr = None
        if (src / KR_FILE).is_file():
            try:
                with np.load(src / KR_FILE) as z:
                    kr = KReciprocalVectors(k1=int(z["k1"]), indptr=z["indptr"],
                                            indices=z["indices"], weights=z["weights"])
            except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
                raise IndexFormatError(f"cannot read {src / KR_FILE}: {e}") from e
        try:
            return cls(ids, I, D, kr)
        except ValueError as e:
            raise IndexFormatError(f"{src}: {e}") from e


def _knn_exact(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of xq against xb (rows of xb as ids), GPU when present."""
    if faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        return faiss.knn_gpu(res, xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    with small_batch_blas():
        return faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)


class _GraphSearcher:
    """The neighbour search of one graph build, shipped to a runner's workers once: the
    gallery vectors (exact search) or the gallery's whole faiss index, serialized (it is
    deserialized once per worker, on first use)."""

    def __init__(self, source: GalleryIndex | np.ndarray, ids: np.ndarray, k: int,
                 nprobe: int | None, ef_search: int | None) -> None:
        self.k, self.nprobe, self.ef_search = k, nprobe, ef_search
        self.ids = ids
        if isinstance(source, np.ndarray):
            self.xb: np.ndarray | None = source
            self.blob: np.ndarray | None = None
            self.factory = ""
        else:
            whole = source._whole
            self.xb, self.blob, self.factory = None, faiss.serialize_index(whole.index), \
                whole.factory
        self._part: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_part": None}

    def search(self, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(D float32 [b, k], I int64 [b, k]) of the query rows ``xq``."""
        if self.xb is not None:
            D, rows = _knn_exact(xq, self.xb, self.k)
            return D, np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)
        if self._part is None:
            from visearch.index.gallery import _Partition

            self._part = _Partition(faiss.deserialize_index(self.blob), self.factory)
        return self._part.search(xq, self.k, self.nprobe, self.ef_search)


def _graph_rows(xq: np.ndarray, searcher: _GraphSearcher) -> tuple[np.ndarray, np.ndarray]:
    """One shard of graph rows (a runner task)."""
    return searcher.search(xq)


def build_neighbour_graph(
    source: GalleryIndex | np.ndarray,
    ids: np.ndarray | None = None,
    k1: int = 20,
    *,
    batch_size: int = 4096,
    nprobe: int | None = None,
    ef_search: int | None = None,
    progress: bool = False,
    kreciprocal: bool = True,
    runner: Runner | None = None,
) -> NeighbourGraph:
    """Compute every gallery item's top-k1 neighbours in batches.

    Args:
        source: a ``GalleryIndex`` (neighbours found with its own search: exact for Flat,
            approximate for IVF/HNSW, which is what makes 1M-item galleries feasible on CPU)
            or float32 [N, d] L2-normalised vectors (exact brute force, on GPU when faiss
            sees one).
        ids: int64 [N] item ids of the vectors; with an index, None means all its items.
        k1: neighbours per item, the item itself included.
        batch_size: queries per faiss call (bounds memory to batch_size x N similarities
            for brute force).
        nprobe, ef_search: search-time options when ``source`` is an IVF/HNSW index.
        progress: show a tqdm bar (for CLIs).
        kreciprocal: also compute every item's k-reciprocal vector for re-ranking with
            ``k1 - 1`` (the row holds the item itself), see ``with_k_reciprocal``.
        runner: run the batches on ``visearch.parallel`` workers (a ``LocalRunner`` pool
            or Ray Data); None searches here. Every runner searches the same batches with
            the same index, so the graph does not depend on it. Not for a Milvus gallery
            (its graph is built through faiss, see ``build_version``).

    Returns:
        The graph; rows in the order of ``ids``.
    """
    if k1 < 1:
        raise ValueError(f"k1 must be >= 1, got {k1}")
    for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    t0 = time.perf_counter()
    if not isinstance(source, np.ndarray):  # a gallery index of either backend
        ids = source.ids if ids is None else np.asarray(ids, dtype=np.int64)
        xb = None
        n = len(ids)
    else:
        xb = np.ascontiguousarray(source, dtype=np.float32)
        if xb.ndim != 2:
            raise ValueError(f"vectors must be [N, d], got shape {xb.shape}")
        if ids is None:
            raise ValueError("ids are required with raw vectors")
        ids = np.asarray(ids, dtype=np.int64)
        n = len(xb)
        if len(ids) != n:
            raise ValueError(f"{len(ids)} ids for {n} vectors")
    I_out = np.full((n, k1), -1, dtype=np.int64)
    D_out = np.full((n, k1), np.finfo(np.float32).min, dtype=np.float32)
    kk = min(k1, n) if xb is not None else k1
    if runner is not None:
        if not isinstance(source, np.ndarray | GalleryIndex):
            raise TypeError("a runner computes the graph of faiss galleries or raw vectors")
        searcher = _GraphSearcher(xb if xb is not None else source, ids, kk if xb is not None
                                  else k1, nprobe, ef_search)
        starts = list(range(0, n, batch_size))
        tasks = [xb[s : s + batch_size] if xb is not None
                 else source.reconstruct(ids[s : s + batch_size]) for s in starts]
        for start, (D, I) in zip(starts, runner.map(_graph_rows, tasks, shared=searcher),  # noqa: E741
                                 strict=True):
            I_out[start : start + len(I), : I.shape[1]] = I
            D_out[start : start + len(D), : D.shape[1]] = D
        n_done = n  # all rows computed by the runner
    else:
        n_done = 0
    bar = progress_bar(total=n, desc="neighbour graph", unit="item", disable=not progress)
    bar.update(n_done)
    for start in range(n_done, n, batch_size):
        stop = min(n, start + batch_size)
        if xb is None:
            assert not isinstance(source, np.ndarray)
            xq = source.reconstruct(ids[start:stop])
            D, I = source.search(xq, k1, nprobe=nprobe, ef_search=ef_search)  # noqa: E741
        else:
            D, rows = _knn_exact(xb[start:stop], xb, kk)
            I = np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)  # noqa: E741
        I_out[start:stop, : I.shape[1]] = I
        D_out[start:stop, : D.shape[1]] = D
        bar.update(stop - start)
    bar.close()
    logger.info("neighbour graph: %d items x k1=%d in %.1f s", n, k1, time.perf_counter() - t0)
    graph = NeighbourGraph(ids, I_out, D_out)
    if kreciprocal and k1 >= 2 and n:
        graph = with_k_reciprocal(graph, xb if xb is not None else source.reconstruct(ids))
    return graph


def with_k_reciprocal(
    graph: NeighbourGraph, xb: np.ndarray, k1: int | None = None
) -> NeighbourGraph:
    """The graph with its k-reciprocal vectors (``NeighbourGraph.kreciprocal``) computed.

    Args:
        graph: the neighbour graph.
        xb: float32 [N, d] L2-normalised vectors of the graph's rows (in ``graph.ids``
            order), the same the re-ranker will use (e.g. the index's ``reconstruct``).
        k1: the re-ranking k1; None means ``graph.k1 - 1`` (rows hold the item itself).
    """
    t0 = time.perf_counter()
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    lists, _ = self_first_lists(graph.ids, np.asarray(graph.I), xb)
    k1 = min(graph.k1 - 1 if k1 is None else k1, lists.shape[1] - 1)
    if k1 < 1:
        raise ValueError(f"a graph of {graph.k1} neighbours per row cannot give k1 >= 1")
    kr = compute_k_reciprocal_vectors(lists, xb, k1)
    logger.info("k-reciprocal vectors: %d items, k1=%d, %.1f nonzeros/item, %.1f MB in %.2f s",
                len(graph), k1, len(kr.indices) / max(len(graph), 1), kr.nbytes / 1e6,
                time.perf_counter() - t0)
    return NeighbourGraph(graph.ids, graph.I, graph.D, kr)


def update_neighbour_graph(
    graph: NeighbourGraph,
    index: GalleryIndex,
    *,
    added_ids: np.ndarray,
    removed_ids: np.ndarray,
    batch_size: int = 4096,
    nprobe: int | None = None,
    ef_search: int | None = None,
    progress: bool = False,
) -> NeighbourGraph:
    """The graph of ``index`` after items were added to and removed from it, without an
    N x N recomputation.

    ``index`` is the updated index. Rows of removed items are dropped; rows that listed a
    removed item are searched again; new items are searched; every other row is merged
    with its similarities to the new items (a [N, n_added] product). With a Flat index the
    result equals ``build_neighbour_graph`` on the new gallery (up to ties). ``nprobe`` and
    ``ef_search`` apply to the rows searched again, as in ``build_neighbour_graph``.
    """
    added_ids = np.asarray(added_ids, dtype=np.int64)
    removed_ids = np.asarray(removed_ids, dtype=np.int64)
    k1 = graph.k1
    keep = ~np.isin(graph.ids, removed_ids)
    ids = graph.ids[keep]
    I = np.array(graph.I[keep])  # noqa: E741
    D = np.array(graph.D[keep])
    stale = np.isin(I, removed_ids).any(axis=1)
    if len(added_ids):
        xa = index.reconstruct(added_ids)
        fresh = np.flatnonzero(~stale)
        for start in range(0, len(fresh), batch_size):
            rows = fresh[start : start + batch_size]
            S = index.reconstruct(ids[rows]) @ xa.T  # [b, n_added]
            cand_D = np.concatenate([D[rows], S.astype(np.float32)], axis=1)
            cand_I = np.concatenate([I[rows], np.broadcast_to(added_ids, S.shape)], axis=1)
            top = np.argsort(-cand_D, axis=1, kind="stable")[:, :k1]
            D[rows] = np.take_along_axis(cand_D, top, axis=1)
            I[rows] = np.take_along_axis(cand_I, top, axis=1)
    redo = np.concatenate([ids[stale], added_ids])
    if len(redo):
        sub = build_neighbour_graph(index, redo, k1, batch_size=batch_size, nprobe=nprobe,
                                    ef_search=ef_search, progress=progress, kreciprocal=False)
        ids = np.concatenate([ids[~stale], redo])
        I = np.concatenate([I[~stale], sub.I])  # noqa: E741
        D = np.concatenate([D[~stale], sub.D])
    logger.info(
        "neighbour graph updated: %d removed, %d added, %d rows searched again",
        int((~keep).sum()), len(added_ids), int(stale.sum()),
    )
    out = NeighbourGraph(ids, I, D)
    if graph.kreciprocal is not None and len(ids):
        # One new item perturbs the sets of items hops away: recompute all (O(N), cheap
        # next to the searches above).
        out = with_k_reciprocal(out, index.reconstruct(ids), graph.kreciprocal.k1)
    return out


# --------------------------------------------------------------------------------------
# precomputed k-reciprocal vectors (Zhong et al., CVPR 2017), for online re-ranking
# --------------------------------------------------------------------------------------


def half_k(k1: int) -> int:
    """``round(k1 / 2)``, the expansion step's k (the reference's ``np.around``: half to
    even)."""
    return int(np.around(k1 / 2.0))


def self_first_lists(
    ids: np.ndarray, neighbours: np.ndarray, xb: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's neighbour list as row numbers, re-sorted by exact similarity, row first.

    Args:
        ids: int64 [N] item ids of the rows (any order, unique).
        neighbours: int64 [N, K] neighbour item ids per row (``-1`` padding; the row's own
            id may or may not be included; ids outside ``ids`` count as padding).
        xb: float32 [N, d] L2-normalised vectors of the rows.

    Returns:
        ``(lists int64 [N, W], sims float32 [N, W])``: ``lists[i, 0] == i`` (similarity
        ``+inf``), then the other neighbours' row numbers by descending cosine similarity
        (recomputed from ``xb``: the graph may come from an approximate index), ``-1`` /
        ``-inf`` padding; ``W - 1`` is the longest row's neighbour count.
    """
    ids = np.asarray(ids, np.int64)
    neighbours = np.asarray(neighbours, np.int64)
    n = len(ids)
    rows = np.arange(n)
    order = np.argsort(ids, kind="stable")
    flat = neighbours.reshape(-1)
    at = np.searchsorted(ids, flat, sorter=order)
    pos = order[np.minimum(at, max(n - 1, 0))] if n else np.zeros_like(flat)
    pos = np.where((ids[pos] == flat) if n else False, pos, -1).reshape(neighbours.shape)
    valid = (pos >= 0) & (pos != rows[:, None])
    sims = np.empty(pos.shape, np.float32)
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, lo + _CHUNK)
        sims[sl] = np.einsum("nd,nkd->nk", xb[sl], xb[np.maximum(pos[sl], 0)])
    order2 = np.argsort(np.where(valid, -sims, np.inf), axis=1, kind="stable")
    pos = np.take_along_axis(np.where(valid, pos, -1), order2, axis=1)
    sims = np.take_along_axis(np.where(valid, sims, -np.inf), order2, axis=1)
    keep = 1 + int((pos >= 0).any(axis=0).sum()) if n else 1  # drop all-padding columns
    lists = np.concatenate([rows[:, None], pos], axis=1)[:, :keep]
    sims = np.concatenate([np.full((n, 1), np.inf, np.float32), sims], axis=1)[:, :keep]
    return lists, sims.astype(np.float32)


def reciprocal_mask(lists: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """bool [len(rows), k + 1]: which of ``lists[rows, :k+1]`` are k-reciprocal to the row,
    i.e. ``R(row, k) = {g in N(row, k+1) : row in N(g, k+1)}``.

    ``lists`` (int64 [M, >= k+1]) holds row numbers, self first, ``-1`` padding (which can
    never equal a row, so membership tests stay exact).
    """
    forward = lists[rows, : k + 1]
    backward = lists[np.maximum(forward, 0), : k + 1]
    mask = (backward == np.asarray(rows)[:, None, None]).any(axis=2)
    return mask & (forward >= 0)


def reciprocal_masks(
    lists: np.ndarray, k1: int, *, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """``(mask1 bool [N, k1+1], maskh bool [N, h+1])``: ``reciprocal_mask`` of every row for
    ``k1`` and for ``h = half_k(k1)``, in chunks of rows."""
    n, h = len(lists), half_k(k1)
    mask1 = np.zeros((n, k1 + 1), bool)
    maskh = np.zeros((n, h + 1), bool)
    for lo in range(0, n, chunk):
        sl = np.arange(lo, min(n, lo + chunk))
        mask1[sl] = reciprocal_mask(lists, sl, k1)
        maskh[sl] = reciprocal_mask(lists, sl, h)
    return mask1, maskh


@dataclass(frozen=True)
class KReciprocalVectors:
    """Every gallery item's unnormalised k-reciprocal vector, in the gallery alone.

    Row ``j`` holds ``exp(-d(j, x))`` for ``x`` in ``R*(j)`` (the k1-reciprocal set with
    its round(k1/2)-expansion), ``d = (1 - cosine) / 2`` in [0, 1], ``d(j, j) = 0``;
    ``V_j`` is the row divided by its sum. Rows and columns are graph rows.

    Attributes:
        k1: the k1 the sets were computed with (lists of ``k1 + 1`` entries, self first).
        indptr: int64 [N + 1], CSR row pointers.
        indices: int32 [nnz], column (graph row) numbers, ascending within a row.
        weights: float32 [nnz], ``exp(-d)``.
    """

    k1: int
    indptr: np.ndarray
    indices: np.ndarray
    weights: np.ndarray

    def __len__(self) -> int:
        return int(len(self.indptr) - 1)

    @property
    def nbytes(self) -> int:
        """Bytes of the three arrays."""
        return int(self.indptr.nbytes + self.indices.nbytes + self.weights.nbytes)

    def check(self, n: int) -> None:
        """Raise ``ValueError`` unless the arrays form an [n, n] CSR matrix as documented."""
        ip, ix, w = self.indptr, self.indices, self.weights
        if self.k1 < 1:
            raise ValueError(f"k-reciprocal vectors: k1 must be >= 1, got {self.k1}")
        if ip.dtype != np.int64 or ix.dtype != np.int32 or w.dtype != np.float32:
            raise ValueError(f"k-reciprocal vectors have dtypes {ip.dtype}/{ix.dtype}/{w.dtype}")
        if ip.shape != (n + 1,) or ix.shape != w.shape or ip[0] != 0 or ip[-1] != len(ix):
            raise ValueError(f"k-reciprocal vectors: indptr {ip.shape} / {len(ix)} entries "
                             f"do not make {n} rows")
        if (np.diff(ip) < 1).any() or (len(ix) and (ix.min() < 0 or ix.max() >= n)):
            raise ValueError("k-reciprocal vectors: an empty row or a column out of range")
        if not np.isfinite(w).all() or (w <= 0).any():
            raise ValueError("k-reciprocal vectors: weights must be finite and > 0")


def expanded_sets(
    lists: np.ndarray, rows: np.ndarray, k1: int, mask1: np.ndarray, maskh: np.ndarray
) -> np.ndarray:
    """int64 [len(rows), (k1+1)(h+2)]: ``R*(row)`` members (row numbers, ``-1`` padding,
    repeats), from the reciprocal masks of every row (``mask1`` bool [M, k1+1],
    ``maskh`` bool [M, h+1]).

    Membership of ``R(c, h)`` in ``R(row, k1)`` by a broadcast comparison
    ([rows, k1+1, h+1, k1+1]): memory linear in ``rows``, so it runs over any N in chunks.
    """
    h = maskh.shape[1] - 1
    r1 = np.where(mask1[rows], lists[rows, : k1 + 1], -1)
    c = np.maximum(r1, 0)
    rch = np.where(maskh[c] & (r1 >= 0)[..., None], lists[c, : h + 1], -1)
    inside = ((rch[..., None] == r1[:, None, None, :]).any(-1)) & (rch >= 0)
    size = (rch >= 0).sum(-1)
    accept = (r1 >= 0) & (inside.sum(-1) > 2.0 / 3.0 * size)
    expansion = np.where(accept[..., None], rch, -1).reshape(len(rows), -1)
    return np.concatenate([r1, expansion], axis=1)


def exp_weights(sim: np.ndarray) -> np.ndarray:
    """float32 ``exp(-d)`` with ``d = clip((1 - sim) / 2, 0, 1)`` computed in float32 as the
    brute force does."""
    d = np.clip((1.0 - sim.astype(np.float32)) * np.float32(0.5), 0.0, 1.0)
    return np.exp(-d).astype(np.float32)


def compute_k_reciprocal_vectors(
    lists: np.ndarray, xb: np.ndarray, k1: int, *, rows: np.ndarray | None = None,
    chunk: int = 1024, masks: tuple[np.ndarray, np.ndarray] | None = None,
) -> KReciprocalVectors:
    """The gallery's k-reciprocal vectors from its self-first lists (``self_first_lists``).

    Args:
        lists: int64 [N, >= k1+1] row numbers, self first, ``-1`` padding.
        xb: float32 [N, d] L2-normalised vectors of the rows.
        k1: the paper's k1 (the expansion uses ``half_k(k1)``).
        rows: compute only these rows (int64 [r]; the result then has ``r`` rows, columns
            still graph rows); all rows when None.
        chunk: rows per vectorised step (memory ~ chunk * k1^2 * h).
        masks: ``reciprocal_masks(lists, k1)`` when the caller has them already.

    Returns:
        The vectors; cost O(N k1^2 h) plus one d-dimensional dot product per nonzero.
    """
    n = len(lists)
    if lists.shape[1] < k1 + 1:
        raise ValueError(f"lists of {lists.shape[1]} entries cannot give k1={k1}")
    every = np.arange(n)
    rows = every if rows is None else np.asarray(rows, np.int64)
    mask1, maskh = reciprocal_masks(lists, k1, chunk=chunk) if masks is None else masks
    counts, cols, weights = [], [], []
    for lo in range(0, len(rows), chunk):
        sl = rows[lo : lo + chunk]
        m = np.sort(expanded_sets(lists, sl, k1, mask1, maskh), axis=1)
        m[:, 1:][m[:, 1:] == m[:, :-1]] = -1  # repeats (sorted, so adjacent) -> padding
        rr, cc = np.nonzero(m >= 0)
        g = m[rr, cc]
        sim = np.einsum("nd,nd->n", xb[sl[rr]], xb[g])
        sim[g == sl[rr]] = 1.0  # d(j, j) = 0 exactly, as in the brute force
        counts.append(np.bincount(rr, minlength=len(sl)))
        cols.append(g)
        weights.append(exp_weights(sim))
    indptr = np.zeros(len(rows) + 1, np.int64)
    if counts:
        np.cumsum(np.concatenate(counts), out=indptr[1:])
    indices = np.concatenate(cols).astype(np.int32) if cols else np.zeros(0, np.int32)
    w = np.concatenate(weights) if weights else np.zeros(0, np.float32)
    return KReciprocalVectors(k1=int(k1), indptr=indptr, indices=indices, weights=w)
