"""The soak benchmark for 30 s: open-loop load at 80% of the measured maximum QPS through a
real ``visearch-serve``, a hot swap every 10 s, the second one to a corrupted version."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import soak


def test_soak_30_s_with_hot_swaps_and_a_corrupted_version(tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    soak.add_arguments(p)
    args = p.parse_args(["--duration", "30", "--swap-every", "10", "--window", "10",
                         "--probe", "4", "--skus", "30", "--workers", "8",
                         "--out", str(tmp_path)])
    report = soak.run(args)
    soak.print_report(report)

    assert report["ok"], report["problems"]
    # Every Search of the soak was answered, at the paced rate.
    assert report["failed"] == {} and report["late"] == 0
    assert report["requests"] == sum(w["requests"] for w in report["windows"])
    assert report["rate"] == 0.8 * report["max_qps"]["qps"] > 0
    assert abs(report["requests"] - 30 * report["rate"]) <= report["rate"] + 1
    # Swaps at 10 s (to B: served) and 20 s (to the damaged C: refused, B keeps serving).
    good, bad = report["reloads"]
    a, b = sorted({v for w in report["windows"] for v in w["versions"]})
    assert (good["version"], good["code"], good["serving_after"]) == (b, "OK", b)
    assert bad["code"] == "FAILED_PRECONDITION" and bad["serving_after"] == b
    assert "sha256 differs from the manifest" in bad["detail"]
    assert f"still serving {b}" in bad["detail"]
    first, _, last = report["windows"]
    # (a request sent just before the swap may be answered by B: a by send time, mostly)
    assert first["versions"].get(a, 0) >= 0.9 * first["requests"]
    assert set(last["versions"]) == {b}
    # No growth beyond 10% (a leak); a drop can be the kernel reclaiming file-backed pages
    # when other jobs press on memory, which says nothing about the server.
    assert report["rss_growth"] <= 0.10
    assert [w["rss_kb"] > 0 for w in report["windows"]] == [True] * 3
    assert last["rss_kb"] == report["rss_kb"]["end"]
