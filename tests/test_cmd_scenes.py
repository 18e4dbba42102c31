"""``visearch-index cutout`` / ``synth-scenes``: a status for every catalog row, never a crash."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index_builder.cli import main as index_main


def _row(image: str, sku: str, **extra: object) -> str:
    return json.dumps({"image": image, "sku": sku, "category": "bag", **extra}) + "\n"


def test_cutout_stage_reports_each_bad_row_and_keeps_the_good_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from visearch.synth import generate_world

    world = tmp_path / "world"
    generate_world(world, skus=4, seed=2, image_size=96, scenes=0, photos_per_sku=0,
                   dup_rate=0.0, mislabel_rate=0.0, split_rate=0.0)
    good = [json.loads(x) for x in (world / "catalog.jsonl").read_text().splitlines()][:3]
    rng = np.random.default_rng(0)
    Image.new("RGB", (96, 96), (255, 255, 255)).save(world / "white.jpg")
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(world / "noise.png")
    Image.new("RGBA", (96, 96), (0, 0, 0, 0)).save(world / "clear.png")
    (world / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    catalog = world / "mixed.jsonl"
    catalog.write_text(
        "".join(json.dumps(g) + "\n" for g in good)
        + _row("white.jpg", "W") + _row("noise.png", "N") + _row("clear.png", "C")
        + _row("white.jpg", "B", bbox=[200, 200, 300, 300]) + _row("broken.jpg", "X")
    )
    out = tmp_path / "cutouts"
    assert index_main(["cutout", "--catalog", str(catalog), "--out", str(out), "--lenient",
                       "--quiet"]) == 0
    # the subcommand prints cut_out_catalog's typed summary
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {
        "out": str(out), "rows": 8, "objects": 3,
        "statuses": {"empty": 1, "not_plain": 1, "ok": 3, "rejected": 2, "transparent": 1}}
    lines = (out / "report.jsonl").read_text().splitlines()
    report = {r["line"]: r for r in map(json.loads, lines)}
    assert sorted(report) == list(range(1, 9))  # every line of the catalog has a status
    assert [report[i]["status"] for i in (1, 2, 3)] == ["ok"] * 3
    assert report[4]["status"] == "empty"
    assert report[5]["status"] == "not_plain"
    assert report[6]["status"] == "transparent"
    # The manifest reader refuses these rows (bbox outside the image, undecodable file); the
    # report still names them with the reader's reason.
    assert report[7]["status"] == "rejected" and "outside" in report[7]["reason"]
    assert report[8]["status"] == "rejected"
    assert all(report[i]["reason"] for i in range(4, 9))
    objects = [json.loads(x) for x in (out / "objects.jsonl").read_text().splitlines()]
    assert [o["line"] for o in objects] == [1, 2, 3]
    for o, g in zip(objects, good, strict=True):
        assert o["sku"] == g["sku"]
        rgba = np.asarray(Image.open(out / o["png"]))
        assert rgba.shape[2] == 4 and rgba.shape[:2] == (o["box"][3] - o["box"][1],
                                                          o["box"][2] - o["box"][0])

    scenes = tmp_path / "scenes"
    assert index_main(["synth-scenes", "--cutouts", str(out), "--out", str(scenes),
                       "--scenes-per-object", "2", "--image-size", "64", "--quiet"]) == 0
    coco = json.loads((scenes / "train.json").read_text())
    assert len(coco["images"]) + len(json.loads((scenes / "val.json").read_text())["images"]) == 6
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (printed["out"], printed["objects"], printed["background_source"]) == (
        str(scenes), 3, "procedural")
    assert printed["train_images"] == len(coco["images"])


def test_the_typed_stage_functions_return_the_summaries_rebuild_stores(tmp_path: Path) -> None:
    from index_builder.cmd_scenes import (
        CutoutSummary,
        ScenesSummary,
        cut_out_catalog,
        read_cutout_boxes,
        synthesize_catalog_scenes,
    )
    from visearch.catalog import read_manifest
    from visearch.synth import generate_world

    world = tmp_path / "world"
    generate_world(world, skus=3, seed=4, image_size=96, scenes=0, photos_per_sku=0,
                   dup_rate=0.0, mislabel_rate=0.0, split_rate=0.0)
    rows = read_manifest(world / "catalog.jsonl").rows
    cut = cut_out_catalog(rows, tmp_path / "cut", exclude=[rows[0].image], min_quality=0.0)
    assert isinstance(cut, CutoutSummary)
    assert cut.rows == len(rows) and cut.statuses["excluded"] == 1
    assert cut.objects == cut.statuses.get("ok", 0) == len(read_cutout_boxes(tmp_path / "cut"))
    assert cut.to_dict() == {"rows": cut.rows, "objects": cut.objects,
                             "statuses": cut.statuses}
    scenes = synthesize_catalog_scenes(tmp_path / "cut", tmp_path / "scenes",
                                       scenes_per_object=1.0, image_size=64, seed=0)
    assert isinstance(scenes, ScenesSummary) and scenes.objects == cut.objects
    summary = scenes.to_dict()
    assert summary["background_source"] == "procedural" and summary["objects"] == cut.objects
    train = json.loads((tmp_path / "scenes" / "train.json").read_text())
    assert summary["train_images"] == len(train["images"])
