"""SKU merging by classifier confusion: find SKU ids that are one product.

A linear classifier over SKUs is trained on the embeddings; held-out predictions (stratified
cross-validation) give the confusion probability ``p_ij = c_ij / n_i``, the share of SKU
``i``'s images predicted as SKU ``j``. Two SKUs the classifier cannot tell apart, in both
directions (``(p_ij + p_ji) / 2`` above a threshold), are one product listed twice. Merged
pairs are grouped with union-find; the classifier is retrained on the merged labels and the
threshold lowered along a schedule, until a round at the last threshold merges nothing.
Merging happens within a category only when categories are given (one classifier each).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from visearch.progress import progress_bar
from visearch.unionfind import UnionFind

logger = logging.getLogger(__name__)

#: Default schedule of symmetrised-confusion thresholds, highest first (soft confusion).
#: Precision first: merging two look-alike products is worse than leaving a product split;
#: (0.3, 0.25, 0.2) finds every split SKU of the synthetic world but merges look-alikes too
#: (benchmarks/bench_cleaning.py).
THRESHOLDS = (0.5, 0.4, 0.3)
FOLDS = 4


def default_classifier() -> LogisticRegression:
    """Multinomial logistic regression; C is high because unit-norm features are small."""
    return LogisticRegression(C=10.0, max_iter=300)


@dataclass(frozen=True)
class MergeEdge:
    """Styles ``a`` and ``b`` (ids at that round) merged with symmetrised confusion ``score``."""

    a: str
    b: str
    score: float
    round: int
    threshold: float


@dataclass(frozen=True)
class MergeGroup:
    """SKUs merged into one style; ``style_id`` is the smallest SKU id of the group and
    ``score`` the highest confusion among the edges that joined it."""

    style_id: str
    skus: list[str]
    score: float
    edges: list[MergeEdge] = field(default_factory=list)


@dataclass(frozen=True)
class MergeRound:
    """One classifier round: held-out accuracy on the labels of that round, and merges."""

    round: int
    threshold: float
    classes: int
    heldout_accuracy: float
    merged_pairs: int
    refit: bool


@dataclass
class MergeResult:
    """``sku_map``: every input SKU -> its style id (itself when not merged).

    ``candidates`` (calibrated merging only): every examined pair with evidence, each a
    ``visearch.cleaning.calibrated.MergeCandidate`` with its decision ("merge", "review",
    ...); ``calibration``: the fitted null per category.
    """

    sku_map: dict[str, str]
    groups: list[MergeGroup]
    rounds: list[MergeRound]
    candidates: list[Any] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "skus": len(self.sku_map),
            "styles": len(set(self.sku_map.values())),
            "merge_groups": len(self.groups),
            "skus_merged": sum(len(g.skus) for g in self.groups),
            "rounds": len(self.rounds),
            "review_pairs": sum(c.decision == "review" for c in self.candidates),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "groups": [asdict(g) for g in self.groups],
            "rounds_detail": [asdict(r) for r in self.rounds],
            "candidates": [asdict(c) for c in self.candidates],
            "calibration": self.calibration,
        }

    def merged_pairs(self) -> set[tuple[str, str]]:
        """Every unordered pair ``(a, b)``, ``a < b``, of input SKUs mapped to one style."""
        pairs: set[tuple[str, str]] = set()
        for g in self.groups:
            s = sorted(g.skus)
            pairs.update((a, b) for k, a in enumerate(s) for b in s[k + 1 :])
        return pairs


def heldout_confusion(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    folds: int = FOLDS,
    classifier: Callable[[], Any] | None = None,
    soft: bool = True,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """Confusion probabilities from stratified cross-validated predictions.

    Args:
        embeddings: ``float32 [N, D]``.
        labels: ``int64 [N]`` in ``0..K-1``.
        folds: cross-validation folds (lowered to the largest class size when above it).
        classifier: factory of an sklearn-style classifier (``fit``, ``predict_proba``,
            ``classes_``); ``default_classifier`` when None.
        soft: sum predicted probabilities (default) instead of counting argmax hits.
        seed: fold shuffling seed.

    Returns:
        ``(P, accuracy)``: ``P float64 [K, K]`` with ``P[i, j] = c_ij / n_i`` (rows of classes
        with fewer than 2 images are zero: a lone image is never held out against its own
        class) and the held-out accuracy over the evaluated images.
    """
    labels = np.asarray(labels, dtype=np.int64)
    k = int(labels.max()) + 1 if len(labels) else 0
    counts = np.bincount(labels, minlength=k)
    P = np.zeros((k, k), dtype=np.float64)
    evaluated = counts[labels] >= 2
    if k < 2 or not evaluated.any():
        return P, float("nan")
    make = classifier or default_classifier
    n_splits = int(min(folds, counts.max()))
    if n_splits < 2:
        return P, float("nan")
    C = np.zeros((k, k), dtype=np.float64)
    skf = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    # One category's fit is small: multi-threaded BLAS costs more in thread hand-offs than it
    # gains (10x slower measured on a loaded 2-core machine), so fits run single-threaded.
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        # Small classes (fewer images than folds) and early stops are expected here.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        splits = list(skf.split(embeddings, labels))
        for train, test in splits:
            test = test[evaluated[test]]
            if len(test) == 0 or len(np.unique(labels[train])) < 2:
                continue
            clf = make()
            clf.fit(embeddings[train], labels[train])
            proba = clf.predict_proba(embeddings[test])
            cols = np.asarray(clf.classes_, dtype=np.int64)
            if soft:
                np.add.at(C, (labels[test][:, None], cols[None, :]), proba)
            else:
                np.add.at(C, (labels[test], cols[proba.argmax(axis=1)]), 1.0)
    rows = counts >= 2
    P[rows] = C[rows] / counts[rows, None]
    total = C[rows].sum()
    accuracy = float(np.trace(C) / total) if total else float("nan")
    return P, accuracy


def symmetrise(P: np.ndarray) -> np.ndarray:
    """``(P + P.T) / 2`` with a zero diagonal: the pair score of two classes."""
    S = (P + P.T) / 2.0
    np.fill_diagonal(S, 0.0)
    return S


def merge_skus(
    embeddings: np.ndarray,
    skus: Sequence[str],
    *,
    categories: Sequence[str] | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
    folds: int = FOLDS,
    classifier: Callable[[], Any] | None = None,
    soft: bool = True,
    seed: int = 0,
    max_rounds: int = 20,
    progress: bool = False,
) -> MergeResult:
    """Merge SKUs the classifier confuses, iterating over a falling threshold schedule.

    Args:
        embeddings: ``float32 [N, D]``, L2-normalised.
        skus: ``N`` SKU ids aligned with ``embeddings``.
        categories: ``N`` categories; when given, SKUs merge only within a category and each
            category gets its own classifier (smaller, faster problems).
        thresholds: symmetrised-confusion thresholds, one round each, highest first; after
            the last one, rounds repeat at the last threshold until nothing merges. A pair
            merges when its score is strictly above the round's threshold.
        folds: cross-validation folds.
        classifier: factory of an sklearn-style classifier; see ``heldout_confusion``.
        soft: ``c_ij`` sums held-out predicted probabilities (default) instead of counting
            argmax hits. With a few images per SKU, argmax counts move in steps of
            ``1 / n_i`` and a single stray prediction can pass a threshold; chained merges
            then snowball (a merged class draws more predictions). Soft counts are smoother.
            They scale with ``1 / K`` for diffuse predictions, so categories with very few
            SKUs need a higher threshold.
        seed: fold shuffling seed.
        max_rounds: stop after this many rounds even if merges continue.
        progress: show a tqdm bar over rounds.

    Returns:
        ``MergeResult`` with the SKU -> style map, merge groups with their scores, and rounds.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) != len(skus):
        raise ValueError(f"embeddings [N, D] and N SKU ids expected, got {x.shape} and {len(skus)}")
    if categories is not None and len(categories) != len(skus):
        raise ValueError(f"{len(categories)} categories for {len(skus)} images")
    schedule = [float(t) for t in thresholds]
    if not schedule or any(not 0.0 <= t < 1.0 for t in schedule):
        raise ValueError(f"thresholds must be a non-empty list in [0, 1), got {thresholds}")
    names = sorted(set(skus))
    sku_idx = {s: i for i, s in enumerate(names)}
    sample_sku = np.array([sku_idx[s] for s in skus], dtype=np.int64)
    cats = list(categories) if categories is not None else [""] * len(skus)
    parts = {c: np.flatnonzero(np.array(cats, dtype=object) == c) for c in sorted(set(cats))}
    uf = UnionFind(len(names))
    edges: list[MergeEdge] = []
    rounds: list[MergeRound] = []
    cached: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    changed = True

    bar = progress_bar(total=None, desc="merge rounds", unit="round", disable=not progress)
    for r in range(max_rounds):
        t = schedule[min(r, len(schedule) - 1)]
        refit = changed
        if refit:
            cached = {}
            for cat, rows in parts.items():
                roots = np.array([uf.find(int(s)) for s in sample_sku[rows]], dtype=np.int64)
                classes, labels = np.unique(roots, return_inverse=True)
                if len(classes) < 2:
                    continue
                P, acc = heldout_confusion(
                    x[rows], labels, folds=folds, classifier=classifier, soft=soft, seed=seed
                )
                cached[cat] = (classes, symmetrise(P), acc)
        merged = 0
        n_classes = 0
        accs = []
        for classes, S, acc in cached.values():
            n_classes += len(classes)
            if not np.isnan(acc):
                accs.append(acc)
            ii, jj = np.nonzero(np.triu(S, 1) > t)
            for i, j in sorted(zip(ii, jj, strict=True), key=lambda p: -S[p[0], p[1]]):
                a, b = int(classes[i]), int(classes[j])
                if uf.union(a, b):
                    merged += 1
                    edges.append(MergeEdge(names[a], names[b], round(float(S[i, j]), 6), r, t))
        rounds.append(
            MergeRound(
                r, t, n_classes, float(np.mean(accs)) if accs else float("nan"), merged, refit
            )
        )
        logger.info(
            "merge round %d: threshold %.3f, %d classes, %d merges", r, t, n_classes, merged
        )
        bar.update(1)
        changed = merged > 0
        if not changed and r >= len(schedule) - 1:
            break
    bar.close()

    groups: list[MergeGroup] = []
    sku_map = {s: s for s in names}
    edge_root = [uf.find(sku_idx[e.a]) for e in edges]
    for members in uf.groups(min_size=2):
        member_names = sorted(names[m] for m in members)
        style = member_names[0]
        for s in member_names:
            sku_map[s] = style
        root = uf.find(members[0])
        own = [e for e, er in zip(edges, edge_root, strict=True) if er == root]
        groups.append(MergeGroup(style, member_names, max(e.score for e in own), own))
    logger.info("merge: %d SKU groups merged into styles", len(groups))
    return MergeResult(sku_map=sku_map, groups=groups, rounds=rounds)
