"""ONNX export and ONNX Runtime serving: parity with torch (embeddings, top-10, decoded
detections), checksums in the version, verify and the server refusing corrupt or missing
ONNX files, and the torch fallback."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from visearch.detection.model import HeadMaps, build_detector, load_detector, save_detector
from visearch.embedding import build_embedder, embed_arrays, load_embedder, save_embedder
from visearch.errors import IndexFormatError
from visearch.imageio import encode_jpeg
from visearch.index import IndexRoot, build_version, update_version
from visearch.index.root import IndexVersion
from visearch.runtime import onnx as rt
from visearch.search.pipeline import SearchPipeline

CATEGORIES = ["bag", "cap", "shoe"]
N_SKUS = 30


def _image(sku: int, variant: int, size: int = 64) -> np.ndarray:
    """A drawing: SKU-specific colours and stripes, shifted per shop image."""
    rng = np.random.default_rng(sku)
    img = np.full((size, size, 3), 235, np.uint8)
    colour = rng.integers(0, 255, 3)
    img[12 + variant : 52 + variant, 10:54] = colour
    img[12 + variant : 52 + variant : 3 + sku % 5, 10:54] = 255 - colour
    img[20:24, 10 + 2 * (sku % 7) : 30] = rng.integers(0, 255, 3)
    return img


def _queries(n: int, seed: int) -> list[np.ndarray]:
    """Seeded query crops of varied sizes: gallery drawings with noise, re-scaled."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = _image(i % N_SKUS, 1).astype(np.int16) + rng.integers(-20, 21, (64, 64, 3))
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        rows, cols = np.arange(h) * 64 // h, np.arange(w) * 64 // w
        out.append(np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8)[rows][:, cols]))
    return out


