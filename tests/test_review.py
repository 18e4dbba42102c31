"""The review queue: decisions files, the page, and decisions applied by the next run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index_builder.cli import main as index_main
from visearch.cleaning.review import (
    Decision,
    ReviewItem,
    append_decisions,
    parse_item_id,
    read_decisions,
    render_page,
    reviewed_pairs,
)

D = 32


def test_decisions_round_trip_and_the_last_one_wins(tmp_path: Path):
    path = tmp_path / "review" / "decisions.jsonl"
    assert read_decisions(path) == {}
    append_decisions(path, [Decision("merge:S1|S2", "accept"), Decision("denoise:a.jpg", "reject")])
    append_decisions(path, [Decision("merge:S1|S2", "reject", note="different logos")])
    got = read_decisions(path)
    assert {k: d.decision for k, d in got.items()} == {"merge:S1|S2": "reject",
                                                       "denoise:a.jpg": "reject"}
    assert got["merge:S1|S2"].note == "different logos" and got["merge:S1|S2"].time > 0
    assert reviewed_pairs(got, "merge", "reject") == {("S1", "S2")}
    assert reviewed_pairs(got, "denoise", "reject") == {("a.jpg",)}
    assert reviewed_pairs(got, "merge", "accept") == set()


@pytest.mark.parametrize("bad", ["merge:S1", "dup:a|b", "denoise:", "S1|S2", "merge:S1|"])
def test_bad_item_ids_are_refused_with_the_valid_forms(bad: str, tmp_path: Path):
    with pytest.raises(ValueError, match="merge:<sku>|<sku>"):
        parse_item_id(bad)
    with pytest.raises(ValueError, match="expected"):
        append_decisions(tmp_path / "d.jsonl", [Decision(bad, "accept")])
    assert not (tmp_path / "d.jsonl").exists()


def test_a_bad_decision_line_names_its_line(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "merge:A|B", "decision": "accept"}\n{"id": "merge:A|B", '
                    '"decision": "maybe"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: decision must be one of"):
        read_decisions(path)


def test_page_lists_pending_then_decided_with_images_and_scores():
    items = [
        ReviewItem("merge", ("S1", "S2"), "merged", "mutual confusion",
                   {"false_merge_p": 0.001}, {"S1": ["a.jpg"], "S2": ["b.jpg"]}),
        ReviewItem("denoise", ("c.jpg",), "removed", "noise", {"distance": 0.5},
                   {"S3 (removed)": ["c.jpg"]}),
    ]
    page = render_page(items, {"denoise:c.jpg": Decision("denoise:c.jpg", "reject")},
                       lambda im: f"../img/{im}")
    assert page.index("merge:S1|S2") < page.index("Decided (1)") < page.index("denoise:c.jpg")
    assert "src='../img/a.jpg'" in page and "src='../img/c.jpg'" in page
    assert "Pending (1)" in page and "<b>0.001</b>" in page
    # The decided item's radio button is pre-selected on "reject".
    assert "name='denoise:c.jpg' value='reject' checked" in page


# ---- decisions applied by the stages ------------------------------------------------------


@pytest.fixture()
def catalog(tmp_path: Path) -> tuple[Path, Path]:
    """30 distinct SKUs (4 images each) and one product under SPLIT1/SPLIT2, with embeddings
    (an .npz) that say so; the images are grey 4-pixel placeholders."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows, xs = [], []

    def add(sku: str, centre: np.ndarray, n: int) -> None:
        x = centre + 0.5 * rng.standard_normal((n, D)) / np.sqrt(D)
        xs.append(x / np.linalg.norm(x, axis=1, keepdims=True))
        for i in range(n):
            image = f"img/{sku}_{i}.png"
            Image.new("RGB", (2, 2), (128, 128, 128)).save(tmp_path / image)
            rows.append({"image": image, "sku": sku, "category": "bag"})

    def unit() -> np.ndarray:
        v = rng.standard_normal(D)
        return v / np.linalg.norm(v)

    for k in range(30):
        add(f"D{k:02d}", unit(), 4)
    split = unit()
    add("SPLIT1", split, 4)
    add("SPLIT2", split, 4)
    path = tmp_path / "catalog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    np.savez(tmp_path / "emb.npz", embeddings=np.concatenate(xs).astype(np.float32),
             images=np.array([r["image"] for r in rows]))
    return path, tmp_path / "emb.npz"


