"""Drawing programs: one per category, in product-normalised coordinates.

A program draws one product into a :class:`Canvas`, whose affine placement (centre, size,
rotation, mirror, horizontal squash for a 3/4 view) maps product coordinates ``(u, v)`` in
``[0, 1]^2`` to pixels. Everything is a polygon (ellipses are sampled), so every part follows
the placement; the body is filled with the product's pattern, computed in product
coordinates with numpy so it moves with the product. Hand-written because no library draws
parametric products; PIL does the rasterising.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from visearch.synth.spec import ProductSpec

RGB = tuple[int, int, int]
_GLOSSY = {"glass", "steel", "plastic", "metal", "ceramic", "enamel", "tin", "leather"}


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's embedded font scales only with FreeType; without it, the fixed bitmap font.
    if features.check("freetype2"):
        return ImageFont.load_default(size=size)
    return ImageFont.load_default()


def shade(c: Sequence[int], f: float) -> RGB:
    """Scale a colour towards black (``f < 1``) or white (``f > 1``)."""
    if f <= 1.0:
        return tuple(int(v * f) for v in c)  # type: ignore[return-value]
    t = min(f - 1.0, 1.0)
    return tuple(int(v + (255 - v) * t) for v in c)  # type: ignore[return-value]


class Canvas:
    """A product placement on an RGB image with its own alpha mask (the product's pixels).

    ``cx, cy`` is the product centre and ``size`` the product box side, both in pixels;
    ``theta`` is rotation in radians; ``flip`` mirrors left-right (text stays readable);
    ``squash`` in (0, 1] narrows the product as seen from an angle.
    """

    def __init__(
        self,
        image: Image.Image,
        spec: ProductSpec,
        *,
        cx: float,
        cy: float,
        size: float,
        theta: float = 0.0,
        flip: bool = False,
        squash: float = 1.0,
    ) -> None:
        self.image = image
        self.alpha = Image.new("L", image.size, 0)
        self.spec = spec
        self.cx, self.cy, self.size = cx, cy, size
        self.cos, self.sin = math.cos(theta), math.sin(theta)
        self.fx = -squash if flip else squash
        self.draw = ImageDraw.Draw(image)
        self.adraw = ImageDraw.Draw(self.alpha)
        self._texture: tuple[Image.Image, tuple[int, int]] | None = None

    def pt(self, u: float, v: float) -> tuple[float, float]:
        """Product coordinates -> pixel coordinates."""
        px = (u - 0.5) * self.fx * self.size
        py = (v - 0.5) * self.size
        return (self.cx + px * self.cos - py * self.sin, self.cy + px * self.sin + py * self.cos)

    def texture(self) -> tuple[Image.Image, tuple[int, int]]:
        """The body fill around the product (pattern, shading, gloss) and its pixel offset.

        Computed once per product, only over the product's reach, in product coordinates.
        """
        if self._texture is None:
            w, h = self.image.size
            reach = 0.75 * self.size
            x0, y0 = max(0, int(self.cx - reach)), max(0, int(self.cy - reach))
            x1, y1 = min(w, int(self.cx + reach) + 1), min(h, int(self.cy + reach) + 1)
            x0, y0 = min(x0, max(0, x1 - 1)), min(y0, max(0, y1 - 1))
            x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
            dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(self.cx)
            dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(self.cy)
            cos, sin = np.float32(self.cos), np.float32(self.sin)
            u = (dx * cos + dy * sin) * np.float32(1.0 / (self.fx * self.size)) + np.float32(0.5)
            v = (dy * cos - dx * sin) * np.float32(1.0 / self.size) + np.float32(0.5)
            t = _pattern(self.spec.pattern, u, v, self.spec.pattern_scale)
            body = np.asarray(self.spec.color, np.float32)
            pat = np.asarray(self.spec.pattern_color, np.float32)
            light = (1.12 - 0.28 * np.clip(v, 0, 1) - 0.18 * np.abs(np.clip(u, 0, 1) - 0.45))
            if self.spec.material in _GLOSSY:
                gloss = (0.45 * np.exp(-(((u - 0.3) * 20.0) ** 2))).astype(np.float32)
            else:
                gloss = np.zeros_like(u)
            tl, gl = t[..., None], gloss[..., None]
            col = (body + (pat - body) * tl) * light[..., None]
            col += (255.0 - col) * gl
            tex = Image.fromarray(np.clip(col, 0, 255).astype(np.uint8))
            self._texture = (tex, (x0, y0))
        return self._texture

    def poly(self, pts: Sequence[tuple[float, float]], fill: RGB | str, outline: bool = True):
        """Fill a polygon given in product coordinates; ``fill="body"`` uses the pattern."""
        xy = [self.pt(u, v) for u, v in pts]
        if fill == "body":
            tex, (x0, y0) = self.texture()
            m = Image.new("L", tex.size, 0)
            ImageDraw.Draw(m).polygon([(x - x0, y - y0) for x, y in xy], fill=255)
            self.image.paste(tex, (x0, y0), m)
            edge = shade(self.spec.color, 0.55)
        else:
            self.draw.polygon(xy, fill=tuple(fill))
            edge = shade(fill, 0.6)  # type: ignore[arg-type]
        if outline:
            self.draw.polygon(xy, outline=edge)
        self.adraw.polygon(xy, fill=255)

    def ellipse(self, cu: float, cv: float, ru: float, rv: float, fill: RGB | str,
                a0: float = 0.0, a1: float = 2 * math.pi, n: int = 20, outline: bool = True):
        """An ellipse (or a sector from angle ``a0`` to ``a1``) as a polygon."""
        pts = [
            (cu + ru * math.cos(a0 + (a1 - a0) * i / n), cv + rv * math.sin(a0 + (a1 - a0) * i / n))
            for i in range(n + 1)
        ]
        if a1 - a0 < 2 * math.pi - 1e-6:
            pts.append((cu, cv))
        self.poly(pts, fill, outline)

    def rect(self, u1: float, v1: float, u2: float, v2: float, fill: RGB | str,
             outline: bool = True):
        """An axis-aligned rectangle in product coordinates (rotates with the product)."""
        self.poly([(u1, v1), (u2, v1), (u2, v2), (u1, v2)], fill, outline)

    def line(self, pts: Sequence[tuple[float, float]], fill: Sequence[int], width: float):
        """A polyline; ``width`` in product units (at least 1 px)."""
        xy = [self.pt(u, v) for u, v in pts]
        wpx = max(1, round(width * self.size))
        self.draw.line(xy, fill=tuple(fill), width=wpx)
        self.adraw.line(xy, fill=255, width=wpx)

    def ring(self, cu: float, cv: float, ru: float, rv: float, fill: Sequence[int],
             width: float, a0: float = 0.0, a1: float = 2 * math.pi, n: int = 20):
        """An elliptic arc drawn as a line of ``width`` product units (handles, straps)."""
        pts = [
            (cu + ru * math.cos(a0 + (a1 - a0) * i / n), cv + rv * math.sin(a0 + (a1 - a0) * i / n))
            for i in range(n + 1)
        ]
        self.line(pts, fill, width)

    def logo(self, cu: float, cv: float, r: float) -> None:
        """The product's mark: a small shape plus its text (unrotated, never mirrored)."""
        d = self.spec.detail
        col = tuple(d["logo_color"])  # type: ignore[arg-type]
        shape = d["logo_shape"]
        if shape == "circle":
            self.ellipse(cu, cv, r, r, col, n=12, outline=False)
        elif shape == "ring":
            self.ring(cu, cv, r, r, col, r * 0.45, n=12)
        elif shape == "square":
            self.rect(cu - r, cv - r, cu + r, cv + r, col, outline=False)
        elif shape == "triangle":
            self.poly([(cu, cv - r), (cu + r, cv + r), (cu - r, cv + r)], col, outline=False)
        elif shape == "diamond":
            self.poly([(cu, cv - r), (cu + r, cv), (cu, cv + r), (cu - r, cv)], col, False)
        elif shape == "bar":
            self.rect(cu - 1.4 * r, cv - 0.4 * r, cu + 1.4 * r, cv + 0.4 * r, col, False)
        else:  # cross
            self.line([(cu - r, cv), (cu + r, cv)], col, r * 0.6)
            self.line([(cu, cv - r), (cu, cv + r)], col, r * 0.6)
        text = str(d["logo_text"])
        px = max(6, int(self.size * 0.11))
        x, y = self.pt(cu, cv + r * 1.2)
        self.draw.text((x, y), text, fill=shade(col, 0.8), font=_font(px), anchor="mt")


def _pattern(kind: str, u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    """Mix weight of the pattern colour, float32 in [0, 1], same shape as ``u``."""
    if kind == "solid":
        return np.zeros_like(u)
    if kind == "stripes":
        return (np.floor(v / p) % 2).astype(np.float32)
    if kind == "pinstripes":
        return ((u / p) % 1.0 < 0.22).astype(np.float32)
    if kind == "diagonal":
        return (((u + v) / p) % 1.0 < 0.5).astype(np.float32)
    if kind == "dots":
        fu, fv = (u / p) % 1.0 - 0.5, (v / p) % 1.0 - 0.5
        return (fu * fu + fv * fv < 0.09).astype(np.float32)
    if kind == "checks":
        return ((np.floor(u / p) + np.floor(v / p)) % 2).astype(np.float32)
    if kind == "two-tone":
        return (v > 0.58).astype(np.float32)
    if kind == "band":
        return (np.abs(v - 0.52) < 0.07).astype(np.float32)
    raise ValueError(f"unknown pattern {kind!r}")


# ---- the programs ------------------------------------------------------------------------
# Each takes a Canvas and returns the (u, v) of its logo centre (the close-up target).


def draw_shoe(c: Canvas) -> tuple[float, float]:
    s, d = c.spec.shape, c.spec.detail
    acc = d["accent"]
    kind = int(s["variant"])  # 0 boot, 1 sneaker, 2 low shoe
    top = (0.1, 0.4, 0.52)[kind] + 0.06 * s["a"]
    back = 0.06 + 0.04 * s["b"]
    collar = (0.36, 0.34, 0.3)[kind]
    instep = (0.5, 0.56, 0.6)[kind] + 0.05 * s["d"]
    toe_h = 0.62 + 0.08 * s["b"]
    sole_col = (235, 235, 228) if s["c"] > 0.4 else (40, 38, 36)
    c.poly([(0.03, 0.84), (0.97, 0.84), (0.98, 0.9), (0.94, 0.95), (0.04, 0.95)], sole_col)
    upper = [(back, 0.86), (back - 0.02, (top + 0.86) / 2), (back, top), (collar, top),
             (collar + 0.04, instep), (0.62, toe_h - 0.02)]
    upper += [(0.86 + 0.1 * math.cos(a), 0.84 - (0.84 - toe_h) * math.sin(a))
              for a in np.linspace(math.pi / 2, 0.0, 6)]
    c.poly(upper, "body")
    c.rect(back, top, collar, top + 0.05, shade(c.spec.color, 0.7))
    n = int(d["count"]) + 1
    for i in range(n):
        f = (i + 0.5) / n
        u = collar + 0.04 + (0.62 - collar - 0.04) * f
        vv = instep + (toe_h - 0.02 - instep) * f
        c.line([(u - 0.06, vv - 0.02), (u + 0.05, vv + 0.03)], acc, 0.022)
    c.line([(0.2, 0.8), (0.8, 0.8)], acc, 0.02)
    c.logo(0.26, 0.62, 0.06)
    return (0.26, 0.62)


def draw_bag(c: Canvas) -> tuple[float, float]:
    s, d = c.spec.shape, c.spec.detail
    acc = d["accent"]
    inset = 0.04 + 0.12 * s["a"]
    top = 0.36 + 0.1 * s["b"]
    c.ring(0.5, top, 0.18 + 0.1 * s["c"], 0.2 + 0.08 * s["d"], acc, 0.035, math.pi, 2 * math.pi)
    c.poly([(0.06 + inset, top), (0.94 - inset, top), (0.96, 0.95), (0.04, 0.95)], "body")
    if int(s["variant"]) == 1:
        c.poly([(0.06 + inset, top), (0.94 - inset, top), (0.5, top + 0.3)],
               shade(c.spec.color, 0.8))
    for i in range(int(d["count"])):
        c.ellipse(0.3 + 0.4 * (i + 0.5) / int(d["count"]), top + 0.05, 0.025, 0.025, acc, n=8)
    lv = 0.64 + 0.12 * float(d["logo_pos"])
    c.logo(0.5, lv, 0.07)
    return (0.5, lv)


def draw_top(c: Canvas) -> tuple[float, float]:
    s, d = c.spec.shape, c.spec.detail
    acc = d["accent"]
    kind = int(s["variant"])
    sh = 0.12 + 0.05 * s["a"]
    w = 0.2 + 0.06 * s["b"]
    if kind != 2:
        sleeve_end = (0.42, 0.86, 0.42)[kind]
        c.poly([(0.5 - w, sh), (0.05, sleeve_end - 0.1), (0.13, sleeve_end), (0.5 - w, 0.4)],
               "body")
        c.poly([(0.5 + w, sh), (0.95, sleeve_end - 0.1), (0.87, sleeve_end), (0.5 + w, 0.4)],
               "body")
    c.poly([(0.5 - w, sh), (0.4, sh - 0.03), (0.6, sh - 0.03), (0.5 + w, sh),
            (0.5 + w + 0.03, 0.95), (0.5 - w - 0.03, 0.95)], "body")
    c.ellipse(0.5, sh, 0.1, 0.06 + 0.03 * s["c"], acc, math.pi * 0.05, math.pi * 0.95, n=10)
    for i in range(int(d["count"])):
        c.ellipse(0.5, sh + 0.12 + 0.07 * i, 0.017, 0.017, acc, n=6, outline=False)
    lu = 0.38 + 0.24 * float(d["logo_pos"])
    c.logo(lu, 0.5, 0.06)
    return (lu, 0.5)


def draw_watch(c: Canvas) -> tuple[float, float]:
    s, d = c.spec.shape, c.spec.detail
    acc = d["accent"]
    sw = 0.13 + 0.05 * s["a"]
    c.rect(0.5 - sw, 0.02, 0.5 + sw, 0.98, acc)
    for i in range(int(d["count"]) + 1):
        c.ellipse(0.5, 0.82 + 0.035 * i, 0.015, 0.012, shade(acc, 0.5), n=6, outline=False)
    r = 0.26 + 0.06 * s["b"]
    if int(s["variant"]) == 1:
        c.rect(0.5 - r, 0.5 - r, 0.5 + r, 0.5 + r, "body")
    else:
        c.ellipse(0.5, 0.5, r, r, "body", n=24)
    dial = (240, 240, 236) if s["c"] > 0.5 else (24, 24, 30)
    c.ellipse(0.5, 0.5, r * 0.78, r * 0.78, dial, n=24)
    hand = shade(dial, 0.2) if s["c"] > 0.5 else (230, 230, 230)
    c.line([(0.5, 0.5), (0.5 + r * 0.5, 0.5 - r * 0.3)], hand, 0.025)
    c.line([(0.5, 0.5), (0.5 - r * 0.1, 0.5 - r * 0.62)], hand, 0.018)
    c.rect(0.5 + r, 0.46, 0.5 + r + 0.05, 0.54, shade(c.spec.color, 0.8))
    c.logo(0.5, 0.5 + r * 0.32, r * 0.14)
    return (0.5, 0.5 + r * 0.32)


def draw_bottle(c: Canvas) -> tuple[float, float]:
    s, d = c.spec.shape, c.spec.detail
    acc = d["accent"]
    bw = 0.18 + 0.1 * s["a"]
    nw = 0.06 + 0.04 * s["b"]
    shoulder = 0.3 + 0.1 * s["c"]
    c.rect(0.5 - nw - 0.01, 0.02, 0.5 + nw + 0.01, 0.14, acc)
    pts = [(0.5 - nw, 0.13), (0.5 + nw, 0.13), (0.5 + nw, shoulder - 0.08),
           (0.5 + bw, shoulder), (0.5 + bw, 0.93), (0.5 + bw - 0.04, 0.97),
           (0.5 - bw + 0.04, 0.97), (0.5 - bw, 0.93), (0.5 - bw, shoulder),
           (0.5 - nw, shoulder - 0.08)]
    c.poly(pts, "body")
    lt = 0.5 + 0.1 * s["d"]
    if int(s["variant"]) != 0:
        c.rect(0.5 - bw, lt, 0.5 + bw, lt + 0.26, (236, 232, 220))
    for i in range(int(d["count"])):
        c.line([(0.5 - nw - 0.01, 0.05 + 0.025 * i), (0.5 + nw + 0.01, 0.05 + 0.025 * i)],
               shade(acc, 0.6), 0.01)
    c.logo(0.5, lt + 0.08, 0.05)
    return (0.5, lt + 0.08)


def draw_box(c: Canvas) -> tuple[float, float]:
    s, d = c.spec.shape, c.spec.detail
    acc = d["accent"]
    dep = 0.12 + 0.12 * s["a"]
    x1, x2 = 0.06, 0.94 - dep
    y1, y2 = 0.08 + dep + 0.15 * s["b"], 0.95
    c.poly([(x1, y1), (x1 + dep, y1 - dep), (x2 + dep, y1 - dep), (x2, y1)],
           shade(c.spec.color, 1.25))
    c.poly([(x2, y1), (x2 + dep, y1 - dep), (x2 + dep, y2 - dep), (x2, y2)],
           shade(c.spec.color, 0.7))
    c.rect(x1, y1, x2, y2, "body")
    if int(s["variant"]) != 2:
        mid = (x1 + x2) / 2
        c.rect(mid - 0.03, y1, mid + 0.03, y2, acc, outline=False)
        c.poly([(mid - 0.03 + dep / 2, y1 - dep / 2), (mid + 0.03 + dep / 2, y1 - dep / 2),
                (mid + 0.03, y1), (mid - 0.03, y1)], acc, outline=False)
    for i in range(int(d["count"])):
        c.ellipse(x1 + 0.07, y1 + 0.07 + 0.06 * i, 0.02, 0.02, acc, n=6, outline=False)
    lu = x1 + (x2 - x1) * (0.3 + 0.4 * float(d["logo_pos"]))
    c.logo(lu, (y1 + y2) / 2 + 0.05, 0.06)
    return (lu, (y1 + y2) / 2 + 0.05)


def draw_lamp(c: Canvas) -> tuple[float, float]:
    s, d = c.spec.shape, c.spec.detail
    acc = d["accent"]
    c.ellipse(0.5, 0.93, 0.16 + 0.08 * s["a"], 0.04, acc, n=16)
    top_w = 0.12 + 0.1 * s["b"]
    bot_w = 0.28 + 0.12 * s["c"]
    sh_b = 0.38 + 0.1 * s["d"]
    if int(s["variant"]) == 1:
        c.line([(0.5, 0.92), (0.32, 0.62), (0.5, sh_b)], shade(acc, 0.7), 0.035)
    else:
        c.line([(0.5, 0.92), (0.5, sh_b)], shade(acc, 0.7), 0.035)
    c.poly([(0.5 - top_w, 0.06), (0.5 + top_w, 0.06), (0.5 + bot_w, sh_b),
            (0.5 - bot_w, sh_b)], "body")
    for i in range(int(d["count"])):
        c.line([(0.5 + bot_w * 0.6 - 0.05 * i, sh_b), (0.5 + bot_w * 0.6 - 0.05 * i,
                                                       sh_b + 0.1 + 0.04 * i)], acc, 0.012)
    c.logo(0.5, 0.2 + 0.06 * float(d["logo_pos"]), 0.045)
    return (0.5, 0.2)


def draw_chair(c: Canvas) -> tuple[float, float]:
    s, d = c.spec.shape, c.spec.detail
    acc = d["accent"]
    seat = 0.55 + 0.08 * s["a"]
    leg = shade(c.spec.color, 0.5) if s["b"] > 0.5 else (60, 60, 64)
    for u in (0.14, 0.86):
        c.line([(u, seat), (u - 0.04 + 0.08 * (u > 0.5), 0.97)], leg, 0.04)
    c.line([(0.32, seat), (0.34, 0.9)], shade(leg, 0.8), 0.03)
    c.line([(0.68, seat), (0.66, 0.9)], shade(leg, 0.8), 0.03)
    back_top = 0.04 + 0.1 * s["c"]
    c.rect(0.18, back_top, 0.82, seat - 0.1 + 0.05 * s["d"], "body")
    n = int(d["count"]) + 1
    for i in range(n):
        u = 0.18 + 0.64 * (i + 0.5) / n
        c.line([(u, back_top + 0.05), (u, seat - 0.14)], acc, 0.015)
    c.poly([(0.08, seat), (0.92, seat), (0.86, seat + 0.09), (0.14, seat + 0.09)],
           shade(c.spec.color, 0.85))
    c.logo(0.3 + 0.4 * float(d["logo_pos"]), back_top + 0.12, 0.05)
    return (0.5, back_top + 0.12)


def draw_mug(c: Canvas) -> tuple[float, float]:
    s, d = c.spec.shape, c.spec.detail
    acc = d["accent"]
    w = 0.26 + 0.08 * s["a"]
    top = 0.15 + 0.1 * s["b"]
    cu = 0.44
    c.ring(cu + w, 0.55, 0.14 + 0.04 * s["c"], 0.17, acc, 0.06, -math.pi / 2, math.pi / 2)
    c.poly([(cu - w, top), (cu + w, top), (cu + w * (0.9 + 0.1 * s["d"]), 0.93),
            (cu - w * (0.9 + 0.1 * s["d"]), 0.93)], "body")
    c.ellipse(cu, top, w, 0.05, shade(c.spec.color, 0.5), n=16)
    for i in range(int(d["count"])):
        c.line([(cu - w, 0.82 - 0.03 * i), (cu + w * 0.95, 0.82 - 0.03 * i)], acc, 0.012)
    c.logo(cu, 0.45 + 0.1 * float(d["logo_pos"]), 0.07)
    return (cu, 0.5)


def draw_cap(c: Canvas) -> tuple[float, float]:
    s, d = c.spec.shape, c.spec.detail
    acc = d["accent"]
    crown_h = 0.38 + 0.14 * s["a"]
    base = 0.7
    brim = 0.28 + 0.12 * s["b"]
    c.poly([(0.62, base - 0.05), (0.62 + brim, base + 0.04 + 0.05 * s["c"]),
            (0.6 + brim, base + 0.12), (0.55, base + 0.06)], acc)
    c.ellipse(0.4, base, 0.34, crown_h, "body", math.pi, 2 * math.pi, n=20)
    c.rect(0.06, base - 0.03, 0.74, base + 0.05, shade(c.spec.color, 0.75))
    c.ellipse(0.4, base - crown_h, 0.04, 0.025, acc, n=8)
    for i in range(int(d["count"])):
        du = 0.1 * (i + 1) - 0.05 * int(d["count"])
        c.line([(0.4 + du, base - crown_h + 0.04), (0.4 + 2.2 * du, base - 0.04)],
               shade(c.spec.color, 0.7), 0.012)
    c.logo(0.4, base - crown_h * 0.5, 0.06)
    return (0.4, base - crown_h * 0.5)


PROGRAMS: dict[str, Callable[[Canvas], tuple[float, float]]] = {
    "bag": draw_bag,
    "bottle": draw_bottle,
    "box": draw_box,
    "cap": draw_cap,
    "chair": draw_chair,
    "lamp": draw_lamp,
    "mug": draw_mug,
    "shoe": draw_shoe,
    "top": draw_top,
    "watch": draw_watch,
}


def draw_product(
    image: Image.Image,
    spec: ProductSpec,
    *,
    cx: float,
    cy: float,
    size: float,
    theta: float = 0.0,
    flip: bool = False,
    squash: float = 1.0,
) -> tuple[Image.Image, tuple[float, float]]:
    """Draw ``spec`` onto ``image`` (RGB, modified in place).

    Returns the product's alpha mask (``L``, same size; 255 where drawn) and the pixel
    position of its logo centre.
    """
    canvas = Canvas(image, spec, cx=cx, cy=cy, size=size, theta=theta, flip=flip,
                    squash=squash)
    lu, lv = PROGRAMS[spec.category](canvas)
    return canvas.alpha, canvas.pt(lu, lv)
