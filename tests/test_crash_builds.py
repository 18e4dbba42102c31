"""kill -9 during ``visearch-index rebuild`` and ``add``: the bounded run of benchmarks/crash.py
(one kill each; the benchmark kills each command 20 times)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from benchmarks.crash import ADD_STAGES, crash_loop, probe
from visearch.index import IndexRoot, build_version


def test_killed_rebuild_and_add_leave_a_serving_index_and_rerun(tmp_path: Path) -> None:
    lines: list[str] = []
    # Seed 1 kills the rebuild half-way through its work; the add's first kill aims at its
    # first stage (loading the model and embedding the 4 x 53 rows).
    rebuild = crash_loop(tmp_path, "rebuild", 1, seed=1, skus=12, log=lines.append)
    add = crash_loop(tmp_path, "add", 1, seed=1, skus=12, add_copies=4, log=lines.append)

    for report in (rebuild, add):
        (kill,) = report["kills"]
        assert kill["returncode"] == -9, lines  # the kill landed before the run finished
        # The delay counts from the end of start-up (the first line of output) and falls in
        # the command's work, which the timed run measured after its start-up.
        assert 0 < kill["delay_s"] < report["work_s"] < report["duration_s"] - report["startup_s"]
        assert kill["startup_s"] is not None and kill["startup_s"] > 0
        # The version active before the kill is still active, verified, and answers the
        # probe photos with the same SKUs and scores.
        assert kill["active_after"] == kill["active_before"], lines
        assert kill["verified"] and kill["same_results"] is True, lines
        # The same command, re-run, completed and published a new, valid, active version.
        assert kill["rerun_returncode"] == 0, lines
        assert kill["final"] not in (None, kill["active_before"]) and kill["final_verified"]
        assert kill["ok"] and report["ok"]
    # The add was killed in its own work, before it published (not in start-up as before).
    add_kill = add["kills"][0]
    assert add_kill["aimed"] == ADD_STAGES[0][1] and rebuild["kills"][0]["aimed"] is None
    assert add_kill["stage"] in {name for _, name in ADD_STAGES[:4]}, lines

    # Versions: the timed rebuild, its re-run, the timed add, the add's re-run; nothing else
    # (the killed runs published nothing), and no staging folder is left behind.
    root = IndexRoot(tmp_path / "root")
    assert len(root.versions()) == 4 and root.current() == add["kills"][0]["final"]
    assert not list((tmp_path / "root").glob(".staging-*"))
    world = tmp_path / "world"
    catalog = len((world / "catalog.jsonl").read_text().splitlines())
    version = root.open()
    # The re-run added the catalog 4 times over to the same base as the timed add did.
    base = IndexRoot(tmp_path / "root").open(rebuild["kills"][0]["final"])
    assert add["rows"] == 4 * catalog
    assert version.manifest["counts"]["total"] == base.manifest["counts"]["total"] + 4 * catalog
    version.close()
    base.close()
    # Not a terminal (the log file): every training of the rebuild reported its steps as
    # log lines with counts, none as tqdm's carriage-return frames ("train-x:  33%|...").
    raw = (tmp_path / "logs" / "rebuild-timed.log").read_bytes()
    assert not re.search(rb"train-\w+: +\d+%\|", raw)
    log = raw.decode()
    trainings = re.findall(r"visearch\.progress: (train-\w+): (\d+)/(\d+) step", log)
    done = [name for name, n, total in trainings if n == total]
    assert done == ["train-detector", "train-embedder", "train-embedder"], trainings
    name, verified, answers = probe(tmp_path / "root", [(world / json.loads(
        (world / "queries.jsonl").read_text().splitlines()[0])["image"]).read_bytes()])
    assert name == root.current() and verified and answers and answers[0]


def test_a_version_with_many_exact_duplicates_verifies(tmp_path: Path) -> None:
    """Regression (the crash benchmark's 9th ``add`` of the same catalog was refused): with 10
    or more copies of a vector, an item may be missing from its own top 10 behind ties of
    its own similarity; the self-search check counted it as not found and refused a correct
    version ("only 88.7% of 256 items find themselves within rank 1")."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((40, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    xb = np.concatenate([base] * 12)  # every vector 12 times
    ids = np.arange(len(xb), dtype=np.int64)
    embedder = tmp_path / "embedder.pt"
    embedder.write_bytes(b"weights" * 100)
    version = build_version(IndexRoot(tmp_path / "root"), xb, ids,
                            [{"sku": f"S{i % 40}", "category": "bag"} for i in ids.tolist()],
                            embedder, k1=4, onnx=False)
    report = version.verify()
    assert report.ok and report.checks["self_search_rate"] == 1.0
    assert report.checks["self_search_depth"] == 1  # exact (Flat): rank 1, ties counted


def test_visearch_bench_runs_the_reliability_benchmarks() -> None:
    """``visearch-bench fuzz|crash|soak`` parse their flags and call the benchmarks' entries."""
    from benchmarks import crash, fuzz, soak
    from benchmarks.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["crash", "--kills", "3", "--commands", "add"])
    assert args.func is crash.run and args.kills == 3 and args.commands == "add"
    args = parser.parse_args(["fuzz", "--index-root", "/r", "--n", "300"])
    assert args.func is fuzz.run and args.n == 300 and str(args.index_root) == "/r"
    args = parser.parse_args(["soak", "--duration", "30"])
    assert args.func is soak.report_and_exit_code and args.duration == 30.0
