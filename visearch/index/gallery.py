"""GalleryIndex: FAISS inner-product search over L2-normalised gallery vectors, per category.

One FAISS index holds the whole gallery and one more per category partition, so a query can
be searched across all categories or, after category prediction, within that category
alone (fewer look-alikes of other categories to outrank the right item). Similarities are
inner products of L2-normalised float32 vectors, i.e. cosine similarities in [-1, 1].

Ids are stable int64 item ids, so items are added and removed without a rebuild:

- ``Flat`` and ``HNSW`` indexes are wrapped in ``IndexIDMap2`` (ids, plus reconstruct by id).
  HNSW cannot delete from its graph, so removing from an HNSW partition rebuilds that
  partition from its remaining vectors (exact: HNSW,Flat stores them).
- IVF indexes keep the ids in their inverted lists natively, with a hashtable direct map for
  reconstruct and remove. They are *not* wrapped in ``IndexIDMap2``: ``IndexIDMap2`` assumes
  its sub-index renumbers on removal, which IVF does not, and it then returns wrong ids.

The index type follows the gallery size through ``faiss.index_factory`` (see
``choose_factory``) unless a factory string is forced. When faiss sees a GPU, search runs on
a GPU copy (HNSW stays on CPU: faiss has no GPU HNSW); the CPU index stays the master copy
for add, remove, reconstruct and save.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from visearch import fileio
from visearch.errors import IndexFormatError
from visearch.index.blas import small_batch_blas

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "gallery.json"
IDS_FILE = "gallery_ids.npy"
CATS_FILE = "gallery_categories.npy"
WHOLE_FILE = "whole.faiss"

# Below this many vectors exact search is fast enough (a few ms per query on CPU).
FLAT_MAX = 50_000
# Up to here IVF-Flat fits in memory comfortably (2 GB at d=256); above it, compress.
IVF_FLAT_MAX = 2_000_000
# Up to here compress with 8-bit scalar quantisation (d bytes per vector: 5 GB at 20M, d=256),
# which kept Recall@10 at 0.98 where PQ with d/4 bytes reached 0.71-0.81 at the same speed
# (benchmarks/RESULTS.md, Index); above it, PQ's d/4 bytes per vector.
IVF_SQ8_MAX = 20_000_000

DEFAULT_EF_SEARCH = 64
#: IVF coarse k-means trains on at most this many sampled points per list
IVF_TRAIN_POINTS_PER_LIST = 64

# faiss pads missing results with this similarity (and id -1) for inner-product indexes.
PAD_SIMILARITY = float(np.finfo(np.float32).min)


def default_nlist(n: int) -> int:
    """IVF list count for ``n`` vectors: a power of two near 4 sqrt(n), >= 39 points per list.

    faiss's guidance: nlist between 4 sqrt(n) and 16 sqrt(n), and at least 39 training
    points per centroid for k-means to be meaningful.
    """
    if n < 39:
        return 1
    target = min(4.0 * math.sqrt(n), n / 39.0)
    return max(1, 2 ** int(math.floor(math.log2(max(target, 1.0)))))


def default_nprobe(nlist: int) -> int:
    """Lists probed at search time when the caller does not say: nlist/16, within [8, 256]."""
    return int(min(nlist, max(8, min(256, nlist // 16))))


def choose_factory(n: int, d: int) -> str:
    """The ``faiss.index_factory`` string for a gallery of ``n`` vectors of dimension ``d``.

    ``Flat`` (exact) below ``FLAT_MAX``; ``IVF{nlist},Flat`` up to ``IVF_FLAT_MAX``;
    ``IVF{nlist},SQ8`` (one byte per dimension) up to ``IVF_SQ8_MAX``;
    ``IVF{nlist},PQ{m}np`` (m = d/4 bytes per vector; ``np``: no polysemous training,
    which only serves Hamming-filtered search and costs minutes of training) above.
    """
    if n < FLAT_MAX:
        return "Flat"
    nlist = default_nlist(n)
    if n < IVF_FLAT_MAX:
        return f"IVF{nlist},Flat"
    if n < IVF_SQ8_MAX:
        return f"IVF{nlist},SQ8"
    m = next(m for m in (d // 4, d // 8, d // 16, 1) if m >= 1 and d % m == 0)
    return f"IVF{nlist},PQ{m}np"


def _as_vectors(x: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array [n, d], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{what} must be floating point (float32), got {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise IndexFormatError(
            f"{what} have dimension {x.shape[1]} but the index has dimension {dim}: "
            "embed with the model this index was built with, or build a new index"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_normalised(x: np.ndarray, what: str) -> None:
    if len(x) == 0:
        return
    norms = np.linalg.norm(x, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > 1e-3)
    if len(bad):
        raise ValueError(
            f"{what} must be L2-normalised (row {bad[0]} has norm {norms[bad[0]]:.4f}); "
            "normalise with faiss.normalize_L2 or use the embedder's output as is"
        )


def _as_ids(ids: np.ndarray, n: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) != n:
        raise ValueError(f"ids must be a 1-D array of {n} item ids, got shape {ids.shape}")
    if len(ids) and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids must be integers (int64), got {ids.dtype}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if len(ids) and ids.min() < 0:
        raise ValueError("ids must be >= 0 (-1 is the padding id of search results)")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids must be unique")
    return ids


def _nlist_of(factory: str) -> int | None:
    ivf = [p for p in factory.split(",") if p.startswith("IVF")]
    if not ivf:
        return None
    digits = "".join(ch for ch in ivf[0][3:] if ch.isdigit())
    return int(digits) if digits else None


def _ivf_of(index: faiss.Index) -> faiss.Index | None:
    """The (downcast) IndexIVF inside ``index``, or None."""
    try:
        return faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return None


class _Partition:
    """One FAISS index with int64 ids: the whole gallery or one category's share of it."""

    def __init__(self, index: faiss.Index, factory: str) -> None:
        self.index = index
        self.factory = factory
        self._gpu: faiss.Index | None = None
        try:
            self.ivf = faiss.extract_index_ivf(index)
        except RuntimeError:
            self.ivf = None
        if self.ivf is None and not isinstance(index, faiss.IndexIDMap2):
            raise IndexFormatError(
                f"unsupported index layout {type(index).__name__}: expected IndexIDMap2 or IVF"
            )

    @classmethod
    def create(cls, factory: str, d: int, xtrain: np.ndarray, *, fallback: bool,
               sq_by_residual: bool = False) -> _Partition:
        """An empty, trained partition. With ``fallback``, a factory that cannot be trained
        on ``xtrain`` (too few points for its lists or codebooks) falls back to ``Flat``.
        ``sq_by_residual``: IVF-SQ codes quantise the vectors' residuals to their list
        centroid (faiss's default) instead of the vectors themselves (see ``build``)."""
        try:
            base = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"bad faiss factory string {factory!r}: {e}") from e
        # Polysemous training only serves Hamming-filtered PQ search, which is never used
        # here, and costs most of PQ training time (10-20x, measured): always off.
        for obj in (faiss.downcast_index(base), _ivf_of(base)):
            if obj is not None and hasattr(obj, "do_polysemous_training"):
                obj.do_polysemous_training = False
        coarse = _ivf_of(base)
        if isinstance(coarse, faiss.IndexIVFScalarQuantizer):
            # Quantise the vectors, not their residuals to the list centroid: the residual
            # range is learnt from the training set, so items added later that sit far from
            # it (a new category) were clipped. Measured on 100k vectors trained on half
            # the data: Recall@10 on the other half 0.88 -> 0.96 (0.75 -> 0.92 on harder
            # data), for 0.007 less in-distribution (benchmarks/RESULTS.md, Index).
            coarse.by_residual = sq_by_residual
        if coarse is not None:
            # k-means on a sample: faiss's default (256 points per list) trains IVF4096 on
            # 1M points, half an hour on one core; 64 per list is well above faiss's 39.
            coarse.cp.max_points_per_centroid = IVF_TRAIN_POINTS_PER_LIST
        if not base.is_trained:
            nlist = _nlist_of(factory)
            too_few = nlist is not None and len(xtrain) < nlist
            try:
                if too_few:
                    raise RuntimeError(f"{len(xtrain)} training points for {nlist} lists")
                with small_batch_blas():
                    base.train(xtrain)
            except RuntimeError as e:
                if not fallback:
                    raise ValueError(
                        f"cannot train {factory!r} on {len(xtrain)} vectors: {e}"
                    ) from e
                logger.warning(
                    "partition of %d vectors cannot train %r (%s); using Flat",
                    len(xtrain), factory, str(e).splitlines()[-1][:120],
                )
                return cls.create("Flat", d, xtrain, fallback=False)
        try:
            ivf = faiss.extract_index_ivf(base)
        except RuntimeError:
            ivf = None
        if ivf is not None:
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
            ivf.nprobe = default_nprobe(ivf.nlist)
            return cls(base, factory)
        hnsw = getattr(faiss.downcast_index(base), "hnsw", None)
        if hnsw is not None:
            hnsw.efSearch = DEFAULT_EF_SEARCH
        return cls(faiss.IndexIDMap2(base), factory)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_hnsw(self) -> bool:
        return self.ivf is None and hasattr(faiss.downcast_index(self.index.index), "hnsw")

    def add(self, xb: np.ndarray, ids: np.ndarray) -> None:
        self._gpu = None
        if len(ids):
            with small_batch_blas():  # IVF list assignment is an exact search
                self.index.add_with_ids(xb, ids)

    def remove(self, ids: np.ndarray, keep_ids: np.ndarray) -> int:
        """Remove ``ids``; ``keep_ids`` (the partition's ids after removal) lets an index that
        cannot delete (HNSW) be rebuilt from its remaining vectors."""
        self._gpu = None
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return 0
        if self.ivf is not None:
            # The hashtable direct map only supports removal through IDSelectorArray.
            return int(self.index.remove_ids(faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))))
        if not self.is_hnsw:
            return int(self.index.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))))
        before = self.ntotal
        keep_ids = np.ascontiguousarray(keep_ids, dtype=np.int64)
        xkeep = self.reconstruct(keep_ids)
        logger.info("HNSW partition cannot delete: rebuilding it from %d vectors", len(keep_ids))
        # not IVF (IVF deletes in place), so no IVF-SQ encoding to carry over
        fresh = _Partition.create(self.factory, self.index.d, xkeep, fallback=False)
        fresh.add(xkeep, keep_ids)
        self.index = fresh.index
        return before - self.ntotal

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.zeros((0, self.index.d), dtype=np.float32)
        return self.index.reconstruct_batch(ids)

    def _search_index(self) -> faiss.Index:
        if self._gpu is None and faiss.get_num_gpus() > 0 and not self.is_hnsw:
            try:
                self._gpu = faiss.index_cpu_to_all_gpus(self.index)
            except RuntimeError as e:  # an index type without a GPU version
                logger.warning("cannot move %r to GPU, searching on CPU: %s", self.factory, e)
                self._gpu = self.index
        return self._gpu if self._gpu is not None else self.index

    def search(
        self, xq: np.ndarray, k: int, nprobe: int | None, ef_search: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        params = None
        if self.ivf is not None and nprobe is not None:
            params = faiss.SearchParametersIVF(nprobe=int(nprobe))
        elif self.is_hnsw and ef_search is not None:
            params = faiss.SearchParametersHNSW(efSearch=int(ef_search))
        index = self._search_index()
        with small_batch_blas():
            try:
                if params is None:
                    return index.search(xq, k)
                return index.search(xq, k, params=params)
            except RuntimeError:
                if index is self.index:
                    raise
                # What a GPU index refuses (k > 2048, per-call parameters on some
                # versions), the CPU master copy answers.
                logger.debug("GPU search failed, answering on CPU", exc_info=True)
                return self.index.search(xq, k, params=params)


class GalleryIndex:
    """Cosine-similarity search over the gallery, whole or restricted to one category.

    Build with ``GalleryIndex.build`` or ``GalleryIndex.load``; not thread-safe for
    concurrent ``add``/``remove``; concurrent ``search`` calls are fine (faiss searches
    are read-only and per-call parameters are passed as ``SearchParameters``).
    """

    def __init__(
        self,
        dim: int,
        whole: _Partition,
        parts: dict[str, _Partition],
        ids: np.ndarray,
        categories_of_ids: np.ndarray,
        category_names: list[str],
        factory: str | None,
        partitioned: bool = True,
        sq_by_residual: bool = False,
    ) -> None:
        self._dim = int(dim)
        self.partitioned = partitioned
        self.sq_by_residual = sq_by_residual
        self._whole = whole
        self._parts = parts
        self._ids = ids
        self._codes = categories_of_ids
        self._names = category_names
        self.factory = factory
        self._order: np.ndarray | None = None  # argsort of _ids, cached for id -> row

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        xb: np.ndarray,
        ids: np.ndarray,
        categories: Sequence[str],
        *,
        factory: str | None = None,
        partitioned: bool = True,
        sq_by_residual: bool = False,
    ) -> GalleryIndex:
        """Build the index of a gallery.

        Args:
            xb: float32 [N, d], L2-normalised gallery vectors.
            ids: int64 [N], unique item ids (>= 0).
            categories: N category names, one per vector.
            factory: a ``faiss.index_factory`` string forced for the whole index and every
                partition (partitions too small to train it fall back to ``Flat``); None
                chooses by size with ``choose_factory``. IVF and PQ are trained on the
                gallery itself.
            partitioned: also build one index per category (for ``search(category=...)``);
                False builds only the whole index (half the memory, e.g. for benchmarks).
            sq_by_residual: IVF-SQ indexes quantise each vector's residual to its list
                centroid (faiss's default) instead of the vector itself (the default here:
                items added later, far from the training set, are not clipped). Also used
                for the partitions that ``add`` creates. Other index types ignore it.

        Returns:
            The index; ``.ntotal == N``.
        """
        xb = _as_vectors(xb, None, "gallery vectors")
        n, d = xb.shape
        if n == 0:
            raise ValueError("cannot build an index of an empty gallery")
        _check_normalised(xb, "gallery vectors")
        ids = _as_ids(ids, n)
        cats = [str(c) for c in categories]
        if len(cats) != n:
            raise ValueError(f"got {len(cats)} categories for {n} vectors")
        names = sorted(set(cats))
        code_of = {c: i for i, c in enumerate(names)}
        codes = np.fromiter((code_of[c] for c in cats), dtype=np.int32, count=n)

        whole = _Partition.create(factory or choose_factory(n, d), d, xb, fallback=False,
                                  sq_by_residual=sq_by_residual)
        whole.add(xb, ids)
        parts: dict[str, _Partition] = {}
        for code, name in enumerate(names if partitioned else []):
            mask = codes == code
            xc = np.ascontiguousarray(xb[mask])
            part = _Partition.create(factory or choose_factory(len(xc), d), d, xc, fallback=True,
                                     sq_by_residual=sq_by_residual)
            part.add(xc, ids[mask])
            parts[name] = part
        logger.info(
            "built gallery index: %d vectors, d=%d, %s, %d categories",
            n, d, whole.factory, len(parts),
        )
        return cls(d, whole, parts, ids, codes, names, factory, partitioned, sq_by_residual)

    # -- properties -------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Embedding dimension d."""
        return self._dim

    @property
    def ntotal(self) -> int:
        """Number of gallery vectors."""
        return int(len(self._ids))

    @property
    def categories(self) -> list[str]:
        """Sorted category names seen by the index (a partition may have been emptied)."""
        return sorted(self._names)

    @property
    def ids(self) -> np.ndarray:
        """int64 [N]: the gallery's item ids (a copy; order unspecified but stable)."""
        return self._ids.copy()

    @property
    def factories(self) -> dict[str, str]:
        """The factory string actually used by each partition (key ``""`` is the whole)."""
        out = {"": self._whole.factory}
        out.update({name: p.factory for name, p in self._parts.items()})
        return out

    def nbytes(self) -> int:
        """Serialized size in bytes of all its faiss indexes (whole + partitions): the
        memory they hold, give or take allocator overhead. Serializes: costs a copy."""
        parts = [self._whole, *self._parts.values()]
        return int(sum(faiss.serialize_index(p.index).nbytes for p in parts))

    def counts(self) -> dict[str, int]:
        """Vectors per category."""
        counts = np.bincount(self._codes, minlength=len(self._names))
        return {name: int(counts[i]) for i, name in sorted(enumerate(self._names),
                                                            key=lambda t: t[1])}

    def categories_of(self, ids: np.ndarray) -> list[str]:
        """Category of each of ``ids`` (int64 [n]); raises KeyError for an unknown id."""
        rows = self._rows_of(np.asarray(ids, dtype=np.int64))
        return [self._names[c] for c in self._codes[rows]]

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id in ``self._ids``; KeyError listing unknown ids."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.zeros(0, dtype=np.intp)
        if len(self._ids) == 0:
            raise KeyError(f"item ids not in the index (it is empty): {ids[:10].tolist()}")
        if self._order is None:
            self._order = np.argsort(self._ids, kind="stable")
        sorted_ids = self._ids[self._order]
        pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        missing = ids[sorted_ids[pos] != ids]
        if len(missing):
            raise KeyError(f"item ids not in the index: {missing[:10].tolist()}")
        return self._order[pos]

    # -- queries ----------------------------------------------------------------------------

    def search(
        self,
        xq: np.ndarray,
        k: int,
        *,
        category: str | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar gallery items of each query.

        Args:
            xq: float32 [M, d], L2-normalised query vectors.
            k: results per query (>= 1).
            category: search only this category's partition; None searches all.
            nprobe: IVF lists to visit (default set at build: ``default_nprobe``).
            ef_search: HNSW search breadth (default ``DEFAULT_EF_SEARCH``).

        Returns:
            ``(D, I)``: D float32 [M, k] cosine similarities, descending per row; I int64
            [M, k] item ids. When fewer than k items exist, I is padded with -1 and D with
            ``PAD_SIMILARITY`` (float32 min, as faiss does).
        """
        xq = _as_vectors(xq, self._dim, "query vectors")
        if not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if category is None:
            part = self._whole
        elif not self.partitioned:
            raise ValueError("this index was built without per-category partitions "
                             "(partitioned=False): search with category=None")
        else:
            part = self._parts.get(category)
            if part is None:
                raise ValueError(
                    f"unknown category {category!r}; the index has: {', '.join(self.categories)}"
                )
        if len(xq) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        D, I = part.search(xq, int(k), nprobe, ef_search)  # noqa: E741
        return np.asarray(D, dtype=np.float32), np.asarray(I, dtype=np.int64)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """float32 [n, d]: the stored vectors of ``ids`` (int64 [n]); exact except for PQ
        indexes, where it is the decoded approximation. KeyError for an unknown id."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self._rows_of(ids)
        return self._whole.reconstruct(ids)

    # -- updates ----------------------------------------------------------------------------

    def add(self, xb: np.ndarray, ids: np.ndarray, categories: Sequence[str]) -> None:
        """Add items (same arguments as ``build``); ids must not be in the index yet.

        A new category gets a new partition (``Flat``, or the forced factory when the new
        items suffice to train it). Existing IVF/PQ quantizers are not retrained.
        """
        xb = _as_vectors(xb, self._dim, "added vectors")
        n = len(xb)
        _check_normalised(xb, "added vectors")
        ids = _as_ids(ids, n)
        cats = [str(c) for c in categories]
        if len(cats) != n:
            raise ValueError(f"got {len(cats)} categories for {n} vectors")
        dup = ids[np.isin(ids, self._ids)]
        if len(dup):
            raise ValueError(f"item ids already in the index: {dup[:10].tolist()}")
        for name in sorted(set(cats)):
            if name not in self._names:
                self._names.append(name)
            if self.partitioned and name not in self._parts:
                xc = xb[np.array([c == name for c in cats])]
                self._parts[name] = _Partition.create(
                    self.factory or choose_factory(len(xc), self._dim), self._dim, xc,
                    fallback=True, sq_by_residual=self.sq_by_residual,
                )
        code_of = {c: i for i, c in enumerate(self._names)}
        codes = np.fromiter((code_of[c] for c in cats), dtype=np.int32, count=n)
        self._whole.add(xb, ids)
        for name in sorted(set(cats) & set(self._parts)):
            mask = codes == code_of[name]
            self._parts[name].add(np.ascontiguousarray(xb[mask]), ids[mask])
        self._order = None
        self._ids = np.concatenate([self._ids, ids])
        self._codes = np.concatenate([self._codes, codes])

    def remove(self, ids: np.ndarray) -> int:
        """Remove items by id (int64 [n]); unknown ids are ignored. Returns how many were
        removed. Partitions keep existing when emptied."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        hit = np.isin(self._ids, ids)
        if not hit.any():
            return 0
        keep = ~hit
        for code in np.unique(self._codes[hit]):
            name = self._names[code]
            if name not in self._parts:
                continue
            in_part = self._codes == code
            self._parts[name].remove(self._ids[hit & in_part], self._ids[keep & in_part])
        removed = self._whole.remove(self._ids[hit], self._ids[keep])
        assert removed == int(hit.sum()), (removed, int(hit.sum()))
        self._order = None
        self._ids = self._ids[keep]
        self._codes = self._codes[keep]
        return removed

    # -- persistence ------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Write the index into ``directory`` (created if needed); returns the files written.

        Files: ``gallery.json`` (layout), ``whole.faiss``, ``part-NNNN.faiss`` per category,
        ``gallery_ids.npy`` and ``gallery_categories.npy`` (int64 ids, int32 category codes).
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []

        def write_faiss(index: faiss.Index, name: str) -> None:
            path = out / name
            fileio.before_write(path)
            faiss.write_index(index, str(path))
            written.append(path)

        write_faiss(self._whole.index, WHOLE_FILE)
        parts = []
        for i, name in enumerate(sorted(self._parts)):
            fname = f"part-{i:04d}.faiss"
            write_faiss(self._parts[name].index, fname)
            p = self._parts[name]
            parts.append({"category": name, "file": fname, "factory": p.factory,
                          "ntotal": p.ntotal})
        for fname, arr in ((IDS_FILE, self._ids), (CATS_FILE, self._codes)):
            fileio.before_write(out / fname)
            np.save(out / fname, arr)
            written.append(out / fname)
        meta = {
            "format_version": FORMAT_VERSION,
            "dim": self._dim,
            "metric": "inner_product",
            "factory": self.factory,
            "ntotal": self.ntotal,
            "whole": {"file": WHOLE_FILE, "factory": self._whole.factory},
            "category_names": self._names,
            "partitioned": self.partitioned,
            "partitions": parts,
        }
        fileio.before_write(out / META_FILE)
        (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        written.append(out / META_FILE)
        return written

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> GalleryIndex:
        """Read an index written by ``save``.

        Raises:
            IndexFormatError: a missing, truncated or corrupt file, or files that disagree
                (counts, dimensions).
        """
        src = Path(directory)
        try:
            meta = json.loads((src / META_FILE).read_text())
            ids = np.load(src / IDS_FILE)
            codes = np.load(src / CATS_FILE)
        except (OSError, ValueError, EOFError) as e:
            raise IndexFormatError(f"cannot read gallery index in {src}: {e}") from e
        if meta.get("format_version") != FORMAT_VERSION:
            raise IndexFormatError(
                f"{src / META_FILE}: format version {meta.get('format_version')!r}, "
                f"this code reads {FORMAT_VERSION}; rebuild the index"
            )
        dim = int(meta["dim"])

        def read(fname: str, factory: str, expect: int) -> _Partition:
            path = src / fname
            if not path.is_file():
                raise IndexFormatError(f"missing index file {path}")
            try:
                index = faiss.read_index(str(path))
            except RuntimeError as e:
                raise IndexFormatError(
                    f"corrupt or truncated index file {path}: {str(e).splitlines()[-1][:200]}; "
                    "check the version with IndexVersion.verify, then roll back to another "
                    "version or rebuild this one"
                ) from e
            if index.d != dim or index.ntotal != expect:
                raise IndexFormatError(
                    f"{path}: holds {index.ntotal} vectors of dim {index.d}, "
                    f"expected {expect} of dim {dim}"
                )
            return _Partition(index, factory)

        if len(ids) != meta["ntotal"] or len(codes) != len(ids):
            raise IndexFormatError(f"{src}: id arrays disagree with {META_FILE}")
        whole = read(meta["whole"]["file"], meta["whole"]["factory"], len(ids))
        # Not recorded in gallery.json: the whole index's own IVF-SQ encoding, so that the
        # partitions a later ``add`` creates are encoded like the rest.
        coarse = _ivf_of(whole.index)
        sq_by_residual = (isinstance(coarse, faiss.IndexIVFScalarQuantizer)
                          and bool(coarse.by_residual))
        names = list(meta["category_names"])
        parts = {}
        for p in meta["partitions"]:
            parts[p["category"]] = read(p["file"], p["factory"], int(p["ntotal"]))
        return cls(dim, whole, parts, ids.astype(np.int64), codes.astype(np.int32), names,
                   meta.get("factory"), bool(meta.get("partitioned", True)), sq_by_residual)
