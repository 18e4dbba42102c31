"""Batch embedding: embed_items equals embed_arrays, keeps order, crops, normalises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from visearch.embedding import build_embedder, embed_arrays, embed_items
from visearch.errors import ImageDecodeError
from visearch.imageio import decode_image, encode_jpeg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_embedder("tiny", dim=8, input_size=32)
    m.train()
    m(torch.randn(8, 3, 32, 32))  # non-trivial BN statistics
    return m.eval()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, (int(rng.integers(20, 60)), int(rng.integers(20, 60)), 3)).astype(
            np.uint8
        )
        for _ in range(11)
    ]


def test_embed_arrays_is_normalised_and_independent_of_batching(model, images) -> None:
    a = embed_arrays(model, images, batch_size=4)
    b = embed_arrays(model, images, batch_size=11)
    assert a.shape == (11, 8) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(a[0], a[1])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_embed_items_matches_embed_arrays_in_input_order(
    model, images, tmp_path: Path, num_workers: int
) -> None:
    # Mixed sources: arrays, JPEG bytes, JPEG files; some with boxes.
    jpegs = [encode_jpeg(im, quality=95) for im in images]
    decoded = [decode_image(b) for b in jpegs]
    items, expected_crops = [], []
    for i, im in enumerate(images):
        item_id = 1000 - 7 * i  # ids not sorted: output must follow input order
        box = (2, 3, 15, 18) if i % 3 == 0 else None
        if i % 3 == 1:
            path = tmp_path / f"{i}.jpg"
            path.write_bytes(jpegs[i])
            src, ref = path, decoded[i]
        elif i % 3 == 2:
            src, ref = jpegs[i], decoded[i]
        else:
            src, ref = im, im
        ref = ref if box is None else ref[3:18, 2:15]
        items.append((item_id, src, box))
        expected_crops.append(ref)
    batches = list(
        embed_items(model, iter(items), batch_size=2, num_workers=num_workers, shard_size=5)
    )
    ids = np.concatenate([b[0] for b in batches])
    feats = np.concatenate([b[1] for b in batches])
    assert ids.dtype == np.int64 and feats.dtype == np.float32
    assert ids.tolist() == [it[0] for it in items]
    np.testing.assert_allclose(feats, embed_arrays(model, expected_crops), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)


def test_embedding_restores_training_mode(model, images) -> None:
    model.train()
    try:
        embed_arrays(model, images[:2])
        assert model.training
        list(embed_items(model, [(1, images[0], None)]))
        assert model.training and not torch.is_inference_mode_enabled()
    finally:
        model.eval()


def test_bad_inputs_raise(model) -> None:
    with pytest.raises(TypeError, match="uint8"):
        embed_arrays(model, [np.zeros((4, 4, 3), dtype=np.float32)])
    with pytest.raises(ImageDecodeError):
        list(embed_items(model, [(1, b"not an image", None)]))
