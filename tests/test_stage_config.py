"""The rebuild config is checked on load: types, ranges, choices and names, key by key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from index_builder.cli import main as index_main
from index_builder.config import (
    PROFILES,
    EmbedderConfig,
    RebuildConfig,
    load_config,
    validate,
)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_a_full_config_round_trips_through_its_json(profile: str, tmp_path: Path) -> None:
    cfg = load_config(profile=profile)
    path = tmp_path / "full.json"
    path.write_text(json.dumps(cfg.to_dict()))
    again = load_config(path)
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert validate(again) is again
    if profile == "cpu-small":  # the defaults are the dataclasses' own
        assert cfg == RebuildConfig()
        assert cfg.merge.thresholds == [0.5, 0.4, 0.3] and cfg.embedder.augment == "strong"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"seed": "0"}, r"config key 'seed' must be an integer, got '0'"),
        ({"embedder": {"attention": 1}}, r"embedder\.'attention' must be true or false, got 1"),
        ({"embedder": {"epochs": 2.0}}, r"embedder\.'epochs' must be an integer, got 2\.0"),
        ({"embedder": {"lr": True}}, r"embedder\.'lr' must be a number, got True"),
        ({"embedder": {"margin": "0.2"}}, r"embedder\.'margin' must be a number or null"),
        ({"dedup": {"radius": "5"}}, r"dedup\.'radius' must be an integer or null, got '5'"),
        ({"index": {"factory": 3}}, r"index\.'factory' must be a string or null, got 3"),
        ({"merge": {"thresholds": [0.5, "x"]}},
         r"merge\.'thresholds' must be a list \(a number each\), got \[0\.5, 'x'\]"),
        ({"merge": {"thresholds": 0.5}}, r"merge\.'thresholds' must be a list"),
        ({"lenient": None}, r"config key 'lenient' must be true or false, got None"),
    ],
)
def test_a_value_of_the_wrong_type_names_its_key_and_the_expected_type(
    overrides: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(overrides=overrides)


def test_an_integer_is_a_number_and_is_kept_as_given() -> None:
    # Kept as written (not turned into 1.0): the stage fingerprints hold config values, and
    # a config file that worked before must not rerun its stages.
    cfg = load_config(overrides={"embedder": {"lr": 1, "margin": None}})
    assert cfg.embedder.lr == 1 and type(cfg.embedder.lr) is int
    assert cfg.embedder.margin is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"embeder": {}}, r"unknown config key 'embeder'; valid keys: \[.*'embedder'"),
        ({"index": {"k": 3}}, r"unknown config key index\.'k'; valid keys: \['factory', "
                              r"'graph_ef_search', 'graph_nprobe', 'k1'\]"),
        ({"scenes": {"query_domain": True, "domain": 1}}, r"unknown config key scenes\.'domain'"),
    ],
)
def test_an_unknown_key_is_refused_with_the_valid_ones(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(overrides=overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"embedder": {"epochs": 0}}, r"embedder\.'epochs' is out of range: it must be >= 1, "
                                      r"got 0"),
        ({"embedder": {"cleaning_epochs": -1}}, r"embedder\.'cleaning_epochs'.*>= 1"),
        ({"detector": {"epochs": 0}}, r"detector\.'epochs'.*>= 1"),
        ({"detector": {"lr": 0}}, r"detector\.'lr' is out of range: it must be > 0, got 0"),
        ({"detector": {"score_thresh": 1.5}}, r"detector\.'score_thresh'.*>= 0 and <= 1"),
        ({"scenes": {"val_fraction": -0.1}}, r"scenes\.'val_fraction'.*>= 0 and <= 1"),
        ({"merge": {"false_merge_rate": 2}}, r"merge\.'false_merge_rate'.*<= 1, got 2"),
        ({"merge": {"thresholds": [0.5, -0.1]}},
         r"merge\.'thresholds' is out of range: each element must be >= 0 and <= 1"),
        ({"embedder": {"erasing": 1.01}}, r"embedder\.'erasing'"),
        ({"embedder": {"lookalike_group": 1}}, r"embedder\.'lookalike_group'.*>= 2, got 1"),
        ({"embedder": {"hdc_weight": -0.5}}, r"embedder\.'hdc_weight'.*>= 0"),
        ({"index": {"k1": 0}}, r"index\.'k1'"),
        ({"index": {"graph_nprobe": 0}}, r"index\.'graph_nprobe'"),
        ({"workers": 0}, r"config key 'workers' is out of range: it must be >= 1"),
        ({"clean": {"eps": 0.0}}, r"clean\.'eps'.*> 0"),
    ],
)
def test_a_value_out_of_its_range_is_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(overrides=overrides)


def test_boundaries_and_documented_off_values_are_accepted() -> None:
    cfg = load_config(overrides={
        "scenes": {"val_fraction": 0, "crop_jitter": 1, "detector_epochs": None},
        "detector": {"score_thresh": 1, "rounds": 0},
        "dedup": {"color_tol": -1, "radius": 0},  # a negative colour tolerance turns it off
        "clean": {"return_thresh": -1},  # a negative return threshold skips step 2
        "embedder": {"steps_per_epoch": None, "augment": None, "pretrained": None},
    })
    assert (cfg.scenes.val_fraction, cfg.detector.score_thresh, cfg.dedup.color_tol,
            cfg.clean.return_thresh, cfg.embedder.augment) == (0, 1, -1, -1, None)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"detector": {"source": "file"}},
         r"detector\.'source' must be one of \('auto', 'coco', 'catalog'\), got 'file'"),
        ({"detector": {"labels": "sku"}}, r"detector\.'labels' must be one of \('category', "),
        ({"merge": {"rule": "vote"}}, r"merge\.'rule' must be one of \('calibrated', "
                                      r"'confusion'\)"),
        # names are checked against the registries that resolve them
        ({"embedder": {"backbone": "vgg16"}},
         r"embedder\.'backbone' must be one of \[.*'mobilenet_v2'.*\], got 'vgg16'"),
        ({"embedder": {"loss": "triplet"}}, r"embedder\.'loss' must be one of \[.*'arcface'"),
        ({"embedder": {"pooling": "max"}}, r"embedder\.'pooling' must be one of \['avg', 'gem'\]"),
        ({"embedder": {"augment": "heavy"}}, r"embedder\.'augment' must be one of \['light', "),
        ({"embedder": {"sampler": "hard"}},
         r"embedder\.'sampler' must be one of \('pk', 'lookalike'\), got 'hard'"),
        ({"detector": {"backbone": "tiny"}},  # an embedder backbone, not a detector one
         r"detector\.'backbone' must be one of \[.*'tiny_fpn'.*\], got 'tiny'"),
    ],
)
def test_a_value_outside_its_choices_lists_them(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(overrides=overrides)


def test_a_nested_section_is_an_object_merged_key_by_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"config key 'embedder' must be an object .*got 3"):
        load_config(overrides={"embedder": 3})
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"profile": "gpu", "embedder": {"epochs": 3},
                                "scenes": {"image_size": 64}}))
    cfg = load_config(path, overrides={"embedder": {"dim": 64}})
    # the profile's keys of the section stay; the file's and the overrides' are added
    assert (cfg.embedder.backbone, cfg.embedder.image_size, cfg.embedder.epochs,
            cfg.embedder.dim) == ("mobilenet_v2", 224, 3, 64)
    assert cfg.scenes.image_size == 64 and cfg.scenes.max_distractors == 3
    # a loaded config is immutable: a change goes through load_config's checks
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.embedder.epochs = 5  # type: ignore[misc]


def test_a_bad_file_names_the_key_path(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"scenes": {"crop_jitter": "big"}}')
    with pytest.raises(ValueError, match=r"scenes\.'crop_jitter' must be a number, got 'big'"):
        load_config(path)
    path.write_text('{"clean": {"eps": NaN}}')  # Python's json reads NaN; it is no number
    with pytest.raises(ValueError, match=r"clean\.'eps' must be a number, got nan"):
        load_config(path)
    path.write_text('["not", "an", "object"]')
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_config(path)
    path.write_text('{"profile": ["gpu"]}')
    with pytest.raises(ValueError, match=r"unknown profile \['gpu'\]"):
        load_config(path)


def test_a_config_built_in_code_is_checked_like_a_file() -> None:
    cfg = RebuildConfig()
    bad = dataclasses.replace(cfg, embedder=dataclasses.replace(cfg.embedder, p=0))
    with pytest.raises(ValueError, match=r"embedder\.'p' is out of range"):
        validate(bad)
    bad = dataclasses.replace(cfg, embedder=EmbedderConfig(pooling="sum"))
    with pytest.raises(ValueError, match=r"embedder\.'pooling' must be one of"):
        validate(bad)


def test_rebuild_refuses_a_bad_config_before_running_any_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"embedder": {"epochs": 0}}))
    work = tmp_path / "work"
    code = index_main(["rebuild", "--catalog", str(tmp_path / "catalog.jsonl"), "--root",
                       str(tmp_path / "r"), "--work", str(work), "--config", str(config)])
    assert code == 2
    assert "error: config key embedder.'epochs' is out of range" in capsys.readouterr().err
    assert not work.exists() and not (tmp_path / "r").exists()


def test_rebuild_refuses_a_bad_config_built_in_code(tmp_path: Path) -> None:
    from index_builder.cmd_rebuild import RebuildInputs, rebuild

    cfg = RebuildConfig()
    bad = dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, k1=-3))
    work = tmp_path / "work"
    with pytest.raises(ValueError, match=r"index\.'k1' is out of range"):
        rebuild(RebuildInputs(tmp_path / "catalog.jsonl", tmp_path / "r", work), bad)
    assert not work.exists()
