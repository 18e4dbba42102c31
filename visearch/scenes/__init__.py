"""Detector and query-domain training data made from shop images alone: product cut-outs
(``cutout``; ``photo_cutout`` for user photos and ``cut_out_product``, the entry point
for both) and copy-paste scene synthesis (``compose``)."""

from visearch.scenes.compose import (
    Pasted,
    SceneObject,
    SceneSet,
    background_from_photo,
    collapse_categories,
    compose_scene,
    main_categories,
    procedural_background,
    synthesize_scenes,
)
from visearch.scenes.cutout import (
    CUTOUT_STATUSES,
    Cutout,
    cut_out,
    cut_out_file,
    load_rgba,
    plain_border,
)
from visearch.scenes.photo_cutout import cut_out_photo, cut_out_product

__all__ = [
    "CUTOUT_STATUSES",
    "Cutout",
    "Pasted",
    "SceneObject",
    "SceneSet",
    "background_from_photo",
    "collapse_categories",
    "compose_scene",
    "cut_out",
    "cut_out_file",
    "cut_out_photo",
    "cut_out_product",
    "load_rgba",
    "main_categories",
    "plain_border",
    "procedural_background",
    "synthesize_scenes",
]
