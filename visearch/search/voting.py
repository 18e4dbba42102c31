"""Voting: the detector's class scores, the query's nearest neighbours and the embedder's
heads decide the category (:func:`vote_category`) and the attributes
(:func:`vote_attributes`).

The detector sees the object; the neighbours see what the gallery says similar objects are;
the category head (a classifier on the query's own embedding, trained with it) says what
the embedding itself encodes. Each source is turned into a distribution over categories,
they are mixed with configurable weights, and the top category wins:

``detector[c] = score_c / sum(scores)`` (the main object's per-class scores),
``neighbours[c] = sum(w_j for neighbours j of category c) / sum(w_j)``, similarity-weighted
with ``w_j = exp(-(s_1 - s_j) / (t * (s_1 - s_k)))`` (a softmax over the similarities whose
temperature ``t`` is relative to their spread over the k neighbours: the weights mean the
same for a sharp trained model and a flat untrained one, where every similarity is ~0.98 and
raw similarities would give every neighbour the same vote), or ``w_j = max(s_j, 0)`` when
``t`` is None,
``head[c] = p_c / sum(p)`` (the head's softmax over the index's categories),
``combined[c] = (a * detector[c] + b * neighbours[c] + h * head[c]) / (a + b + h)``, where a
source that has nothing to say (no detector, a fallback box, no neighbours, no head) drops
out of the mix. ``combined`` sums to 1 over the categories: it is the "category top-k with
probabilities" the responses carry.

Attributes are voted the same way, per attribute, without a detector: the neighbours'
catalog values (``neighbours[v] = sum(w_j for neighbours j whose value is v) / sum(w_j)``,
the same weights ``w_j``) mixed with the attribute head's probabilities,
``combined[v] = (b * neighbours[v] + h * head[v]) / (b + h)``. A look-alike in the gallery
is usually the same item or one of its family, which shares its body colour and material,
so the neighbours know the attributes better than a head trained as an auxiliary loss (on
the seed-23 world: colour top-1 0.80 against 0.58, ``benchmarks/RESULTS.md``).
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
    head: float = 1.0

    def __post_init__(self) -> None:
        # The head alone cannot be the whole vote: a model without heads would have none.
        if (min(self.detector, self.neighbours, self.head) < 0
                or self.detector + self.neighbours <= 0):
            raise ValueError(
                f"vote weights must be >= 0 with a positive sum of detector and neighbours, "
                f"got {self.detector=}, {self.neighbours=}, {self.head=}"
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
    head: float = 0.0


@dataclass(frozen=True)
class CategoryDecision:
    """The chosen category, its combined score, where it came from, and every vote.

    ``source`` is ``"vote"`` (two or three sources), ``"detector"``, ``"neighbours"``,
    ``"head"`` (one source only), ``"hint"`` (the client's category, votes kept for information) or
    ``"none"`` (nothing to vote with: search the whole index).
    """

    category: str | None
    score: float
    source: str
    votes: tuple[CategoryVote, ...]

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` best categories by combined score (probabilities), best first."""
        return [(v.category, v.combined) for v in self.votes[: max(0, k)]]


def _neighbour_weights(sims: np.ndarray, temperature: float | None) -> np.ndarray:
    """``float [k]`` similarities -> the neighbours' vote weights ``w_j`` (module docstring)."""
    if temperature is None or len(sims) == 0:
        return np.maximum(sims, 0.0)
    spread = max(float(sims.max() - sims.min()), 1e-6)
    return np.exp(-(sims.max() - sims) / (temperature * spread))


def _shares(labels: Sequence[str | None], w: np.ndarray) -> dict[str, float]:
    """Each label's share of the weights ``w`` (labels None are skipped); {} when none."""
    out: dict[str, float] = {}
    for label, wj in zip(labels, w, strict=True):
        if label is not None:
            out[label] = out.get(label, 0.0) + float(wj)
    total = sum(out.values())
    return {c: v / total for c, v in out.items()} if total > 0 else {}


def _normalised(scores: Mapping[str, float] | None) -> dict[str, float]:
    """Non-negative scores scaled to sum to 1; {} when none or all zero."""
    if not scores:
        return {}
    total = float(sum(max(v, 0.0) for v in scores.values()))
    return {c: max(v, 0.0) / total for c, v in scores.items()} if total > 0 else {}


def vote_category(
    detector_scores: Mapping[str, float] | None,
    neighbour_categories: Sequence[str],
    neighbour_similarities: Sequence[float] | np.ndarray,
    *,
    weights: VoteWeights | None = None,
    hint: str | None = None,
    head_scores: Mapping[str, float] | None = None,
) -> CategoryDecision:
    """Combine the detector's class scores, the neighbours' categories and the category
    head's probabilities into one category.

    Args:
        detector_scores: category -> score (any non-negative scale, normalised here), or
            None/empty when there is no detector or the box is a fallback.
        neighbour_categories: the categories of the query's top neighbours, [k].
        neighbour_similarities: their cosine similarities, float [k].
        weights: the mix; defaults to equal weights.
        hint: a category given by the client; it wins, the votes are still reported.
        head_scores: category -> the embedder's category-head probability (normalised
            here), or None/empty when the model has no head.

    Returns:
        The decision, its votes sorted by combined score, descending (ties by name).
    """
    weights = weights or VoteWeights()
    sims = np.asarray(neighbour_similarities, np.float64).reshape(-1)
    if len(sims) != len(neighbour_categories):
        raise ValueError(
            f"{len(neighbour_categories)} neighbour categories but {len(sims)} similarities"
        )
    det = _normalised(detector_scores)
    nn = _shares(list(neighbour_categories), _neighbour_weights(sims, weights.temperature))
    hd = _normalised(head_scores)
    a = weights.detector if det else 0.0
    b = weights.neighbours if nn else 0.0
    h = weights.head if hd else 0.0
    votes = []
    for category in sorted(set(det) | set(nn) | set(hd)):
        d, n, p = det.get(category, 0.0), nn.get(category, 0.0), hd.get(category, 0.0)
        combined = (a * d + b * n + h * p) / (a + b + h) if a + b + h > 0 else 0.0
        votes.append(CategoryVote(category, d, n, combined, p))
    votes.sort(key=lambda v: (-v.combined, v.category))
    if hint is not None:
        score = next((v.combined for v in votes if v.category == hint), 0.0)
        return CategoryDecision(hint, score, "hint", tuple(votes))
    if a + b + h == 0:
        return CategoryDecision(None, 0.0, "none", tuple(votes))
    used = [name for name, w in (("detector", a), ("neighbours", b), ("head", h)) if w > 0]
    source = "vote" if len(used) > 1 else used[0]
    return CategoryDecision(votes[0].category, votes[0].combined, source, tuple(votes))


@dataclass(frozen=True)
class AttributeWeights:
    """How much the neighbours' catalog values and the attribute heads count, and the
    neighbours' relative softmax temperature (as :class:`VoteWeights`). The defaults were
    chosen on half of the seed-23 world's user photos (``benchmarks/RESULTS.md``)."""

    neighbours: float = 1.0
    head: float = 0.25
    temperature: float | None = 0.25

    def __post_init__(self) -> None:
        if min(self.neighbours, self.head) < 0 or self.neighbours + self.head <= 0:
            raise ValueError(f"attribute weights must be >= 0 with a positive sum, got "
                             f"{self.neighbours=}, {self.head=}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (or None), got {self.temperature}")


@dataclass(frozen=True)
class AttributeVote:
    """One attribute value's share from each source and combined (each in [0, 1])."""

    value: str
    neighbours: float
    head: float
    combined: float


def vote_attributes(
    names: Sequence[str],
    neighbour_attributes: Sequence[Mapping[str, str]],
    neighbour_similarities: Sequence[float] | np.ndarray,
    *,
    head_scores: Mapping[str, Mapping[str, float]] | None = None,
    weights: AttributeWeights | None = None,
) -> dict[str, tuple[AttributeVote, ...]]:
    """Vote each attribute from the neighbours' catalog values and the attribute heads.

    Args:
        names: the attributes to vote.
        neighbour_attributes: the query's top neighbours' catalog attributes, [k] (a
            neighbour without a value for an attribute does not vote on it).
        neighbour_similarities: their cosine similarities, float [k].
        head_scores: attribute name -> value -> the head's probability (normalised here);
            None or a missing name: the neighbours alone.
        weights: the mix; defaults to :class:`AttributeWeights`.

    Returns:
        name -> its values' votes, by combined probability (summing to 1), best first (ties
        by value); an attribute that neither source knows is left out.
    """
    weights = weights or AttributeWeights()
    sims = np.asarray(neighbour_similarities, np.float64).reshape(-1)
    if len(sims) != len(neighbour_attributes):
        raise ValueError(f"{len(neighbour_attributes)} neighbour attribute maps but "
                         f"{len(sims)} similarities")
    w = _neighbour_weights(sims, weights.temperature)
    out: dict[str, tuple[AttributeVote, ...]] = {}
    for name in names:
        nn = _shares([None if a.get(name) is None else str(a[name])
                      for a in neighbour_attributes], w)
        hd = _normalised((head_scores or {}).get(name))
        b = weights.neighbours if nn else 0.0
        h = weights.head if hd else 0.0
        if b + h == 0:
            continue
        votes = [AttributeVote(v, nn.get(v, 0.0), hd.get(v, 0.0),
                               (b * nn.get(v, 0.0) + h * hd.get(v, 0.0)) / (b + h))
                 for v in set(nn) | set(hd)]
        out[name] = tuple(sorted(votes, key=lambda v: (-v.combined, v.value)))
    return out
