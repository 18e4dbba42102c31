"""The query pipeline (with a scripted detector) and the micro-batcher it runs models through."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path

import numpy as np
import pytest
import torch

from visearch.detection.model import Detections
from visearch.embedding import build_embedder, save_embedder
from visearch.errors import ImageDecodeError
from visearch.imageio import decode_image, encode_jpeg
from visearch.index import IndexRoot, build_version
from visearch.search.batching import MicroBatcher
from visearch.search.pipeline import RESTRICT_MIN_SCORE, RerankParams, SearchPipeline
from visearch.search.voting import VoteWeights

# ---------------------------------------------------------------------------- batching


def test_batcher_routes_results_and_bounds_batches() -> None:
    gate = threading.Event()
    seen: list[list[int]] = []

    def fn(items: list[int]) -> list[int]:
        gate.wait(10)
        seen.append(list(items))
        return [i * 10 for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(fn, max_batch_size=4, max_wait_ms=1.0)
    try:
        first = batcher.submit(0)  # the worker takes it alone and blocks in fn
        while not batcher.batch_sizes:
            time.sleep(0.001)
        futures = {i: batcher.submit(i) for i in range(1, 11)}  # queued meanwhile
        gate.set()
        assert first.result(5) == 0
        assert {i: f.result(5) for i, f in futures.items()} == {i: i * 10 for i in range(1, 11)}
        assert batcher.batch_sizes == [1, 4, 4, 2]
        assert seen[1:] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    finally:
        batcher.close()


def test_batcher_many_threads_get_their_own_results() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(lambda xs: [x * x for x in xs],
                                                   max_batch_size=8, max_wait_ms=0.5)
    out: dict[int, int] = {}
    lock = threading.Lock()

    def worker(base: int) -> None:
        for i in range(base, base + 50):
            r = batcher(i, timeout=10)
            with lock:
                out[i] = r

    threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert out == {i: i * i for k in range(6) for i in range(k * 1000, k * 1000 + 50)}
    assert max(batcher.batch_sizes) <= 8 and sum(batcher.batch_sizes) == 300


def test_batcher_errors_cancel_and_close() -> None:
    gate = threading.Event()

    def fn(items: list[int]) -> list[int]:
        gate.wait(10)
        if any(i < 0 for i in items):
            raise ValueError("negative")
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(fn, max_batch_size=2, max_wait_ms=0.0)
    blocker = batcher.submit(1)
    while not batcher.batch_sizes:
        time.sleep(0.001)
    bad, good = batcher.submit(-1), batcher.submit(2)  # one batch: both fail
    dropped = batcher.submit(3)
    assert dropped.cancel()  # a caller that gave up before its batch started
    later = batcher.submit(4)
    gate.set()
    assert blocker.result(5) == 1
    with pytest.raises(ValueError, match="negative"):
        bad.result(5)
    with pytest.raises(ValueError, match="negative"):
        good.result(5)
    assert later.result(5) == 4
    with pytest.raises(CancelledError):
        dropped.result(0)
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(5)
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(fn, max_batch_size=0)


# ---------------------------------------------------------------------------- pipeline

CATEGORIES = ["bag", "cap", "shoe"]


def _image(sku: int, variant: int) -> np.ndarray:
    """A 64 x 64 drawing: SKU-specific colours and stripes, shifted per shop image."""
    rng = np.random.default_rng(sku)
    img = np.full((64, 64, 3), 235, np.uint8)
    colour = rng.integers(0, 255, 3)
    img[12 + variant : 52 + variant, 10:54] = colour
    period = 3 + sku % 5
    img[12 + variant : 52 + variant : period, 10:54] = 255 - colour
    img[20:24, 10 + 2 * (sku % 7) : 30] = rng.integers(0, 255, 3)
    return img


@pytest.fixture(scope="module")
def small_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], list]:
    base = tmp_path_factory.mktemp("pipeline_index")
    torch.manual_seed(0)
    model = build_embedder("tiny", dim=32, input_size=48).eval()
    save_embedder(model, base / "embedder.pt")
    images, meta = [], []
    for sku in range(24):
        for variant in range(2):
            jpeg = encode_jpeg(_image(sku, variant), quality=95)
            images.append(jpeg)
            meta.append({"sku": f"S{sku:03d}", "category": CATEGORIES[sku % 3],
                         "image_key": f"img/{sku}_{variant}.jpg", "title": f"item {sku}"})
    from visearch.embedding import embed_arrays

    xb = embed_arrays(model, [decode_image(b) for b in images])
    build_version(base / "root", xb, np.arange(len(xb)), meta, base / "embedder.pt", k1=21)
    return base / "root", meta, images


class ScriptedDetector:
    """Returns the same detections for every image (a stand-in for a trained RetinaNet)."""

    def __init__(self, boxes, scores, labels) -> None:
        self.dets = Detections(np.asarray(boxes, np.float32), np.asarray(scores, np.float32),
                               np.asarray(labels, np.int64), CATEGORIES)
        self.calls: list[int] = []

    def detect(self, images, *, batch_size: int = 8, score_thresh=None) -> list[Detections]:
        self.calls.append(len(images))
        return [self.dets for _ in images]


def _pipeline(root: Path, detector=None, **kwargs) -> SearchPipeline:
    from visearch.embedding import load_embedder

    version = IndexRoot(root).open()
    # These tests check the category-restricted search itself; the confidence gate in front
    # of it has its own test (test_a_doubtful_vote_searches_the_whole_index).
    kwargs.setdefault("restrict_min_score", 0.0)
    return SearchPipeline(version, load_embedder(version.embedder_path), detector, **kwargs)


@pytest.mark.parametrize("rerank", [True, False])
def test_shop_images_come_back_first_and_grouped(small_index, rerank) -> None:
    root, meta, images = small_index
    pipe = _pipeline(root, rerank=RerankParams(k1=20, k2=6, lambda_value=0.3, shortlist=30))
    try:
        for i in range(0, len(images), 5):
            res = pipe.search(images[i], top_k=5, rerank=rerank)
            assert res.results[0].sku == meta[i]["sku"]
            assert res.results[0].item_id == i
            assert len({h.sku for h in res.results}) == len(res.results) == 5
            assert res.reranked == rerank
            assert res.category.category == meta[i]["category"]
            assert all(h.category == meta[i]["category"] for h in res.results)
    finally:
        pipe.close()


def test_grouping_matches_a_brute_force_best_item_per_sku(small_index) -> None:
    root, meta, images = small_index
    pipe = _pipeline(root)
    try:
        res = pipe.search(images[7], top_k=4, rerank=False)
        xq, _, _ = pipe.embed(images[7])
        cat = res.category.category
        ids = [i for i, m in enumerate(meta) if m["category"] == cat]
        sims = pipe.index.reconstruct(np.array(ids)) @ xq
        best: dict[str, float] = {}
        for i, s in zip(ids, sims, strict=True):
            best[meta[i]["sku"]] = max(best.get(meta[i]["sku"], -2.0), float(s))
        expect = sorted(best, key=lambda k: -best[k])[:4]
        assert [h.sku for h in res.results] == expect
        np.testing.assert_allclose([h.score for h in res.results], [best[k] for k in expect],
                                   atol=1e-5)
        assert list(res.timings) == ["decode", "detect", "embed", "search_all", "vote",
                                     "search_category", "rerank", "group", "total"]
    finally:
        pipe.close()


def test_all_categories_searches_the_whole_index(small_index) -> None:
    """The same brute-force best-item-per-SKU order as above, over every item rather than
    the voted category's; the vote is still made and reported."""
    root, meta, images = small_index
    pipe = _pipeline(root)
    try:
        restricted = pipe.search(images[7], top_k=12, rerank=False)
        res = pipe.search(images[7], top_k=12, rerank=False, all_categories=True)
        assert res.category == restricted.category
        assert {h.category for h in restricted.results} == {restricted.category.category}
        xq, _, _ = pipe.embed(images[7])
        sims = pipe.index.reconstruct(np.arange(len(meta))) @ xq
        best: dict[str, float] = {}
        for m, s in zip(meta, sims, strict=True):
            best[m["sku"]] = max(best.get(m["sku"], -2.0), float(s))
        expect = sorted(best, key=lambda k: -best[k])[:12]
        assert [h.sku for h in res.results] == expect
        assert len({h.category for h in res.results}) == 3  # 12 of 24 SKUs span all three
        with pytest.raises(ValueError, match="category_hint and all_categories exclude"):
            pipe.search(images[7], category_hint="bag", all_categories=True)
    finally:
        pipe.close()


