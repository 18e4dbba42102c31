"""benchmarks.bench_models on the CPU with tiny fresh models (every cell of the grid is
reported: measured ones with positive throughput, fp16 as n/a), and the GPU suite script's
bash syntax."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import bench_models

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench_models")
    threads = torch.get_num_threads()  # --threads sets torch's global thread count
    try:
        rep = bench_models.main([
            "--device", "cpu", "--embedder-backbone", "tiny", "--embedder-dim", "16",
            "--embedder-size", "32", "--detector-backbone", "tiny_fpn", "--detector-size", "64",
            "--batch-sizes", "1,2", "--dtypes", "fp32,fp16", "--runtimes", "torch,onnx",
            "--seconds", "0.2", "--warmup", "1", "--threads", "1", "--photo-size", "80",
            "--crop-size", "40", "--work", str(out / "onnx"), "--json", str(out / "r.json"),
        ])
    finally:
        torch.set_num_threads(threads)
    return rep, out


def test_every_cell_is_reported(report: tuple[dict, Path]) -> None:
    rep, _ = report
    cells = {(r["model"], r["runtime"], r["dtype"], r["batch"]) for r in rep["rows"]}
    assert cells == {(m, rt, dt, b) for m in ("detector", "embedder")
                     for rt in ("torch", "onnx") for dt in ("fp32", "fp16") for b in (1, 2)}


def test_fp32_cells_measured(report: tuple[dict, Path]) -> None:
    rep, _ = report
    fp32 = [r for r in rep["rows"] if r["dtype"] == "fp32"]
    assert len(fp32) == 8
    for r in fp32:
        assert r["error"] is None, r
        assert r["images_per_s"] > 0 and r["ms_per_batch"] > 0
        # images/s and ms/batch describe the same timing
        assert r["images_per_s"] == pytest.approx(1000 * r["batch"] / r["ms_per_batch"])
        assert r["batches"] >= 1
        if r["runtime"] == "onnx":
            assert r["providers"] == ["CPUExecutionProvider"]
            assert r["vs_torch_fp32"] > 0
        else:
            assert r["vs_torch_fp32"] == pytest.approx(1.0)


def test_fp16_is_na_on_cpu(report: tuple[dict, Path]) -> None:
    rep, _ = report
    fp16 = [r for r in rep["rows"] if r["dtype"] == "fp16"]
    assert len(fp16) == 8
    for r in fp16:
        assert r["images_per_s"] is None and r["error"].startswith("n/a")
    assert "| n/a | n/a |" in bench_models.markdown(rep)


def test_json_written(report: tuple[dict, Path]) -> None:
    rep, out = report
    saved = json.loads((out / "r.json").read_text())
    assert len(saved["rows"]) == len(rep["rows"]) == 16
    assert saved["machine"]["device"] == "cpu"


def test_unknown_runtime_rejected() -> None:
    with pytest.raises(ValueError, match="tensorrt"):
        bench_models.main(["--device", "cpu", "--runtimes", "torch,tensorrt"])


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_suite_syntax() -> None:
    res = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_suite.sh")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
