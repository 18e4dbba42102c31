"""End-to-end: ``visearch-serve`` serves a Milvus-backed version (Milvus Lite) through a real
gRPC port with the same results as the faiss version of the same gallery, and follows the
Milvus alias when told to reload."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("milvus_lite")

from server.client import SearchClient  # noqa: E402
from server.serve import RunningServer, ServeConfig  # noqa: E402
from visearch.embedding import build_embedder, embed_items, save_embedder  # noqa: E402
from visearch.index import IndexRoot, MilvusBackend, build_version  # noqa: E402

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def roots(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory):
    """The world's catalog embedded once and published twice: into a faiss root and into a
    Milvus Lite root (two Milvus versions, the first active)."""
    base = tmp_path_factory.mktemp("milvus_server")
    torch.manual_seed(0)
    model = build_embedder("tiny", dim=64, input_size=64).eval()
    weights = base / "embedder.pt"
    save_embedder(model, weights)
    rows = [json.loads(line) for line in (tiny_world / "catalog.jsonl").read_text().splitlines()]
    items = [(i, str(tiny_world / r["image"]), r.get("bbox")) for i, r in enumerate(rows)]
    ids, feats = zip(*embed_items(model, items, batch_size=128), strict=True)
    xb, ids = np.concatenate(feats), np.concatenate(ids)
    meta = [{"sku": r["sku"], "category": r["category"], "image_key": r["image"],
             "title": r.get("title", "")} for r in rows]
    faiss_root, milvus_root = IndexRoot(base / "faiss"), IndexRoot(base / "milvus")
    backend = MilvusBackend(str(base / "milvus.db"))
    # k1 = 21: the graph keeps each item itself, re-ranking needs 20 others.
    build_version(faiss_root, xb, ids, meta, weights, k1=21, onnx=False)
    v1 = build_version(milvus_root, xb, ids, meta, weights, k1=21, onnx=False,
                       backend=backend)
    keep = ids[ids % 5 != 0]  # the second Milvus version lacks every fifth item
    v2 = build_version(milvus_root, xb[keep], keep, [meta[i] for i in keep], weights, k1=21,
                       onnx=False, backend=backend, activate=False)
    return faiss_root, milvus_root, v1.version, v2.version, rows


def _serve(root: IndexRoot) -> RunningServer:
    config = ServeConfig(index_root=root.path, port=0, admin_token=TOKEN, use_detector=False,
                         workers=4, max_batch_size=4)
    return RunningServer(config).start()


def _answers(client: SearchClient, world: Path, queries: list[dict], rerank: bool):
    out = []
    for q in queries:
        res = client.search((world / q["image"]).read_bytes(), top_k=5, bbox=q.get("bbox"),
                            rerank=rerank)
        out.append(([r.sku for r in res.results], [r.item_id for r in res.results],
                    [r.score for r in res.results], res.index_version))
    return out


def test_milvus_version_serves_the_same_results_as_faiss(roots, tiny_world):
    faiss_root, milvus_root, v1, v2, rows = roots
    queries = [json.loads(line) for line in
               (tiny_world / "queries.jsonl").read_text().splitlines()][:12] + rows[::50]
    answers = {}
    for name, root in (("faiss", faiss_root), ("milvus", milvus_root)):
        running = _serve(root)
        try:
            with SearchClient(f"127.0.0.1:{running.port}", admin_token=TOKEN,
                              timeout=60) as client:
                client.wait_ready()
                info = client.index_info()
                assert info.ntotal == len(rows)
                answers[name] = {rr: _answers(client, tiny_world, queries, rr)
                                 for rr in (True, False)}
                if name == "milvus":
                    assert info.version == v1
                    assert json.loads(info.manifest_json)["index_backend"]["name"] == "milvus"
                    # activation is an alias switch; a reload (no version) follows the alias
                    milvus_root.activate(v2)
                    res = client.reload()
                    assert res.changed and client.index_info().version == v2
                    assert client.index_info().ntotal == int((np.arange(len(rows)) % 5
                                                              != 0).sum())
                    milvus_root.rollback()
        finally:
            running.stop(grace=1.0)
    same_item = []
    for rerank in (True, False):
        for f, m in zip(answers["faiss"][rerank], answers["milvus"][rerank], strict=True):
            assert f[0] == m[0], (f, m)  # the same SKUs in the same order
            np.testing.assert_allclose(f[2], m[2], atol=1e-5)  # with the same scores
            same_item += [a == b for a, b in zip(f[1], m[1], strict=True)]
    # A SKU's representative image may differ only between tied images (the world injects
    # exact duplicates): the same item almost everywhere.
    assert np.mean(same_item) > 0.95
    hits = [a for a, q in zip(answers["milvus"][True], queries, strict=True)
            if a[0][0] == q["sku"]]
    assert len(hits) >= len(rows[::50])  # the catalog's own images find their SKU
