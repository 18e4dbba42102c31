"""The synthetic product world: procedurally drawn products, shop images, user photos,
detection scenes, and injected catalog noise with its ground truth (see docs/internals.md)."""

from visearch.synth.scene import NEAR_DUP_TRANSFORMS
from visearch.synth.sheet import write_contact_sheet
from visearch.synth.spec import CATEGORIES, ProductSpec, sample_products
from visearch.synth.world import generate_world

__all__ = [
    "CATEGORIES",
    "NEAR_DUP_TRANSFORMS",
    "ProductSpec",
    "generate_world",
    "sample_products",
    "write_contact_sheet",
]
