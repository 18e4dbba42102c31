"""Category voting: hand-computed mixes of detector scores and neighbour votes."""

from __future__ import annotations

import numpy as np
import pytest

from visearch.search.voting import VoteWeights, vote_category


def test_equal_weights_hand_computed() -> None:
    # detector: shoe 0.6/0.8 = 0.75, bag 0.25; neighbours: bag (0.9+0.5)/2.0 = 0.7, shoe 0.3
    d = vote_category({"shoe": 0.6, "bag": 0.2}, ["bag", "shoe", "bag"], [0.9, 0.6, 0.5],
                      weights=VoteWeights(temperature=None))
    assert d.source == "vote"
    assert d.category == "shoe"
    assert d.score == pytest.approx((0.75 + 0.3) / 2)
    by = {v.category: v for v in d.votes}
    assert by["bag"].combined == pytest.approx((0.25 + 0.7) / 2)
    assert by["shoe"].detector == pytest.approx(0.75)
    assert by["bag"].neighbours == pytest.approx(0.7)
    assert [v.category for v in d.votes] == ["shoe", "bag"]


def test_neighbour_weight_flips_the_decision() -> None:
    d = vote_category({"shoe": 0.6, "bag": 0.2}, ["bag", "shoe", "bag"], [0.9, 0.6, 0.5],
                      weights=VoteWeights(detector=1.0, neighbours=3.0, temperature=None))
    # bag: (0.25 + 3 * 0.7) / 4 = 0.5875; shoe: (0.75 + 3 * 0.3) / 4 = 0.4125
    assert d.category == "bag"
    assert d.score == pytest.approx(0.5875)


def test_negative_similarities_vote_zero() -> None:
    # raw weights: bag 0.9 + 0.5 = 1.4, shoe 0.6, hat max(-0.4, 0) = 0
    d = vote_category(None, ["bag", "shoe", "bag", "hat"], [0.9, 0.6, 0.5, -0.4],
                      weights=VoteWeights(temperature=None))
    assert d.source == "neighbours"
    assert d.category == "bag"
    assert d.score == pytest.approx(1.4 / 2.0)
    assert {v.category for v in d.votes} == {"bag", "shoe", "hat"}
    assert next(v for v in d.votes if v.category == "hat").combined == 0.0


def test_relative_temperature_is_scale_free() -> None:
    # spread 0.4, t = 0.5: w = exp(-(0.9 - s) / 0.2) = 1, exp(-0.5), exp(-1), exp(-2)
    cats, sims = ["shoe", "bag", "bag", "bag"], [0.9, 0.8, 0.7, 0.5]
    w = np.exp(-np.array([0.0, 0.5, 1.0, 2.0]))
    d = vote_category(None, cats, sims, weights=VoteWeights(temperature=0.5))
    assert d.category == "bag"
    assert d.score == pytest.approx(w[1:].sum() / w.sum())
    # The same ranks squeezed into a flat (untrained-model) range vote the same way.
    flat = [0.99 + (s - 0.5) / 100 for s in sims]
    f = vote_category(None, cats, flat, weights=VoteWeights(temperature=0.5))
    assert f.score == pytest.approx(d.score)
    # A near-exact top match wins at the default temperature though 3 of 4 disagree.
    top = vote_category(None, cats, [1.0, 0.981, 0.98, 0.979])
    assert top.category == "shoe"


def test_detector_only_hint_and_nothing() -> None:
    d = vote_category({"hat": 2.0, "bag": 2.0}, [], [])
    assert (d.source, d.category, d.score) == ("detector", "bag", 0.5)  # tie -> by name
    h = vote_category({"hat": 1.0}, ["bag"], [1.0], hint="bag")
    assert (h.source, h.category, h.score) == ("hint", "bag", pytest.approx(0.5))
    n = vote_category({}, [], [])
    assert (n.source, n.category, n.votes) == ("none", None, ())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="similarities"):
        vote_category(None, ["a", "b"], [1.0])
    with pytest.raises(ValueError, match="positive sum"):
        VoteWeights(detector=0.0, neighbours=0.0)
    with pytest.raises(ValueError, match="temperature"):
        VoteWeights(temperature=0.0)
