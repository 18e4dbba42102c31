"""SKU merging by held-out classifier confusion, on hand-built embeddings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from visearch.catalog import CatalogRow
from visearch.cleaning import apply_cleaning, heldout_confusion, merge_skus, symmetrise

D = 16


def _cluster(rng: np.random.Generator, centre: int, n: int, spread: float = 0.3) -> np.ndarray:
    x = np.eye(D)[centre] + spread * rng.standard_normal((n, D)) / np.sqrt(D)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _two_alike_one_apart(seed: int = 0, n: int = 12) -> tuple[np.ndarray, list[str]]:
    """SKUs A and B drawn from one cluster (one product under two ids, images interleaved),
    C from a separate cluster."""
    rng = np.random.default_rng(seed)
    ab = _cluster(rng, 0, 2 * n)
    c = _cluster(rng, 5, n)
    x = np.concatenate([ab, c]).astype(np.float32)
    skus = ["A", "B"] * n + ["C"] * n
    return x, skus


def test_confusion_matrix_of_two_alike_and_one_apart():
    x, skus = _two_alike_one_apart()
    labels = np.array([{"A": 0, "B": 1, "C": 2}[s] for s in skus])
    P, acc = heldout_confusion(x, labels, folds=4, soft=False)
    # Held-out argmax predictions of C are all C; A and B are confused with each other only.
    np.testing.assert_allclose(P[2], [0, 0, 1])
    assert P[0, 2] == 0 and P[1, 2] == 0
    np.testing.assert_allclose(P.sum(axis=1), 1.0)
    assert P[0, 1] > 0.25 and P[1, 0] > 0.25
    # Accuracy counts C's 12 right plus A's and B's diagonal hits, of 36.
    assert acc == pytest.approx((12 + 12 * P[0, 0] + 12 * P[1, 1]) / 36)
    # Soft counts: the same picture in probabilities; rows still sum to 1.
    Ps, _ = heldout_confusion(x, labels, folds=4, soft=True)
    np.testing.assert_allclose(Ps.sum(axis=1), 1.0, atol=1e-9)
    assert Ps[2, 2] > 0.8 and Ps[0, 2] < 0.1 and Ps[0, 1] > 0.25 and Ps[1, 0] > 0.25


def test_symmetrise_by_hand():
    P = np.array([[0.5, 0.5, 0.0], [0.1, 0.9, 0.0], [0.0, 0.2, 0.8]])
    S = symmetrise(P)
    np.testing.assert_allclose(S, [[0, 0.3, 0], [0.3, 0, 0.1], [0, 0.1, 0]])


def test_two_confused_skus_merge_and_the_third_does_not():
    x, skus = _two_alike_one_apart()
    result = merge_skus(x, skus, thresholds=(0.2,), folds=4)
    assert result.sku_map == {"A": "A", "B": "A", "C": "C"}
    assert [g.skus for g in result.groups] == [["A", "B"]]
    group = result.groups[0]
    assert group.style_id == "A" and group.score > 0.2
    assert [(e.a, e.b) for e in group.edges] == [("A", "B")]
    assert result.merged_pairs() == {("A", "B")}
    # Round 0 merges; round 1 retrains on {A+B, C}, merges nothing, and stops.
    assert [r.merged_pairs for r in result.rounds] == [1, 0]
    assert [r.classes for r in result.rounds] == [3, 2]
    assert result.rounds[1].heldout_accuracy > 0.9  # {A+B} vs C: separable
    assert result.summary()["styles"] == 2
    hard = merge_skus(x, skus, thresholds=(0.2,), folds=4, soft=False)
    assert hard.sku_map == result.sku_map
    assert hard.rounds[1].heldout_accuracy == 1.0


def test_schedule_lowers_the_threshold_until_nothing_merges():
    x, skus = _two_alike_one_apart()
    # 0.99 merges nothing: the confusion matrix is reused (no refit) at the next threshold.
    result = merge_skus(x, skus, thresholds=(0.99, 0.2), folds=4)
    assert [(r.threshold, r.merged_pairs, r.refit) for r in result.rounds] == [
        (0.99, 0, True),
        (0.2, 1, False),
        (0.2, 0, True),
    ]
    assert result.sku_map["B"] == "A"


def test_categories_keep_merges_within_a_category():
    x, skus = _two_alike_one_apart()
    cats = ["shoe" if s == "A" else "bag" for s in skus]
    result = merge_skus(x, skus, categories=cats, thresholds=(0.2,), folds=4)
    assert result.groups == []
    assert result.sku_map == {"A": "A", "B": "B", "C": "C"}


def test_bad_thresholds():
    x, skus = _two_alike_one_apart()
    with pytest.raises(ValueError, match="thresholds"):
        merge_skus(x, skus, thresholds=())
    with pytest.raises(ValueError, match="thresholds"):
        merge_skus(x, skus, thresholds=(1.5,))


def test_apply_cleaning_drops_and_renames():
    rows = [
        CatalogRow(
            line=i + 1,
            image=f"img/{i}.jpg",
            path=Path(f"/c/img/{i}.jpg"),
            sku=s,
            category="bag",
            title=f"t{i}",
        )
        for i, s in enumerate(["A", "B", "B", "C"])
    ]
    out = apply_cleaning(rows, {"img/2.jpg"}, {"B": "A", "A": "A"})
    assert [(r.line, r.sku) for r in out] == [(1, "A"), (2, "A"), (4, "C")]
    assert out[1] == dataclasses.replace(rows[1], sku="A")
    assert out[0] is rows[0] and rows[1].sku == "B"  # inputs untouched
