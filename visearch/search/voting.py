"""Category voting: the detector's class scores and the query's nearest neighbours decide.

The detector sees the object; the neighbours see what the gallery says similar objects are.
Each source is turned into a distribution over categories, the two are mixed with
configurable weights, and the top category wins:

``detector[c] = score_c / sum(scores)`` (the main object's per-class scores),
``neighbours[c] = sum(w_j for neighbours j of category c) / sum(w_j)``, similarity-weighted
with ``w_j = exp(-(s_1 - s_j) / (t * (s_1 - s_k)))`` (a softmax over the similarities whose
temperature ``t`` is relative to their spread over the k neighbours: the weights mean the
same for a sharp trained model and a flat untrained one, where every similarity is ~0.98 and
raw similarities would give every neighbour the same vote), or ``w_j = max(s_j, 0)`` when
``t`` is None,
``combined[c] = (a * detector[c] + b * neighbours[c]) / (a + b)``, where a source that has
nothing to say (no detector, a fallback box, no neighbours) drops out of the mix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class VoteWeights:
    """How much each source counts, and the neighbours' relative softmax temperature
    (None: raw similarities as weights)."""

    detector: float = 1.0
    neighbours: float = 1.0
    temperature: float | None = 0.25

    def __post_init__(self) -> None:
        if self.detector < 0 or self.neighbours < 0 or self.detector + self.neighbours <= 0:
            raise ValueError(
                f"vote weights must be >= 0 with a positive sum, got {self.detector=}, "
                f"{self.neighbours=}"
            )
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (or None), got {self.temperature}")


@dataclass(frozen=True)
class CategoryVote:
    """One category's share from each source and combined (each in [0, 1])."""

    category: str
    detector: float
    neighbours: float
    combined: float


@dataclass(frozen=True)
class CategoryDecision:
    """The chosen category, its combined score, where it came from, and every vote.

    ``source`` is ``"vote"`` (detector + neighbours), ``"detector"``, ``"neighbours"`` (one
    source only), ``"hint"`` (the client's category, votes kept for information) or
    ``"none"`` (nothing to vote with: search the whole index).
    """

    category: str | None
    score: float
    source: str
    votes: tuple[CategoryVote, ...]


def vote_category(
    detector_scores: Mapping[str, float] | None,
    neighbour_categories: Sequence[str],
    neighbour_similarities: Sequence[float] | np.ndarray,
    *,
    weights: VoteWeights | None = None,
    hint: str | None = None,
) -> CategoryDecision:
    """Combine the detector's class scores and the neighbours' categories into one category.

    Args:
        detector_scores: category -> score (any non-negative scale, normalised here), or
            None/empty when there is no detector or the box is a fallback.
        neighbour_categories: the categories of the query's top neighbours, [k].
        neighbour_similarities: their cosine similarities, float [k].
        weights: the mix; defaults to equal weights.
        hint: a category given by the client; it wins, the votes are still reported.

    Returns:
        The decision, its votes sorted by combined score, descending (ties by name).
    """
    weights = weights or VoteWeights()
    sims = np.asarray(neighbour_similarities, np.float64).reshape(-1)
    if len(sims) != len(neighbour_categories):
        raise ValueError(
            f"{len(neighbour_categories)} neighbour categories but {len(sims)} similarities"
        )
    det: dict[str, float] = {}
    if detector_scores:
        total = float(sum(max(v, 0.0) for v in detector_scores.values()))
        if total > 0:
            det = {c: max(v, 0.0) / total for c, v in detector_scores.items()}
    nn: dict[str, float] = {}
    if weights.temperature is None or len(sims) == 0:
        w = np.maximum(sims, 0.0)
    else:
        spread = max(float(sims.max() - sims.min()), 1e-6)
        w = np.exp(-(sims.max() - sims) / (weights.temperature * spread))
    if w.sum() > 0:
        for category, wj in zip(neighbour_categories, w, strict=True):
            nn[category] = nn.get(category, 0.0) + float(wj)
        total = sum(nn.values())
        nn = {c: v / total for c, v in nn.items()}
    a = weights.detector if det else 0.0
    b = weights.neighbours if nn else 0.0
    votes = []
    for category in sorted(set(det) | set(nn)):
        d, n = det.get(category, 0.0), nn.get(category, 0.0)
        combined = (a * d + b * n) / (a + b) if a + b > 0 else 0.0
        votes.append(CategoryVote(category, d, n, combined))
    votes.sort(key=lambda v: (-v.combined, v.category))
    if hint is not None:
        score = next((v.combined for v in votes if v.category == hint), 0.0)
        return CategoryDecision(hint, score, "hint", tuple(votes))
    if a + b == 0:
        return CategoryDecision(None, 0.0, "none", tuple(votes))
    source = "vote" if a > 0 and b > 0 else ("detector" if a > 0 else "neighbours")
    return CategoryDecision(votes[0].category, votes[0].combined, source, tuple(votes))
