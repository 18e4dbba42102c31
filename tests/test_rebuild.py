"""The rebuild pipeline: config validation, a full tiny run, skip on re-run, rerun on change."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from index_builder import cmd_rebuild
from index_builder.cli import build_parser
from index_builder.cli import main as index_main
from index_builder.cmd_clean import CleanParams, DedupParams, MergeParams
from index_builder.cmd_detector import DetectorTrainParams
from index_builder.cmd_embedder import EmbedderTrainParams, default_pretrained
from index_builder.cmd_index import BuildParams, EmbedOptions
from index_builder.config import load_config
from visearch.index import IndexRoot

TINY = {"profile": "tiny"}  # index_builder/config.py PROFILES["tiny"]


def test_config_profiles_files_and_unknown_keys(tmp_path: Path) -> None:
    cfg = load_config()
    assert cfg.profile == "cpu-small" and cfg.embedder.backbone == "mobilenet_v2"
    gpu = load_config(profile="gpu")
    assert gpu.embedder.backbone == "mobilenet_v2" and gpu.detector.backbone == "resnet50_fpn"
    assert (gpu.embedder.image_size, gpu.embedder.epochs, gpu.embedder.patience,
            gpu.embedder.budget_minutes) == (224, 40, None, 240.0)
    assert (cfg.embedder.image_size, cfg.embedder.epochs, cfg.embedder.steps_per_epoch,
            cfg.embedder.patience, cfg.embedder.cleaning_image_size) == (128, 8, None, None, 96)
    assert (cfg.embedder.erasing, gpu.embedder.erasing) == (0.0, 0.5)  # measured / reference
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"profile": "gpu", "embedder": {"epochs": 3}}))
    cfg = load_config(path, overrides={"merge": {"enabled": False}})
    assert (cfg.profile, cfg.embedder.epochs, cfg.embedder.image_size) == ("gpu", 3, 224)
    assert cfg.merge.enabled is False
    path.write_text(json.dumps({"embedder": {"epoch": 3}}))
    with pytest.raises(ValueError, match=r"unknown config key embedder\.'epoch'; valid keys: "):
        load_config(path)
    with pytest.raises(ValueError, match="unknown profile 'tpu'; valid profiles"):
        load_config(profile="tpu")


# Fields a subcommand takes as a flag of another form (negated, resolved, or split text),
# and the dedup subcommand's hashing processes (os.cpu_count(); rebuild always sets them).
_DERIVED = {"color_tol", "return_thresh", "pretrained", "backbone_weights", "attributes",
            "soft", "by_category", "progress", "crop"}


@pytest.mark.parametrize(
    ("params", "argv", "renamed", "skip"),
    [
        (DedupParams(), ["dedup", "--catalog", "c", "--out", "o"], {"hash_kind": "hash"},
         {"workers"}),
        (CleanParams(), ["clean", "--catalog", "c", "--out", "o", "--model", "m"], {}, set()),
        (MergeParams(), ["merge", "--catalog", "c", "--out", "o", "--model", "m"], {}, set()),
        (DetectorTrainParams(), ["train-detector", "--train", "t", "--out", "o"], {}, set()),
        (EmbedderTrainParams(), ["train-embedder", "--catalog", "c", "--out", "o"], {}, set()),
        (BuildParams(), ["build", "--root", "r", "--catalog", "c", "--model", "m"], {}, set()),
        (EmbedOptions(), ["build", "--root", "r", "--catalog", "c", "--model", "m"], {}, set()),
    ],
)
def test_stage_argument_defaults_are_the_subcommand_defaults(params, argv, renamed,
                                                             skip) -> None:
    """rebuild leaves an argument the config does not set at the dataclass default, where it
    used to leave the subcommand's flag at its default: the two must agree."""
    flags = vars(build_parser().parse_args(argv))
    compared = 0
    for f in dataclasses.fields(params):
        name = renamed.get(f.name, f.name)
        if f.name in _DERIVED | skip or name not in flags:
            continue
        value = getattr(params, f.name)
        assert value == (tuple(flags[name]) if isinstance(value, tuple) else flags[name]), name
        compared += 1
    assert compared >= 3
    if "progress" in {f.name for f in dataclasses.fields(params)}:
        assert params.progress is (not flags["quiet"])
    if isinstance(params, EmbedOptions):
        assert params.crop is (not flags["no_crop"])
    if isinstance(params, MergeParams):
        assert (params.soft, params.by_category, params.color_tol) == (
            not flags["hard"], not flags["across_categories"], None)  # --color-tol -1: off


