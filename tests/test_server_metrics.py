"""Prometheus metrics of the server, scraped over HTTP from a real server on a loopback port."""

from __future__ import annotations

import logging
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_server import TOKEN, build_world_index

from server.client import SearchClient
from server.metrics import ServerMetrics
from server.serve import RunningServer, ServeConfig, _parser, config_from_args
from visearch.index import IndexRoot
from visearch.search.batching import MicroBatcher

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
SERVICE = "visearch.v1.VisualSearch"


def scrape(port: int) -> Samples:
    """Every sample on ``/metrics``, keyed by (sample name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when it does not exist yet (a label set never observed)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def metrics_index(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("metrics_index") / "root"
    names, rows = build_world_index(tiny_world, root, versions=2)
    IndexRoot(root).activate(names[0])
    return root, names, rows


@pytest.fixture(scope="module")
def served(metrics_index):
    root, _, _ = metrics_index
    config = ServeConfig(index_root=root, port=0, metrics_port=0, admin_token=TOKEN,
                         use_detector=False, workers=4, max_batch_size=4)
    running = RunningServer(config).start()
    with SearchClient(f"127.0.0.1:{running.port}", admin_token=TOKEN, timeout=30) as c:
        c.wait_ready()
        yield running, c
    running.stop(grace=1.0)


def test_calls_stages_and_batches_are_counted(served, metrics_index, tiny_world) -> None:
    running, client = served
    _, _, rows = metrics_index
    before = scrape(running.metrics_port)
    stages: set[str] = set()
    for row in rows[:3]:
        res = client.search((tiny_world / row["image"]).read_bytes(), top_k=2, bbox=row["bbox"])
        stages |= {t.stage for t in res.timings}
    with pytest.raises(grpc.RpcError) as err:
        client.search(b"\x89PNG\r\n\x1a\n not really a png", top_k=2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    client.embed((tiny_world / rows[3]["image"]).read_bytes(), bbox=rows[3]["bbox"])
    after = scrape(running.metrics_port)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    handled = "grpc_server_handled_total"
    assert moved(handled, grpc_service=SERVICE, grpc_method="Search", grpc_code="OK") == 3
    assert moved(handled, grpc_service=SERVICE, grpc_method="Search",
                 grpc_code="INVALID_ARGUMENT") == 1
    assert moved(handled, grpc_service=SERVICE, grpc_method="Embed", grpc_code="OK") == 1
    assert moved("grpc_server_handling_seconds_count", grpc_service=SERVICE,
                 grpc_method="Search") == 4
    assert moved("grpc_server_handling_seconds_sum", grpc_service=SERVICE,
                 grpc_method="Search") > 0
    # Every stage the responses report is timed once per successful search, none for the
    # failed one (it fails in decode, before any timing is reported).
    assert {"decode", "embed", "search_category", "rerank", "total"} <= stages
    for stage in stages:
        assert moved("visearch_stage_seconds_count", grpc_method="Search", stage=stage) == 3
    assert moved("visearch_stage_seconds_count", grpc_method="Embed", stage="embed") == 1
    # One crop embedded per successful Search or Embed: the batch sizes add up to 4.
    assert moved("visearch_batch_size_count", model="embed") > 0
    assert moved("visearch_batch_size_sum", model="embed") == 4
    assert value(after, "visearch_batch_size_count", model="detect") == 0  # no detector


def test_index_info_follows_hot_swap(served, metrics_index, tiny_world) -> None:
    running, client = served
    _, names, rows = metrics_index
    samples = scrape(running.metrics_port)
    assert value(samples, "visearch_index_info", version=names[0]) == 1
    assert value(samples, "visearch_index_items") == len(rows)
    assert value(samples, "visearch_index_reloads_total") == 0

    assert client.reload(names[1]).changed
    samples = scrape(running.metrics_port)
    assert value(samples, "visearch_index_info", version=names[1]) == 1
    assert ("visearch_index_info", frozenset({("version", names[0])})) not in samples
    assert value(samples, "visearch_index_reloads_total") == 1
    assert value(samples, "grpc_server_handled_total", grpc_service=SERVICE,
                 grpc_method="ReloadIndex", grpc_code="OK") == 1
    # The new pipeline's batcher reports to the same histogram.
    row = rows[5]
    client.search((tiny_world / row["image"]).read_bytes(), top_k=1, bbox=row["bbox"])
    after = scrape(running.metrics_port)
    assert (value(after, "visearch_batch_size_sum", model="embed")
            - value(samples, "visearch_batch_size_sum", model="embed")) == 1


def test_metrics_port_is_logged_and_closed_with_the_server(metrics_index, tmp_path,
                                                           caplog) -> None:
    # A copy of the root: LMDB refuses to open one file twice in a process.
    root = tmp_path / "root"
    shutil.copytree(metrics_index[0], root)
    config = ServeConfig(index_root=root, port=0, metrics_port=0, use_detector=False,
                         rerank=False)
    with caplog.at_level(logging.INFO, logger="server.metrics"):
        running = RunningServer(config).start()
    try:
        port = running.metrics_port
        assert port and f"http://127.0.0.1:{port}/metrics" in caplog.text
        assert value(scrape(port), "visearch_index_items") == len(metrics_index[2])
    finally:
        running.stop(grace=0.5)
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_metrics_off_by_default() -> None:
    args = _parser().parse_args(["--index-root", "x"])
    assert config_from_args(args).metrics_port is None
    args = _parser().parse_args(["--index-root", "x", "--metrics-port", "0"])
    assert config_from_args(args).metrics_port == 0


def test_servers_have_registries_of_their_own() -> None:
    a, b = ServerMetrics(), ServerMetrics()  # the global registry would refuse the second
    a.observe_stages("Search", {"embed": 2.0})
    assert a.registry.get_sample_value(
        "visearch_stage_seconds_count", {"grpc_method": "Search", "stage": "embed"}) == 1
    assert a.registry.get_sample_value(
        "visearch_stage_seconds_sum", {"grpc_method": "Search", "stage": "embed"}) == (
        pytest.approx(0.002))
    assert b.registry.get_sample_value(
        "visearch_stage_seconds_count", {"grpc_method": "Search", "stage": "embed"}) is None


def test_batcher_reports_each_batch_before_its_results() -> None:
    sizes: list[int] = []
    started, release = threading.Event(), threading.Event()

    def fn(items: list[int]) -> list[int]:
        started.set()
        release.wait(10)  # holds the worker so that the next items queue up together
        return [2 * i for i in items]

    batcher = MicroBatcher(fn, max_batch_size=8, max_wait_ms=0, on_batch=sizes.append)
    try:
        first = batcher.submit(0)
        assert started.wait(10)
        rest = [batcher.submit(i) for i in (1, 2, 3)]
        release.set()
        assert first.result(10) == 0 and [f.result(10) for f in rest] == [2, 4, 6]
        assert sizes == [1, 3]  # observed before the results were handed out

        def broken(size: int) -> None:
            raise RuntimeError("observer bug")

        batcher.on_batch = broken  # a failing observer never fails the callers
        assert batcher(5, timeout=10) == 10
    finally:
        batcher.close()