def _scenes(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (int(rng.integers(60, 120)), int(rng.integers(60, 120)), 3),
                         dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("onnx_models")
    torch.manual_seed(0)
    save_embedder(build_embedder("tiny", dim=32, input_size=48).eval(), base / "embedder.pt")
    det = build_detector("tiny_fpn", CATEGORIES, min_size=96, max_size=128)
    # An untrained RetinaNet scores every anchor ~0.01 (its prior), under the 0.05 floor:
    # zero bias gives ~0.5 scores, so there are detections (and NMS work) to compare.
    torch.nn.init.zeros_(det.retinanet.head.classification_head.cls_logits.bias)
    save_detector(det, base / "detector.pt")
    return base / "embedder.pt", base / "detector.pt"


@pytest.fixture(scope="module")
def built(models, tmp_path_factory: pytest.TempPathFactory) -> IndexVersion:
    """One version with both models exported (the only export of the module: it is slow)."""
    emb_path, det_path = models
    model = load_embedder(emb_path)
    images = [_image(sku, v) for sku in range(N_SKUS) for v in range(2)]
    meta = [{"sku": f"S{i // 2:03d}", "category": CATEGORIES[(i // 2) % 3],
             "image_key": f"img/{i}.jpg", "title": ""} for i in range(len(images))]
    xb = embed_arrays(model, images)
    root = tmp_path_factory.mktemp("onnx_index") / "root"
    return build_version(root, xb, np.arange(len(xb)), meta, emb_path, detector_path=det_path,
                         k1=5)


def _copy_root(version: IndexVersion, dest: Path) -> IndexRoot:
    """A private copy of the version's root (LMDB opens one file once per process)."""
    shutil.copytree(version.path.parent, dest)
    return IndexRoot(dest)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_version_lists_onnx_files_with_checksums_and_parity(built) -> None:
    onnx = built.manifest["onnx"]
    assert onnx["errors"] == {} and onnx["opset"] == rt.OPSET
    for model, name in (("embedder", rt.EMBEDDER_ONNX), ("detector", rt.DETECTOR_ONNX)):
        info = onnx[model]
        assert info["file"] == name and info["exporter"] == "dynamo"
        assert info["sha256"] == built.manifest["files"][name]["sha256"]
        assert built.onnx_path(model) == built.path / name
    assert onnx["embedder"]["parity"]["max_abs_diff"] <= rt.EMBED_TOL
    det = onnx["detector"]["parity"]
    assert det["detections"] > 0 and det["same_count"] and det["same_labels"]
    assert det["max_score_diff"] <= rt.SCORE_TOL and det["max_box_diff"] <= rt.BOX_TOL
    report = built.verify()
    assert report.ok, report.problems


def test_ort_embeddings_and_top10_match_torch(built) -> None:
    model = load_embedder(built.embedder_path)
    ort_model = rt.OrtEmbedder(built.onnx_path("embedder"), model.config, intra_op_threads=1)
    queries = _queries(24, seed=3)
    ref = embed_arrays(model, queries)
    for batch_size in (1, 5):  # dynamic batch axis
        got = ort_model.embed_arrays(queries, batch_size=batch_size)
        assert got.shape == ref.shape and got.dtype == np.float32
        assert np.abs(got - ref).max() <= rt.EMBED_TOL
    k = 10
    Dr, Ir = built.index.search(ref, k + 1)  # noqa: N806
    Do, Io = built.index.search(got, k + 1)  # noqa: N806
    np.testing.assert_allclose(Do, Dr, atol=1e-4)
    for r in range(len(queries)):
        if Dr[r, k - 1] - Dr[r, k] > 1e-5:  # a tie at rank 10 may swap items in and out
            assert set(Io[r, :k]) == set(Ir[r, :k]), r
        order_ties = np.abs(np.diff(Dr[r, :k])) <= 1e-5
        same = Io[r, :k] == Ir[r, :k]
        assert all(same[i] or order_ties[max(i - 1, 0)] or order_ties[min(i, k - 2)]
                   for i in range(k)), r


def test_head_maps_decode_exactly_like_retinanet(models) -> None:
    det = load_detector(models[1])
    images = _scenes(3, seed=1)
    ref = det.detect(images)
    got = det.detect(images, head_maps=HeadMaps(det.retinanet))
    assert sum(len(a) for a in ref) > 0
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_ort_detector_matches_torch_at_any_size_and_batch(built, models) -> None:
    det = load_detector(models[1])
    ort_det = rt.OrtDetector(built.onnx_path("detector"), load_detector(models[1]),
                             intra_op_threads=1)
    images = _scenes(4, seed=2)  # different sizes and aspect ratios: dynamic H, W
    for batch_size in (1, 3):
        # Same batches on both sides: RetinaNet pads a batch to its largest image, and the
        # padding changes the border activations (in torch alike).
        ref = det.detect(images, batch_size=batch_size)
        got = ort_det.detect(images, batch_size=batch_size)
        for a, b in zip(ref, got, strict=True):
            assert len(a) == len(b) > 0
            np.testing.assert_array_equal(a.labels, b.labels)
            np.testing.assert_allclose(b.scores, a.scores, atol=rt.SCORE_TOL)
            np.testing.assert_allclose(b.boxes, a.boxes, atol=rt.BOX_TOL)


def test_pipeline_on_onnx_gives_torchs_results(built, tmp_path) -> None:
    root = _copy_root(built, tmp_path / "root")
    queries = [encode_jpeg(_image(s, 1), quality=95) for s in range(0, N_SKUS, 4)]
    results = {}
    for runtime in ("torch", "onnx"):
        p = SearchPipeline.from_version(root.open(), runtime=runtime, device="cpu",
                                        intra_op_threads=1)
        try:
            want = {"embed": runtime, "detect": runtime}
            assert p.runtimes == want
            results[runtime] = [p.search(q, top_k=5) for q in queries]
        finally:
            p.close()
    for a, b in zip(results["torch"], results["onnx"], strict=True):
        assert [h.sku for h in a.results] == [h.sku for h in b.results]
        assert a.main_object.box == pytest.approx(b.main_object.box, abs=rt.BOX_TOL)
        assert [h.similarity for h in a.results] == pytest.approx(
            [h.similarity for h in b.results], abs=1e-4)


def test_verify_refuses_a_corrupt_or_missing_onnx_file(built, tmp_path) -> None:
    root = _copy_root(built, tmp_path / "root")
    v = root.open()
    _flip_byte(v.path / rt.EMBEDDER_ONNX)
    report = root.open().verify()
    assert not report.ok and f"{rt.EMBEDDER_ONNX}: sha256 differs" in report.problems[0]
    with pytest.raises(IndexFormatError, match="sha256 differs"):
        root.open().onnx_path("embedder")
    with pytest.raises(IndexFormatError, match="embedder.onnx"):
        SearchPipeline.from_version(root.open(), runtime="onnx", device="cpu")
    (v.path / rt.DETECTOR_ONNX).unlink()
    assert f"missing file {rt.DETECTOR_ONNX}" in root.open().verify().problems
    with pytest.raises(IndexFormatError, match="missing"):
        root.open().onnx_path("detector")
    # An ONNX entry whose checksum disagrees with the file list (a hand-edited manifest).
    shutil.copy(built.path / rt.EMBEDDER_ONNX, v.path / rt.EMBEDDER_ONNX)
    shutil.copy(built.path / rt.DETECTOR_ONNX, v.path / rt.DETECTOR_ONNX)
    manifest = json.loads((v.path / "manifest.json").read_text())
    manifest["onnx"]["detector"]["sha256"] = "0" * 64
    (v.path / "manifest.json").write_text(json.dumps(manifest))
    assert root.open().verify().problems == [
        f"{rt.DETECTOR_ONNX}: the ONNX entry's sha256 differs from the file list's"]


def test_update_carries_onnx_and_a_corrupt_version_leaves_the_old_one_serving(
    built, tmp_path
) -> None:
    from server.servicer import PipelineHolder

    root = _copy_root(built, tmp_path / "root")
    v1 = root.open()
    model = load_embedder(v1.embedder_path)
    add = [_image(N_SKUS + i, 0) for i in range(3)]
    v2 = update_version(root, add_xb=embed_arrays(model, add), activate=False,
                        add_items=[{"sku": f"N{i}", "category": "bag"} for i in range(3)])
    assert v2.manifest["onnx"]["source"] == v1.version
    for model_name in ("embedder", "detector"):
        assert v2.manifest["onnx"][model_name]["sha256"] == v1.manifest["onnx"][model_name][
            "sha256"]
        assert v2.onnx_path(model_name) is not None
    broken = root.path / (v2.version + "-broken")
    shutil.copytree(v2.path, broken)
    _flip_byte(broken / rt.DETECTOR_ONNX)

    holder = PipelineHolder(
        root, lambda v: SearchPipeline.from_version(v, runtime="onnx", device="cpu",
                                                    intra_op_threads=1))
    try:
        query = encode_jpeg(_image(N_SKUS + 1, 0), quality=95)
        with pytest.raises(IndexFormatError, match="detector.onnx"):
            holder.reload(broken.name)
        assert holder.version == v1.version
        with holder.lease() as p:
            assert p.runtimes == {"embed": "onnx", "detect": "onnx"}
            assert p.search(query, top_k=3).index_version == v1.version
        assert holder.reload(v2.version)[1:] == (v2.version, True)
        with holder.lease() as p:
            assert p.runtimes == {"embed": "onnx", "detect": "onnx"}
            assert p.search(query, top_k=3, skip_detection=True).results[0].sku == "N1"
    finally:
        holder.close()


def test_a_failed_export_builds_without_onnx_and_serves_on_torch(
    models, tmp_path, monkeypatch, caplog
) -> None:
    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(rt, "export_embedder", broken_export)
    ids = np.arange(12)
    xb = np.eye(12, 32, dtype=np.float32)
    meta = [{"sku": f"S{i}", "category": "bag"} for i in ids]
    with caplog.at_level(logging.WARNING):
        v = build_version(tmp_path / "root", xb, ids, meta, models[0], k1=3)
    assert v.manifest["onnx"]["embedder"] is None
    assert "exporter exploded" in v.manifest["onnx"]["errors"]["embedder"]
    assert not (v.path / rt.EMBEDDER_ONNX).exists() and v.verify().ok
    assert "no ONNX embedder" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        p = SearchPipeline.from_version(v, runtime="onnx", device="cpu")
    try:
        assert p.runtimes["embed"] == "torch" and "embedding on torch" in caplog.text
    finally:
        p.close()


def test_the_torchscript_exporter_is_the_fallback(models, tmp_path, monkeypatch) -> None:
    real_export = torch.onnx.export

    def no_dynamo(*args, dynamo: bool = True, **kwargs):
        if dynamo:
            raise RuntimeError("torch.export cannot trace this")
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    model = load_embedder(models[0])
    assert rt.export_embedder(model, tmp_path / "e.onnx") == "torchscript"
    session = rt.make_session(tmp_path / "e.onnx")
    assert rt.embedder_parity(model, session, batch=3)["max_abs_diff"] <= rt.EMBED_TOL


def test_int8_embedder_stays_close_to_float(models, tmp_path) -> None:
    model = load_embedder(models[0])
    rt.export_embedder(model, tmp_path / "e8.onnx", int8=True)
    parity = rt.embedder_parity(model, rt.make_session(tmp_path / "e8.onnx"), batch=8)
    assert parity["min_cosine"] >= rt.INT8_MIN_COSINE
    assert parity["max_abs_diff"] > 1e-6  # it did quantise


def test_providers_best_first_among_those_offered() -> None:
    every = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
             "AzureExecutionProvider"]
    assert rt.choose_providers(available=every) == ["CUDAExecutionProvider",
                                                     "CPUExecutionProvider"]
    assert rt.choose_providers(available=every, tensorrt=True)[0] == "TensorrtExecutionProvider"
    assert rt.choose_providers("cpu", available=every) == ["CPUExecutionProvider"]
    assert rt.choose_providers(available=["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="intra_op_threads"):
        rt.make_session("x.onnx", intra_op_threads=0)
    with pytest.raises(ValueError, match="runtime"):
        SearchPipeline.from_version(None, runtime="tensorflow")  # type: ignore[arg-type]


def test_efficientnet_lite0_exports_with_parity(tmp_path) -> None:
    # TensorFlow "SAME" padding (timm's Conv2dSame) pads by an amount computed from the input
    # size; the graph must carry it for any batch.
    torch.manual_seed(0)
    model = build_embedder("efficientnet_lite0", dim=32, input_size=96).eval()
    assert rt.export_embedder(model, tmp_path / "lite0.onnx") == "dynamo"
    session = rt.make_session(tmp_path / "lite0.onnx")
    for batch in (1, 5):
        parity = rt.embedder_parity(model, session, batch=batch, seed=batch)
        assert parity["max_abs_diff"] <= rt.EMBED_TOL, parity