def test_stage_arguments_from_the_config_are_what_the_subcommand_flags_gave() -> None:
    from visearch.cleaning.dedup import COLOR_TOL, RADIUS

    cfg = load_config()
    assert cmd_rebuild.dedup_params(cfg) == DedupParams(radius=RADIUS, color_tol=COLOR_TOL,
                                                        workers=2)
    cfg = load_config(overrides={
        "seed": 4,
        "dedup": {"radius": 12, "color_tol": -1},
        "clean": {"return_thresh": -1, "eps": 1},
        "merge": {"thresholds": [1, 0.25]},
        "embedder": {"augment": None, "lr": 1, "margin": None, "pretrained": "no/such.pth",
                     "backbone": "tiny", "sampler": "lookalike", "lookalike_group": 3,
                     "hdc_weight": 1, "patience": 2, "budget_minutes": 30,
                     "peer_backbone": "tiny", "epochs": 5, "p": 8},
        "detector": {"backbone": "tiny_fpn", "lr": 1},
        "index": {"factory": ""},
    })
    assert cmd_rebuild.dedup_params(cfg) == DedupParams(radius=12, color_tol=None, workers=2)
    clean = cmd_rebuild.clean_params(cfg)
    assert clean == CleanParams(eps=1.0, return_thresh=None) and type(clean.eps) is float
    merge = cmd_rebuild.merge_params(cfg)
    assert merge.thresholds == (1.0, 0.25) and type(merge.thresholds[0]) is float
    emb = cmd_rebuild.embedder_params(cfg, epochs=2, steps=None)
    # an unset augmentation is train-embedder's default; a missing weights file falls back
    # to the backbone's shipped one (none for "tiny"); numbers arrive as floats
    assert (emb.augment, emb.pretrained, emb.margin, emb.lr, type(emb.lr)) == (
        "strong", None, None, 1.0, float)
    assert (emb.epochs, emb.steps_per_epoch, emb.seed, emb.progress) == (2, None, 4, True)
    assert (emb.sampler, emb.lookalike_group, emb.hdc_weight, type(emb.hdc_weight)) == (
        "lookalike", 3, 1.0, float)
    # early stopping, the time budget and the mutual-learning peer are the final training's
    assert (emb.patience, emb.budget_minutes, emb.peer_backbone) == (2, 30.0, "tiny")
    first = cmd_rebuild.embedder_params(cfg, epochs=1, steps=400, final=False)
    assert (first.patience, first.budget_minutes, first.peer_backbone) == (None, None, None)
    assert cmd_rebuild.training_plan(cfg, 100) == (
        # 100 // 8 = 12 SKU batches per epoch, lengthened to ceil(400 / 5) = 80 (min_steps)
        "plan: profile cpu-small: the final embedder trains up to 5 epochs x 80 steps of "
        "8 x 4 images (100 SKUs, tiny at 128 px), early stopping after 2 epochs without gain; "
        "budget 30 min")
    assert (emb.min_steps, emb.image_size, first.min_steps, first.image_size) == (
        400, 128, 0, 96)
    det = cmd_rebuild.detector_params(cfg, epochs=3)
    assert (det.epochs, det.lr, det.seed, det.backbone_weights) == (3, 1.0, 4, None)
    assert cmd_rebuild.build_params(cfg) == BuildParams(factory=None, k1=21)


