"""Look-alike P x K sampling against brute-force recomputations of its batches."""

from __future__ import annotations

import numpy as np
import pytest

from visearch.embedding.sampler import LookalikePKSampler, PKSampler, lookalike_neighbours

# Label values 0..11: value 5 has no image, value 7 one image (below min_per_label=2).
COUNTS = {0: 5, 1: 2, 2: 3, 3: 8, 4: 4, 6: 2, 7: 1, 8: 6, 9: 3, 10: 2, 11: 7}
LABELS = np.repeat(list(COUNTS), list(COUNTS.values()))
SAMPLEABLE = {v for v, n in COUNTS.items() if n >= 2}
P, K, GROUP = 7, 3, 3  # 2 families of 3 and one random label per batch


def _table(seed: int, m: int = 4) -> np.ndarray:
    """A random look-alike table over values 0..11 with gaps (-1), unsampleable values (5, 7)
    and values that will already be in the batch."""
    rng = np.random.default_rng(seed)
    table = np.array([rng.permutation([v for v in range(12) if v != c])[:m] for c in range(12)])
    table[rng.random(table.shape) < 0.2] = -1
    return table


def _sampler(seed: int = 3, steps: int | None = 6) -> LookalikePKSampler:
    return LookalikePKSampler(LABELS, P, K, group=GROUP, seed=seed, steps_per_epoch=steps,
                              min_per_label=2)


@pytest.mark.parametrize("table_seed", [0, 1, 2])
def test_every_batch_has_p_labels_k_images_each_from_the_families(table_seed: int) -> None:
    sampler = _sampler()
    sampler.set_neighbours(_table(table_seed))
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches, families = list(sampler), list(sampler.families())
        assert len(batches) == len(families) == 6
        for batch, fams in zip(batches, families, strict=True):
            order = [v for fam in fams for v in fam]
            assert len(batch) == P * K and len(set(order)) == P and set(order) <= SAMPLEABLE
            # k images per label, in family order, each one of that label's images
            assert [int(LABELS[i]) for i in batch] == [v for v in order for _ in range(K)]
            for start in range(0, len(batch), K):
                picks = batch[start : start + K]
                if COUNTS[int(LABELS[picks[0]])] >= K:
                    assert len(set(picks)) == K  # without replacement when it can


@pytest.mark.parametrize("table_seed", [0, 1, 2])
def test_each_anchor_brings_its_first_available_lookalikes(table_seed: int) -> None:
    table = _table(table_seed)
    sampler = _sampler()
    sampler.set_neighbours(table)
    full = 0
    for fams in sampler.families():
        anchors, fills = fams[: P // GROUP], fams[P // GROUP :]
        assert all(len(f) == 1 for f in fills)
        assert sum(len(f) for f in fams) == P
        before: list[int] = []
        for fam in anchors:
            anchor, expected = fam[0], []
            for v in table[anchor]:  # brute force: walk the row, keep the admissible ones
                if (v in SAMPLEABLE and v not in before + [anchor] + expected
                        and len(expected) < GROUP - 1):  # fmt: skip
                    expected.append(int(v))
            assert fam == [anchor] + expected
            full += len(fam) == GROUP
            before += fam
    assert full >= 6  # the tables leave most families complete: the check is not vacuous


def test_batches_depend_only_on_seed_epoch_and_table() -> None:
    a, b = _sampler(), _sampler()
    a.set_neighbours(_table(0))
    b.set_neighbours(_table(0))
    a.set_epoch(2)
    b.set_epoch(2)  # a fresh sampler, as a resumed run builds it
    assert list(a) == list(b) == list(a)
    b.set_epoch(3)
    assert list(a) != list(b)
    b.set_epoch(2)
    b.set_neighbours(_table(1))
    assert list(a) != list(b)
    c = _sampler(seed=4)
    c.set_neighbours(_table(0))
    c.set_epoch(2)
    assert list(a) != list(c)


@pytest.mark.parametrize("steps", [None, 6])
def test_without_a_table_the_batches_are_pk_samplers(steps: int | None) -> None:
    look = _sampler(steps=steps)
    plain = PKSampler(LABELS, P, K, seed=3, steps_per_epoch=steps, min_per_label=2)
    look.set_neighbours(_table(0))
    look.set_neighbours(None)
    for epoch in range(3):
        look.set_epoch(epoch)
        plain.set_epoch(epoch)
        assert list(look) == list(plain)
        assert len(look) == len(plain)


def test_bad_groups_and_tables_are_rejected() -> None:
    with pytest.raises(ValueError, match="group must be in"):
        LookalikePKSampler(LABELS, P, K, group=P + 1)
    sampler = _sampler()
    with pytest.raises(ValueError, match="rows but labels go up to 11"):
        sampler.set_neighbours(_table(0)[:11])
    with pytest.raises(ValueError, match="integer"):
        sampler.set_neighbours(_table(0).astype(float))
    with pytest.raises(ValueError, match="entries must be label values"):
        sampler.set_neighbours(np.full((12, 2), 12))
    with pytest.raises(ValueError, match="set_neighbours"):
        next(sampler.families())


def _neighbours_oracle(centres: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy: cosine matrix with -inf on the diagonal, stable descending argsort."""
    x = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    sims = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :m], sims


def test_lookalike_neighbours_equal_a_brute_force_argsort() -> None:
    rng = np.random.default_rng(0)
    centres = (rng.normal(size=(300, 16)) * rng.uniform(0.5, 3, (300, 1))).astype(np.float32)
    got = lookalike_neighbours(centres, 8)
    expected, sims = _neighbours_oracle(centres, 8)
    assert got.dtype == np.int64 and got.shape == (300, 8)
    rows = np.arange(300)[:, None]
    # tie-aware: the cosines agree everywhere, the ids wherever the cosines are apart
    np.testing.assert_allclose(sims[rows, got], sims[rows, expected], atol=1e-6)
    top = np.sort(sims, axis=1)[:, ::-1][:, :9]
    apart = np.abs(np.diff(top, axis=1)) > 1e-5  # [300, 8]: rank j vs rank j + 1
    alone = apart & np.hstack([np.ones((300, 1), bool), apart[:, :-1]])  # vs j - 1 too
    assert alone.mean() > 0.95
    assert (got[alone] == expected[alone]).all()
    assert not (got == np.arange(300)[:, None]).any()


def test_lookalike_neighbours_exclude_self_among_duplicates_and_pad_short_rows() -> None:
    # Centres 0 and 1 coincide (cosine 1, tied with each one's self); 2 is at cosine 0.6 to
    # both, 3 nearly opposite them.
    centres = np.array([[1, 0], [2, 0], [0.6, 0.8], [-1, 0.1]], dtype=np.float32)
    got = lookalike_neighbours(centres, 5)
    assert got[:2].tolist() == [[1, 2, 3, -1, -1], [0, 2, 3, -1, -1]]
    assert sorted(got[2, :2]) == [0, 1] and got[2, 2:].tolist() == [3, -1, -1]
    assert got[3, 0] == 2 and sorted(got[3, 1:3]) == [0, 1] and got[3, 3:].tolist() == [-1, -1]
