"""Product specifications: what a product looks like, sampled in look-alike families.

A *family* fixes a category, a silhouette (shape parameters), a body colour and a material;
its members (distinct products) differ only in small details: the logo mark and its text,
the pattern, the colour of a small part (strap, lid, laces, band) and a count of small
features (buttons, holes, stripes on a strap). Same-item retrieval has to read those details;
category or colour matching cannot tell family members apart.

A *colourway family* (``colourway_rate`` > 0) is the other kind of look-alike: its members
share the silhouette, the pattern and every small detail, and differ only in the body colour
(one sneaker model in orange and in forest green). A grey-scale hash sees them as one image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Named colours (RGB). Several families share each name, so a colour match is not an identity.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (196, 40, 44),
    "orange": (232, 120, 36),
    "yellow": (236, 200, 48),
    "green": (52, 140, 68),
    "teal": (32, 140, 140),
    "blue": (44, 92, 196),
    "navy": (30, 40, 92),
    "purple": (118, 60, 160),
    "pink": (232, 128, 170),
    "brown": (120, 76, 44),
    "beige": (214, 190, 150),
    "black": (36, 36, 40),
    "grey": (128, 130, 134),
    "white": (238, 238, 232),
}
COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)

PATTERNS: tuple[str, ...] = (
    "solid", "stripes", "pinstripes", "diagonal", "dots", "checks", "two-tone", "band",
)
LOGO_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "bar", "ring", "cross")

MATERIALS: dict[str, tuple[str, ...]] = {
    "shoe": ("leather", "canvas", "suede", "mesh"),
    "bag": ("leather", "canvas", "nylon"),
    "top": ("cotton", "linen", "polyester"),
    "watch": ("steel", "leather", "silicone"),
    "bottle": ("plastic", "glass", "steel"),
    "box": ("cardboard", "wood", "tin"),
    "lamp": ("metal", "fabric", "ceramic"),
    "chair": ("wood", "plastic", "metal"),
    "mug": ("ceramic", "enamel", "glass"),
    "cap": ("cotton", "wool", "denim"),
}
CATEGORIES: tuple[str, ...] = tuple(sorted(MATERIALS))

_SYLLABLES = (
    "ar", "vo", "ke", "lin", "tor", "mi", "sa", "qu", "ro", "den", "ba", "zu", "fel", "no",
)
_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"


@dataclass(frozen=True)
class ProductSpec:
    """One distinct product (a physical item), drawn by its category's program.

    ``shape`` holds the family's silhouette parameters (unitless fractions of the product
    box); ``detail`` holds the member's small-detail parameters (``logo_shape``,
    ``logo_text``, ``accent`` RGB, ``count``). Colours are RGB tuples of ints in 0..255.
    """

    product: str
    family: str
    category: str
    color_name: str
    color: tuple[int, int, int]
    material: str
    pattern: str
    pattern_color: tuple[int, int, int]
    pattern_scale: float
    shape: dict[str, float] = field(default_factory=dict)
    detail: dict[str, object] = field(default_factory=dict)
    brand: str = ""

    def attributes(self) -> dict[str, str]:
        """Catalog attributes: color, pattern, material, family, product, brand."""
        return {
            "color": self.color_name,
            "pattern": self.pattern,
            "material": self.material,
            "family": self.family,
            "product": self.product,
            "brand": self.brand,
        }

    def title(self, seller: int = 0) -> str:
        """A shop title; ``seller`` varies the wording, as split SKUs' listings do."""
        text = str(self.detail["logo_text"])
        base = f"{self.color_name} {self.pattern} {self.material} {self.category}"
        if seller % 2:
            return f"{self.brand} {self.category} {text} - {self.color_name}, {self.material}"
        return f"{self.brand} {text} {base}"


