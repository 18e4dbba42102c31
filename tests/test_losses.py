"""Each loss against values computed independently with plain math/numpy on tiny batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from visearch.embedding.losses import (
    ArcFaceLoss,
    AttributeLoss,
    BatchHardTripletLoss,
    CosFaceLoss,
    HardAwareCascadeLoss,
    LossTerm,
    NormFaceLoss,
    SoftmaxLoss,
    WeightedLoss,
)

# Three 2-D embeddings (un-normalised) and three class centres (un-normalised).
EMB = np.array([[2.0, 0.0], [0.6, 0.8], [-1.0, -0.9]])
CENTRES = np.array([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
LABELS = np.array([0, 1, 2])


def _cosines(emb: np.ndarray, centres: np.ndarray) -> np.ndarray:
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    c = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    return e @ c.T


def _ce(logits: np.ndarray, labels: np.ndarray) -> float:
    out = []
    for row, y in zip(logits, labels, strict=True):
        z = np.exp(row - row.max())
        out.append(-math.log(z[y] / z.sum()))
    return float(np.mean(out))


def _with_centres(loss: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        loss.weight.copy_(torch.tensor(CENTRES, dtype=torch.float32))
    return loss


def _run(loss: torch.nn.Module, emb: np.ndarray = EMB, labels: np.ndarray = LABELS) -> float:
    return loss(torch.tensor(emb, dtype=torch.float32), torch.tensor(labels)).item()


def test_normface_matches_scaled_cosine_softmax() -> None:
    s = 16.0
    expected = _ce(s * _cosines(EMB, CENTRES), LABELS)
    got = _run(_with_centres(NormFaceLoss(2, 3, scale=s)))
    assert got == pytest.approx(expected, rel=1e-5)


def test_cosface_subtracts_margin_from_target_cosine() -> None:
    s, m = 30.0, 0.35
    cos = _cosines(EMB, CENTRES)
    cos[np.arange(3), LABELS] -= m
    expected = _ce(s * cos, LABELS)
    got = _run(_with_centres(CosFaceLoss(2, 3, scale=s, margin=m)))
    assert got == pytest.approx(expected, rel=1e-5)


def _arcface_expected(emb: np.ndarray, s: float, m: float, easy: bool) -> float:
    cos = _cosines(emb, CENTRES)
    logits = cos.copy()
    for i, y in enumerate(LABELS):
        theta = math.acos(cos[i, y])
        if easy:
            logits[i, y] = math.cos(theta + m) if cos[i, y] > 0 else cos[i, y]
        elif theta + m < math.pi:
            logits[i, y] = math.cos(theta + m)
        else:  # insightface: linear continuation past pi
            logits[i, y] = cos[i, y] - m * math.sin(m)
    return _ce(s * logits, LABELS)


def test_arcface_adds_angular_margin_in_the_normal_branch() -> None:
    s, m = 30.0, 0.5
    emb = EMB[:2]
    labels = LABELS[:2]
    cos = _cosines(emb, CENTRES)
    assert all(math.acos(cos[i, y]) + m < math.pi for i, y in enumerate(labels))
    loss = _with_centres(ArcFaceLoss(2, 3, scale=s, margin=m))
    got = _run(loss, emb, labels)
    logits = cos.copy()
    logits[0, 0] = math.cos(math.acos(cos[0, 0]) + m)
    logits[1, 1] = math.cos(math.acos(cos[1, 1]) + m)
    assert got == pytest.approx(_ce(s * logits, labels), rel=1e-5)


def test_arcface_theta_plus_margin_past_pi_uses_linear_fallback() -> None:
    s, m = 30.0, 0.5
    cos = _cosines(EMB, CENTRES)
    # The third embedding points almost opposite its centre (1, 1): theta + m > pi.
    assert math.acos(cos[2, 2]) + m > math.pi
    got = _run(_with_centres(ArcFaceLoss(2, 3, scale=s, margin=m)))
    expected = _arcface_expected(EMB, s, m, easy=False)
    assert got == pytest.approx(expected, rel=1e-5)
    # The naive cos(theta + m) would give a different (larger-logit) value.
    naive = cos.copy()
    for i, y in enumerate(LABELS):
        naive[i, y] = math.cos(math.acos(cos[i, y]) + m)
    assert abs(_ce(s * naive, LABELS) - expected) > 1.0


def test_arcface_easy_margin_keeps_cosine_for_obtuse_angles() -> None:
    s, m = 30.0, 0.5
    got = _run(_with_centres(ArcFaceLoss(2, 3, scale=s, margin=m, easy_margin=True)))
    assert got == pytest.approx(_arcface_expected(EMB, s, m, easy=True), rel=1e-5)


def test_softmax_is_cross_entropy_of_linear_logits() -> None:
    w = np.array([[1.0, -1.0], [0.5, 2.0], [-1.0, 0.0]])
    b = np.array([0.1, -0.2, 0.3])
    loss = SoftmaxLoss(2, 3)
    with torch.no_grad():
        loss.fc.weight.copy_(torch.tensor(w))
        loss.fc.bias.copy_(torch.tensor(b))
    assert _run(loss) == pytest.approx(_ce(EMB @ w.T + b, LABELS), rel=1e-5)


def test_batch_hard_triplet_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(6, 3))
    labels = np.array([0, 0, 1, 1, 2, 3])  # labels 2 and 3 have no positive: not anchors
    margin = 0.3
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    terms = []
    for a in range(6):
        pos = [np.linalg.norm(x[a] - x[j]) for j in range(6) if j != a and labels[j] == labels[a]]
        neg = [np.linalg.norm(x[a] - x[j]) for j in range(6) if labels[j] != labels[a]]
        if pos and neg:
            terms.append(max(0.0, max(pos) - min(neg) + margin))
    expected = float(np.mean(terms))
    assert expected > 0
    got = _run(BatchHardTripletLoss(margin), emb, labels)
    assert got == pytest.approx(expected, rel=1e-5)


def test_triplet_without_any_valid_anchor_is_zero() -> None:
    loss = BatchHardTripletLoss(0.3)
    assert _run(loss, EMB, np.array([0, 1, 2])) == 0.0


def test_hdc_equals_its_hand_computed_value() -> None:
    # Unit directions (1,0), (0,1) | (1,0), (-1,0): positive cosines 0 and -1; negative
    # cosines 1 (0-2), -1 (0-3), 0 (1-2), 0 (1-3). Margin 0.5, levels keep all / half.
    emb = np.array([[2.0, 0.0], [0.0, 3.0], [0.5, 0.0], [-4.0, 0.0]])
    level0 = (1.0 + 2.0) / 2 + (0.5**2 + 0 + 0 + 0) / 4  # every pair: 1.5625
    level1 = 2.0 + (0.5**2 + 0) / 2  # lowest positive (-1), two highest negatives (1, 0)
    expected = (1 * level0 + 3 * level1) / 4
    assert expected == 1.984375
    loss = HardAwareCascadeLoss((1.0, 0.5), (1.0, 3.0), margin=0.5)
    assert _run(loss, emb, np.array([0, 0, 1, 1])) == pytest.approx(expected, rel=1e-6)


def _hdc_oracle(emb: np.ndarray, labels: np.ndarray, fractions: list[float],
                weights: list[float], margin: float) -> float:
    """Plain-python loops: enumerate pairs, sort by hardness, keep ceil(f * n), average."""
    unit = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in emb.tolist()]
    pos, neg = [], []
    for i in range(len(unit)):
        for j in range(i + 1, len(unit)):
            s = sum(a * b for a, b in zip(unit[i], unit[j], strict=True))
            (pos if labels[i] == labels[j] else neg).append(s)
    pos.sort()
    neg.sort(reverse=True)
    total = 0.0
    for f, w in zip(fractions, weights, strict=True):
        level = 0.0
        if pos:
            kept = pos[: max(1, math.ceil(round(f * len(pos), 9)))]
            level += sum(1 - s for s in kept) / len(kept)
        if neg:
            kept = neg[: max(1, math.ceil(round(f * len(neg), 9)))]
            level += sum(max(0.0, s - margin) ** 2 for s in kept) / len(kept)
        total += w * level
    return total / sum(weights)


@pytest.mark.parametrize(
    "labels",
    [
        [0, 0, 0, 1, 1, 2, 2, 2, 3, 4],  # 8 positive and 37 negative pairs
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # negatives only
        [3] * 10,  # positives only
    ],
)
def test_hdc_matches_a_pairwise_loop_oracle(labels: list[int]) -> None:
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(10, 3))  # 3-D: many negatives above the margin
    fractions, weights, margin = [1.0, 0.5, 0.25, 0.1], [1.0, 0.5, 2.0, 1.0], 0.2
    expected = _hdc_oracle(emb, np.array(labels), fractions, weights, margin)
    got = HardAwareCascadeLoss(fractions, weights, margin=margin)(
        torch.tensor(emb, dtype=torch.float64), torch.tensor(labels)
    )
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # The hardest levels cost more than the average over all pairs.
    level0 = HardAwareCascadeLoss([1.0], margin=margin)(torch.tensor(emb), torch.tensor(labels))
    assert got.item() > level0.item()


def test_hdc_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    emb = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    loss = HardAwareCascadeLoss(margin=-0.5)  # every negative pair active
    assert torch.autograd.gradcheck(lambda e: loss(e, labels), (emb,))


def test_hdc_without_any_pair_is_zero_with_a_graph() -> None:
    emb = torch.randn(1, 4, requires_grad=True)
    value = HardAwareCascadeLoss()(emb, torch.tensor([0]))
    assert value.item() == 0.0
    value.backward()
    assert emb.grad is not None and (emb.grad == 0).all()


def test_attribute_loss_ignores_unknown_values() -> None:
    w0 = np.array([[1.0, 0.0], [0.0, 1.0]])
    w1 = np.array([[0.5, 0.5], [-0.5, 0.5], [1.0, -1.0]])
    loss = AttributeLoss(2, [2, 3])
    with torch.no_grad():
        for head, w in zip(loss.heads, (w0, w1), strict=True):
            head.weight.copy_(torch.tensor(w))
            head.bias.zero_()
    labels = np.array([[0, 2], [1, -1], [-1, 1]])
    expected = 0.5 * (
        _ce(EMB[:2] @ w0.T, labels[:2, 0]) + _ce(EMB[[0, 2]] @ w1.T, labels[[0, 2], 1])
    )
    assert _run(loss, EMB, labels) == pytest.approx(expected, rel=1e-5)


def test_weighted_loss_sums_weighted_terms_on_their_targets() -> None:
    arc = _with_centres(ArcFaceLoss(2, 3, margin=0.2))
    cat = SoftmaxLoss(2, 2)
    loss = WeightedLoss(
        [LossTerm("arcface", arc, 1.0), LossTerm("category", cat, 0.25, target="category")]
    )
    emb = torch.tensor(EMB, dtype=torch.float32)
    targets = {"sku": torch.tensor(LABELS), "category": torch.tensor([0, 1, 1])}
    total, parts = loss(emb, targets)
    expected = arc(emb, targets["sku"]).item() + 0.25 * cat(emb, targets["category"]).item()
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert set(parts) == {"arcface", "category"}
    with pytest.raises(KeyError, match="attributes"):
        WeightedLoss([LossTerm("a", AttributeLoss(2, [2]), target="attributes")])(emb, targets)


@pytest.mark.parametrize(
    "make",
    [
        lambda: NormFaceLoss(4, 3),
        lambda: CosFaceLoss(4, 3),
        lambda: ArcFaceLoss(4, 3),
        lambda: SoftmaxLoss(4, 3),
        lambda: BatchHardTripletLoss(0.5),
        lambda: HardAwareCascadeLoss(margin=0.0),
    ],
)
def test_gradients_reach_the_embeddings(make) -> None:
    torch.manual_seed(0)
    emb = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    make()(emb, labels).backward()
    assert emb.grad is not None
    assert torch.isfinite(emb.grad).all()
    assert emb.grad.abs().sum() > 1e-4


def test_arcface_gradient_is_finite_at_cosine_one() -> None:
    loss = _with_centres(ArcFaceLoss(2, 3))
    emb = torch.tensor([[3.0, 0.0]], requires_grad=True)  # exactly on centre 0
    loss(emb, torch.tensor([0])).backward()
    assert torch.isfinite(emb.grad).all()


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="margin"):
        ArcFaceLoss(4, 3, margin=2.0)
    with pytest.raises(ValueError, match="classes"):
        NormFaceLoss(4, 1)
    with pytest.raises(ValueError, match="non-increasing"):
        HardAwareCascadeLoss((0.5, 1.0))
    with pytest.raises(ValueError, match="one per level"):
        HardAwareCascadeLoss((1.0, 0.5), (1.0,))
    with pytest.raises(ValueError, match="unique"):
        WeightedLoss([LossTerm("a", SoftmaxLoss(2, 2)), LossTerm("a", SoftmaxLoss(2, 2))])


def test_mutual_kl_equals_the_closed_form_and_trains_each_side_only() -> None:
    from visearch.embedding.losses import mutual_kl

    a = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], requires_grad=True)
    b = torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]], requires_grad=True)
    t = 2.0
    p = torch.softmax(a.detach() / t, 1).numpy().astype(np.float64)
    q = torch.softmax(b.detach() / t, 1).numpy().astype(np.float64)
    want_a = t * t * np.mean(np.sum(q * (np.log(q) - np.log(p)), 1))  # KL(q || p)
    want_b = t * t * np.mean(np.sum(p * (np.log(p) - np.log(q)), 1))  # KL(p || q)
    kl_a, kl_b = mutual_kl(a, b, temperature=t)
    assert float(kl_a.detach()) == pytest.approx(want_a, rel=1e-5)
    assert float(kl_b.detach()) == pytest.approx(want_b, rel=1e-5)
    kl_a.backward()
    assert a.grad is not None and b.grad is None  # the target posterior is detached
    same, _ = mutual_kl(a, a.detach().clone())
    assert float(same.detach()) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        mutual_kl(a, b, temperature=0)
    with pytest.raises(ValueError, match="one shape"):
        mutual_kl(a, b[:, :2])
