"""Shared fixtures: seeded synthetic worlds generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Tests share two cores with each other; one intra-op thread keeps them predictable.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "weights" / "mobilenet_v2-b0353104.pth"


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 200-SKU synthetic world (seed 0, 96 px images): catalog, queries, COCO, truth."""
    from visearch.synth import generate_world

    out = tmp_path_factory.mktemp("tiny_world")
    generate_world(out, skus=200, seed=0, image_size=96)
    return out
