"""Hierarchical DBSCAN SKU denoising on hand-built embeddings with known geometry."""

from __future__ import annotations

import numpy as np
import pytest

from visearch.cleaning import dbscan_baseline, denoise_skus
from visearch.cleaning.denoise import distance_to_core

D = 8


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _at_angle(base: int, other: int, cos: float) -> np.ndarray:
    """A unit vector with cosine ``cos`` to axis ``base``, tilted towards axis ``other``."""
    v = np.zeros(D)
    v[base], v[other] = cos, np.sqrt(1 - cos**2)
    return v


def _world() -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    e0 = np.eye(D)[0]
    rows, skus = [], []
    # SKU "A": five tight images around axis 0 (pairwise cosine distance < 0.01), a hard
    # positive at cosine distance 0.15 from the axis (beyond eps 0.05 of every core image),
    # and an obvious outlier on axis 1 (a different product).
    rows += [e0 + 0.05 * rng.standard_normal(D) * np.eye(D)[2:].sum(0) for _ in range(5)]
    rows += [_at_angle(0, 3, 0.85), np.eye(D)[1]]
    skus += ["A"] * 7
    # SKU "B": too small to judge.
    rows += [np.eye(D)[4], np.eye(D)[5]]
    skus += ["B", "B"]
    # SKU "C": four mutually orthogonal images: no cluster at all.
    rows += [np.eye(D)[k] for k in (4, 5, 6, 7)]
    skus += ["C"] * 4
    # SKU "D": a cluster of four on axis 6 and a pair on axis 7: the pair is a minor cluster.
    rows += [np.eye(D)[6] + 0.01 * np.eye(D)[k] for k in range(4)]
    rows += [np.eye(D)[7], np.eye(D)[7] + 0.01 * np.eye(D)[0]]
    skus += ["D"] * 6
    return _unit(np.array(rows)), skus


def test_outlier_removed_and_hard_positive_returned_in_step_2():
    x, skus = _world()
    result = denoise_skus(x, skus, eps=0.05, return_thresh=0.2)
    # SKU A: rows 0-4 core, 5 (hard positive) returned, 6 (outlier) removed.
    np.testing.assert_array_equal(result.core[:7], [1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(result.returned[:7], [0, 0, 0, 0, 0, 1, 0])
    removed = {r.index: r for r in result.removed}
    assert removed[6].sku == "A" and removed[6].reason == "noise"
    # The outlier is orthogonal to the core's centroid: cosine distance 1.
    assert removed[6].distance == pytest.approx(1.0, abs=1e-4)
    assert result.small_skus == ["B"]
    assert result.unclustered_skus == ["C"]
    # SKU D (rows 13-18): the pair on axis 7 is a minor cluster, removed.
    assert {i: r.reason for i, r in removed.items() if r.sku == "D"} == {
        17: "minor_cluster",
        18: "minor_cluster",
    }
    assert set(removed) == {6, 17, 18}
    np.testing.assert_array_equal(np.flatnonzero(~result.keep), [6, 17, 18])
    s = result.summary()
    assert (s["removed"], s["returned_by_step2"], s["small_skus_kept"]) == (3, 1, 1)


def test_step_1_alone_drops_the_hard_positive_too():
    x, skus = _world()
    result = denoise_skus(x, skus, eps=0.05, return_thresh=None)
    assert not result.returned.any()
    assert {r.index for r in result.removed} == {5, 6, 17, 18}
    hard = next(r for r in result.removed if r.index == 5)
    # Distance of the hard positive to the core centroid, by hand: 1 - cos(angle to centroid).
    centroid = _unit(x[:5].mean(0))
    assert hard.distance == pytest.approx(1 - float(x[5] @ centroid), abs=1e-5)


def test_nearest_rule_and_thresholds():
    x, skus = _world()
    # Too strict a return threshold keeps the hard positive out.
    strict = denoise_skus(x, skus, eps=0.05, return_thresh=0.1)
    assert 5 in {r.index for r in strict.removed}
    nearest = denoise_skus(x, skus, eps=0.05, return_thresh=0.2, return_rule="nearest")
    assert {r.index for r in nearest.removed} == {6, 17, 18}
    d = distance_to_core(x[5:6], x[:5], rule="nearest")
    assert d[0] == pytest.approx(1 - float((x[:5] @ x[5]).max()), abs=1e-6)


def test_plain_dbscan_baseline_keeps_every_cluster():
    x, skus = _world()
    keep = dbscan_baseline(x, skus, eps=0.05)
    # Noise only: the hard positive and the outlier of A; D's minor cluster stays.
    np.testing.assert_array_equal(np.flatnonzero(~keep), [5, 6])


def test_bad_input():
    x, skus = _world()
    with pytest.raises(ValueError, match="L2-normalised"):
        denoise_skus(x * 2, skus)
    with pytest.raises(ValueError, match="SKU labels"):
        denoise_skus(x, skus[:-1])
    with pytest.raises(ValueError, match="return_rule"):
        denoise_skus(x, skus, return_rule="median")
