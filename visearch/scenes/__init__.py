"""Detector and query-domain training data made from shop images alone: product cut-outs
(``cutout``) and copy-paste scene synthesis (``compose``)."""

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
from visearch.scenes.cutout import CUTOUT_STATUSES, Cutout, cut_out, cut_out_file, load_rgba

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
    "load_rgba",
    "main_categories",
    "procedural_background",
    "synthesize_scenes",
]