def test_a_rejected_merge_is_honoured_on_the_next_run(catalog, tmp_path: Path, capsys):
    cat, emb = catalog
    work = tmp_path / "work"
    merge = ["merge", "--catalog", cat, "--out", work, "--embeddings", emb]
    assert index_main([str(a) for a in merge]) == 0
    sku_map = json.loads((work / "merge" / "sku_map.json").read_text())
    assert sku_map["SPLIT2"] == "SPLIT1" and sum(k != v for k, v in sku_map.items()) == 1

    review = ["review", "--catalog", str(cat), "--work", str(work)]
    assert index_main(review) == 0
    page = (work / "review" / "index.html").read_text()
    assert "merge:SPLIT1|SPLIT2" in page and "Pending (" in page
    assert "img/SPLIT1_0.png" in page  # relative to the page: ../../img/...
    assert index_main([*review, "--reject", "merge:SPLIT1|SPLIT2", "--note", "two sizes"]) == 0
    out = capsys.readouterr().out
    assert "1 decision(s) recorded" in out and "1 decided" in out
    decisions = work / "review" / "decisions.jsonl"
    assert json.loads(decisions.read_text())["decision"] == "reject"

    # The next run with the decisions reruns the stage, and the pair stays apart.
    assert index_main([str(a) for a in [*merge, "--decisions", decisions]]) == 0
    assert "skipped" not in capsys.readouterr().out
    sku_map = json.loads((work / "merge" / "sku_map.json").read_text())
    assert all(k == v for k, v in sku_map.items())
    report = json.loads((work / "merge" / "report.json").read_text())
    assert {(c["a"], c["b"]): c["decision"] for c in report["candidates"]}[
        ("SPLIT1", "SPLIT2")] == "rejected"

    # Accepting a pair the rule did not merge merges it.
    assert index_main([*review, "--accept", "merge:D00|D01"]) == 0
    assert index_main([str(a) for a in [*merge, "--decisions", decisions]]) == 0
    sku_map = json.loads((work / "merge" / "sku_map.json").read_text())
    assert sku_map["D01"] == "D00" and sku_map["SPLIT2"] == "SPLIT2"


def test_a_rejected_denoise_removal_is_kept(catalog, tmp_path: Path):
    cat, emb = catalog
    work = tmp_path / "work"
    # A tight eps and no return step remove some images.
    clean = ["clean", "--catalog", cat, "--out", work, "--embeddings", emb, "--eps", 0.18,
             "--return-thresh", -1]
    assert index_main([str(a) for a in clean]) == 0
    lines = (work / "clean" / "removed.jsonl").read_text().splitlines()
    removed = [json.loads(x) for x in lines]
    assert removed
    report = json.loads((work / "clean" / "report.json").read_text())
    assert sum(len(v) for v in report["per_sku"].values()) == len(removed)
    first = removed[0]["image"]
    assert index_main(["review", "--catalog", str(cat), "--work", str(work),
                       "--reject", f"denoise:{first}"]) == 0
    decisions = work / "review" / "decisions.jsonl"
    assert index_main([str(a) for a in [*clean, "--decisions", decisions]]) == 0
    again = [json.loads(x)["image"] for x in
             (work / "clean" / "removed.jsonl").read_text().splitlines()]
    assert again == [r["image"] for r in removed[1:]]
    assert json.loads((work / "clean" / "report.json").read_text())["kept_by_review"] == [first]


def test_rebuild_applies_a_reviewed_rejection_on_the_next_run(tmp_path: Path, capsys):
    from visearch.synth import generate_world

    world = tmp_path / "world"
    generate_world(world, skus=16, seed=5, image_size=64, scenes=0, photos_per_sku=0)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({
        "workers": 1,
        "dedup": {"workers": 1},
        "detector": {"enabled": False},
        "scenes": {"query_domain": False},
        # strict denoising, so that the tiny model removes something to review
        "clean": {"eps": 0.05, "return_thresh": 0.0},
        "embedder": {"backbone": "tiny", "dim": 32, "epochs": 1, "cleaning_epochs": 1,
                     "image_size": 48, "p": 8, "k": 2, "pretrained": None,
                     "frozen_blocks": 0, "steps_per_epoch": 4, "cleaning_steps_per_epoch": 4,
                     "cleaning_image_size": 48, "patience": None, "budget_minutes": None},
        "index": {"k1": 11},
    }))
    work = tmp_path / "work"
    argv = ["rebuild", "--catalog", str(world / "catalog.jsonl"), "--root",
            str(tmp_path / "indexes"), "--work", str(work), "--config", str(config)]
    assert index_main(argv) == 0
    out = capsys.readouterr().out
    page = work / "review" / "index.html"
    assert f"-> {page}" in out and page.is_file()
    removed = [json.loads(x)["image"] for x in
               (work / "clean" / "removed.jsonl").read_text().splitlines()]
    assert removed, "the strict denoise config should remove images"
    def gallery() -> set[str]:  # the manifest's paths are relative to its own folder
        lines = (work / "catalogs" / "gallery.jsonl").read_text().splitlines()
        return {Path(json.loads(x)["image"]).name for x in lines}

    assert Path(removed[0]).name not in gallery()

    assert index_main(["review", "--catalog", str(world / "catalog.jsonl"), "--work",
                       str(work), "--reject", f"denoise:{removed[0]}"]) == 0
    assert index_main(argv) == 0
    out = capsys.readouterr().out
    assert Path(removed[0]).name in gallery()
    assert "1 decided" in out
