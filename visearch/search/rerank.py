"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) for serving, one query at a time.

Notation (the paper's): ``N(p, k)`` the top-k list of ``p`` (``p`` itself first),
``R(p, k) = {g in N(p, k+1) : p in N(g, k+1)}`` the k-reciprocal set,
``R*(p)`` = ``R(p, k1)`` plus, for every ``c`` in it, ``R(c, round(k1/2))`` when more than
two thirds of that set already lies in ``R(p, k1)``; ``V_p`` the vector over all items with
``V_p[g] = exp(-d(p, g)) / Z_p`` on ``R*(p)`` and 0 elsewhere; local query expansion
``V'_p = mean(V_g for g in N(p, k2))``; Jaccard distance
``d_J(p, g) = 1 - sum_j min(V'_p[j], V'_g[j]) / sum_j max(V'_p[j], V'_g[j])``; final distance
``d*(p, g) = (1 - lambda) d_J(p, g) + lambda d(p, g)``.

Distances: the vectors are L2-normalised, ``d(p, g) = ||x_p - x_g||^2 / 4 = (1 - s) / 2`` in
[0, 1] with ``s`` the cosine similarity. The reference code divides each row by its own
maximum; a fixed divisor (the largest possible squared distance on the unit sphere) keeps the
same [0, 1] scale without knowing every item's farthest neighbour.

Serving (:class:`KReciprocalReranker`). The brute force inserts the query into the gallery
and recomputes every list and set over N + 1 items (:func:`k_reciprocal_bruteforce`,
O(N^2) per query). Offline, the gallery kNN graph stores every item's top list (``k1 + 1``
entries with the item itself) and, computed from it in the gallery alone, every item's
k-reciprocal vector ``V_g`` (unnormalised, sparse: ``R*(g)`` has ~20 members;
:class:`visearch.index.graph.KReciprocalVectors`); the re-ranker also keeps, per item, which
entries of its list are in ``R(g, k1)`` and ``R(g, h)`` (``h = round(k1/2)``). Online the
query can change only what it perturbs:

- ``q`` enters ``N(u, m)`` iff ``s(u, q)`` is not below ``u``'s m-th entry (graph
  similarity, the item itself first), pushing that entry out; nothing else in u's list moves.
- So ``R(u, k)`` changes only if q enters u's top ``k + 1`` (q may join, the pushed-out entry
  leaves), or q entered the top ``k + 1`` of a member ``e`` of ``R(u, k)`` and pushed ``u``
  out of it (``u`` was ``e``'s k-th entry). Both are read off ``s(q, .)`` of ``u`` and of
  ``R(u, k)``'s members.
- ``V_j`` changes only if ``R(j, k1)`` or some ``R(c, h)``, ``c`` in ``R(j, k1)``, changes;
  otherwise ``R*(j)`` and its weights ``exp(-d(j, x))`` (gallery pairs) are as stored and
  ``V_j[q] = 0``.
- The answer reads ``V'_q`` and the candidates' ``V'_c``, means of ``V_j`` over the top-k2
  lists (q merged in) of q and of the candidates: the set J.

Per query: the similarity of q to every row of U = J, q's top k1, their ``R(., k1)``
members and those members' ``R(., h)`` members (to all N rows instead when N is small: one
matrix-vector product is cheaper than collecting U); the rows of J whose ``V_j`` is
perturbed (typically a third to a half of J, those near q) get ``R(., k1)``, ``R(., h)`` and
``R*`` recomputed from the stored sets with the two corrections above, their weights read
from the stored rows (new members: a dot product); the others are read as stored. Then
``V'`` is built only on the columns of ``V'_q``'s support (outside it ``min(V'_q, V'_c)`` is
0) and the Jaccard distances follow, all vectorised (a few hundred rows: well under 1 ms).

