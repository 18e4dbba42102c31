"""Resumable stages: skip on an unchanged fingerprint, rerun on a change, publish atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from index_builder.stage import run_stage, stage_done
from visearch.registry import Registry


def test_stage_skips_when_unchanged_and_reruns_on_change(tmp_path: Path) -> None:
    calls: list[Path] = []

    def work(out: Path) -> dict:
        calls.append(out)
        (out / "result.txt").write_text(str(len(calls)))
        return {"n": len(calls)}

    first = run_stage("embed", tmp_path, {"catalog": "abc", "dim": 8}, work)
    assert not first.skipped and first.summary == {"n": 1}
    mtime = (first.out_dir / "done.json").stat().st_mtime_ns
    second = run_stage("embed", tmp_path, {"dim": 8, "catalog": "abc"}, work)
    assert second.skipped and second.summary == {"n": 1} and len(calls) == 1
    assert (second.out_dir / "done.json").stat().st_mtime_ns == mtime
    third = run_stage("embed", tmp_path, {"catalog": "abd", "dim": 8}, work)
    assert not third.skipped and len(calls) == 2
    assert (third.out_dir / "result.txt").read_text() == "2"
    assert json.loads((third.out_dir / "done.json").read_text())["fingerprint"]["catalog"] == "abd"


def test_interrupted_stage_leaves_the_previous_output(tmp_path: Path) -> None:
    run_stage("s", tmp_path, {"v": 1}, lambda out: (out / "a").write_text("old") and None)

    def crash(out: Path) -> None:
        (out / "a").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage("s", tmp_path, {"v": 2}, crash)
    assert (tmp_path / "s" / "a").read_text() == "old"
    assert stage_done(tmp_path, "s", {"v": 1}) and not stage_done(tmp_path, "s", {"v": 2})
    assert not list(tmp_path.glob(".s.tmp-*"))


def test_registry_rejects_duplicates_and_lists_names() -> None:
    reg: Registry[int] = Registry("backbone")
    reg.register("b")(2)
    reg.register("a")(1)
    assert reg.get("a") == 1 and reg.names() == ["a", "b"] and "b" in reg and len(reg) == 2
    with pytest.raises(ValueError, match="backbone 'a' is already registered"):
        reg.register("a")(3)
    with pytest.raises(KeyError, match="unknown backbone 'c'; valid names: a, b"):
        reg.get("c")
