"""Retrieval metrics against hand-computed values and a permutation oracle for ties."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from visearch.detection.evaluate import box_iou, main_object_hit_rate
from visearch.metrics import accuracy, retrieval_metrics


def test_single_correct_sku_hand_computed() -> None:
    m = retrieval_metrics([["a", "b", "c"]], [{"b"}], ks=(1, 5))
    assert m["recall@1"] == 0.0
    assert m["recall@5"] == 1.0
    assert m["map@5"] == pytest.approx(0.5)
    assert m["ndcg@5"] == pytest.approx(1 / math.log2(3))


def test_several_correct_skus_hand_computed() -> None:
    m = retrieval_metrics([["a", "b", "c", "d"]], [{"a", "c"}], ks=(1, 4))
    assert m["recall@1"] == 1.0
    assert m["map@4"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["ndcg@4"] == pytest.approx((1 + 1 / 2) / (1 + 1 / math.log2(3)))
    # A correct SKU that is never retrieved still counts in the denominator.
    m = retrieval_metrics([["a", "b"]], [{"a", "z"}], ks=(2,))
    assert m["map@2"] == pytest.approx(0.5)


def test_two_way_tie_is_half_credit() -> None:
    m = retrieval_metrics([["a", "b"]], [{"b"}], ks=(1, 2), scores=[[0.5, 0.5]])
    assert m["recall@1"] == pytest.approx(0.5)
    assert m["map@1"] == pytest.approx(0.5)
    assert m["ndcg@1"] == pytest.approx(0.5)
    assert m["map@2"] == pytest.approx(0.75)


def test_three_way_tie_with_two_correct() -> None:
    # Pairs of positions for {a, b}: {1,2} AP=1, {1,3} AP=5/6, {2,3} AP=7/12; each 1/3.
    m = retrieval_metrics([["a", "b", "c"]], [{"a", "b"}], ks=(3,), scores=[[1, 1, 1]])
    assert m["map@3"] == pytest.approx((1 + 5 / 6 + 7 / 12) / 3)


def _brute_force(ranked, relevant, scores, k):
    """Average each metric over every order of the tied items (the definition)."""
    groups: list[list[str]] = []
    for sku, s in zip(ranked, scores, strict=True):
        if groups and s == scores[ranked.index(groups[-1][0])]:
            groups[-1].append(sku)
        else:
            groups.append([sku])
    totals = {"recall": 0.0, "map": 0.0, "ndcg": 0.0}
    orders = list(itertools.product(*(itertools.permutations(g) for g in groups)))
    r_total = len(relevant)
    ideal = sum(1 / math.log2(i + 1) for i in range(1, min(r_total, k) + 1))
    for order in orders:
        flat = [s for g in order for s in g][:k]
        hits = [s in relevant for s in flat]
        totals["recall"] += float(any(hits))
        ap, seen = 0.0, 0
        for i, h in enumerate(hits, start=1):
            if h:
                seen += 1
                ap += seen / i
        totals["map"] += ap / min(r_total, k)
        totals["ndcg"] += sum(1 / math.log2(i + 1) for i, h in enumerate(hits, 1) if h) / ideal
    return {key: v / len(orders) for key, v in totals.items()}


@pytest.mark.parametrize("seed", range(25))
def test_ties_match_permutation_oracle(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(2, 7)
    ranked = [f"s{i}" for i in range(n)]
    scores = sorted((rng.choice([0.1, 0.5, 0.9]) for _ in range(n)), reverse=True)
    relevant = set(rng.sample(ranked, rng.randint(1, min(3, n))))
    if rng.random() < 0.3:
        relevant.add("missing")
    k = rng.randint(1, n)
    got = retrieval_metrics([ranked], [relevant], ks=(k,), scores=[scores])
    want = _brute_force(ranked, relevant, scores, k)
    for name in ("recall", "map", "ndcg"):
        assert got[f"{name}@{k}"] == pytest.approx(want[name], abs=1e-12), name


def test_mean_over_queries_and_per_query() -> None:
    mean, rows = retrieval_metrics([["a"], ["b"]], [{"a"}, {"a"}], ks=(1,), per_query=True)
    assert mean["recall@1"] == 0.5
    assert [r["recall@1"] for r in rows] == [1.0, 0.0]


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="each SKU once"):
        retrieval_metrics([["a", "a"]], [{"a"}])
    with pytest.raises(ValueError, match="2 rankings but 1"):
        retrieval_metrics([["a"], ["b"]], [{"a"}])
    with pytest.raises(ValueError, match="k must be positive"):
        retrieval_metrics([["a"]], [{"a"}], ks=(0,))


def test_box_metrics() -> None:
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10))[0, 0] == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3))[0, 0] == 0.0
    assert box_iou([(0, 0, 10, 10)] * 3, [(0, 0, 10, 10)] * 2).shape == (3, 2)
    assert main_object_hit_rate(
        [(0, 0, 10, 10), (0, 0, 10, 10)], [(0, 0, 10, 10), (6, 0, 16, 10)]
    ) == 0.5
    assert accuracy(["shoe", "bag"], ["shoe", "top"]) == 0.5
