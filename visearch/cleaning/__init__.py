"""Catalog cleaning after dedup: SKU denoising (hierarchical DBSCAN), SKU merging (classifier
confusion; calibrated: mutual confusion plus embedding evidence against a false-merge rate),
the review queue of what cleaning proposes, and ``apply_cleaning`` to turn their outputs
into cleaned rows.

The catalog is never rewritten in place: each stage outputs what to drop or rename, and
``apply_cleaning`` applies it to the rows in memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from visearch.catalog import CatalogRow
from visearch.cleaning.calibrated import (
    DistinctNull,
    MergeCandidate,
    calibrated_merge,
    fit_distinct_null,
)
from visearch.cleaning.denoise import DenoiseResult, Removed, dbscan_baseline, denoise_skus
from visearch.cleaning.merge import (
    MergeEdge,
    MergeGroup,
    MergeResult,
    MergeRound,
    heldout_confusion,
    merge_skus,
    symmetrise,
)

__all__ = [
    "DenoiseResult",
    "DistinctNull",
    "MergeCandidate",
    "MergeEdge",
    "MergeGroup",
    "MergeResult",
    "MergeRound",
    "Removed",
    "apply_cleaning",
    "calibrated_merge",
    "dbscan_baseline",
    "denoise_skus",
    "fit_distinct_null",
    "heldout_confusion",
    "merge_skus",
    "symmetrise",
]


def apply_cleaning(
    rows: Iterable[CatalogRow],
    removed_images: Iterable[str] = (),
    sku_map: Mapping[str, str] | None = None,
) -> list[CatalogRow]:
    """The rows left after cleaning, in input order.

    Args:
        rows: catalog rows.
        removed_images: ``image`` fields (as written in the catalog) to drop: dedup and
            denoise outputs.
        sku_map: old SKU -> merged style id (merge output); SKUs not in it are unchanged.

    Returns:
        New ``CatalogRow`` objects (the inputs are frozen and untouched); a renamed row keeps
        every field but ``sku``.
    """
    drop = set(removed_images)
    mapping = dict(sku_map or {})
    out: list[CatalogRow] = []
    for row in rows:
        if row.image in drop:
            continue
        new_sku = mapping.get(row.sku, row.sku)
        out.append(row if new_sku == row.sku else dataclasses.replace(row, sku=new_sku))
    return out