def _done_mtimes(work: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in work.glob("*/done.json")}


def test_rebuild_runs_every_stage_then_skips_and_reruns_downstream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from visearch.synth import generate_world

    # The stages are called as typed functions: the only argv parsed is rebuild's own.
    parsed: list[list[str]] = []
    parse_args = argparse.ArgumentParser.parse_args

    def counting(self, args=None, namespace=None):
        parsed.append(list(args or []))
        return parse_args(self, args, namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", counting)

    world = tmp_path / "world"
    generate_world(world, skus=24, seed=3, image_size=64, scenes=24)
    root, work = tmp_path / "indexes", tmp_path / "work"
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    argv = ["rebuild", "--catalog", str(world / "catalog.jsonl"), "--root", str(root),
            "--work", str(work), "--config", str(config)]

    assert index_main(argv) == 0
    assert [a[0] for a in parsed] == ["rebuild"]
    index_root = IndexRoot(root)
    (first,) = index_root.versions()
    assert index_root.current() == first
    stages = set(_done_mtimes(work))
    assert {"ingest", "dedup", "detector", "embedder_first_pass", "clean", "merge",
            "embedder", "build"} <= stages
    gallery = (work / "catalogs" / "gallery.jsonl").read_text().splitlines()
    version = index_root.open()
    assert version.manifest["counts"]["total"] == len(gallery)
    assert version.detector_path is not None and version.detector_path.is_file()
    assert version.dim == 32
    version.close()
    removed = set(json.loads((work / "dedup" / "removed.json").read_text()))
    assert removed and not removed & {json.loads(r)["image"] for r in gallery}

    # Unchanged inputs: every stage is skipped and no new version appears.
    before = _done_mtimes(work)
    capsys.readouterr()
    assert index_main(argv) == 0
    assert _done_mtimes(work) == before
    assert index_root.versions() == [first]
    assert "done in" not in capsys.readouterr().out

    # The main-object floor is not a training parameter: the detector is not retrained.
    config.write_text(json.dumps({**TINY, "detector": {"score_thresh": 0.25}}))
    assert index_main(argv) == 0
    assert _done_mtimes(work) == before

    # A changed embedder parameter reruns the trainings and the build, not the detector.
    config.write_text(json.dumps({**TINY, "embedder": {"dim": 16}}))
    assert index_main(argv) == 0
    after = _done_mtimes(work)
    assert after["detector"] == before["detector"] and after["dedup"] == before["dedup"]
    assert after["embedder"] != before["embedder"] and after["build"] != before["build"]
    assert len(index_root.versions()) == 2
    version = index_root.open()
    assert version.dim == 16
    version.close()


def test_rebuild_reports_a_bad_catalog_row_and_keeps_the_active_index(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text('{"image": "missing.jpg", "sku": "S", "category": "c"}\n')
    code = index_main(["rebuild", "--catalog", str(catalog), "--root", str(tmp_path / "r"),
                       "--work", str(tmp_path / "w")])
    assert code == 1
    assert not (tmp_path / "r").exists()


def test_rebuild_without_detection_annotations_trains_a_detector_on_catalog_scenes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A catalog with no COCO scenes still gets a detector: trained on copy-paste scenes of
    its own cut-outs, used to serve, and named as the detector's source."""
    import shutil

    from visearch.catalog import read_manifest
    from visearch.detection.data import read_coco
    from visearch.synth import generate_world

    world = tmp_path / "world"
    generate_world(world, skus=16, seed=5, image_size=64, scenes=0)
    shutil.rmtree(world / "detection")
    root, work = tmp_path / "indexes", tmp_path / "work"
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**TINY, "clean": {"enabled": False},
                                  "merge": {"enabled": False},
                                  "scenes": {"image_size": 64, "scenes_per_object": 0.25}}))
    argv = ["rebuild", "--catalog", str(world / "catalog.jsonl"), "--root", str(root),
            "--work", str(work), "--config", str(config)]
    assert index_main(argv) == 0
    out = capsys.readouterr().out
    assert "rebuild: detector main-object (main vs other products), trained on" in out
    assert "copy-paste scenes made from" in out

    catalog = read_manifest(world / "catalog.jsonl").rows
    report = [json.loads(x) for x in (work / "cutouts" / "report.jsonl").read_text().splitlines()]
    assert [r["line"] for r in report] == [r.line for r in catalog]  # one status per row
    ok = sum(r["status"] == "ok" for r in report)
    assert ok >= 0.8 * len(catalog)
    coco = read_coco(work / "scenes" / "train.json")
    assert len(coco["images"]) > 0 and len(coco["annotations"]) >= len(coco["images"])
    assert sorted(c["name"] for c in coco["categories"]) == sorted({r.category for r in catalog})

    # The embedder trained on shop images plus the scenes' crops of the same SKUs.
    train = read_manifest(work / "catalogs" / "train.jsonl").rows
    crops = [r for r in train if "/scenes/crops/" in str(r.path)]
    assert crops and {r.sku for r in crops} <= {r.sku for r in catalog}
    assert len(train) == len(crops) + len(read_manifest(work / "catalogs" / "gallery.jsonl").rows)

    version = IndexRoot(root).open()
    assert version.detector_path is not None and version.detector_path.is_file()
    assert "copy-paste scenes" in version.manifest["config"]["detector_source"]
    version.close()

    # Asked for COCO annotations that do not exist: a clear error, the active index kept.
    assert index_main([*argv, "--detector-source", "coco"]) == 1
    assert "no detection annotations" in capsys.readouterr().err
    assert IndexRoot(root).versions() == [version.version]


