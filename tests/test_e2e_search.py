"""End to end: catalog -> ``visearch-index rebuild`` -> ``visearch-serve`` -> user photos.

The one test that asks the whole system the shopper's question. A small synthetic world
is rebuilt with the real offline pipeline (ingest, dedup, a short training of the real
MobileNetV2 embedder from its ImageNet weights, build), served on a free loopback port,
and every user photo is searched through gRPC with the box the app sends. Most photos must
come back with their own SKU first: chance is 1/40, and the untrained ImageNet backbone
gets Recall@1 0.37 on a 30-SKU world (``benchmarks.bench_embedder``).

The detector is off here: training one that finds products in clutter takes minutes on
this CPU (``benchmarks.bench_detector``), so the query carries its box, as a client that
lets the shopper confirm the box does. Detection quality is measured by ``visearch-bench
recall`` (the ``full`` vs ``gt_box`` rows), not asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from index_builder.cli import main as index_main
from server.client import SearchClient
from server.serve import RunningServer, ServeConfig
from visearch.index import IndexRoot

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "weights" / "mobilenet_v2-b0353104.pth"

SKUS = 40
STEPS = 160  # about 2 minutes on one core, rebuild included


@pytest.fixture(scope="module")
def served_world(tmp_path_factory: pytest.TempPathFactory):
    """(client, queries, relevant SKUs per SKU) for a rebuilt and served 40-SKU world."""
    from visearch.synth import generate_world

    if not WEIGHTS.is_file():
        pytest.fail(f"{WEIGHTS} is missing: `make weights` fetches it (make test does)")
    base = tmp_path_factory.mktemp("e2e")
    world = base / "world"
    generate_world(world, skus=SKUS, seed=7, image_size=96, photos_per_sku=2, scenes=0)
    config = {
        "workers": 1,
        "dedup": {"workers": 1},
        "detector": {"enabled": False},
        "clean": {"enabled": False},
        "merge": {"enabled": False},
        # the schedule this test's recall floors were measured with: STEPS steps at 96 px
        "embedder": {"epochs": 1, "steps_per_epoch": STEPS, "image_size": 96, "patience": None,
                     "budget_minutes": None, "pretrained": str(WEIGHTS)},
    }
    (base / "config.json").write_text(json.dumps(config))
    root = base / "indexes"
    argv = ["rebuild", "--catalog", str(world / "catalog.jsonl"), "--root", str(root),
            "--work", str(base / "work"), "--config", str(base / "config.json")]
    assert index_main(argv) == 0
    assert IndexRoot(root).current() is not None

    queries = [json.loads(line) for line in (world / "queries.jsonl").read_text().splitlines()]
    same: dict[str, set[str]] = {}
    for group in json.loads((world / "truth.json").read_text())["split_skus"]:
        for sku in group["skus"]:
            same[sku] = set(group["skus"])
    running = RunningServer(ServeConfig(index_root=root, port=0, use_detector=False)).start()
    try:
        with SearchClient(f"127.0.0.1:{running.port}", timeout=60) as client:
            client.wait_ready()
            yield client, world, queries, same
    finally:
        running.stop(grace=1.0)


@pytest.mark.parametrize("rerank", [True, False])
def test_user_photos_find_their_sku(served_world, rerank: bool) -> None:
    client, world, queries, same = served_world
    assert len(queries) == 2 * SKUS
    top1 = top5 = 0
    category_ok = 0
    for q in queries:
        res = client.search((world / q["image"]).read_bytes(), top_k=5, bbox=q["bbox"],
                            rerank=rerank)
        skus = [r.sku for r in res.results]
        # Results come from the voted category only (a few SKUs each in this world).
        assert skus and len(skus) == len(set(skus)) and res.reranked == rerank
        ok = same.get(q["sku"], {q["sku"]})
        top1 += skus[0] in ok
        top5 += bool(ok & set(skus))
        category_ok += res.category.category == q["category"]
    n = len(queries)
    # Chance is 1/40 at rank 1. Measured (seed 7, 160 steps, rerank on / off): R@1
    # 0.64 / 0.65, R@5 0.79 / 0.78, category 0.79 (training is bit-reproducible on one
    # machine; the margins absorb another CPU's float rounding). Recall@5 is capped by the
    # category vote: results come from the voted category only.
    assert top1 / n >= 0.55, f"Recall@1 {top1 / n:.2f} ({top1}/{n})"
    assert top5 / n >= 0.7, f"Recall@5 {top5 / n:.2f} ({top5}/{n})"
    assert category_ok / n >= 0.7, f"category accuracy {category_ok / n:.2f}"
