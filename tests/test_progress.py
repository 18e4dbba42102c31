"""Progress bars: tqdm on a terminal, a few log lines with real counts otherwise."""

from __future__ import annotations

import io
import logging
import re

import pytest
import torch
from tqdm import tqdm

from visearch.progress import LogBar, progress_bar
from visearch.training import Trainer, WarmupCosine

_LINE = re.compile(r"^(?P<desc>[\w-]+): (?P<n>\d+)/(?P<total>\d+) (?P<unit>\w+) \[(?P<pct>\d+)%\]")


def _lines(caplog: pytest.LogCaptureFixture) -> list[re.Match[str]]:
    out = [_LINE.match(r.getMessage()) for r in caplog.records if r.name == "visearch.progress"]
    assert all(m is not None for m in out), [r.getMessage() for r in caplog.records]
    return out  # type: ignore[return-value]


def test_not_a_terminal_logs_a_line_per_tenth_with_the_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    with progress_bar(total=1000, desc="ingest", unit="img", terminal=False,
                      every=3600, min_gap=0) as bar:
        assert isinstance(bar, LogBar)
        for i in range(1000):
            bar.set_postfix(seen=i + 1, refresh=False)
            bar.update(1)
    lines = _lines(caplog)
    assert [int(m["n"]) for m in lines] == list(range(100, 1001, 100))
    assert {(m["desc"], m["total"], m["unit"]) for m in lines} == {("ingest", "1000", "img")}
    assert [int(m["pct"]) for m in lines] == list(range(10, 101, 10))
    assert caplog.records[-1].getMessage().endswith("seen=1000")
    assert bar.lines == 10


def test_time_based_lines_and_the_closing_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    # every=1e-9: a line on every update that changed the count; none without a change
    bar = progress_bar(total=None, desc="merge", unit="round", terminal=False, every=1e-9)
    for _ in range(3):
        bar.update(1)
    bar.refresh()
    bar.close()
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(",")[0] for m in messages] == ["merge: 1 round", "merge: 2 round",
                                                  "merge: 3 round"]
    caplog.clear()
    # a fast loop (under min_gap between tenths) logs once, where it ended
    with progress_bar(range(1000), desc="hashing", unit="img", terminal=False) as bar:
        assert sum(1 for _ in bar) == 1000
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "hashing: 1000/1000 img [100%]"]
    caplog.clear()
    # a bar closed before any line was due still says where it ended, once
    with progress_bar(total=50, desc="cut-outs", terminal=False, every=3600) as bar:
        bar.update(3)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["cut-outs: 3/50 it [6%]"]


def test_terminal_gets_tqdm_and_disable_gets_nothing(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO)
    stream = io.StringIO()
    bar = progress_bar(range(5), desc="scenes", terminal=True, file=stream, every=1.0)
    assert type(bar) is tqdm and list(bar) == [0, 1, 2, 3, 4]
    assert "scenes: 100%" in stream.getvalue() and not caplog.records
    # No flag: the bar follows whether stderr is a terminal.
    monkeypatch.setattr("sys.stderr", io.StringIO())
    logged = progress_bar(total=3)
    assert isinstance(logged, LogBar)
    logged.close()  # closed at 0 of 3: it says so, once
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["progress: 0/3 it [0%]"]
    caplog.clear()

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", Tty())
    auto = progress_bar(total=3)
    assert type(auto) is tqdm
    auto.close()
    quiet = progress_bar(total=10, terminal=False, disable=True)
    quiet.update(10)
    quiet.close()
    assert not caplog.records
    with pytest.raises(ValueError, match="fraction in"):
        LogBar(total=3, fraction=0)


def test_trainer_fit_logs_its_progress_when_not_on_a_terminal(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one training engine (every training of rebuild) shows its steps as a few log
    lines, with the epoch and loss, instead of one frame per step."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    trainer = Trainer({"model": model}, model.parameters(), lr=0.01, weight_decay=0.0,
                      schedule=WarmupCosine(1, 40), device="cpu")
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    def loss_fn(batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        loss = torch.nn.functional.mse_loss(model(x), y)
        return loss, {}, 8

    monkeypatch.setattr("visearch.progress.MIN_GAP_S", 0.0)
    losses = trainer.fit(4, lambda epoch: range(10), loss_fn, steps_per_epoch=10,
                         progress=True, desc="train-toy")
    lines = _lines(caplog)
    assert len(losses) == 40 and [int(m["n"]) for m in lines] == list(range(4, 41, 4))
    assert {(m["desc"], m["total"], m["unit"]) for m in lines} == {("train-toy", "40", "step")}
    last = caplog.records[-1].getMessage()
    assert "epoch=4" in last and f"loss={losses[-1]:.3f}" in last


def test_no_module_but_progress_imports_tqdm() -> None:
    """Every long loop goes through ``progress_bar`` (a raw tqdm bar writes carriage-return
    frames into logs): no library, CLI or benchmark module imports tqdm itself."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    allowed = {repo / "visearch" / "progress.py"}
    pattern = re.compile(r"^\s*(from\s+tqdm[\w.]*\s+import|import\s+tqdm)", re.M)
    sources = [p for d in ("visearch", "benchmarks", "server", "index_builder", "scripts")
               if (repo / d).is_dir() for p in (repo / d).rglob("*.py")]
    assert len(sources) > 50 and allowed <= set(sources)  # the scan sees the real tree
    offenders = sorted(str(p.relative_to(repo)) for p in sources
                       if p not in allowed and pattern.search(p.read_text(encoding="utf-8")))
    assert offenders == []
    # The scan would catch one: progress.py itself matches.
    assert pattern.search((repo / "visearch" / "progress.py").read_text(encoding="utf-8"))
