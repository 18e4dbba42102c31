"""Catalog cleaning after dedup: SKU denoising (hierarchical DBSCAN) and SKU merging
(classifier confusion), plus ``apply_cleaning`` to turn their outputs into cleaned rows.

The catalog is never rewritten in place: each stage outputs what to drop or rename, and
``apply_cleaning`` applies it to the rows in memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from visearch.catalog import CatalogRow
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
    "MergeEdge",
    "MergeGroup",
    "MergeResult",
    "MergeRound",
    "Removed",
    "apply_cleaning",
    "dbscan_baseline",
    "denoise_skus",
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
