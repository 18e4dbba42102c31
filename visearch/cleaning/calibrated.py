"""Calibrated SKU merging: two SKUs merge only on mutual confusion *and* embedding evidence,
with the evidence threshold stated as a false-merge rate.

Confusion alone merges look-alikes: a classifier that confuses two products of one family
in one direction (or both, when their images are few) cannot tell a split SKU from two
distinct products. So a pair merges only when

1. **the confusion is mutual**: held-out classifier probability mass (see
   ``heldout_confusion``) from each SKU to the other is at least ``min_confusion``; and
2. **its images are near-identical at the embedding level**: the *excess distance*

       u(a, b) = (w_a + w_b) / 2 - mean_{x in a, y in b} cos(x, y),

   with ``w_s`` the mean cosine similarity of two distinct images of SKU ``s``, is about 0
   for one product under two ids (the images of the two SKUs are as alike as the images of
   one SKU) and positive for two products; and ``u``, relative to the pair's within-SKU
   distance (``relative_excess``), is improbably small for a pair of distinct SKUs.
   "Improbable" is measured against the catalog itself: the null is the relative excess of
   every SKU to its *nearest other SKU* (the hardest distinct pair each SKU has). Its lower
   tail is modelled as a power law, fitted on the quartile below the median (contamination
   by split SKUs only makes it more conservative), and a pair's ``false_merge_p`` is the
   fitted probability that a distinct nearest pair is at least as close. It merges when
   that is at most ``false_merge_rate``.

Embeddings trained with colour augmentation (hue jitter, grey-scale) may be nearly
colour-blind, so two colourways of one model could pass both tests; when per-image colour
signatures are given (``visearch.cleaning.dedup.color_signature``), a pair also needs the mean hue
directions of its two SKUs within ``color_tol`` (``visearch.cleaning.dedup.color_distance``) to
merge. The pipeline leaves this off: on the synthetic world the relative excess already
kept every colourway apart, and the hue check blocked true splits (close-ups, greyish
products).

Pairs with some evidence but not enough (confusion of at least ``min_confusion`` in one
direction only, or ``false_merge_p`` above the merge rate but at most ``review_rate``) are
returned as review candidates, not merged. Decisions of a human reviewer are applied:
accepted pairs merge, rejected pairs never end in one group.

Everything is computed per category from SKU centroids (sum and count of unit vectors), so
the cost is one faiss kNN over centroids plus one cross-validated classifier per category.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from visearch.cleaning.dedup import COLOR_TOL, color_distance
from visearch.cleaning.merge import (
    FOLDS,
    MergeEdge,
    MergeGroup,
    MergeResult,
    MergeRound,
    heldout_confusion,
)
from visearch.index.blas import small_batch_blas
from visearch.unionfind import UnionFind

logger = logging.getLogger(__name__)

#: Default false-merge rate: the modelled share of distinct nearest SKU pairs close enough to
#: merge. bench_cleaning, 300 SKUs: 0 merges on a clean look-alike world and precision 1.0
#: on the default noisy world, under 150- and 400-step first-pass embedders alike.
FALSE_MERGE_RATE = 0.01
#: Pairs whose false-merge probability is at most this (but above the merge rate) go to review.
REVIEW_RATE = 0.1
#: Held-out probability mass from each SKU to the other, below which a pair is not "mutually
#: confused" (chance is 1 / SKUs in the category).
MIN_CONFUSION = 0.15
#: Nearest other SKUs (by centroid) examined per SKU.
NEIGHBOURS = 5


@dataclass(frozen=True)
class MergeCandidate:
    """A pair of SKUs (``a < b``) of one category and the evidence that they are one product.

    ``confusion_ab``: held-out probability mass of ``a``'s images predicted as ``b`` (and
    ``confusion_ba`` the reverse); ``excess_distance``: ``u(a, b)`` (cosine units, about 0
    for one product); ``relative_excess``: ``u`` over the pair's mean within-SKU cosine
    distance; ``false_merge_p``: the modelled probability that a distinct nearest pair is
    as close (in ``relative_excess``); ``decision``: "merge", "review", "accepted" (by a reviewer),
    "rejected" (by a reviewer) or "blocked" (would join a rejected pair); ``reason`` in words.
    """

    a: str
    b: str
    category: str
    confusion_ab: float
    confusion_ba: float
    excess_distance: float
    relative_excess: float
    false_merge_p: float
    decision: str
    reason: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.a, self.b)


@dataclass(frozen=True)
class DistinctNull:
    """Power-law model of the lower tail of distinct nearest-pair excess distances:
    ``P(U <= u) = 0.5 * (u / median) ** k`` below the median.

    A log-normal fitted to the same quartiles decays much faster towards 0 and
    underestimated the look-alike families measured (bench_cleaning): several distinct
    pairs sat where it put odds of 1e-4. The power law keeps a heavier tail, so the
    false-merge probabilities it gives are conservative.

    ``median``: of the nearest-pair distances; ``k``: the tail exponent; ``samples``: how
    many distances it was fitted on.
    """

    median: float
    k: float
    samples: int

    def false_merge_p(self, u: np.ndarray | float) -> np.ndarray:
        """``P(U <= u)`` under the model (``float64``, like ``u``); 0 for ``u <= 0`` (closer
        than any distinct pair can be), capped at 1."""
        u = np.asarray(u, dtype=np.float64)
        ratio = np.clip(u, 0.0, None) / self.median
        return np.minimum(0.5 * ratio**self.k, 1.0)


def fit_distinct_null(u_nearest: np.ndarray) -> DistinctNull:
    """Fit ``DistinctNull`` to ``float [M]`` nearest-other-SKU excess distances.

    ``k = ln 2 / ln(q50 / q25)`` matches the model to the median and the 25th percentile,
    both taken by rank over all samples. True split SKUs (at or below 0) in the sample can
    only lower ``q25``, which lowers ``k``: a heavier tail, fewer merges. Contamination
    makes the model more conservative, never less.
    """
    u = np.sort(np.asarray(u_nearest, dtype=np.float64))
    if len(u) < 4:
        raise ValueError(f"need at least 4 nearest-pair distances to fit the null, got {len(u)}")
    q25 = float(u[int(math.floor(0.25 * (len(u) - 1)))])
    q50 = float(u[int(math.floor(0.5 * (len(u) - 1)))])
    if q25 <= 0 or q50 <= q25:
        raise ValueError(
            "the nearest-pair distances are degenerate (a quarter or more at or below 0): "
            "the embeddings cannot tell these SKUs apart; check the embedder"
        )
    return DistinctNull(median=q50, k=math.log(2.0) / math.log(q50 / q25), samples=len(u))


def sku_statistics(
    embeddings: np.ndarray, labels: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-SKU sums for the excess distance.

    Args:
        embeddings: ``float32 [N, D]``, L2-normalised.
        labels: ``int64 [N]`` SKU index in ``0..k-1``.

    Returns:
        ``(centroid float64 [k, D], count int64 [k], within float64 [k])``: the mean of the
        SKU's vectors (not normalised), its size, and the mean cosine of two distinct images
        of it (NaN for a SKU of one image). The mean cross similarity of SKUs ``a`` and ``b``
        is ``centroid[a] @ centroid[b]``.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    count = np.bincount(labels, minlength=k).astype(np.int64)
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, x)
    centroid = sums / np.maximum(count, 1)[:, None]
    # sum over ordered pairs (i != j) of x_i . x_j = |sum|^2 - sum |x_i|^2 = |sum|^2 - n
    pair_sum = (sums * sums).sum(axis=1) - count
    with np.errstate(divide="ignore", invalid="ignore"):
        within = np.where(count >= 2, pair_sum / (count * (count - 1.0)), np.nan)
    return centroid, count, within


def excess_distance(
    centroid: np.ndarray, within: np.ndarray, a: np.ndarray, b: np.ndarray
) -> np.ndarray:
    """``u(a, b) = (within[a] + within[b]) / 2 - centroid[a] @ centroid[b]`` for index arrays
    ``a``, ``b`` (``int64 [P]``); ``float64 [P]``."""
    cross = np.einsum("pd,pd->p", centroid[a], centroid[b])
    return 0.5 * (within[a] + within[b]) - cross


#: Whole-image chroma norm under which an image counts as grey (its hue is noise).
_GREY_CHROMA = 0.1


def _hue_vectors(colors: np.ndarray) -> np.ndarray:
    """``float64 [N, 2]``: the hue direction of each image, from grid colour signatures
    ``[N, 2 * G * G]`` (``visearch.cleaning.dedup.color_signature``).

    A SKU's shop images show its product in different poses and crops (a close-up has far
    more chroma than a full view on white), so neither the grid cells nor the chroma's
    size compare across images; the direction of the whole-image chroma does. It is a unit
    vector, shorter for nearly grey images (norm ``|chroma| / _GREY_CHROMA`` below that).
    """
    n, s = colors.shape
    cells = s // 2
    # Scaled by sqrt(cells): a uniform colour gets the norm of its grid signature.
    chroma = colors.reshape(n, 2, cells).mean(axis=2) * np.sqrt(cells)
    norm = np.linalg.norm(chroma, axis=1, keepdims=True)
    return chroma / np.maximum(norm, _GREY_CHROMA)


def relative_excess(
    centroid: np.ndarray, within: np.ndarray, a: np.ndarray, b: np.ndarray
) -> np.ndarray:
    """``u(a, b) / (1 - (within[a] + within[b]) / 2)``: the excess distance in units of the
    pair's own within-SKU cosine distance (``float64 [P]``).

    Scale-free: an embedder trained longer spreads every distance, and one SKU's images
    are tight or loose by product; "as alike as one SKU's images" is a ratio. Measured on
    the synthetic world (bench_cleaning) it separates split SKUs from look-alikes better
    than ``u`` under both a 150- and a 400-step first-pass embedder.
    """
    spread = np.maximum(1.0 - 0.5 * (within[a] + within[b]), 1e-6)
    return excess_distance(centroid, within, a, b) / spread


def _neighbour_pairs(centroid: np.ndarray, neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """Each SKU's ``neighbours`` nearest other SKUs by centroid inner product (faiss):
    ``(a, b)`` int64 arrays, one row per (SKU, neighbour)."""
    k = len(centroid)
    if k < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    c = np.ascontiguousarray(centroid, dtype=np.float32)
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    kk = min(k, neighbours + 1)
    with small_batch_blas():
        _, ids = index.search(c, kk)
    a = np.repeat(np.arange(k, dtype=np.int64), kk)
    b = ids.reshape(-1).astype(np.int64)
    keep = (b >= 0) & (b != a)
    return a[keep], b[keep]


def calibrated_merge(
    embeddings: np.ndarray,
    skus: Sequence[str],
    *,
    categories: Sequence[str] | None = None,
    false_merge_rate: float = FALSE_MERGE_RATE,
    review_rate: float = REVIEW_RATE,
    min_confusion: float = MIN_CONFUSION,
    neighbours: int = NEIGHBOURS,
    folds: int = FOLDS,
    classifier: Callable[[], Any] | None = None,
    accepted: Iterable[tuple[str, str]] = (),
    rejected: Iterable[tuple[str, str]] = (),
    colors: np.ndarray | None = None,
    color_tol: float = COLOR_TOL,
    seed: int = 0,
) -> MergeResult:
    """Merge SKU pairs with mutual confusion and improbably close embeddings.

    Args:
        embeddings: ``float32 [N, D]``, L2-normalised.
        skus: ``N`` SKU ids aligned with ``embeddings``.
        categories: ``N`` categories; pairs are formed and the null fitted within each.
        false_merge_rate: a pair merges when its ``false_merge_p`` is at most this.
        review_rate: pairs that do not merge, with a ``false_merge_p`` up to this and
            confusion of at least ``min_confusion`` in one direction or both, go to review
            (``MergeResult.candidates``).
        min_confusion: the held-out probability mass each way needed to merge.
        neighbours: nearest SKUs by centroid considered per SKU.
        folds, classifier, seed: see ``heldout_confusion``.
        accepted: ``(a, b)`` SKU pairs a reviewer accepted: they merge whatever the scores.
        rejected: pairs a reviewer rejected: never merged, directly or through others.
        colors: ``float32 [N, S]`` colour signatures of the images (``color_signature``);
            when given, a pair whose SKUs' mean hue directions differ by more than
            ``color_tol`` (``color_distance``) goes to review instead of merging.

    Returns:
        ``MergeResult``: ``sku_map`` (every SKU -> the smallest SKU id of its group),
        ``groups``, one ``rounds`` entry, ``candidates`` (every examined pair with evidence,
        merged or for review) and ``calibration`` (the catalog's null, SKUs per category).
    """
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) != len(skus):
        raise ValueError(f"embeddings [N, D] and N SKU ids expected, got {x.shape} and {len(skus)}")
    if categories is not None and len(categories) != len(skus):
        raise ValueError(f"{len(categories)} categories for {len(skus)} images")
    for name, rate in (("false_merge_rate", false_merge_rate), ("review_rate", review_rate)):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {rate}")
    if review_rate < false_merge_rate:
        raise ValueError(f"review_rate ({review_rate}) must be >= false_merge_rate "
                         f"({false_merge_rate}): review takes the pairs just short of merging")
    if colors is not None and len(colors) != len(skus):
        raise ValueError(f"{len(colors)} colour signatures for {len(skus)} images")
    if not 0.0 < min_confusion <= 1.0:
        raise ValueError(f"min_confusion must be in (0, 1], got {min_confusion}")
    names = sorted(set(skus))
    sku_idx = {s: i for i, s in enumerate(names)}
    accepted_set = {tuple(sorted(p)) for p in accepted}
    rejected_set = {tuple(sorted(p)) for p in rejected}
    for pair in accepted_set | rejected_set:
        if len(pair) != 2 or pair[0] == pair[1]:
            raise ValueError(f"a reviewed pair must name two different SKUs, got {pair}")
    cats = list(categories) if categories is not None else [""] * len(skus)
    cat_arr = np.array(cats, dtype=object)
    candidates: list[MergeCandidate] = []
    calibration: dict[str, Any] = {}
    accs: list[float] = []
    # Pass 1, per category: SKU statistics, centroid neighbours, each SKU's nearest distance.
    parts: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    nulls: list[np.ndarray] = []
    for cat in sorted(set(cats)):
        rows = np.flatnonzero(cat_arr == cat)
        classes, labels = np.unique([skus[i] for i in rows], return_inverse=True)
        k = len(classes)
        if k < 2:
            continue
        centroid, count, within = sku_statistics(x[rows], labels, k)
        if np.isnan(within).all():
            continue
        # A lone image's SKU takes the category's typical spread.
        within = np.where(np.isnan(within), np.nanmedian(within), within)
        a, b = _neighbour_pairs(centroid, neighbours)
        u = relative_excess(centroid, within, a, b)
        nearest = np.full(k, np.inf)
        np.minimum.at(nearest, a, u)
        nulls.append(nearest[(count >= 2) & np.isfinite(nearest)])
        parts.append((cat, rows, classes, labels, centroid, within))
        calibration[cat] = {"skus": k, "null_samples": len(nulls[-1])}
    # One null for the catalog: a category has too few SKUs to fit its own tail. Without
    # one nothing merges on its own: every confused pair goes to review.
    null: DistinctNull | None = None
    try:
        null = fit_distinct_null(np.concatenate(nulls) if nulls else np.zeros(0))
        calibration["null"] = {"median": round(null.median, 4), "k": round(null.k, 4),
                               "samples": null.samples}
    except ValueError as exc:
        calibration["null"] = {"skipped": str(exc)}
        logger.warning("calibrated merge: no null, nothing merges without review: %s", exc)
    # Pass 2, per category: held-out confusion, evidence of each examined pair.
    for cat, rows, classes, labels, centroid, within in parts:
        P, acc = heldout_confusion(x[rows], labels, folds=folds, classifier=classifier,
                                   seed=seed)
        if not np.isnan(acc):
            accs.append(acc)
        a, b = _neighbour_pairs(centroid, neighbours)
        pairs = {(int(min(i, j)), int(max(i, j))) for i, j in zip(a, b, strict=True)}
        # Pairs the classifier confuses are examined even when not centroid neighbours.
        ci, cj = np.nonzero(np.maximum(P, P.T) >= min_confusion)
        pairs |= {(int(i), int(j)) for i, j in zip(ci, cj, strict=True) if i < j}
        for pair in sorted(accepted_set | rejected_set):
            if pair[0] in classes and pair[1] in classes:
                i, j = np.searchsorted(classes, pair)
                pairs.add((int(i), int(j)))
        if not pairs:
            continue
        pi = np.array([p[0] for p in pairs], dtype=np.int64)
        pj = np.array([p[1] for p in pairs], dtype=np.int64)
        pu = excess_distance(centroid, within, pi, pj)
        pr = relative_excess(centroid, within, pi, pj)
        pp = null.false_merge_p(pr) if null is not None else np.full(len(pr), np.nan)
        cd = np.zeros(len(pi))
        if colors is not None:
            chroma = _hue_vectors(np.asarray(colors, np.float64)[rows])
            sums = np.zeros((len(classes), chroma.shape[1]))
            np.add.at(sums, labels, chroma)
            mean_color = sums / np.bincount(labels, minlength=len(classes))[:, None]
            cd = color_distance(mean_color[pi], mean_color[pj])
        for i, j, uu, rr, p, c in zip(pi, pj, pu, pr, pp, cd, strict=True):
            sa, sb = str(classes[i]), str(classes[j])
            cab, cba = float(P[i, j]), float(P[j, i])
            mutual = min(cab, cba) >= min_confusion
            decision, reason = "", ""
            if (sa, sb) in rejected_set:
                decision, reason = "rejected", "rejected by a reviewer"
            elif (sa, sb) in accepted_set:
                decision, reason = "accepted", "accepted by a reviewer"
            elif np.isnan(p):
                if max(cab, cba) >= min_confusion:
                    decision, reason = "review", "too few SKUs to calibrate the evidence"
            elif mutual and p <= false_merge_rate and c > color_tol:
                decision = "review"
                reason = f"colours differ: colour distance {c:.2f} > {color_tol}"
            elif mutual and p <= false_merge_rate:
                decision = "merge"
                reason = (f"mutual confusion {min(cab, cba):.2f} >= {min_confusion} and "
                          f"false-merge p {p:.2g} <= {false_merge_rate}")
            elif p <= review_rate and max(cab, cba) >= min_confusion:
                decision = "review"
                reason = ("confusion one-sided or low" if not mutual else
                          f"embedding evidence short: false-merge p {p:.2g} > "
                          f"{false_merge_rate}")
            if decision:
                candidates.append(MergeCandidate(
                    sa, sb, cat, round(cab, 4), round(cba, 4), round(float(uu), 6),
                    round(float(rr), 4),
                    float(f"{float(p):.4g}"), decision, reason))

    # Merge the strongest evidence first; an edge that would join a rejected pair is blocked.
    uf = UnionFind(len(names))
    members = {i: {i} for i in range(len(names))}
    rejected_idx = {(sku_idx[a], sku_idx[b]) for a, b in rejected_set
                    if a in sku_idx and b in sku_idx}
    edges: list[MergeEdge] = []
    order = sorted(range(len(candidates)), key=lambda c: (
        candidates[c].decision != "accepted", np.nan_to_num(candidates[c].false_merge_p, nan=1.0),
        candidates[c].excess_distance))
    for c in order:
        cand = candidates[c]
        if cand.decision not in ("merge", "accepted"):
            continue
        ra, rb = uf.find(sku_idx[cand.a]), uf.find(sku_idx[cand.b])
        if ra == rb:
            continue
        if any((min(m, n), max(m, n)) in rejected_idx for m in members[ra] for n in members[rb]):
            candidates[c] = MergeCandidate(**{**cand.__dict__, "decision": "blocked",
                                              "reason": "would join a rejected pair"})
            continue
        joined = members.pop(ra) | members.pop(rb)
        uf.union(ra, rb)
        members[uf.find(ra)] = joined
        edges.append(MergeEdge(cand.a, cand.b, round(1.0 - cand.false_merge_p, 6), 0,
                               false_merge_rate))

    groups: list[MergeGroup] = []
    sku_map = {s: s for s in names}
    for group in uf.groups(min_size=2):
        member_names = sorted(names[m] for m in group)
        for s in member_names:
            sku_map[s] = member_names[0]
        own = [e for e in edges if sku_map[e.a] == member_names[0]]
        groups.append(MergeGroup(member_names[0], member_names, max(e.score for e in own), own))
    merged = sum(1 for cnd in candidates if cnd.decision in ("merge", "accepted"))
    rounds = [MergeRound(0, false_merge_rate, len(names),
                         float(np.mean(accs)) if accs else float("nan"), merged, True)]
    logger.info("calibrated merge: %d groups, %d pairs for review", len(groups),
                sum(cnd.decision == "review" for cnd in candidates))
    return MergeResult(sku_map=sku_map, groups=groups, rounds=rounds,
                       candidates=sorted(candidates, key=lambda cnd: cnd.key),
                       calibration=calibration)
