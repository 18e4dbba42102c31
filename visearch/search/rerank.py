"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) for serving, one query at a time.

Notation (the paper's): ``N(p, k)`` the top-k list of ``p`` (``p`` itself first),
``R(p, k) = {g in N(p, k+1) : p in N(g, k+1)}`` the k-reciprocal set,
``R*(p)`` = ``R(p, k1)`` plus, for every ``c`` in it, ``R(c, round(k1/2))`` when at least
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
O(N^2) per query). Every quantity the query's row needs depends only on a few hops of top-k
lists around the query and its candidates: ``V'_g`` needs ``V_j`` for ``j in N(g, k2)``,
``V_j`` needs the lists of ``N(j, k1 + 1)`` (reciprocity) and of ``N(c, k1/2 + 1)`` for
``c in R(j, k1)`` (expansion). Offline, the gallery kNN graph stores every item's top list
and similarities (computed once, ``k1 + 1`` entries with the item itself). Online, the lists
of the few thousand items within those hops are read from the graph and the query is inserted
into each at its similarity rank (``q`` enters ``N(g, m)`` iff ``s(g, q)`` beats the
similarity of ``g``'s m-th graph entry, pushing the m-th entry out), then the sets and
vectors are computed for those items only.

Why this is exact: in the (N + 1)-item set the only new item is ``q``, so an item's top-m
list is its gallery top-m list with ``q`` merged in at its similarity, and ``m <= k1 + 1``
entries of the graph suffice; the final distances of the query's row need only ``V'_q`` and
the candidates' ``V'_g``, and the three hops above are every list those read. Given exact
graph lists of length >= k1 + 1 and the query's exact top-k1 (a flat index), the re-ranked
distances of the candidates equal the brute force's (up to floating-point ties; the tests
check it on seeded galleries). What is approximated: (a) a graph built with an approximate index
(IVF, HNSW) gives approximate lists, and every set inherits them; (b) only the candidates
(e.g. one category's top hits) are re-ranked, items outside the shortlist are not
considered; (c) items the graph does not hold (added without updating it) have no list and keep
their original distance (Jaccard distance 1).

Cost per query: a few thousand graph rows and sparse vectors, milliseconds, independent of N.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)

_CHUNK = 1024


def _distance(sim: np.ndarray) -> np.ndarray:
    """Cosine similarity -> squared euclidean distance / 4 on the unit sphere, in [0, 1]."""
    return np.clip((1.0 - sim) * 0.5, 0.0, 1.0)


def _half(k1: int) -> int:
    # The reference uses int(np.around(k1 / 2)), which rounds half to even.
    return int(np.around(k1 / 2.0))


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
    h = _half(k1)

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
# serving: gallery lists precomputed (the kNN graph), sets computed online around the query
# --------------------------------------------------------------------------------------




def _reciprocal_mask(lists: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """bool [len(rows), k + 1]: which of ``lists[rows, :k+1]`` are k-reciprocal to the row.

    ``lists`` holds local row numbers, ``-1`` for padding or rows outside the local set
    (which can never equal a row, so membership tests stay exact).
    """
    forward = lists[rows, : k + 1]
    backward = lists[np.maximum(forward, 0), : k + 1]
    mask = (backward == rows[:, None, None]).any(axis=2)
    return mask & (forward >= 0)


def _expanded_sets(lists: np.ndarray, rows: np.ndarray, k1: int, h: int) -> np.ndarray:
    """int64 [len(rows), W]: ``R*(row)`` members (local numbers, ``-1`` padding, repeats)."""
    r1 = np.where(_reciprocal_mask(lists, rows, k1), lists[rows, : k1 + 1], -1)
    # R(c, h) once for every distinct c met in the R(row, k1) sets.
    cands = np.unique(r1[r1 >= 0])
    rch_u = np.where(_reciprocal_mask(lists, cands, h), lists[cands, : h + 1], -1)
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


class KReciprocalReranker:
    """k-reciprocal re-ranking of one query's candidates against a precomputed gallery graph.

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
        self._lists, self._sims = self._self_first_lists(neighbours)
        width = self._lists.shape[1]
        if k1 + 1 > width:
            log.warning("neighbour graph keeps %d neighbours; lowering k1 %d -> %d",
                        width - 1, k1, width - 1)
            k1 = width - 1
        self.k1 = k1
        self.k2 = min(k2, k1 + 1)
        self.h = _half(k1)
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

    def _self_first_lists(self, neighbours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.ids)
        rows = np.arange(n)
        pos = self.positions(neighbours.reshape(-1)).reshape(neighbours.shape)
        valid = (pos >= 0) & (pos != rows[:, None])
        sims = np.empty(pos.shape, np.float32)
        for lo in range(0, n, _CHUNK):
            sl = slice(lo, lo + _CHUNK)
            sims[sl] = np.einsum("nd,nkd->nk", self.xb[sl], self.xb[np.maximum(pos[sl], 0)])
        # Re-sort by exact similarity (the graph may come from an approximate index) and
        # put the row itself first, where the method expects it.
        order = np.argsort(np.where(valid, -sims, np.inf), axis=1, kind="stable")
        pos = np.take_along_axis(np.where(valid, pos, -1), order, axis=1)
        sims = np.take_along_axis(np.where(valid, sims, -np.inf), order, axis=1)
        keep = 1 + int((pos >= 0).any(axis=0).sum()) if n else 1  # drop all-padding columns
        lists = np.concatenate([rows[:, None], pos], axis=1)[:, :keep]
        sims = np.concatenate([np.full((n, 1), np.inf, np.float32), sims], axis=1)[:, :keep]
        return lists, sims.astype(np.float32)

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
