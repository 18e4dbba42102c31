"""``visearch-index`` build/list/verify/add/remove/activate/rollback/gc on a tiny catalog with
a tiny (untrained, seeded) embedder."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

from index_builder.cli import main
from visearch.embedding import build_embedder, save_embedder
from visearch.index import IndexRoot

CATS = ("bag", "shoe")


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def write_catalog(folder: Path, name: str, start: int, n: int, *, bad_line: int = 0) -> Path:
    """n seeded random-pattern images as a catalog; row ``bad_line`` (1-based) points at a
    missing file."""
    rng = np.random.default_rng(start)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(start, start + n):
        img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(6, 0).repeat(6, 1)
        Image.fromarray(img).save(folder / "img" / f"{i}.png")
        row = {"image": f"img/{i}.png", "sku": f"S{i:03d}", "category": CATS[i % 2],
               "title": f"product {i}"}
        if i % 3 == 0:
            row["bbox"] = [4, 4, 44, 44]
        if len(lines) + 1 == bad_line:
            row["image"] = "img/missing.png"
        lines.append(json.dumps(row))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = build_embedder("tiny", dim=16, pooling="avg", input_size=48)
    save_embedder(model, folder / "embedder.pt")
    catalog = write_catalog(folder, "catalog.jsonl", 0, 24)
    return folder, catalog, folder / "embedder.pt"


def run(*argv: str) -> int:
    return main([str(a) for a in argv])


def test_build_verify_add_remove_rollback_gc(setup, capsys):
    folder, catalog, model = setup
    root = folder / "indexes"
    assert run("build", "--root", root, "--catalog", catalog, "--model", model, "--k1", 5,
               "--graph-nprobe", 3, "--quiet") == 0
    index_root = IndexRoot(root)
    v1 = index_root.open()
    assert v1.manifest["counts"]["total"] == 24 and v1.dim == 16
    assert v1.manifest["config"]["graph_nprobe"] == 3
    assert v1.items[3] == {"sku": "S003", "category": "shoe", "image_key": "img/3.png",
                           "title": "product 3", "attributes": {}, "line": 4}
    capsys.readouterr()
    assert run("verify", "--root", root) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["checks"]["self_search_rate"] == 1.0
    assert report["checks"]["model_dim"] == 16

    new = write_catalog(folder, "new.jsonl", 100, 4)
    assert run("add", "--root", root, "--catalog", new, "--quiet") == 0
    v2 = index_root.open()
    assert v2.version != v1.version and v2.manifest["counts"]["total"] == 28
    skus = {m["sku"] for _, m in v2.items.items_iter()}
    assert {"S100", "S103"} <= skus and "S100" not in {m["sku"] for _, m in v1.items.items_iter()}

    assert run("remove", "--root", root, "--sku", "S000", "--sku", "S101", "--sku", "S999") == 0
    v3 = index_root.open()
    assert v3.manifest["counts"]["total"] == 26
    assert {m["sku"] for _, m in v3.items.items_iter()} == skus - {"S000", "S101"}
    assert "S999" in capsys.readouterr().err

    assert run("rollback", "--root", root) == 0 and index_root.current() == v2.version
    assert run("activate", "--root", root, v3.version) == 0
    capsys.readouterr()
    assert run("list", "--root", root) == 0
    listing = capsys.readouterr().out
    assert f"* {v3.version}" in listing and f"< {v2.version}" in listing
    assert run("gc", "--root", root, "--keep", 1) == 0
    assert index_root.versions() == [v2.version, v3.version]


def test_bad_rows_strict_fails_with_line_lenient_skips(setup, capsys):
    folder, _, model = setup
    bad = write_catalog(folder / "bad", "catalog.jsonl", 200, 6, bad_line=3)
    root = folder / "bad-indexes"
    assert run("build", "--root", root, "--catalog", bad, "--model", model, "--quiet") == 1
    err = capsys.readouterr().err
    assert "catalog.jsonl:3:" in err and IndexRoot(root).versions() == []
    assert run("build", "--root", root, "--catalog", bad, "--model", model, "--quiet",
               "--lenient", "--k1", 3) == 0
    assert "skipped 1 bad row(s)" in capsys.readouterr().err
    assert IndexRoot(root).open().manifest["counts"]["total"] == 5


def test_add_with_a_model_of_another_dimension_fails_clearly(setup, capsys):
    folder, catalog, model = setup
    root = folder / "dim-indexes"
    assert run("build", "--root", root, "--catalog", catalog, "--model", model, "--quiet") == 0
    before = IndexRoot(root).current()
    other = build_embedder("tiny", dim=8, pooling="avg", input_size=48)
    save_embedder(other, folder / "other.pt")
    new = write_catalog(folder, "new2.jsonl", 300, 2)
    capsys.readouterr()
    assert run("add", "--root", root, "--catalog", new, "--model", folder / "other.pt",
               "--quiet") == 1
    assert "makes 8-d embeddings but" in capsys.readouterr().err
    assert IndexRoot(root).current() == before and len(IndexRoot(root).versions()) == 1


def test_build_is_the_typed_build_index(setup, capsys):
    """``rebuild`` calls build_index; ``build`` is a thin wrapper: the same arguments give
    the same index version (items, counts, vectors' model, inputs)."""
    from index_builder.cmd_index import BuildParams, EmbedOptions, build_index
    from visearch.fileio import file_digest

    folder, catalog, model = setup
    cli_root, typed_root = folder / "cli-indexes", folder / "typed-indexes"
    assert run("build", "--root", cli_root, "--catalog", catalog, "--model", model, "--k1", 4,
               "--no-crop", "--no-activate", "--quiet") == 0
    printed = capsys.readouterr().out
    version = build_index(typed_root, catalog, model, BuildParams(k1=4),
                          embed=EmbedOptions(crop=False, progress=False), activate=False)
    cli = IndexRoot(cli_root).open(IndexRoot(cli_root).versions()[0])
    assert IndexRoot(typed_root).current() is None and f"{cli.version}:" in printed
    m_cli, m_typed = cli.manifest, version.manifest
    assert m_typed["counts"] == m_cli["counts"] and m_typed["counts"]["total"] == 24
    assert m_typed["config"]["crop"] is False and m_typed["config"]["detector_source"] is None
    assert m_typed["config"]["k1"] == m_cli["config"]["k1"] == 4
    assert m_typed["model"]["sha256"] == m_cli["model"]["sha256"] == file_digest(model)
    assert m_typed["inputs"] == m_cli["inputs"] == {"catalog": file_digest(catalog),
                                                    "catalog_path": str(catalog)}
    assert dict(version.items.items_iter()) == dict(cli.items.items_iter())
    cli.close()
    version.close()


def test_ingest_is_idempotent_and_strict_by_default(setup, tmp_path, capsys):
    from index_builder.cmd_ingest import IngestResult, ingest_catalog

    _, catalog, _ = setup
    store = tmp_path / "store"
    assert run("ingest", "--catalog", catalog, "--store", store) == 0
    assert capsys.readouterr().out.strip() == (
        "ingest: 24 item(s) added, 0 already present, 24 new image(s), 0 rejected; store "
        "holds 24 item(s), 24 image(s)")
    again = ingest_catalog(catalog, store)
    assert again == IngestResult(added_items=0, present_items=24, added_images=0, rejected=0,
                                 total_items=24, total_images=24)

    bad = write_catalog(tmp_path / "bad", "catalog.jsonl", 400, 3, bad_line=2)
    assert run("ingest", "--catalog", bad, "--store", tmp_path / "bad-store") == 1
    assert "catalog.jsonl:2:" in capsys.readouterr().err
    lenient = ingest_catalog(bad, tmp_path / "bad-store", lenient=True)
    assert (lenient.added_items, lenient.rejected, lenient.total_items) == (2, 1, 2)