def _jitter_color(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple:
    c = np.clip(np.asarray(rgb) + rng.integers(-amount, amount + 1, size=3), 0, 255)
    return tuple(int(v) for v in c)


def _contrast_color(rng: np.random.Generator, exclude: str) -> tuple[int, int, int]:
    names = [n for n in COLOR_NAMES if n != exclude]
    return _jitter_color(rng, PALETTE[names[int(rng.integers(len(names)))]], 12)


def _shape_params(rng: np.random.Generator) -> dict[str, float]:
    # Every program reads the generic knobs it needs; unused ones cost nothing.
    u = rng.uniform
    return {
        "w": float(u(0.75, 1.0)), "h": float(u(0.75, 1.0)), "a": float(u(0.0, 1.0)),
        "b": float(u(0.0, 1.0)), "c": float(u(0.0, 1.0)), "d": float(u(0.0, 1.0)),
        "variant": float(rng.integers(0, 3)),
    }


def _detail(rng: np.random.Generator, color_name: str) -> dict[str, object]:
    n = int(rng.integers(1, 4))
    return {
        "logo_shape": LOGO_SHAPES[int(rng.integers(len(LOGO_SHAPES)))],
        "logo_text": "".join(_LETTERS[int(i)] for i in rng.integers(0, len(_LETTERS), size=n)),
        "logo_color": _contrast_color(rng, color_name),
        "accent": _contrast_color(rng, color_name),
        "count": int(rng.integers(1, 5)),
        "logo_pos": float(rng.uniform(0.0, 1.0)),
    }


def sample_products(
    n_products: int, rng: np.random.Generator, *, colourway_rate: float = 0.0
) -> list[ProductSpec]:
    """Sample ``n_products`` products grouped in look-alike families.

    Family sizes are 1..4 (mean about 2.2), so roughly two thirds of products have at least
    one look-alike. Categories are balanced round-robin over families in shuffled order.
    ``colourway_rate``: the probability that a family of two or more is a colourway family
    (members differ only in body colour, each a different named colour). At 0 (the default)
    no extra random number is drawn, so the products are those of earlier versions.
    """
    if not 0.0 <= colourway_rate <= 1.0:
        raise ValueError(f"colourway_rate must be in [0, 1], got {colourway_rate}")
    if n_products < 1:
        raise ValueError(f"n_products must be >= 1, got {n_products}")
    products: list[ProductSpec] = []
    fam = 0
    cat_order = rng.permutation(len(CATEGORIES))
    while len(products) < n_products:
        category = CATEGORIES[int(cat_order[fam % len(CATEGORIES)])]
        size = int(min(rng.choice([1, 1, 2, 2, 3, 3, 4]), n_products - len(products)))
        color_name = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        color = _jitter_color(rng, PALETTE[color_name], 14)
        material = MATERIALS[category][int(rng.integers(len(MATERIALS[category])))]
        shape = _shape_params(rng)
        brand = "".join(_SYLLABLES[int(i)] for i in rng.integers(0, len(_SYLLABLES), 2)).title()
        family = f"F{fam:05d}"
        # Members share the base pattern colour; pattern kind and accent colour may differ.
        pattern_color = _contrast_color(rng, color_name)
        base_pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
        family_accent = _contrast_color(rng, color_name)
        colourway = colourway_rate > 0 and size > 1 and rng.uniform() < colourway_rate
        if colourway:
            # Every member gets its own named colour; the first keeps the family's.
            others = [n for n in COLOR_NAMES if n != color_name]
            picks = rng.choice(len(others), size=size - 1, replace=False)
            names = [color_name] + [others[int(i)] for i in picks]
            colors = [color] + [_jitter_color(rng, PALETTE[n], 14) for n in names[1:]]
            shared = _detail(rng, color_name)
            shared_scale = float(rng.uniform(0.07, 0.16))
        for m in range(size):
            if colourway:
                member_name, member_color = names[m], colors[m]
                pattern, detail = base_pattern, dict(shared)
            else:
                member_name, member_color = color_name, color
                pattern = base_pattern
                if m > 0 and rng.uniform() < 0.35:
                    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
                detail = _detail(rng, color_name)
                if rng.uniform() < 0.5:
                    detail["accent"] = family_accent  # same strap colour: the logo tells apart
            products.append(
                ProductSpec(
                    product=f"P{len(products):05d}",
                    family=family,
                    category=category,
                    color_name=member_name,
                    color=member_color,
                    material=material,
                    pattern=pattern,
                    pattern_color=pattern_color,
                    pattern_scale=shared_scale if colourway else float(rng.uniform(0.07, 0.16)),
                    shape=shape,
                    detail=detail,
                    brand=brand,
                )
            )
        fam += 1
    return products
