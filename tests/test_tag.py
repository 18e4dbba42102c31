"""``visearch-index tag``: missing categories/attributes from the heads into a new manifest,
checked against the heads' own predictions; the input catalog is never rewritten."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from index_builder.cli import main as index_main
from index_builder.cmd_tag import tag_catalog
from visearch.catalog import read_manifest
from visearch.cleaning.review import Decision, append_decisions
from visearch.embedding import TaskHeads, build_embedder, embed_arrays_with_heads, save_embedder
from visearch.embedding.heads import top_k_prediction
from visearch.embedding.infer import load_crop
from visearch.errors import ManifestError

CATS = ["bag", "mug", "shoe"]
ATTRS = {"color": ["blue", "red", "white"], "pattern": ["dots", "solid"]}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    torch.manual_seed(5)
    model = build_embedder("tiny", dim=16, input_size=32)
    model.set_heads(TaskHeads(16, CATS, ATTRS))
    path = tmp_path_factory.mktemp("tag_model") / "embedder.pt"
    save_embedder(model, path)
    return path


def _catalog(folder: Path) -> Path:
    """8 images; rows 0, 3, 6 lack a category, even rows lack colour, row 5 has all."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True)
    lines = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
            folder / "img" / f"{i}.png")
        row = {"image": f"img/{i}.png", "sku": f"S{i // 2}", "category": CATS[i % 3],
               "bbox": [2, 3, 40, 38], "attributes": {"color": "red", "pattern": "dots"}}
        if i == 3:
            row["category"] = ""  # empty counts as missing too
        elif i % 3 == 0:
            del row["category"]
        if i % 2 == 0:
            del row["attributes"]["color"]
        if i == 7:
            del row["attributes"]
        lines.append(json.dumps(row))
    path = folder / "catalog.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _oracle(model_path: Path, catalog: Path) -> list[dict]:
    from visearch.embedding import load_embedder

    model = load_embedder(model_path)
    rows = [json.loads(line) for line in catalog.read_text().splitlines()]
    crops = [load_crop(catalog.parent / r["image"], r["bbox"]) for r in rows]
    _, logits = embed_arrays_with_heads(model, crops)
    out = []
    for i in range(len(rows)):
        out.append({name: top_k_prediction(logits[name][i], model.heads.labels(name), 1)
                    for name in logits})
    return out


def test_tag_fills_missing_fields_as_the_heads_predict(model_path, tmp_path) -> None:
    catalog = _catalog(tmp_path / "c")
    before = _digest(catalog)
    out = tmp_path / "out" / "tagged.jsonl"
    s = tag_catalog(catalog, model_path, out, min_score=0.0)
    assert _digest(catalog) == before  # the input is untouched
    assert (s.rows, s.incomplete, s.review, s.skipped) == (8, 6, 0, 0)
    oracle = _oracle(model_path, catalog)
    given = [json.loads(line) for line in catalog.read_text().splitlines()]
    tagged = read_manifest(out).rows  # a valid manifest: every row has a category
    # Image paths are rewritten relative to the new manifest and point at the same files.
    assert [r.path for r in tagged] == [(catalog.parent / g["image"]).resolve() for g in given]
    scores = {json.loads(x)["line"]: json.loads(x)
              for x in s.scores.read_text().splitlines()}
    for i, (row, g) in enumerate(zip(tagged, given, strict=True)):
        if g.get("category"):
            assert row.category == g["category"]  # never replaced
        else:
            assert row.category == oracle[i]["category"].values[0]
            assert scores[i + 1]["fields"]["category"]["score"] == pytest.approx(
                oracle[i]["category"].scores[0])
        for name in ATTRS:
            have = g.get("attributes", {}).get(name)
            assert row.attributes[name] == (have or oracle[i][f"attr.{name}"].values[0])
    assert set(scores) == {1, 3, 4, 5, 7, 8}  # the incomplete rows (1-based lines)


def test_low_confidence_rows_go_to_review_and_decisions_apply(model_path, tmp_path) -> None:
    catalog = _catalog(tmp_path / "c")
    out = tmp_path / "tagged.jsonl"
    s = tag_catalog(catalog, model_path, out, min_score=1.0)
    # No probability reaches 1: attributes stay missing, every incomplete row is reviewed.
    assert s.written == 3 and s.review == 6  # only the 3 required categories are written
    rows = read_manifest(out).rows
    assert all("color" not in r.attributes for i, r in enumerate(rows) if i % 2 == 0)
    page = s.page.read_text()
    assert "tag:img/0.png" in page and "auto-tagged with low confidence" in page
    decisions = tmp_path / "decisions.jsonl"
    append_decisions(decisions, [Decision("tag:img/0.png", "accept"),
                                 Decision("tag:img/2.png", "reject")])
    tag_catalog(catalog, model_path, out, min_score=1.0, decisions=decisions)
    rows = read_manifest(out).rows
    oracle = _oracle(model_path, catalog)
    assert rows[0].attributes["color"] == oracle[0]["attr.color"].values[0]  # accepted
    assert "color" not in rows[2].attributes and "color" not in rows[4].attributes


def test_tag_never_overwrites_the_input_catalog(model_path, tmp_path, capsys) -> None:
    catalog = _catalog(tmp_path / "c")
    before = _digest(catalog)
    with pytest.raises(ValueError, match="never rewrites its input"):
        tag_catalog(catalog, model_path, catalog)
    link = tmp_path / "link.jsonl"
    link.symlink_to(catalog)
    with pytest.raises(ValueError, match="never rewrites its input"):
        tag_catalog(catalog, model_path, link)
    code = index_main(["tag", "--catalog", str(catalog), "--model", str(model_path),
                       "--out", str(catalog)])
    assert code == 2 and "never rewrites its input" in capsys.readouterr().err
    assert _digest(catalog) == before
    # The CLI writes the new manifest beside, the input unchanged.
    out = tmp_path / "new.jsonl"
    assert index_main(["tag", "--catalog", str(catalog), "--model", str(model_path),
                       "--out", str(out)]) == 0
    assert out.is_file() and _digest(catalog) == before


def test_bad_rows_and_a_model_without_heads(model_path, tmp_path) -> None:
    catalog = _catalog(tmp_path / "c")
    with catalog.open("a") as f:
        f.write('{"image": "img/missing.png", "sku": "S9"}\n')
    with pytest.raises(ManifestError, match=r"catalog.jsonl:9: cannot read image"):
        tag_catalog(catalog, model_path, tmp_path / "o.jsonl")
    s = tag_catalog(catalog, model_path, tmp_path / "o.jsonl", lenient=True)
    assert s.skipped == 1 and s.rows == 8
    torch.manual_seed(0)
    plain = tmp_path / "plain.pt"
    save_embedder(build_embedder("tiny", dim=16, input_size=32), plain)
    with pytest.raises(ValueError, match="no category/attribute heads"):
        tag_catalog(catalog, plain, tmp_path / "o2.jsonl", lenient=True)
    with pytest.raises(ValueError, match="min-score"):
        tag_catalog(catalog, model_path, tmp_path / "o3.jsonl", min_score=2.0)
