"""SKU merging by held-out classifier confusion, on hand-built embeddings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from visearch.catalog import CatalogRow
from visearch.cleaning import (
    DistinctNull,
    apply_cleaning,
    calibrated_merge,
    fit_distinct_null,
    heldout_confusion,
    merge_skus,
    symmetrise,
)
from visearch.cleaning.calibrated import excess_distance, sku_statistics

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


# ---- calibrated merging ---------------------------------------------------------------------


def _catalog(seed: int = 0, *, n_distinct: int = 30, lookalike_shift: float = 0.35):
    """A category of ``n_distinct`` distinct SKUs (5 images each around random centres), one
    product split under SPLIT1/SPLIT2 (4 images each, one centre), and a look-alike pair:
    BIG (16 images) and SMALL (4 images, centre shifted by ``lookalike_shift``): the
    classifier files SMALL's images under BIG far more often than the reverse."""
    rng = np.random.default_rng(seed)
    d = 32

    def around(centre: np.ndarray, n: int, spread: float = 0.5) -> np.ndarray:
        x = centre + spread * rng.standard_normal((n, d)) / np.sqrt(d)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def unit() -> np.ndarray:
        v = rng.standard_normal(d)
        return v / np.linalg.norm(v)

    xs, skus = [], []
    for k in range(n_distinct):
        xs.append(around(unit(), 5))
        skus += [f"D{k:02d}"] * 5
    split = unit()
    for name in ("SPLIT1", "SPLIT2"):
        xs.append(around(split, 4))
        skus += [name] * 4
    big = unit()
    small = big + lookalike_shift * unit()
    xs += [around(big, 16), around(small / np.linalg.norm(small), 4)]
    skus += ["BIG"] * 16 + ["SMALL"] * 4
    return np.concatenate(xs).astype(np.float32), skus


def test_sku_statistics_equal_brute_force():
    x, skus = _catalog()
    names, labels = np.unique(skus, return_inverse=True)
    centroid, count, within = sku_statistics(x, labels, len(names))
    for k in range(len(names)):
        own = x[labels == k].astype(np.float64)
        G = own @ own.T
        n = len(own)
        assert count[k] == n
        assert within[k] == pytest.approx((G.sum() - np.trace(G)) / (n * (n - 1)), abs=1e-6)
    a, b = np.array([0, 3]), np.array([5, 7])
    u = excess_distance(centroid, within, a, b)
    for p, (i, j) in enumerate(zip(a, b, strict=True)):
        cross = (x[labels == i].astype(np.float64) @ x[labels == j].T).mean()
        assert u[p] == pytest.approx((within[i] + within[j]) / 2 - cross, abs=1e-6)


def test_distinct_null_fit_and_contamination_only_make_it_more_conservative():
    rng = np.random.default_rng(1)
    # A power law on [0, 0.4]: P(U <= u) = (u / 0.4) ** 1.5, median 0.4 * 0.5 ** (1 / 1.5).
    u = 0.4 * rng.uniform(size=8000) ** (1 / 1.5)
    null = fit_distinct_null(u)
    assert null.k == pytest.approx(1.5, rel=0.05)
    assert null.median == pytest.approx(0.4 * 0.5 ** (1 / 1.5), rel=0.02)
    assert null.false_merge_p(0.05) == pytest.approx((0.05 / 0.4) ** 1.5, rel=0.15)
    # 10 % true duplicates at or below 0 (split SKUs) lower k: a heavier tail, fewer merges.
    dirty = fit_distinct_null(np.concatenate([u, np.full(800, -0.01)]))
    assert dirty.k < null.k and dirty.false_merge_p(0.01) > null.false_merge_p(0.01)
    # By hand: 0 at or below 0, capped at 1 above.
    exact = DistinctNull(median=0.2, k=2.0, samples=1)
    np.testing.assert_allclose(exact.false_merge_p(np.array([-0.1, 0.0, 0.1, 0.2, 0.5])),
                               [0.0, 0.0, 0.125, 0.5, 1.0])
    with pytest.raises(ValueError, match="degenerate"):
        fit_distinct_null(np.array([-1.0, -1.0, -1.0, 0.2, 0.3]))


def test_split_skus_merge_and_one_sided_look_alikes_do_not():
    x, skus = _catalog()
    result = calibrated_merge(x, skus, folds=4)
    assert result.groups and [g.skus for g in result.groups] == [["SPLIT1", "SPLIT2"]]
    assert result.sku_map["SPLIT2"] == "SPLIT1" and result.sku_map["SMALL"] == "SMALL"
    by_pair = {c.key: c for c in result.candidates}
    split = by_pair[("SPLIT1", "SPLIT2")]
    assert split.decision == "merge" and min(split.confusion_ab, split.confusion_ba) >= 0.15
    look = by_pair[("BIG", "SMALL")]
    # SMALL's images go to BIG, not the reverse: one-sided, so review, not a merge, even
    # though the embeddings are close.
    assert look.confusion_ba > 0.3 and look.confusion_ab < 0.15
    assert look.decision == "review" and "one-sided" in look.reason
    assert look.false_merge_p < split.false_merge_p + 0.5
    assert result.summary()["review_pairs"] >= 1 and result.summary()["merge_groups"] == 1


def test_reviewed_decisions_are_applied():
    x, skus = _catalog()
    rejected = calibrated_merge(x, skus, folds=4, rejected=[("SPLIT2", "SPLIT1")])
    assert rejected.groups == [] and rejected.sku_map["SPLIT2"] == "SPLIT2"
    assert {c.key: c.decision for c in rejected.candidates}[("SPLIT1", "SPLIT2")] == "rejected"
    accepted = calibrated_merge(x, skus, folds=4, accepted=[("BIG", "SMALL")])
    assert sorted(g.skus for g in accepted.groups) == [["BIG", "SMALL"], ["SPLIT1", "SPLIT2"]]


def test_a_rejected_pair_never_joins_through_a_third_sku():
    x, skus = _catalog()
    # Accepting BIG-SPLIT1 and SMALL-SPLIT1 would put BIG and SMALL in one group.
    result = calibrated_merge(
        x, skus, folds=4, accepted=[("BIG", "SPLIT1"), ("SMALL", "SPLIT1")],
        rejected=[("BIG", "SMALL")])
    assert result.sku_map["BIG"] != result.sku_map["SMALL"]
    assert "blocked" in {c.decision for c in result.candidates}


def test_too_few_skus_to_calibrate_send_pairs_to_review():
    x, skus = _two_alike_one_apart()
    result = calibrated_merge(x, skus, folds=4)
    assert result.groups == []
    assert [(c.key, c.decision) for c in result.candidates] == [(("A", "B"), "review")]
    with pytest.raises(ValueError, match="review_rate"):
        calibrated_merge(x, skus, false_merge_rate=0.2, review_rate=0.1)


def test_colourways_do_not_merge_when_colours_are_given():
    x, skus = _catalog()
    colors = np.zeros((len(skus), 32), np.float32)
    colors[:, 0] = 0.3  # one colour everywhere ...
    colors[[s == "SPLIT2" for s in skus], 0] = -0.3  # ... but SPLIT2 is another colourway
    result = calibrated_merge(x, skus, folds=4, colors=colors)
    assert result.groups == []
    pair = {c.key: c for c in result.candidates}[("SPLIT1", "SPLIT2")]
    assert pair.decision == "review" and "colours differ: colour distance 2.00" in pair.reason
    same = calibrated_merge(x, skus, folds=4, colors=np.abs(colors))
    assert [g.skus for g in same.groups] == [["SPLIT1", "SPLIT2"]]
