"""A contact sheet: shop images and user photos of a few SKUs, boxes drawn, one PNG."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_CELL = 128
_LABEL_W = 150


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_contact_sheet(world: Path, out: Path, *, rows: int = 8, max_shop: int = 5,
                        max_photos: int = 2, scenes: bool = True) -> Path:
    """Write a PNG of ``rows`` SKUs: their shop images (green boxes) then user photos (red).

    SKUs are taken from look-alike families first (two or three members each, adjacent
    rows), so the sheet shows how small the differences are. With ``scenes``, a last row
    shows detection training scenes with every annotated box (blue) and its category.
    Each cell is 128 px; the label column is 150 px. Returns ``out``.
    """
    world = Path(world)
    if not (world / "catalog.jsonl").is_file():
        raise ValueError(f"{world} has no catalog.jsonl; generate a world there first")
    catalog = _read_jsonl(world / "catalog.jsonl")
    queries = _read_jsonl(world / "queries.jsonl") if (world / "queries.jsonl").is_file() else []
    truth = json.loads((world / "truth.json").read_text(encoding="utf-8"))
    shop: dict[str, list[dict]] = {}
    for r in catalog:
        shop.setdefault(r["sku"], []).append(r)
    photos: dict[str, list[dict]] = {}
    for r in queries:
        photos.setdefault(r["sku"], []).append(r)
    chosen: list[str] = []
    for fam in truth.get("lookalike_families", []):
        chosen.extend(s for s in fam["skus"][:3] if s not in chosen)
        if len(chosen) >= rows:
            break
    chosen.extend(s for s in sorted(shop) if s not in chosen)
    chosen = chosen[:rows]

    cols = max_shop + max_photos
    coco_path = world / "detection" / "train.json"
    scene_row = scenes and coco_path.is_file()
    height = (len(chosen) + int(bool(scene_row))) * _CELL
    sheet = Image.new("RGB", (_LABEL_W + cols * _CELL, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for y, sku in enumerate(chosen):
        first = shop[sku][0]
        attrs = first.get("attributes", {})
        label = (f"{sku}\n{first['category']}\n{attrs.get('family', '')}\n"
                 f"{attrs.get('color', '')} {attrs.get('pattern', '')}\n"
                 f"{attrs.get('material', '')}")
        draw.multiline_text((6, y * _CELL + 6), label, fill=(0, 0, 0), font=font)
        cells = [(r, (0, 170, 0)) for r in shop[sku][:max_shop]]
        cells += [(r, (220, 0, 0)) for r in photos.get(sku, [])[:max_photos]]
        for x, (r, colour) in enumerate(cells):
            if x >= max_shop and colour == (0, 170, 0):
                break
            col = x if colour == (0, 170, 0) else max_shop + x - len(shop[sku][:max_shop])
            with Image.open(world / r["image"]) as im:
                img = im.convert("RGB")
            s = _CELL / max(img.size)
            img = img.resize((round(img.size[0] * s), round(img.size[1] * s)))
            d = ImageDraw.Draw(img)
            if r.get("bbox"):
                x1, y1, x2, y2 = (v * s for v in r["bbox"])
                d.rectangle((x1, y1, x2 - 1, y2 - 1), outline=colour, width=2)
            sheet.paste(img, (_LABEL_W + col * _CELL, y * _CELL))
        draw.line((0, y * _CELL, sheet.size[0], y * _CELL), fill=(200, 200, 200))
    if scene_row:
        _draw_scene_row(sheet, world, len(chosen) * _CELL, cols, font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def _draw_scene_row(sheet: Image.Image, world: Path, top: int, cols: int,
                    font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> None:
    coco = json.loads((world / "detection" / "train.json").read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in coco["categories"]}
    anns: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    ImageDraw.Draw(sheet).multiline_text((6, top + 6), "detection scenes\n(train.json)",
                                         fill=(0, 0, 0), font=font)
    for x, info in enumerate(coco["images"][:cols]):
        with Image.open(world / info["file_name"]) as im:
            img = im.convert("RGB")
        s = _CELL / max(img.size)
        img = img.resize((round(img.size[0] * s), round(img.size[1] * s)))
        d = ImageDraw.Draw(img)
        for a in anns.get(info["id"], []):
            bx, by, bw, bh = (v * s for v in a["bbox"])
            d.rectangle((bx, by, bx + bw - 1, by + bh - 1), outline=(0, 90, 255), width=2)
            d.text((bx + 2, by + 1), names[a["category_id"]], fill=(255, 255, 255), font=font)
        sheet.paste(img, (_LABEL_W + x * _CELL, top))
