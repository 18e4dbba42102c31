"""P x K batch sampling for metric learning: P classes per batch, K images of each, optionally
in families of look-alike classes (hard negatives in every batch)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import faiss
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


class LookalikePKSampler(PKSampler):
    """:class:`PKSampler` whose batches hold families of look-alike labels, so each label
    meets its hardest negatives (for SKUs: the most similar other products) in the batch.

    Each batch of ``p`` distinct labels is built as ``p // group`` families and a random
    remainder: an *anchor* is the next label of the epoch's random label stream (permutations
    of the sampleable labels, as :class:`PKSampler` visits them) not already in the batch;
    it brings the first ``group - 1`` labels of its ``neighbours`` row that are sampleable
    (have images, pass ``min_per_label``) and not already in the batch. Slots left over (the
    ``p % group`` remainder, and families short of neighbours) are filled from the stream.
    Every label placed in a batch counts as visited for the current pass of the stream, which
    then skips it, so each label still appears about once per epoch (more often when it is
    many labels' look-alike). Then, as in :class:`PKSampler`, ``k`` images are drawn per label.

    Randomness depends only on ``(seed, epoch)`` and the neighbours table, so a resumed run that
    sets the same table draws the same batches. Without a table (``set_neighbours(None)``, the
    initial state) the batches are exactly :class:`PKSampler`'s.

    Args:
        group: labels per family (anchor + ``group - 1`` look-alikes), ``1 <= group <= p``.
        others: as :class:`PKSampler`.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        p: int,
        k: int,
        *,
        group: int = 4,
        seed: int = 0,
        steps_per_epoch: int | None = None,
        min_per_label: int = 1,
    ) -> None:
        super().__init__(
            labels, p, k, seed=seed, steps_per_epoch=steps_per_epoch, min_per_label=min_per_label
        )
        if not 1 <= group <= self.p:
            raise ValueError(f"group must be in [1, p={self.p}] labels per family, got {group}")
        self.group = int(group)
        arr = np.asarray(labels, dtype=np.int64)
        #: the label value of each sampleable label (position in ``by_label``)
        self.values = np.array([arr[idx[0]] for idx in self.by_label], dtype=np.int64)
        self.neighbours: np.ndarray | None = None

    def set_neighbours(self, neighbours: np.ndarray | None) -> None:
        """Set the look-alike table: ``int64 [C, m]``, row ``v`` = label value ``v``'s nearest
        other labels (values), best first, ``-1`` = none; or None for plain P x K batches.
        Every sampleable label value must have a row (negative label values get none)."""
        if neighbours is None:
            self.neighbours = None
            return
        table = np.asarray(neighbours)
        if table.ndim != 2 or not np.issubdtype(table.dtype, np.integer):
            raise ValueError(
                f"neighbours must be an integer [C, m] array, got {table.dtype} {table.shape}"
            )
        top = int(self.values.max())
        if top >= len(table):
            raise ValueError(
                f"neighbours has {len(table)} rows but labels go up to {top}; "
                "give one row per label value 0..C-1"
            )
        if table.size and not -1 <= int(table.min()) <= int(table.max()) < len(table):
            raise ValueError(
                f"neighbours entries must be label values in [0, {len(table)}), or -1 for none"
            )
        self.neighbours = table.astype(np.int64, copy=True)

    def families(self) -> Iterator[list[list[int]]]:
        """This epoch's batches as label values: per batch, a list of families — first the
        ``p // group`` anchor families (anchor, then its look-alikes), then one single-label
        list per remaining slot; :meth:`__iter__` draws its images from these labels, in order.
        Needs a neighbours table."""
        if self.neighbours is None:
            raise ValueError("families() needs a neighbours table; call set_neighbours first")
        for batch in self._families(self._streams()[0]):
            yield [[int(self.values[j]) for j in fam] for fam in batch]

    def _families(self, rng: np.random.Generator) -> Iterator[list[list[int]]]:
        """Batches as families of label *positions* (indices into ``by_label``)."""
        assert self.neighbours is not None
        n_labels = len(self.by_label)
        pos = np.full(len(self.neighbours), -1, dtype=np.int64)
        pos[self.values[self.values >= 0]] = np.flatnonzero(self.values >= 0)
        stream: list[int] = []
        visited = np.zeros(n_labels, dtype=bool)

        def next_label(in_batch: set[int]) -> int:
            # The stream's next label neither in this batch nor visited in this pass.
            while True:
                while stream:
                    j = stream.pop()
                    if not visited[j] and j not in in_batch:
                        return j
                visited[:] = False  # a new pass over all labels
                stream.extend(rng.permutation(n_labels)[::-1].tolist())

        for _ in range(self.steps):
            in_batch: set[int] = set()
            batch: list[list[int]] = []
            for _anchor in range(self.p // self.group):
                fam = [next_label(in_batch)]
                in_batch.add(fam[0])
                value = int(self.values[fam[0]])
                row = self.neighbours[value] if value >= 0 else ()
                for v in row:
                    if len(fam) == self.group:
                        break
                    j = int(pos[v]) if v >= 0 else -1
                    if j >= 0 and j not in in_batch:
                        fam.append(j)
                        in_batch.add(j)
                batch.append(fam)
                visited[fam] = True
            while len(in_batch) < self.p:
                j = next_label(in_batch)
                in_batch.add(j)
                visited[j] = True
                batch.append([j])
            yield batch

    def __iter__(self) -> Iterator[list[int]]:
        if self.neighbours is None:
            yield from super().__iter__()
            return
        label_rng, pick_rng = self._streams()
        for families in self._families(label_rng):
            batch: list[int] = []
            for j in (j for fam in families for j in fam):
                idx = self.by_label[j]
                pick = pick_rng.choice(idx, size=self.k, replace=len(idx) < self.k)
                batch.extend(int(i) for i in pick)
            yield batch

    def _streams(self) -> tuple[np.random.Generator, np.random.Generator]:
        """Independent generators for the label stream and the image picks, from
        ``(seed, epoch)``, so :meth:`families` sees the labels :meth:`__iter__` uses."""
        labels_ss, picks_ss = np.random.SeedSequence([self.seed, self.epoch]).spawn(2)
        return np.random.default_rng(labels_ss), np.random.default_rng(picks_ss)


def lookalike_neighbours(centres: np.ndarray, m: int) -> np.ndarray:
    """Each class's ``m`` most similar *other* classes: ``int64 [C, m]``, row ``c`` = the rows
    of ``centres`` (``float [C, d]``, e.g. a classifier's weights) with the highest cosine to
    row ``c``, best first, ``c`` itself excluded; ``-1`` pads rows when ``C - 1 < m``.

    Exact (faiss ``IndexFlatIP`` over the L2-normalised centres); ties between equal cosines
    are in faiss's order. An all-zero centre has cosine 0 to everything.
    """
    x = np.asarray(centres, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"centres must be a non-empty float [C, d] array, got shape {x.shape}")
    if m < 1:
        raise ValueError(f"m must be >= 1 neighbours per class, got {m}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.ascontiguousarray(x / np.maximum(norms, np.finfo(np.float32).tiny))
    n = len(x)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, ids = index.search(x, min(m + 1, n))
    out = np.full((n, m), -1, dtype=np.int64)
    for c in range(n):
        # Drop c itself wherever it ranks (a duplicate centre may tie with it), else the last.
        row = ids[c][(ids[c] != c) & (ids[c] >= 0)][:m]
        out[c, : len(row)] = row
    return out