def test_a_doubtful_vote_searches_the_whole_index(small_index) -> None:
    """``restrict_min_score`` gates the category restriction on the vote's combined score:
    below it the results are the whole index's (as ``all_categories``), at or above it the
    voted category's; a category hint always restricts."""
    root, meta, images = small_index
    plain = _pipeline(root)
    try:
        restricted = plain.search(images[7], top_k=12, rerank=False)
        everywhere = plain.search(images[7], top_k=12, rerank=False, all_categories=True)
        hinted = plain.search(images[7], top_k=12, rerank=False, category_hint="bag")
    finally:
        plain.close()
    score = restricted.category.score
    assert 0 < score < 1
    for gate, want in ((score + 1e-6, everywhere), (score, restricted), (0.0, restricted)):
        pipe = _pipeline(root, restrict_min_score=min(gate, 1.0))
        try:
            res = pipe.search(images[7], top_k=12, rerank=False)
            assert [h.sku for h in res.results] == [h.sku for h in want.results]
            assert res.category == restricted.category  # the vote is reported either way
            assert [h.sku for h in pipe.search(images[7], top_k=12, rerank=False,
                                               category_hint="bag").results] == \
                [h.sku for h in hinted.results]
        finally:
            pipe.close()
    from visearch.embedding import load_embedder

    version = IndexRoot(root).open()
    default = SearchPipeline(version, load_embedder(version.embedder_path))
    try:  # served as chosen by benchmarks.bench_catalog_scale --gate-sweep
        assert default.restrict_min_score == RESTRICT_MIN_SCORE == 0.6
    finally:
        default.close()
    with pytest.raises(ValueError, match=r"restrict_min_score must be in \[0, 1\]"):
        _pipeline(root, restrict_min_score=1.5)


