"""SKU denoising, per SKU: a two-step ("hierarchical") DBSCAN.

A SKU's images should show one product. Step 1 clusters the SKU's embeddings with DBSCAN
(cosine distance, ``min_samples`` 2) and keeps the largest cluster as the SKU's core; this
is strict, so it also drops hard positives (odd angles, crops). Step 2 revisits every image
outside the core and returns those within ``return_thresh`` of the core. What is left out is
removed from the SKU (mislabelled images, wrong products, junk).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.cluster import DBSCAN

from visearch.progress import progress_bar

logger = logging.getLogger(__name__)

#: Cosine distance radius of step 1 (DBSCAN ``eps``).
EPS = 0.25
#: Cosine distance to the core under which step 2 returns an image.
RETURN_THRESH = 0.35
#: SKUs with fewer images cannot say which image is the odd one: kept as they are.
MIN_SIZE = 3


@dataclass(frozen=True)
class Removed:
    """Image ``index`` (row of the embeddings) removed from ``sku``.

    ``reason``: "noise" (DBSCAN found it near no other image of the SKU) or "minor_cluster"
    (it clustered, but not with the SKU's largest cluster); ``distance``: its cosine
    distance to the core (as step 2 measured it), above the return threshold.
    """

    index: int
    sku: str
    reason: str
    distance: float


@dataclass
class DenoiseResult:
    """Per-image outcome of ``denoise_skus``; arrays are ``bool [N]`` in embedding order.

    ``core``: in its SKU's largest step-1 cluster (or in a SKU kept as is); ``returned``:
    brought back by step 2; ``keep = core | returned``.
    """

    keep: np.ndarray
    core: np.ndarray
    returned: np.ndarray
    removed: list[Removed]
    small_skus: list[str]
    unclustered_skus: list[str]
    n_skus: int

    def summary(self) -> dict[str, Any]:
        return {
            "images": int(len(self.keep)),
            "skus": self.n_skus,
            "kept": int(self.keep.sum()),
            "removed": len(self.removed),
            "returned_by_step2": int(self.returned.sum()),
            "skus_with_removals": len({r.sku for r in self.removed}),
            "small_skus_kept": len(self.small_skus),
            "unclustered_skus_kept": len(self.unclustered_skus),
        }

    def per_sku(self) -> dict[str, list[Removed]]:
        """SKU -> what was removed from it (and why), SKUs with removals only, sorted."""
        out: dict[str, list[Removed]] = {}
        for r in self.removed:
            out.setdefault(r.sku, []).append(r)
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "removed_detail": [asdict(r) for r in self.removed],
            "small_skus": self.small_skus,
            "unclustered_skus": self.unclustered_skus,
        }


def _check_embeddings(embeddings: np.ndarray, skus: Sequence[str]) -> np.ndarray:
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be float32 [N, D], got shape {x.shape}")
    if len(skus) != len(x):
        raise ValueError(f"{len(skus)} SKU labels for {len(x)} embeddings")
    x = x.astype(np.float32, copy=False)
    norms = np.linalg.norm(x, axis=1)
    if len(x) and not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError("embeddings must be L2-normalised (row norms 1); normalise them first")
    return x


def _groups(skus: Sequence[str]) -> dict[str, np.ndarray]:
    """SKU -> its rows (ascending), SKUs in first-seen order."""
    order: dict[str, list[int]] = {}
    for i, s in enumerate(skus):
        order.setdefault(s, []).append(i)
    return {s: np.asarray(rows, dtype=np.int64) for s, rows in order.items()}


def _cosine_distances(x: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - x @ x.T, 0.0, 2.0).astype(np.float64)


def _dbscan_labels(x: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN labels of unit vectors under cosine distance (-1: noise)."""
    return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(
        _cosine_distances(x)
    )


def _largest_cluster(x: np.ndarray, labels: np.ndarray) -> int:
    """Label of the largest cluster; a tie goes to the tighter one (longer mean vector)."""
    best, best_key = -1, (-1, -1.0)
    for lab in np.unique(labels[labels >= 0]):
        members = labels == lab
        key = (int(members.sum()), float(np.linalg.norm(x[members].mean(axis=0))))
        if key > best_key:
            best, best_key = int(lab), key
    return best


def distance_to_core(x: np.ndarray, core: np.ndarray, *, rule: str = "centroid") -> np.ndarray:
    """Cosine distance ``float64 [n]`` of each row of ``x`` (``float32 [n, D]``) to the core
    images ``core`` (``float32 [m, D]``, m >= 1), all L2-normalised.

    ``rule``: "centroid" (to the L2-normalised mean of the core) or "nearest" (to the
    closest core image).
    """
    if rule == "centroid":
        c = core.mean(axis=0)
        c = c / max(float(np.linalg.norm(c)), 1e-12)
        return 1.0 - (x @ c).astype(np.float64)
    if rule == "nearest":
        return 1.0 - (x @ core.T).max(axis=1).astype(np.float64)
    raise ValueError(f"return_rule must be 'centroid' or 'nearest', got {rule!r}")


def denoise_skus(
    embeddings: np.ndarray,
    skus: Sequence[str],
    *,
    eps: float = EPS,
    min_samples: int = 2,
    return_thresh: float | None = RETURN_THRESH,
    return_rule: str = "centroid",
    min_size: int = MIN_SIZE,
    progress: bool = False,
) -> DenoiseResult:
    """Hierarchical DBSCAN per SKU: keep the largest cluster, then return near outliers.

    Args:
        embeddings: ``float32 [N, D]``, L2-normalised.
        skus: ``N`` SKU ids, aligned with ``embeddings``.
        eps: step-1 DBSCAN radius, in cosine distance (``1 - cos``).
        min_samples: DBSCAN ``min_samples`` (the image itself included).
        return_thresh: step 2 returns an image outside the core whose cosine distance to
            the core (``return_rule``) is at most this; None skips step 2 (step 1 alone).
        return_rule: "centroid" or "nearest", see ``distance_to_core``.
        min_size: SKUs with fewer images are kept as they are and counted.
        progress: show a tqdm bar over SKUs.

    Returns:
        ``DenoiseResult``. A SKU where DBSCAN finds no cluster at all is kept as is too
        (nothing to call its core) and listed in ``unclustered_skus``.
    """
    x = _check_embeddings(embeddings, skus)
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if return_rule not in ("centroid", "nearest"):
        raise ValueError(f"return_rule must be 'centroid' or 'nearest', got {return_rule!r}")
    n = len(x)
    core = np.zeros(n, dtype=bool)
    returned = np.zeros(n, dtype=bool)
    removed: list[Removed] = []
    small: list[str] = []
    unclustered: list[str] = []
    groups = _groups(skus)
    for sku, rows in progress_bar(groups.items(), desc="denoise", unit="sku", disable=not progress):
        if len(rows) < min_size:
            core[rows] = True
            small.append(sku)
            continue
        xs = x[rows]
        labels = _dbscan_labels(xs, eps, min_samples)
        big = _largest_cluster(xs, labels)
        if big < 0:
            core[rows] = True
            unclustered.append(sku)
            continue
        in_core = labels == big
        core[rows[in_core]] = True
        outside = np.flatnonzero(~in_core)
        dist = distance_to_core(xs[outside], xs[in_core], rule=return_rule)
        for k, d in zip(outside, dist, strict=True):
            if return_thresh is not None and d <= return_thresh:
                returned[rows[k]] = True
            else:
                reason = "noise" if labels[k] < 0 else "minor_cluster"
                removed.append(Removed(int(rows[k]), sku, reason, round(float(d), 6)))
    keep = core | returned
    result = DenoiseResult(keep, core, returned, removed, small, unclustered, len(groups))
    logger.info("denoise: %s", result.summary())
    return result


def dbscan_baseline(
    embeddings: np.ndarray,
    skus: Sequence[str],
    *,
    eps: float = EPS,
    min_samples: int = 2,
    min_size: int = MIN_SIZE,
) -> np.ndarray:
    """Plain DBSCAN per SKU, the benchmark's baseline: drop DBSCAN's noise points, keep
    every cluster (no notion of a core, no second step).

    Returns:
        ``bool [N]``: True for images kept. SKUs below ``min_size`` or with no cluster at all
        are kept whole, as in ``denoise_skus``.
    """
    x = _check_embeddings(embeddings, skus)
    keep = np.ones(len(x), dtype=bool)
    for rows in _groups(skus).values():
        if len(rows) < min_size:
            continue
        labels = _dbscan_labels(x[rows], eps, min_samples)
        if (labels >= 0).any():
            keep[rows[labels < 0]] = False
    return keep