Why this is exact: in the (N + 1)-item set the only new item is ``q``, so an item's top-m
list is its gallery top-m list with ``q`` merged in at its similarity, and ``m <= k1 + 1``
entries of the graph suffice; the two corrections above are every way inserting ``q``
changes a k-reciprocal set, so a ``V_j`` not flagged is exactly the stored one, and a
flagged one is recomputed by the paper's rules from exact corrected sets. The final
distances of the query's row need only ``V'_q`` and the candidates' ``V'_c``. Given exact
graph lists of length >= k1 + 1, the stored vectors computed from them, and the query's
exact top-k1 (a flat index), the re-ranked distances of the candidates equal the brute
force's (up to floating-point ties; the tests check it on seeded galleries, with queries
that perturb many lists). What is approximated: (a) a graph built with an approximate index
(IVF, HNSW) gives approximate lists, and every set and stored vector inherits them; (b) only
the candidates (e.g. one category's top hits) are re-ranked, items outside the shortlist are
not considered; (c) items the graph does not hold (added without updating it) have no list
and keep their original distance (Jaccard distance 1).

Cost per query: a few hundred rows, about 1 ms in numpy on one core, independent of N above
``dense_below`` items. Offline: O(N k1^2 h) set operations and one dot product per stored
entry (~20 per item, ~175 bytes per item with the CSR pointers); galleries stored before the
vectors existed get them computed when the re-ranker loads (logged).
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from visearch.index.graph import (
    KReciprocalVectors,
    compute_k_reciprocal_vectors,
    exp_weights,
    half_k,
    reciprocal_masks,
    self_first_lists,
)

log = logging.getLogger(__name__)


def _distance(sim: np.ndarray) -> np.ndarray:
    """Cosine similarity -> squared euclidean distance / 4 on the unit sphere, in [0, 1]."""
    return np.clip((1.0 - sim) * 0.5, 0.0, 1.0)


# --------------------------------------------------------------------------------------
# brute force: the paper's formula over the query plus the whole gallery
# --------------------------------------------------------------------------------------


def k_reciprocal_bruteforce(
    xq: np.ndarray, xb: np.ndarray, *, k1: int = 20, k2: int = 6, lambda_value: float = 0.3
) -> np.ndarray:
    """Exact k-reciprocal final distances from one query to every gallery item.

    The full O(N^2) method: the query is item 0 of an (N + 1)-item set, every item's
    k-reciprocal set, expansion and query expansion are computed from the full distance
    matrix. Used as the test oracle and the benchmark baseline.

    Args:
        xq: float32 [d], L2-normalised query.
        xb: float32 [N, d], L2-normalised gallery.
        k1, k2, lambda_value: the paper's parameters.

    Returns:
        float32 [N], ``d*(q, g)`` for every gallery row (smaller is better).
    """
    x = np.concatenate([np.asarray(xq, np.float32)[None], np.asarray(xb, np.float32)])
    n = x.shape[0]
    if not 1 <= k1 < n or not 1 <= k2 <= k1 + 1:
        raise ValueError(f"need 1 <= k1 < {n} items and 1 <= k2 <= k1 + 1, got {k1=}, {k2=}")
    dist = _distance(x @ x.T)
    np.fill_diagonal(dist, 0.0)
    # Items sort themselves first; a stable sort on (distance, not-self) makes that certain.
    rank = np.lexsort((np.arange(n)[None, :] != np.arange(n)[:, None], dist), axis=1)
    h = half_k(k1)

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = rank[i, : k + 1]
        backward = rank[forward, : k + 1]
        return forward[(backward == i).any(axis=1)]

    v = np.zeros((n, n), np.float64)
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = [r]
        for c in r:
            rc = reciprocal(int(c), h)
            if len(np.intersect1d(rc, r)) > 2.0 / 3.0 * len(rc):
                expanded.append(rc)
        members = np.unique(np.concatenate(expanded))
        w = np.exp(-dist[i, members])
        v[i, members] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    overlap = np.minimum(v[0][None, :], v[1:]).sum(axis=1)
    jaccard = 1.0 - overlap / (2.0 - overlap)
    return ((1.0 - lambda_value) * jaccard + lambda_value * dist[0, 1:]).astype(np.float32)


# --------------------------------------------------------------------------------------
# serving: the gallery's vectors precomputed, only those the query perturbs recomputed
# --------------------------------------------------------------------------------------


def _unique(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a 1-d int array (``np.unique`` hashes: slower below ~10^4)."""
    a = np.sort(a.ravel())
    first = np.empty(len(a), bool)
    first[:1] = True
    np.not_equal(a[1:], a[:-1], out=first[1:])
    return a[first]


def _distinct(a: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Distinct values of a 1-d array of row numbers, unsorted, in O(len(a)) through a
    scratch map over the rows (its entries at ``a`` are left set: the caller overwrites
    and resets them)."""
    a = a.ravel()
    at = np.arange(len(a))
    scratch[a] = at  # the last write of each value wins: keep that one
    return a[scratch[a] == at]


def _insert_q(arr: np.ndarray, at: np.ndarray, value: np.ndarray | int | bool) -> np.ndarray:
    """``arr`` [r, w] with ``value`` inserted at column ``at[i]`` of row i (the last column
    falls off; rows with ``at >= w`` unchanged): a top list with the query merged in."""
    col = np.arange(arr.shape[1])[None, :]
    shifted = np.concatenate([arr[:, :1], arr[:, :-1]], axis=1)
    value = np.asarray(value)
    if value.ndim == 1:
        value = value[:, None]
    return np.where(col < at[:, None], arr, np.where(col == at[:, None], value, shifted))


class KReciprocalReranker:
    """k-reciprocal re-ranking of one query's candidates against a precomputed gallery graph.

    Args:
        ids: int64 [N], the gallery item ids of the graph rows.
        neighbours: int64 [N, K], each row's nearest gallery item ids by descending
            similarity (``-1`` padding); the row's own id may or may not be included.
            ``K`` must reach ``k1`` (``k1`` is lowered, with a warning, otherwise).
        xb: float32 [N, d], the L2-normalised gallery vectors in ``ids`` order.
        k1, k2, lambda_value: the paper's parameters (defaults are the paper's).
        vectors: the gallery's k-reciprocal vectors precomputed offline (the graph's
            ``kreciprocal``, rows in ``ids`` order); None, or computed for another k1,
            means they are computed here (O(N), logged).
        dense_below: galleries of at most this many items compute the query's similarity
            to every item (one matrix-vector product, cheaper than collecting the few
            hundred rows it needs); larger ones gather those rows only, so the cost per
            query does not grow with N.
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
        vectors: KReciprocalVectors | None = None,
        dense_below: int = 4096,
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
        self.dense_below = int(dense_below)
        self._order = np.argsort(ids, kind="stable")
        self._tls = threading.local()
        lists, sims = self_first_lists(ids, neighbours, xb)
        width = lists.shape[1]
        if k1 + 1 > width:
            log.warning("neighbour graph keeps %d neighbours; lowering k1 %d -> %d",
                        width - 1, k1, width - 1)
            k1 = width - 1
        self.k1 = k1
        self.k2 = min(k2, k1 + 1)
        self.h = half_k(k1)
        self._lists = np.ascontiguousarray(lists[:, : k1 + 1])
        self._sims = np.ascontiguousarray(sims[:, : k1 + 1])
        if n == 0 or k1 < 1:
            self._vectors = None
            return
        self._mask1, self._maskh = reciprocal_masks(self._lists, k1)
        if vectors is not None and (vectors.k1 != k1 or len(vectors) != n):
            log.info("precomputed k-reciprocal vectors are for k1=%d over %d items, serving "
                     "needs k1=%d over %d: computing them", vectors.k1, len(vectors), k1, n)
            vectors = None
        if vectors is not None and not self._spot_check(vectors):
            log.warning("precomputed k-reciprocal vectors disagree with the graph and vectors "
                        "(sample of rows recomputed): computing them all again")
            vectors = None
        if vectors is None:
            t0 = time.perf_counter()
            vectors = compute_k_reciprocal_vectors(
                self._lists, xb, k1, masks=(self._mask1, self._maskh))
            log.info("computed k-reciprocal vectors at load: %d items, k1=%d, %.2f s "
                     "(rebuild the index to store them with its graph)",
                     n, k1, time.perf_counter() - t0)
        self._vectors = vectors
        self._indptr = np.asarray(vectors.indptr, np.int64)
        self._indices = np.asarray(vectors.indices)  # int32 [nnz]
        self._weights = np.asarray(vectors.weights, np.float32)
        self._rowsum = np.add.reduceat(self._weights.astype(np.float64), self._indptr[:-1])
        self._all = np.arange(n, dtype=np.int64)
        self._identity = np.arange(n + 1, dtype=np.int64)

    def _spot_check(self, vectors: KReciprocalVectors, sample: int = 32) -> bool:
        """Recompute ``sample`` seeded rows: True when they equal the stored ones."""
        n = len(self.ids)
        rows = np.unique(np.random.default_rng(0).integers(0, n, size=min(sample, n)))
        fresh = compute_k_reciprocal_vectors(self._lists, self.xb, self.k1, rows=rows,
                                             masks=(self._mask1, self._maskh))
        ip = np.asarray(vectors.indptr)
        got = [np.asarray(vectors.indices[ip[r] : ip[r + 1]]) for r in rows]
        want = np.split(fresh.indices, fresh.indptr[1:-1])
        if not all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)):
            return False
        w = np.concatenate([np.asarray(vectors.weights[ip[r] : ip[r + 1]]) for r in rows])
        return bool(np.allclose(w, fresh.weights, rtol=0, atol=1e-6))

    @property
    def vectors(self) -> KReciprocalVectors | None:
        """The gallery's k-reciprocal vectors in use (None for an empty gallery)."""
        return self._vectors

    def _scratch(self) -> tuple[np.ndarray, np.ndarray]:
        """Two per-thread int64 [N + 1] global -> local maps, all -1 between uses."""
        bufs = getattr(self._tls, "maps", None)
        if bufs is None:
            n = len(self.ids) + 1
            bufs = self._tls.maps = (np.full(n, -1, np.int64), np.full(n, -1, np.int64))
        return bufs

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
        n, k1 = len(self.ids), self.k1
        cpos = self.positions(np.asarray(candidate_ids, np.int64).reshape(-1))
        valid = cpos >= 0
        csim = np.full(len(cpos), -1.0, np.float32)
        csim[valid] = self.xb[cpos[valid]] @ xq
        cdist = _distance(csim)
        qpos = self.positions(np.asarray(nn_ids, np.int64).reshape(-1))
        qpos = qpos[qpos >= 0]
        if len(qpos) == 0 or not valid.any() or self._vectors is None:
            return cdist.astype(np.float32), csim
        qpos = qpos[np.argsort(-(self.xb[qpos] @ xq), kind="stable")]
        qlist = np.full(k1 + 1, -1, np.int64)  # N(q, k1 + 1): q itself (row n) first
        qlist[0] = n
        qlist[1 : 1 + min(k1, len(qpos))] = qpos[:k1]
        jaccard = np.ones(len(cpos))
        jaccard[valid] = self._jaccard(xq, qlist, cpos[valid], csim[valid])
        final = (1.0 - self.lambda_value) * jaccard + self.lambda_value * cdist
        return final.astype(np.float32), csim

    def _corrected_sets(
        self, rows: np.ndarray, s: np.ndarray, k: int, mask: np.ndarray, drop: np.ndarray,
        qrank: np.ndarray, loc: np.ndarray,
    ) -> np.ndarray:
        """int64 [len(rows), k+1]: ``R(row, k)`` in the gallery plus the query (``-1`` for
        non-members), from the gallery's ``R`` (``mask`` bool [N, k+1]) corrected for the
        query: ``s`` is each row's similarity to q, which enters the row's list at its rank
        (if within ``k``, pushing the k-th entry out), a member ``e`` leaves when the query
        pushed the row out of ``e``'s list (``drop[loc[e]] == row``), and the query is a
        member iff it enters and the row is in the query's own top k
        (``qrank[loc[row]] <= k``)."""
        lists = self._lists[rows, : k + 1]
        at = np.count_nonzero(self._sims[rows, : k + 1] > s[:, None], axis=1)
        m = mask[rows]
        e = loc[np.where(m, lists, rows[:, None])]  # every member is in the local set
        m &= drop[e] != rows[:, None]
        m = _insert_q(m, at, qrank[loc[rows]] <= k)
        return np.where(m, _insert_q(lists, at, len(self.ids)), -1)

    def _jaccard(
        self, xq: np.ndarray, qlist: np.ndarray, cpos: np.ndarray, csim: np.ndarray,
    ) -> np.ndarray:
        """float64 [m]: ``d_J(q, c)`` for the candidate rows ``cpos`` (similarities
        ``csim``), given q's list ``qlist`` (rows, q = N first); see the module docstring
        for the sets read and why the result is exact."""
        remap, cmap = self._scratch()
        try:
            return self._jaccard_with(xq, qlist, cpos, csim, remap, cmap)
        except BaseException:
            remap[:] = -1  # the normal path resets only the entries it set
            cmap[:] = -1
            raise

    def _jaccard_with(
        self, xq: np.ndarray, qlist: np.ndarray, cpos: np.ndarray, csim: np.ndarray,
        remap: np.ndarray, cmap: np.ndarray,
    ) -> np.ndarray:
        """``_jaccard`` with the two scratch maps (left all -1 on return)."""
        n, k1, k2, h = len(self.ids), self.k1, self.k2, self.h
        lists, sims, mask1, maskh = self._lists, self._sims, self._mask1, self._maskh
        # J: the rows whose V' the answer reads (q's and the candidates' top-k2, q merged).
        at_c = np.count_nonzero(sims[cpos, :k2] > csim[:, None], axis=1)
        top0 = _insert_q(lists[cpos, :k2], at_c, n)
        qtop = qlist[:k2]
        J = _unique(np.concatenate([top0.ravel(), qtop]))
        J = J[J >= 0]
        jg = J[:-1]  # row n (q) is in qtop and sorts last
        qg = qlist[1:][qlist[1:] >= 0]
        # U, numbered by loc (q = len(U)): every row whose similarity to q can change a set
        # that V_j (j in J) or V_q reads: B = J and q's top k1, R(b, k1) for b in B, R(c, h)
        # for c in those. A small gallery takes all rows: one matrix-vector product costs
        # less than finding U.
        dense = n <= self.dense_below
        if dense:
            U, loc, lu = self._all, self._identity, slice(None)
            s_u = self.xb @ xq
        else:
            b = np.concatenate([jg, qg])
            r1b = _distinct(lists[b][mask1[b]], remap)  # rows are in their own R: B too
            U = _distinct(np.concatenate([r1b, lists[r1b, : h + 1][maskh[r1b]]]), remap)
            loc, lu = remap, U
            loc[U] = np.arange(len(U))
            loc[n] = len(U)
            s_u = self.xb[U] @ xq
        nu = len(U)
        # q enters u's top k+1 iff it is not below u's k-th entry (lists sort descending,
        # ties go to q as in the brute force, padding is -inf).
        enters1 = ~(sims[lu, k1] > s_u)
        entersh = ~(sims[lu, h] > s_u)
        # drop_k[u]: the row q pushes out of u's top k+1 when it enters, if that row was
        # k-reciprocal to u (only then does its set change); -1 otherwise.
        drop1 = np.where(enters1 & mask1[lu, k1], lists[lu, k1], -1)
        droph = np.where(entersh & maskh[lu, h], lists[lu, h], -1)
        touched1 = enters1.copy()
        t = loc[drop1[drop1 >= 0]]  # rows outside U lose a member too: none is read below
        touched1[t[t >= 0]] = True
        touchedh = entersh.copy()
        t = loc[droph[droph >= 0]]
        touchedh[t[t >= 0]] = True
        qrank = np.full(nu + 1, k1 + 1)  # rank in q's list (1..k1) of each local row
        qrank[loc[qg]] = np.arange(1, len(qg) + 1)
        # V_j is the stored one unless R(j, k1) or some R(c, h), c in R(j, k1), changed.
        m1 = mask1[jg]
        pert = touched1[loc[jg]] | (touchedh[loc[np.where(m1, lists[jg], jg[:, None])]]
                                    & m1).any(1)
        p = jg[pert]
        pq = np.append(p, n)
        # R'(p, k1) for the perturbed rows and q (last row), then R'(c, h) for their members.
        qin = np.zeros(k1 + 1, bool)
        qin[0] = True
        qin[1 : 1 + len(qg)] = enters1[loc[qg]]
        r1 = np.concatenate([
            self._corrected_sets(p, s_u[loc[p]], k1, mask1, drop1, qrank, loc),
            np.where(qin, qlist, -1)[None],
        ])
        cs = _distinct(r1[r1 >= 0], cmap)  # numbered by cmap while R'(c, h) is looked up
        cmap[cs] = np.arange(len(cs))
        on_g = cs < n
        csg = cs[on_g]
        rh = np.full((len(cs), h + 1), -1, np.int64)
        rh[on_g] = self._corrected_sets(csg, s_u[loc[csg]], h, maskh, droph, qrank, loc)
        if len(csg) < len(cs):  # q's own R'(q, h)
            qh = np.full(h + 1, -1, np.int64)
            qh[0] = n
            qh[1:] = np.where(qin[1 : h + 1] & entersh[loc[np.maximum(qlist[1 : h + 1], 0)]],
                              qlist[1 : h + 1], -1)
            rh[~on_g] = qh
        rch = np.where((r1 >= 0)[..., None], rh[cmap[np.maximum(r1, 0)]], -1)
        # R*(p): R'(p, k1) plus each R'(c, h) of which more than 2/3 lies in R'(p, k1);
        # membership and de-duplication through a [rows, mem] bit table, mem every member of
        # an R'(c, h) (c itself included, so R'(p, k1) too: every cs entry is renumbered).
        mem = _distinct(rh[rh >= 0], cmap)
        cmap[mem] = np.arange(len(mem))
        rows = np.arange(len(r1))
        table = np.zeros((len(r1), len(mem)), bool)
        rr, cc = np.nonzero(r1 >= 0)
        table[rr, cmap[r1[rr, cc]]] = True
        valid = rch >= 0
        inside = table[rows[:, None, None], cmap[np.maximum(rch, 0)]] & valid
        accept = (r1 >= 0) & (np.count_nonzero(inside, axis=-1)
                              > 2.0 / 3.0 * np.count_nonzero(valid, axis=-1))
        rhs = rch[accept].ravel()  # [a * (h+1)]
        ar = np.repeat(np.nonzero(accept)[0], h + 1)
        keep = rhs >= 0
        table[ar[keep], cmap[rhs[keep]]] = True
        pr, pc = np.nonzero(table)
        # Every J row's stored entries; the perturbed rows' fill a weight table (exp(-d)
        # by row and mem column; stored members that left have no column) beside q's, read
        # at the new members.
        st, ln = self._indptr[jg], self._indptr[jg + 1] - self._indptr[jg]
        rid = np.repeat(np.arange(len(jg)), ln)
        pos = np.arange(len(rid)) + np.repeat(st - (np.cumsum(ln) - ln), ln)
        on_p = pert[rid]
        wtab = np.zeros((len(pq), len(mem)), np.float32)
        col = cmap[self._indices[pos[on_p]]]
        ok = col >= 0
        wtab[(np.cumsum(pert)[rid[on_p]] - 1)[ok], col[ok]] = self._weights[pos[on_p]][ok]
        on_g = mem < n
        wtab[-1, on_g] = exp_weights(s_u[loc[mem[on_g]]])
        if not on_g.all():
            qc = np.flatnonzero(~on_g)[0]
            wtab[:-1, qc] = exp_weights(s_u[loc[p]])
            wtab[-1, qc] = 1.0
        w = wtab[pr, pc]
        x = mem[pc]
        miss = np.flatnonzero(w == 0)  # exp(-d) >= 1/e: 0 marks a newly accepted member
        if len(miss):
            w[miss] = exp_weights(np.einsum("nd,nd->n", self.xb[pq[pr[miss]]],
                                            self.xb[x[miss]]))
        cmap[mem] = -1
        vp = w / np.bincount(pr, w, minlength=len(pq))[pr]
        # Every V_j, j in J, as entries (J index, column, value): stored or recomputed.
        off = ~on_p
        e_row = np.concatenate([rid[off], np.searchsorted(J, pq)[pr]])
        e_col = np.concatenate([self._indices[pos[off]], x])
        e_val = np.concatenate([self._weights[pos[off]] / self._rowsum[jg[rid[off]]], vp])
        # V'_q's support C: only those columns can contribute to sum min(V'_q, V'_c).
        qrow = np.zeros(len(J) + 1, bool)
        qj = np.searchsorted(J, qtop[qtop >= 0])
        qrow[qj] = True
        C = _unique(e_col[qrow[e_row]])
        cmap[C] = np.arange(len(C))
        keep = cmap[e_col] >= 0
        vloc = np.zeros((len(J) + 1, len(C)))  # last row: zeros for -1 padding
        vloc[e_row[keep], cmap[e_col[keep]]] = e_val[keep]
        cmap[C] = -1
        if not dense:
            remap[U] = -1
            remap[n] = -1
        vq = vloc[qj].sum(axis=0) / k2
        ci0 = np.where(top0 >= 0, np.searchsorted(J, np.maximum(top0, 0)), len(J))
        vc = vloc[ci0].sum(axis=1) / k2
        overlap = np.minimum(vc, vq[None, :]).sum(axis=1)
        return 1.0 - overlap / (2.0 - overlap)
