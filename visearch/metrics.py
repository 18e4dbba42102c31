"""Retrieval metrics, tie-aware, for queries with one or several correct SKUs.

A query's result is a ranking of SKUs (best first, each SKU once, as the engine returns
them after grouping by SKU), optionally with scores. Equal scores form a tied group whose
order is arbitrary; every metric here is then the *expected* value over all orders of the
tied items (McSherry & Najork, "Computing information retrieval performance measures
efficiently in the presence of tied scores", ECIR 2008), so a metric never rewards or
punishes the accident of a sort order. Without scores there are no ties.

Definitions (binary relevance; ``R`` = number of correct SKUs of the query):
- ``recall@k``: 1 when at least one correct SKU is in the top k (the hit rate used by product
  retrieval benchmarks such as In-shop and SOP), else 0.
- ``map@k``: average precision truncated at k, normalised by ``min(R, k)``.
- ``ndcg@k``: DCG with gains 1 and discount ``1 / log2(1 + rank)``, over the ideal DCG.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10, 20)


def _tie_groups(n: int, scores: Sequence[float] | None, atol: float) -> list[tuple[int, int]]:
    """[start, end) index ranges of tied groups in a ranking of length ``n``."""
    if scores is None:
        return [(i, i + 1) for i in range(n)]
    if len(scores) != n:
        raise ValueError(f"got {len(scores)} scores for a ranking of {n} items")
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, n + 1):
        if i == n or abs(float(scores[i]) - float(scores[start])) > atol:
            groups.append((start, i))
            start = i
    return groups


def _query_metrics(
    ranked: Sequence[str],
    relevant: Collection[str],
    ks: Sequence[int],
    scores: Sequence[float] | None,
    atol: float,
) -> dict[str, float]:
    if len(set(ranked)) != len(ranked):
        raise ValueError("a ranking must list each SKU once (group results by SKU first)")
    rel = [s in relevant for s in ranked]
    total_rel = len(set(relevant))
    groups = _tie_groups(len(ranked), scores, atol)
    out: dict[str, float] = {}
    for k in ks:
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        p_none = 1.0  # probability that no correct SKU lands in the top k
        ap = 0.0
        dcg = 0.0
        rel_before = 0  # correct SKUs in earlier groups (certainly ranked above)
        for start, end in groups:
            if start >= k:
                break
            n_g = end - start
            r_g = sum(rel[start:end])
            slots = min(end, k) - start  # positions of this group inside the top k
            if r_g:
                # Hypergeometric: none of the r_g correct items in the first `slots` of n_g.
                p_none *= math.comb(n_g - r_g, slots) / math.comb(n_g, slots)
                for i in range(1, slots + 1):
                    # P(position start+i holds a correct item) = r_g / n_g; given it does,
                    # the expected correct items among the group's first i positions is
                    # 1 + (i - 1)(r_g - 1)/(n_g - 1); precision is linear in that count.
                    p_rel = r_g / n_g
                    extra = (i - 1) * (r_g - 1) / (n_g - 1) if n_g > 1 else 0.0
                    ap += p_rel * (rel_before + 1 + extra) / (start + i)
                    dcg += p_rel / math.log2(start + i + 1)
            rel_before += r_g
        ideal = sum(1.0 / math.log2(i + 1) for i in range(1, min(total_rel, k) + 1))
        out[f"recall@{k}"] = 1.0 - p_none if total_rel else 0.0
        out[f"map@{k}"] = ap / min(total_rel, k) if total_rel else 0.0
        out[f"ndcg@{k}"] = dcg / ideal if ideal else 0.0
    return out


def retrieval_metrics(
    ranked: Sequence[Sequence[str]],
    relevant: Sequence[Collection[str]],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    scores: Sequence[Sequence[float]] | None = None,
    atol: float = 0.0,
    per_query: bool = False,
) -> dict[str, float] | tuple[dict[str, float], list[dict[str, float]]]:
    """Mean Recall@k, mAP@k and NDCG@k over queries.

    Args:
        ranked: per query, the retrieved SKUs best first, each once.
        relevant: per query, the set of correct SKUs (several when one product is listed
            under several SKU ids).
        ks: cut-offs.
        scores: per query, the scores of ``ranked`` (descending); equal scores (within
            ``atol``) are ties, and metrics are expected values over their orders.
        per_query: also return the list of per-query metric dicts.

    Returns:
        ``{"recall@1": ..., "map@1": ..., "ndcg@1": ..., ...}`` averaged over queries
        (and the per-query list when ``per_query``).
    """
    if len(ranked) != len(relevant):
        raise ValueError(f"{len(ranked)} rankings but {len(relevant)} relevance sets")
    if scores is not None and len(scores) != len(ranked):
        raise ValueError(f"{len(scores)} score lists but {len(ranked)} rankings")
    rows = [
        _query_metrics(r, rel, ks, scores[i] if scores is not None else None, atol)
        for i, (r, rel) in enumerate(zip(ranked, relevant, strict=True))
    ]
    keys = [f"{m}@{k}" for k in ks for m in ("recall", "map", "ndcg")]
    mean = {key: float(np.mean([row[key] for row in rows])) if rows else 0.0 for key in keys}
    return (mean, rows) if per_query else mean


def accuracy(predicted: Sequence[str], truth: Sequence[str]) -> float:
    """Fraction of equal labels (e.g. category accuracy)."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions but {len(truth)} labels")
    if not truth:
        return 0.0
    return float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))
