"""Main-product boxes for catalog rows: the given bbox, else the detector's main object.

The embedder and index crop with ``visearch.imageio.crop(image, box)``; this module only
decides the box of each row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from visearch.catalog import CatalogRow
from visearch.detection.main_object import MAIN_SCORE_THRESH, select_main_object
from visearch.detection.pseudo_label import Detector
from visearch.imageio import decode_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowBox:
    """The box of one row: ``box`` (x1, y1, x2, y2) in original pixels; ``source`` is
    ``"given"`` (the manifest's bbox), ``"detector"`` (the main object) or ``"fallback"``
    (nothing passed ``score_thresh``: the whole image); ``score`` is the detection score
    (1.0 when given, 0.0 for a fallback); ``category`` the detector's (None when given)."""

    box: tuple[float, float, float, float]
    source: str
    score: float
    category: str | None


def main_object_boxes(
    detector: Detector,
    rows: Sequence[CatalogRow],
    *,
    score_thresh: float = MAIN_SCORE_THRESH,
    batch_size: int = 16,
    progress: bool = False,
) -> list[RowBox]:
    """One ``RowBox`` per row, in order; only rows without a bbox are decoded and detected."""
    from visearch.progress import progress_bar

    out: list[RowBox | None] = [
        RowBox(tuple(r.bbox), "given", 1.0, None) if r.bbox is not None else None  # type: ignore[arg-type]
        for r in rows
    ]
    todo = [i for i, r in enumerate(rows) if r.bbox is None]
    bar = progress_bar(total=len(todo), desc="detect", disable=not progress, leave=False)
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        images = [decode_image(rows[i].source) for i in idx]
        dets = detector.detect(images)
        for i, image, det in zip(idx, images, dets, strict=True):
            main = select_main_object(det, image.shape, score_thresh=score_thresh)
            out[i] = RowBox(
                main.box, "fallback" if main.fallback else "detector", main.score, main.category
            )
        bar.update(len(idx))
    bar.close()
    fallbacks = sum(1 for b in out if b is not None and b.source == "fallback")
    logger.info(
        "%d row(s): %d with a given bbox, %d detected, %d whole-image fallbacks",
        len(rows), len(rows) - len(todo), len(todo) - fallbacks, fallbacks,
    )
    assert all(b is not None for b in out)
    return out  # type: ignore[return-value]