def test_detector_box_is_embedded_and_votes(small_index) -> None:
    root, meta, images = small_index
    box = [8.0, 10.0, 56.0, 54.0]
    det = ScriptedDetector([box, [0, 0, 20, 20]], [0.9, 0.4], [2, 0])  # shoe, bag
    pipe = _pipeline(root, det, vote_weights=VoteWeights(detector=1.0, neighbours=0.0))
    try:
        res = pipe.search(images[0], top_k=3)  # a "bag" SKU, but the detector says shoe
        assert res.main_object.source == "detector" and res.main_object.box == tuple(box)
        assert [d.category for d in res.detections] == ["shoe", "bag"]
        assert (res.category.category, res.category.source) == ("shoe", "detector")
        assert res.category.score == pytest.approx(1.0)  # the bag box has IoU < 0.5
        assert {h.category for h in res.results} == {"shoe"}
        # The detector's crop is what was embedded.
        with_det, chosen, _ = pipe.embed(images[0])
        by_box, _, _ = pipe.embed(images[0], bbox=box)
        assert chosen.source == "detector"
        np.testing.assert_allclose(with_det, by_box, atol=1e-6)
        d = pipe.detect(images[0])
        assert (d.width, d.height, d.main_object.category) == (64, 64, "shoe")
    finally:
        pipe.close()


def test_weak_detections_fall_back_to_the_whole_image(small_index) -> None:
    root, meta, images = small_index
    pipe = _pipeline(root, ScriptedDetector([[0, 0, 10, 10]], [0.05], [1]))
    try:
        res = pipe.search(images[3], top_k=2)
        assert res.main_object.fallback and res.main_object.source == "image"
        assert res.main_object.box == (0.0, 0.0, 64.0, 64.0)
        assert res.category.source == "neighbours"  # a fallback's scores do not vote
        assert res.results[0].sku == meta[3]["sku"]
    finally:
        pipe.close()


def test_bad_requests_raise_value_errors(small_index) -> None:
    root, meta, images = small_index
    pipe = _pipeline(root, max_top_k=20, default_top_k=3)
    try:
        assert len(pipe.search(images[0]).results) == 3  # top_k 0 -> default
        with pytest.raises(ImageDecodeError, match="empty"):
            pipe.search(b"")
        with pytest.raises(ImageDecodeError):
            pipe.search(b"GIF89a broken")
        for top_k in (-1, 21):
            with pytest.raises(ValueError, match="top_k must be between 1 and 20"):
                pipe.search(images[0], top_k=top_k)
        with pytest.raises(ValueError, match="unknown category 'hat'.*bag, cap, shoe"):
            pipe.search(images[0], category_hint="hat")
        for bbox in ([0, 0, 65, 10], [5, 5, 5, 30], [float("nan"), 0, 4, 4]):
            with pytest.raises(ValueError, match="bbox"):
                pipe.search(images[0], bbox=bbox)
        with pytest.raises(TimeoutError, match="deadline"):
            pipe.search(images[0], deadline=time.monotonic() - 1)
        hinted = pipe.search(images[0], top_k=2, category_hint="cap")
        assert hinted.category.source == "hint" and {h.category for h in hinted.results} == {"cap"}
    finally:
        pipe.close()
