"""The dedup / clean / merge stages through their CLI: outputs, and skipping when up to date."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index_builder import cmd_clean

D = 16


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    cmd_clean.register(parser.add_subparsers(dest="command"))
    return parser


def _run(*argv: str) -> int:
    args = _parser().parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture()
def world(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A 13-row catalog: SKUs A and C are one product (embeddings from one cluster), B is
    another; a4 is a byte copy of a0; b3 is filed under B but is something else. Returns the
    catalog and an .npz of hand-built embeddings."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    names = [f"a{i}" for i in range(4)] + [f"b{i}" for i in range(4)] + [f"c{i}" for i in range(4)]
    for name in names:
        noise = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / "img" / f"{name}.jpg", quality=90)
    shutil.copyfile(tmp_path / "img" / "a0.jpg", tmp_path / "img" / "a4.jpg")
    names.append("a4")
    with open(tmp_path / "catalog.jsonl", "w") as f:
        for name in names:
            row = {"image": f"img/{name}.jpg", "sku": name[0].upper(), "category": "bag"}
            f.write(json.dumps(row) + "\n")

    def around(axis: int, n: int) -> np.ndarray:
        x = np.eye(D)[axis] + 0.3 * rng.standard_normal((n, D)) / np.sqrt(D)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    emb = np.concatenate([around(0, 4), around(1, 3), np.eye(D)[[7]], around(0, 4), around(0, 1)])
    np.savez(
        tmp_path / "emb.npz",
        embeddings=emb.astype(np.float32),
        images=np.array([f"img/{n}.jpg" for n in names]),
    )
    return tmp_path / "catalog.jsonl", tmp_path / "emb.npz"


def test_dedup_writes_removed_and_skips_when_up_to_date(world, tmp_path, capsys):
    catalog, _ = world
    out = tmp_path / "work"
    assert _run("dedup", "--catalog", catalog, "--out", out, "--workers", 1) == 0
    assert json.loads((out / "dedup" / "removed.json").read_text()) == ["img/a4.jpg"]
    report = json.loads((out / "dedup" / "report.json").read_text())
    assert report["groups_detail"] == [
        {"keep": "img/a0.jpg", "members": ["img/a0.jpg", "img/a4.jpg"]}
    ]
    done = out / "dedup" / "done.json"
    mtime = done.stat().st_mtime_ns
    capsys.readouterr()

    assert _run("dedup", "--catalog", catalog, "--out", out, "--workers", 1) == 0
    assert "up to date, skipped" in capsys.readouterr().out
    assert done.stat().st_mtime_ns == mtime

    # A changed parameter runs the stage again.
    assert _run("dedup", "--catalog", catalog, "--out", out, "--radius", 3) == 0
    assert "skipped" not in capsys.readouterr().out
    assert json.loads(done.read_text())["fingerprint"]["radius"] == 3


def test_clean_then_merge_from_precomputed_embeddings(world, tmp_path, capsys):
    catalog, emb = world
    out = tmp_path / "work"
    assert _run("dedup", "--catalog", catalog, "--out", out, "--workers", 1) == 0
    dedup_removed = out / "dedup" / "removed.json"

    common = ("--catalog", catalog, "--out", out, "--embeddings", emb, "--exclude", dedup_removed)
    assert _run("clean", *common, "--eps", 0.1, "--return-thresh", 0.3) == 0
    lines = (out / "clean" / "removed.jsonl").read_text().splitlines()
    assert [json.loads(x)["image"] for x in lines] == ["img/b3.jpg"]
    assert json.loads(lines[0])["sku"] == "B" and json.loads(lines[0])["reason"] == "noise"
    assert cmd_clean.read_removed(out / "clean" / "removed.jsonl") == {"img/b3.jpg"}

    clean_removed = out / "clean" / "removed.jsonl"
    merge_args = (*common, "--exclude", clean_removed, "--rule", "confusion",
                  "--thresholds", "0.4,0.2", "--folds", 3)
    assert _run("merge", *merge_args) == 0
    sku_map = cmd_clean.read_sku_map(out / "merge" / "sku_map.json")
    assert sku_map == {"A": "A", "B": "B", "C": "A"}
    report = json.loads((out / "merge" / "report.json").read_text())
    assert [g["skus"] for g in report["groups"]] == [["A", "C"]]
    done = out / "merge" / "done.json"
    mtime = done.stat().st_mtime_ns
    capsys.readouterr()
    assert _run("merge", *merge_args) == 0
    assert "merge: up to date, skipped" in capsys.readouterr().out
    assert done.stat().st_mtime_ns == mtime


def test_misaligned_embeddings_are_refused(world, tmp_path, capsys):
    catalog, _ = world
    np.save(tmp_path / "short.npy", np.eye(D, dtype=np.float32)[:5])
    rc = _run(
        "clean",
        "--catalog",
        catalog,
        "--out",
        tmp_path / "w",
        "--embeddings",
        tmp_path / "short.npy",
    )
    assert rc == 1
    assert "one row per catalog row" in capsys.readouterr().err


def test_stage_function_reports_skipped(world, tmp_path):
    from visearch.catalog import read_manifest

    catalog, _ = world
    rows = read_manifest(catalog).rows
    first = cmd_clean.dedup_stage(rows, tmp_path / "w", inputs={"catalog": "x"})
    again = cmd_clean.dedup_stage(rows, tmp_path / "w", inputs={"catalog": "x"})
    assert (first.skipped, again.skipped) == (False, True)
    assert again.summary == first.summary and first.summary["removed"] == 1
    # Touching an image file changes the fingerprint: the stage runs again.
    (catalog.parent / "img" / "b0.jpg").write_bytes(
        (catalog.parent / "img" / "b1.jpg").read_bytes()
    )
    third = cmd_clean.dedup_stage(rows, tmp_path / "w", inputs={"catalog": "x"})
    assert not third.skipped and third.summary["removed"] == 2


def test_model_embeddings_are_computed_once_and_shared(world, tmp_path, capsys):
    import torch

    from visearch.embedding import build_embedder, save_embedder

    catalog, _ = world
    torch.manual_seed(0)
    save_embedder(build_embedder("tiny", dim=16, input_size=32), tmp_path / "emb.pt")
    base = ("--catalog", catalog, "--out", tmp_path / "w", "--model", tmp_path / "emb.pt")
    assert _run("clean", *base) == 0
    assert "embed: done" in capsys.readouterr().out
    with np.load(tmp_path / "w" / "clean-embed" / "embeddings.npz") as z:
        emb, images = z["embeddings"], list(z["images"])
    assert emb.shape == (13, 16) and images[0] == "img/a0.jpg"
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # a0 and a4 are the same bytes: the same embedding.
    np.testing.assert_allclose(emb[0], emb[images.index("img/a4.jpg")], atol=1e-6)
    assert _run("merge", *base) == 0
    assert "embed: up to date, skipped" in capsys.readouterr().out
    assert (tmp_path / "w" / "merge" / "sku_map.json").is_file()


def test_the_subcommands_run_the_typed_stage_functions(world, tmp_path, capsys):
    """``rebuild`` calls dedup_catalog / clean_catalog / merge_catalog; the subcommands are
    thin wrappers over them: the same arguments find the CLI's stages up to date."""
    catalog, emb = world
    out = tmp_path / "work"
    assert _run("dedup", "--catalog", catalog, "--out", out, "--workers", 1) == 0
    dedup = cmd_clean.dedup_catalog(catalog, out, cmd_clean.DedupParams(workers=1))
    assert dedup.skipped and dedup.summary["removed"] == 1
    assert dedup.out_dir == out / "dedup"

    removed = out / "dedup" / "removed.json"
    assert _run("clean", "--catalog", catalog, "--out", out, "--embeddings", emb,
                "--exclude", removed, "--eps", 0.1, "--return-thresh", -1) == 0
    assert "clean: done in" in capsys.readouterr().out
    source = cmd_clean.EmbeddingSource(embeddings=emb)
    params = cmd_clean.CleanParams(eps=0.1, return_thresh=None)
    typed = cmd_clean.clean_catalog(catalog, tmp_path / "typed", source, params,
                                    exclude=[removed])
    assert typed.embed is None and not typed.stage.skipped
    assert typed.stage.summary["removed"] == 2
    for name in ("removed.jsonl", "report.json"):
        assert (typed.stage.out_dir / name).read_text() == (out / "clean" / name).read_text()
    again = cmd_clean.clean_catalog(catalog, out, source, params, exclude=[removed])
    assert again.stage.skipped and again.report("clean").startswith("clean: up to date")

    merge = cmd_clean.MergeParams(rule="confusion", thresholds=(0.4, 0.2), folds=3)
    merged = cmd_clean.merge_catalog(catalog, out, source, merge, exclude=[removed])
    assert not merged.stage.skipped
    assert cmd_clean.read_sku_map(out / "merge" / "sku_map.json") == {
        "A": "A", "B": "B", "C": "A"}
    assert _run("merge", "--catalog", catalog, "--out", out, "--embeddings", emb,
                "--exclude", removed, "--rule", "confusion", "--thresholds", "0.4,0.2",
                "--folds", 3) == 0
    assert "merge: up to date, skipped" in capsys.readouterr().out


def test_an_embedding_source_is_a_model_or_a_file(tmp_path):
    with pytest.raises(ValueError, match="exactly one of an embedder model and an embeddings"):
        cmd_clean.EmbeddingSource()
    with pytest.raises(ValueError, match="exactly one"):
        cmd_clean.EmbeddingSource(model=tmp_path / "m.pt", embeddings=tmp_path / "e.npz")
