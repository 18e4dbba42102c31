"""P x K batch sampling for metric learning: P classes per batch, K images of each."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class PKSampler(Sampler[list[int]]):
    """Yields batches of ``p * k`` dataset indices: ``p`` distinct labels, ``k`` indices each.

    An epoch visits the labels in a random order, ``p`` at a time, so every label appears
    about once per epoch; ``steps_per_epoch`` overrides the number of batches (labels are then
    cycled through again as needed). A label with fewer than ``k`` images is sampled with
    replacement. Labels with a single image are kept (they still act as negatives and train
    the classifier) unless ``min_per_label`` excludes them.

    Randomness depends only on ``(seed, epoch)``; call :meth:`set_epoch` before each epoch
    (as with ``DistributedSampler``), which makes a resumed run draw the same batches.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        p: int,
        k: int,
        *,
        seed: int = 0,
        steps_per_epoch: int | None = None,
        min_per_label: int = 1,
    ) -> None:
        if p < 2 or k < 1:
            raise ValueError(f"need p >= 2 labels and k >= 1 images per batch, got p={p}, k={k}")
        labels = np.asarray(labels, dtype=np.int64)
        self.p, self.k, self.seed = int(p), int(k), int(seed)
        self.epoch = 0
        self.by_label: list[np.ndarray] = [
            idx
            for lab in np.unique(labels)
            if len(idx := np.flatnonzero(labels == lab)) >= min_per_label
        ]
        if len(self.by_label) < p:
            raise ValueError(
                f"P x K sampling needs at least p={p} labels with >= {min_per_label} images, "
                f"found {len(self.by_label)}; lower p (labels per batch) or min_per_label"
            )
        self.steps = (
            int(steps_per_epoch)
            if steps_per_epoch is not None
            else max(1, len(self.by_label) // self.p)
        )
        if self.steps < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches :meth:`__iter__` yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n_labels = len(self.by_label)
        rounds = math.ceil(self.steps * self.p / n_labels)
        order = np.concatenate([rng.permutation(n_labels) for _ in range(rounds)])
        for step in range(self.steps):
            batch: list[int] = []
            for lab in order[step * self.p : (step + 1) * self.p]:
                idx = self.by_label[lab]
                pick = rng.choice(idx, size=self.k, replace=len(idx) < self.k)
                batch.extend(int(i) for i in pick)
            yield batch
