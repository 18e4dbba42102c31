"""Manifest validation: every bad row is named by its line, strict fails, lenient skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from visearch.catalog import read_manifest, write_manifest
from visearch.errors import ManifestError


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 30), (200, 0, 0)).save(tmp_path / "img" / "a.jpg")
    Image.new("RGB", (40, 30), (0, 200, 0)).save(tmp_path / "img" / "b.png")
    (tmp_path / "img" / "text.jpg").write_text("not an image")
    return tmp_path


GOOD = {"image": "img/a.jpg", "sku": "S1", "category": "shoe", "bbox": [1, 2, 39, 29],
        "attributes": {"color": "red", "size": 42}, "title": "Red shoe"}

BAD_ROWS = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "a row must be a JSON object, got list"),
    ({"sku": "S1", "category": "shoe"}, "missing required field 'image'"),
    ({"image": "img/a.jpg", "sku": "", "category": "shoe"}, "field 'sku' is empty"),
    ({"image": "img/a.jpg", "sku": 12, "category": "shoe"},
     "field 'sku' must be a string, got int"),
    ({**GOOD, "colour": "red"}, "unknown field(s) ['colour']"),
    ({**GOOD, "bbox": [1, 2, 3]}, "must be a list of 4 numbers"),
    ({**GOOD, "bbox": [10, 2, 5, 20]}, "is empty: need x1 < x2 and y1 < y2"),
    ({**GOOD, "bbox": [0, 0, 41, 30]}, "lies outside the 40 x 30 image"),
    ({**GOOD, "bbox": ["a", 0, 1, 1]}, "must hold numbers"),
    ({**GOOD, "attributes": {"tags": ["x"]}}, "attribute 'tags' must be a string or a number"),
    ({**GOOD, "image": "img/missing.jpg"}, "cannot read image file"),
    ({**GOOD, "image": "img/text.jpg"}, "text.jpg: not an image in a known format"),
]


def _write(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_good_rows_parse(folder: Path) -> None:
    second = {"image": "img/b.png", "sku": "S2", "category": "bag"}
    m = read_manifest(_write(folder / "catalog.jsonl", [GOOD, "", second]))
    assert [r.line for r in m.rows] == [1, 3]  # the blank line is not a row
    row = m.rows[0]
    assert row.path == (folder / "img" / "a.jpg").resolve()
    assert row.bbox == (1.0, 2.0, 39.0, 29.0)
    assert row.attributes == {"color": "red", "size": "42"}
    assert row.title == "Red shoe"
    assert m.rows[1].bbox is None and m.rows[1].attributes == {} and m.rows[1].title == ""
    assert m.rejects == []


@pytest.mark.parametrize(("row", "reason"), BAD_ROWS)
def test_strict_names_the_line(folder: Path, row, reason: str) -> None:
    path = _write(folder / "c.jsonl", [GOOD, GOOD, row])
    with pytest.raises(ManifestError) as info:
        read_manifest(path, strict=True)
    assert info.value.line == 3
    assert str(info.value).startswith(f"{path}:3: ")
    assert reason in str(info.value)


def test_lenient_skips_counts_and_writes_rejects(folder: Path) -> None:
    rows = [GOOD] + [r for r, _ in BAD_ROWS] + [GOOD]
    path = _write(folder / "c.jsonl", rows)
    rejects = folder / "rejects.jsonl"
    m = read_manifest(path, strict=False, rejects_path=rejects)
    assert [r.line for r in m.rows] == [1, len(rows)]
    assert [r.line for r in m.rejects] == list(range(2, len(rows)))
    written = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [w["line"] for w in written] == list(range(2, len(rows)))
    for w, (_, reason) in zip(written, BAD_ROWS, strict=True):
        assert reason in w["reason"]
    assert written[0]["raw"] == "{not json"


def test_exif_rotation_swaps_the_sides_for_bbox_checks(folder: Path) -> None:
    img = Image.new("RGB", (40, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # shown 20 wide, 40 high
    img.save(folder / "img" / "rot.jpg", exif=exif.tobytes())
    row = {"image": "img/rot.jpg", "sku": "S", "category": "c", "bbox": [0, 0, 20, 40]}
    assert read_manifest(_write(folder / "r.jsonl", [row])).rows[0].bbox == (0, 0, 20, 40)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="manifest file not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_write_manifest_round_trip(folder: Path) -> None:
    m = read_manifest(_write(folder / "catalog.jsonl", [GOOD]))
    (folder / "sub").mkdir()
    write_manifest(folder / "sub" / "clean.jsonl", m.rows)
    again = read_manifest(folder / "sub" / "clean.jsonl")
    assert again.rows[0].path == m.rows[0].path
    assert again.rows[0].image == "../img/a.jpg"
    assert again.rows[0].bbox == m.rows[0].bbox