def test_rebuild_adds_pseudo_label_rounds_on_unlabelled_photos(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from visearch.synth import generate_world

    world = tmp_path / "world"
    generate_world(world, skus=12, seed=6, image_size=64, scenes=0)
    shutil.rmtree(world / "detection")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**TINY, "clean": {"enabled": False},
                                  "merge": {"enabled": False},
                                  "scenes": {"image_size": 64, "scenes_per_object": 0.25,
                                             "query_domain": False}}))
    root, work = tmp_path / "indexes", tmp_path / "work"
    assert index_main(["rebuild", "--catalog", str(world / "catalog.jsonl"), "--root",
                       str(root), "--work", str(work), "--config", str(config),
                       "--unlabelled-photos", str(world / "photos")]) == 0
    assert f"pseudo-labels on {world / 'photos'}" in capsys.readouterr().out
    # round 0 trained on the scenes alone, round 1 on them plus the photos' pseudo-labels
    rounds = json.loads((work / "detector" / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["train_images"] >= rounds[0]["train_images"]
    version = IndexRoot(root).open()
    assert version.detector_path is not None and version.detector_path.is_file()
    assert "pseudo-labels" in version.manifest["config"]["detector_source"]
    version.close()
    # no query-domain crops: the embedder trained on the shop images alone
    train = (work / "catalogs" / "train.jsonl").read_text()
    assert "crops/" not in train


def test_each_backbone_finds_its_own_shipped_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the working directory's weights/ is searched first
    (tmp_path / "weights").mkdir()
    for name in ("mobilenet_v2-b0353104.pth", "efficientnet-lite0-57934424.pth"):
        (tmp_path / "weights" / name).write_bytes(b"")
    lite0 = default_pretrained("efficientnet_lite0")
    assert lite0 == tmp_path / "weights" / "efficientnet-lite0-57934424.pth"
    assert default_pretrained("mobilenet_v2") == tmp_path / "weights" / "mobilenet_v2-b0353104.pth"
    assert default_pretrained("tiny") is None
