"""The gallery neighbour graph: every gallery item's top-k1 neighbours, computed offline.

Online k-reciprocal re-ranking needs the neighbour lists of the query's candidates and of
their neighbours; with this graph stored beside the index it never computes an N x N
similarity matrix. Each row includes the item itself (normally at rank 0), because
k-reciprocal sets R(p, k) contain p.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from visearch import fileio
from visearch.errors import IndexFormatError
from visearch.index.blas import small_batch_blas
from visearch.index.gallery import GalleryIndex

logger = logging.getLogger(__name__)

IDS_FILE = "neighbours_ids.npy"
I_FILE = "neighbours_I.npy"
D_FILE = "neighbours_D.npy"

# A dense id -> row table is used while ids are at most this many times the row count
# (ids are assigned densely by build_version); sparser ids fall back to a dict.
_DENSE_SLACK = 4


class NeighbourGraph:
    """Top-k1 neighbours of each gallery item.

    Attributes:
        ids: int64 [N], the item of each row.
        I: int64 [N, k1], neighbour item ids, most similar first (-1 padding).
        D: float32 [N, k1], their cosine similarities (descending per row).
    """

    def __init__(self, ids: np.ndarray, I: np.ndarray, D: np.ndarray) -> None:  # noqa: E741
        ids = np.asarray(ids, dtype=np.int64)
        if I.ndim != 2 or I.shape != D.shape or len(I) != len(ids):
            raise ValueError(
                f"graph arrays disagree: ids {ids.shape}, I {I.shape}, D {D.shape}"
            )
        self.ids = ids
        self.I = I
        self.D = D
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
        """Write ``neighbours_{ids,I,D}.npy`` into ``directory``; returns the paths."""
        out = Path(directory)
        written = []
        for name, arr in ((IDS_FILE, self.ids), (I_FILE, self.I), (D_FILE, self.D)):
            fileio.before_write(out / name)
            np.save(out / name, np.ascontiguousarray(arr))
            written.append(out / name)
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
        try:
            return cls(ids, I, D)
        except ValueError as e:
            raise IndexFormatError(f"{src}: {e}") from e


def _knn_exact(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of xq against xb (rows of xb as ids), GPU when present."""
    if faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        return faiss.knn_gpu(res, xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    with small_batch_blas():
        return faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)


def build_neighbour_graph(
    source: GalleryIndex | np.ndarray,
    ids: np.ndarray | None = None,
    k1: int = 20,
    *,
    batch_size: int = 4096,
    nprobe: int | None = None,
    ef_search: int | None = None,
    progress: bool = False,
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

    Returns:
        The graph; rows in the order of ``ids``.
    """
    if k1 < 1:
        raise ValueError(f"k1 must be >= 1, got {k1}")
    for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    t0 = time.perf_counter()
    if isinstance(source, GalleryIndex):
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
    bar = tqdm(total=n, desc="neighbour graph", unit="item", disable=not progress)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        if xb is None:
            assert isinstance(source, GalleryIndex)
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
    return NeighbourGraph(ids, I_out, D_out)


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
                                    ef_search=ef_search, progress=progress)
        ids = np.concatenate([ids[~stale], redo])
        I = np.concatenate([I[~stale], sub.I])  # noqa: E741
        D = np.concatenate([D[~stale], sub.D])
    logger.info(
        "neighbour graph updated: %d removed, %d added, %d rows searched again",
        int((~keep).sum()), len(added_ids), int(stale.sum()),
    )
    return NeighbourGraph(ids, I, D)
