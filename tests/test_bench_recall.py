"""The recall benchmark's vote-weight sweep against the serving code's own decisions."""

from __future__ import annotations

import numpy as np

from benchmarks.recall import vote_weight_sweep
from visearch.search.voting import VoteWeights, vote_category

CATS = ["bag", "cap", "mug", "shoe"]


def record(decision) -> dict:
    return {"votes": [(v.category, v.detector, v.neighbours, v.combined)
                      for v in decision.votes]}


def test_hand_case_flips_with_the_detector_share():
    # Detector: bag 0.7, cap 0.3. Neighbours: bag 0.2, cap 0.8.
    rec = {"votes": [("bag", 0.7, 0.2, 0.45), ("cap", 0.3, 0.8, 0.55)]}
    sweep = vote_weight_sweep([rec], ["bag"], shares=(0.0, 0.5, 0.55, 0.75, 1.0))
    # combined bag = 0.7 w + 0.2 (1 - w) beats cap = 0.3 w + 0.8 (1 - w) once w > 0.6.
    assert [r["category_accuracy"] for r in sweep] == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_equal_share_reproduces_the_served_decisions():
    rng = np.random.default_rng(0)
    records, served, det_only, nn_only = [], [], [], []
    for i in range(200):
        scores = {c: float(s) for c, s in zip(CATS, rng.random(4), strict=True)}
        cats = list(rng.choice(CATS, size=20))
        sims = np.sort(rng.uniform(0.3, 0.9, 20))[::-1]
        detector = None if i % 10 == 0 else scores  # some queries have no detector say
        decision = vote_category(detector, cats, sims, weights=VoteWeights())
        records.append(record(decision))
        served.append(decision.category)
        det_only.append(max(scores, key=scores.get) if detector else "")
        nn_only.append(vote_category(None, cats, sims).category)
    sweep = {r["detector_share"]: r["category_accuracy"]
             for r in vote_weight_sweep(records, served, shares=(0.5,))}
    assert sweep[0.5] == 1.0
    ends = vote_weight_sweep(records, det_only, shares=(1.0,))
    assert ends[0]["category_accuracy"] == 1.0
    ends = vote_weight_sweep(records, nn_only, shares=(0.0,))
    assert ends[0]["category_accuracy"] == 1.0
    # And the sweep is not constant: the sources disagree on many of these queries.
    mixed = vote_weight_sweep(records, served, shares=(0.0, 1.0))
    assert all(r["category_accuracy"] < 0.9 for r in mixed)
