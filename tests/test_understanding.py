"""The embedder's understanding heads: save/load round trip, copies of the trained loss
terms, ONNX parity, trend task weights against a hand-computed oracle, the vote with the
category head, and the training hold-out."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from visearch.embedding import (
    TaskHeads,
    build_embedder,
    embed_arrays_with_heads,
    load_embedder,
    save_embedder,
)
from visearch.embedding.heads import softmax, top_k_prediction
from visearch.embedding.losses import (
    AttributeLoss,
    LossTerm,
    SoftmaxLoss,
    TrendWeights,
    WeightedLoss,
)
from visearch.embedding.train import ImageSet, hold_out
from visearch.search.voting import (
    AttributeWeights,
    VoteWeights,
    vote_attributes,
    vote_category,
)

CATS = ["bag", "mug", "shoe"]
ATTRS = {"color": ["blue", "red", "white", "black"], "pattern": ["dots", "solid"]}


def _model_with_heads(seed: int = 0):
    torch.manual_seed(seed)
    model = build_embedder("tiny", dim=32, input_size=32).eval()
    model.set_heads(TaskHeads(32, CATS, ATTRS))
    return model


def _crops(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 3 * i, 36, 3), dtype=np.uint8) for i in range(n)]


def test_head_outputs_round_trip_through_save_and_load(tmp_path) -> None:
    model = _model_with_heads()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        emb, logits = model.forward_with_heads(x)
    path = tmp_path / "m.pt"
    save_embedder(model, path)
    loaded = load_embedder(path)
    assert loaded.heads is not None
    assert loaded.heads.categories == CATS and loaded.heads.attributes == ATTRS
    assert loaded.heads.names == ["category", "attr.color", "attr.pattern"]
    with torch.no_grad():
        emb2, logits2 = loaded.forward_with_heads(x)
    torch.testing.assert_close(emb2, emb, rtol=0, atol=0)
    assert set(logits2) == set(logits)
    for name in logits:
        torch.testing.assert_close(logits2[name], logits[name], rtol=0, atol=0)
        assert logits[name].shape == (5, len(loaded.heads.labels(name)))
    # The plain embedding is unchanged by the heads: forward == forward_with_heads[0].
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), emb2)
    # Batch inference returns the same logits row by row.
    vecs, batch_logits = embed_arrays_with_heads(loaded, _crops(4), batch_size=3)
    vecs1, one = embed_arrays_with_heads(loaded, _crops(4)[2:3])
    np.testing.assert_allclose(vecs[2], vecs1[0], atol=1e-6)
    np.testing.assert_allclose(batch_logits["attr.color"][2], one["attr.color"][0], atol=1e-5)


def test_a_model_without_heads_loads_as_before(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_embedder("tiny", dim=16, input_size=32)
    save_embedder(model, tmp_path / "m.pt")
    loaded = load_embedder(tmp_path / "m.pt")
    assert loaded.heads is None and "heads" not in loaded.config
    _, logits = embed_arrays_with_heads(loaded, _crops(2))
    assert logits == {}


def test_heads_are_copies_of_the_trained_loss_terms() -> None:
    torch.manual_seed(3)
    cat = SoftmaxLoss(32, len(CATS))
    attrs = AttributeLoss(32, [len(v) for v in ATTRS.values()])
    loss = WeightedLoss([LossTerm("cat", cat, 0.1, "category"),
                         LossTerm("attributes", attrs, 0.1, "attributes")])
    heads = TaskHeads.from_loss(32, loss, CATS, ATTRS)
    assert heads is not None
    z = torch.randn(6, 32)
    out = heads(z)
    torch.testing.assert_close(out["category"], cat.logits(z))
    torch.testing.assert_close(out["attr.color"], attrs.heads[0](z))
    torch.testing.assert_close(out["attr.pattern"], attrs.heads[1](z))
    # Copies: training the loss further does not move the served heads.
    with torch.no_grad():
        cat.fc.weight.add_(1.0)
    assert not torch.allclose(heads(z)["category"], cat.logits(z))
    only_sku = WeightedLoss([LossTerm("arc", SoftmaxLoss(32, 5))])
    assert TaskHeads.from_loss(32, only_sku, CATS, ATTRS) is None


def test_top_k_prediction_is_the_softmax_order() -> None:
    logits = np.array([0.5, 2.0, -1.0, 2.0])
    pred = top_k_prediction(logits, ["a", "b", "c", "d"], 3)
    p = np.exp(logits) / np.exp(logits).sum()
    assert pred.values == ("b", "d", "a")  # the tie b/d keeps class order
    np.testing.assert_allclose(pred.scores, [p[1], p[3], p[0]])
    np.testing.assert_allclose(softmax(np.array([[1000.0, 1000.0]])), [[0.5, 0.5]])
    with pytest.raises(ValueError, match="labels"):
        top_k_prediction(logits, ["a"], 1)


def test_trend_weights_follow_the_validation_trend_oracle() -> None:
    trend = TrendWeights(["category", "attributes"], [0.1, 0.3], floor=0.25)
    assert trend.update({"category": 2.0, "attributes": 3.0}) == pytest.approx(
        {"category": 0.1, "attributes": 0.3})  # the first measurement only records
    # category stalls (2.0 -> 2.0), attributes learn fast (3.0 -> 1.5):
    w = trend.update({"category": 2.0, "attributes": 1.5})
    s_cat, s_att = (2.0 / 2.0) * (2.0 / 2.0), (1.5 / 3.0) * (1.5 / 3.0)
    budget, lo = 0.4, 0.25 * 0.4 / 2
    expect = {"category": lo + (budget - 2 * lo) * s_cat / (s_cat + s_att),
              "attributes": lo + (budget - 2 * lo) * s_att / (s_cat + s_att)}
    assert w == pytest.approx(expect)
    assert sum(w.values()) == pytest.approx(budget)  # the budget is kept
    assert w["category"] > 0.1 and w["attributes"] < 0.3  # the stalled task gains
    # The floor: a task never falls below floor * budget / n, however fast it learns.
    for step in range(5):
        w = trend.update({"category": 2.0, "attributes": 10.0 ** -(step + 1)})
    assert w["attributes"] >= lo and w["attributes"] == pytest.approx(lo, rel=1e-3)
    assert sum(w.values()) == pytest.approx(budget)
    # State is in the buffers, so a checkpoint carries it.
    other = TrendWeights(["category", "attributes"], [0.1, 0.3])
    other.load_state_dict(trend.state_dict())
    assert other.as_dict() == pytest.approx(trend.as_dict())
    with pytest.raises(ValueError, match="finite"):
        trend.update({"category": float("nan"), "attributes": 1.0})
    with pytest.raises(KeyError):
        trend.update({"category": 1.0})


def test_weighted_loss_uses_the_trend_weights() -> None:
    torch.manual_seed(0)
    cat = SoftmaxLoss(8, 3)
    sku = SoftmaxLoss(8, 4)
    trend = TrendWeights(["cat"], [0.5])
    loss = WeightedLoss([LossTerm("sku", sku, 1.0), LossTerm("cat", cat, 0.5, "category")],
                        trend=trend)
    x = torch.randn(6, 8)
    targets = {"sku": torch.tensor([0, 1, 2, 3, 0, 1]), "category": torch.tensor([0, 1, 2] * 2)}
    trend.weights.fill_(2.0)
    total, parts = loss(x, targets)
    assert float(total.detach()) == pytest.approx(float(parts["sku"]) + 2.0 * float(parts["cat"]),
                                         rel=1e-6)
    assert loss.weight("sku") == 1.0 and loss.weight("cat") == 2.0
    with pytest.raises(ValueError, match="unknown terms"):
        WeightedLoss([LossTerm("sku", sku)], trend=TrendWeights(["cat"], [1.0]))


def test_vote_with_the_category_head_matches_the_formula() -> None:
    det = {"bag": 3.0, "mug": 1.0}
    cats = ["mug", "mug", "shoe"]
    sims = [0.9, 0.8, 0.7]
    head = {"bag": 0.2, "mug": 0.1, "shoe": 0.7}
    weights = VoteWeights(detector=1.0, neighbours=2.0, head=0.5, temperature=None)
    d = vote_category(det, cats, sims, weights=weights, head_scores=head)
    nn = {"mug": 1.7 / 2.4, "shoe": 0.7 / 2.4}
    dd = {"bag": 0.75, "mug": 0.25}
    expect = {c: (1.0 * dd.get(c, 0) + 2.0 * nn.get(c, 0) + 0.5 * head[c]) / 3.5
              for c in ("bag", "mug", "shoe")}
    got = {v.category: v.combined for v in d.votes}
    assert got == pytest.approx(expect)
    assert sum(got.values()) == pytest.approx(1.0)
    assert {v.category: v.head for v in d.votes} == pytest.approx(head)
    assert d.source == "vote" and d.category == max(expect, key=expect.get)
    assert d.top(2) == [(c, pytest.approx(expect[c]))
                        for c in sorted(expect, key=lambda c: -expect[c])[:2]]
    # Without a head the vote is the old one; the head alone is a source too.
    no_head = vote_category(det, cats, sims, weights=weights)
    assert all(v.head == 0.0 for v in no_head.votes)
    only = vote_category(None, [], [], weights=weights, head_scores=head)
    assert only.source == "head" and only.category == "shoe"
    with pytest.raises(ValueError, match="positive sum"):
        VoteWeights(detector=0.0, neighbours=0.0, head=1.0)


def test_attribute_vote_matches_a_hand_computed_vote() -> None:
    # Three neighbours, similarities 0.9, 0.8, 0.5: spread 0.4, temperature 0.5, so
    # w = exp(-(0.9 - s) / 0.2) = 1, e^-0.5, e^-2. The third has no pattern.
    attrs = [{"color": "red", "pattern": "dots"}, {"color": "blue", "pattern": "solid"},
             {"color": "red"}]
    sims = [0.9, 0.8, 0.5]
    head = {"color": {"red": 0.1, "blue": 0.3, "white": 0.6}}
    weights = AttributeWeights(neighbours=1.0, head=0.5, temperature=0.5)
    votes = vote_attributes(["color", "pattern", "material"], attrs, sims, head_scores=head,
                            weights=weights)
    w1, w2, w3 = 1.0, math.exp(-0.5), math.exp(-2.0)
    nn_red, nn_blue = (w1 + w3) / (w1 + w2 + w3), w2 / (w1 + w2 + w3)
    expect = {"red": (nn_red + 0.5 * 0.1) / 1.5, "blue": (nn_blue + 0.5 * 0.3) / 1.5,
              "white": 0.5 * 0.6 / 1.5}
    assert [v.value for v in votes["color"]] == sorted(expect, key=lambda v: -expect[v])
    assert {v.value: v.combined for v in votes["color"]} == pytest.approx(expect)
    assert {v.value: v.neighbours for v in votes["color"]} == pytest.approx(
        {"red": nn_red, "blue": nn_blue, "white": 0.0})
    assert {v.value: v.head for v in votes["color"]} == pytest.approx(head["color"])
    # No head for pattern: the neighbours alone (the third neighbour has no vote on it);
    # nobody knows the material: left out.
    assert {v.value: v.combined for v in votes["pattern"]} == pytest.approx(
        {"dots": w1 / (w1 + w2), "solid": w2 / (w1 + w2)})
    assert "material" not in votes
    # The head alone when there are no neighbours; raw similarities without a temperature.
    alone = vote_attributes(["color"], [], [], head_scores=head, weights=weights)
    assert [v.value for v in alone["color"]] == ["white", "blue", "red"]
    raw = vote_attributes(["color"], attrs, sims, weights=AttributeWeights(temperature=None))
    assert {v.value: v.combined for v in raw["color"]} == pytest.approx(
        {"red": 1.4 / 2.2, "blue": 0.8 / 2.2})
    with pytest.raises(ValueError, match="similarities"):
        vote_attributes(["color"], attrs, sims[:2])
    with pytest.raises(ValueError, match="positive sum"):
        AttributeWeights(neighbours=0.0, head=0.0)


def test_onnx_embedder_outputs_the_head_logits(tmp_path) -> None:
    from visearch.runtime.onnx import (
        MAP_TOL,
        OrtEmbedder,
        embedder_parity,
        export_embedder,
        make_session,
    )

    model = _model_with_heads(seed=2)
    path = tmp_path / "e.onnx"
    export_embedder(model, path)
    session = make_session(path, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["embeddings", *model.heads.names]
    parity = embedder_parity(model, session)
    assert parity["max_abs_diff"] <= 1e-4
    assert parity["heads_max_abs_diff"] <= MAP_TOL and parity["heads_argmax_agree"] == 1.0
    ort = OrtEmbedder(path, model.config, providers=["CPUExecutionProvider"])
    crops = _crops(5, seed=4)
    vecs, logits = ort.embed_arrays_with_heads(crops, batch_size=2)
    ref_vecs, ref_logits = embed_arrays_with_heads(model, crops, batch_size=5)
    np.testing.assert_allclose(vecs, ref_vecs, atol=1e-4)
    assert set(logits) == set(ref_logits)
    for name in logits:
        np.testing.assert_allclose(logits[name], ref_logits[name], atol=MAP_TOL)
    # A graph exported without heads reports that the session lacks them.
    plain = _model_with_heads(seed=2)
    plain.set_heads(None)
    export_embedder(plain, tmp_path / "plain.onnx")
    bad = embedder_parity(model, make_session(tmp_path / "plain.onnx",
                                              providers=["CPUExecutionProvider"]))
    assert math.isinf(bad["heads_max_abs_diff"])


def test_hold_out_keeps_every_sku_in_training() -> None:
    sku = np.repeat(np.arange(40), [1 if i % 4 == 0 else 5 for i in range(40)])
    images = ImageSet([f"img{i}" for i in range(len(sku))], [None] * len(sku),
                      {"sku": sku, "category": sku % 3})
    train, held = hold_out(images, 0.2, seed=1)
    assert len(train) + len(held) == len(images)
    assert set(train.sources).isdisjoint(held.sources)
    held_skus = np.asarray(held.labels["sku"])
    assert len(np.unique(held_skus)) == len(held_skus)  # one per SKU at most
    assert set(np.asarray(train.labels["sku"])) == set(sku)  # no SKU lost
    assert all(s % 4 != 0 for s in held_skus)  # only SKUs with >= 3 images give one
    assert len(held) == min(round(0.2 * len(images)), 30)
    again, held2 = hold_out(images, 0.2, seed=1)
    assert list(held2.sources) == list(held.sources)  # seeded
    with pytest.raises(ValueError, match="fraction"):
        hold_out(images, 1.5)
