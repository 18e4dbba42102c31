"""Progress bars that read well on a terminal and in a log.

Every long loop of the offline pipeline (trainings, ingest, scenes) takes its bar from
:func:`progress_bar`. On a terminal that is a plain tqdm bar. When the bar's stream is not a
terminal (a CI log, ``rebuild ... 2>&1 | tee build.log``, a service's journal) tqdm would still
write one carriage-return frame per refresh, thousands of them in a long training; there the
bar is a :class:`LogBar` instead: the same tqdm object (same counters, postfix, rate and ETA),
whose display is a log line through :mod:`logging` every ``every`` seconds and each
``fraction`` of the total, plus one at the end.

tqdm has no such mode (its ``mininterval`` only thins the frames, which still land on one
line joined by ``\\r``), and ``tqdm.contrib.logging`` goes the other way (log records around
a bar), hence this small subclass.
"""

from __future__ import annotations

import io
import logging
import sys
import time
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

logger = logging.getLogger(__name__)

#: seconds between two log lines of a :class:`LogBar` (besides its ``fraction`` steps)
LOG_EVERY_S = 30.0
#: a :class:`LogBar` also logs each time its count crosses this fraction of its total
LOG_FRACTION = 0.1
#: ... but not within this many seconds of its last line (a loop done in a second says so
#: once, at the end)
MIN_GAP_S = 1.0


class _Discard(io.TextIOBase):
    """A text stream that drops what tqdm writes (the frames a :class:`LogBar` replaces)."""

    def write(self, s: str) -> int:
        return len(s)


class LogBar(tqdm):
    """A tqdm bar shown as periodic log lines (``logging.INFO`` on ``log``).

    A line is ``"<desc>: 1200/6000 step [20%] 00:41<02:44, 29.3 step/s, loss=0.41"``: the
    count, the percentage when the total is known, elapsed and remaining time, the rate and
    the postfix. One is logged when ``every`` seconds passed since the last one, when the
    count crossed the next multiple of ``fraction * total`` (unless the last line is under
    ``min_gap`` seconds old), and once on ``close``.

    Args:
        every: seconds between lines, > 0.
        fraction: a line per this fraction of the total, in (0, 1]; ignored without a total.
        min_gap: the least seconds between two lines before the closing one (default
            :data:`MIN_GAP_S`).
        log: the logger the lines go to (default: this module's).
        *args, **kwargs: tqdm's (``file`` is replaced: nothing is written to a stream).
    """

    def __init__(self, *args: Any, every: float = LOG_EVERY_S, fraction: float = LOG_FRACTION,
                 min_gap: float | None = None, log: logging.Logger | None = None,
                 **kwargs: Any) -> None:
        min_gap = MIN_GAP_S if min_gap is None else min_gap
        if every <= 0 or not 0 < fraction <= 1 or min_gap < 0:
            raise ValueError(f"every must be > 0, fraction in (0, 1] and min_gap >= 0, got "
                             f"{every}, {fraction}, {min_gap}")
        self._every = float(every)
        self._min_gap = float(min_gap)
        self._fraction = float(fraction)
        self._log = log or logger
        self._last_log_t = time.monotonic()
        self._last_log_n: float | None = None
        self._next_step = 1  # the next multiple of fraction * total that earns a line
        self.lines = 0  # log lines written so far
        kwargs["file"] = _Discard()
        # Every update reaches display(), which decides cheaply whether a line is due:
        # tqdm's own thinning (mininterval, dynamic miniters) would skip the fraction steps.
        kwargs.setdefault("mininterval", 0)
        kwargs.setdefault("miniters", 1)
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        """Log a line when one is due (tqdm calls this on each refresh and on close)."""
        closing = self.disable  # close() sets disable before its last display
        if msg == "" or not closing and self.n == self.initial:
            return True  # tqdm clearing a leave=False bar, or the opening frame: nothing new
        now = time.monotonic()
        total = self.total
        step_due = False
        if total:
            steps = int(self.n / (total * self._fraction) + 1e-9)
            if steps >= self._next_step:
                self._next_step = steps + 1
                step_due = True
        since = now - self._last_log_t
        due = closing or step_due and since >= self._min_gap or since >= self._every
        if due and self.n != self._last_log_n or closing and self._last_log_n is None:
            self._last_log_t, self._last_log_n = now, self.n
            self.lines += 1
            self._log.info("%s", self._line())
        return True

    def _line(self) -> str:
        d = self.format_dict
        unit, n, total = d["unit"], d["n"], d["total"]
        elapsed = self.format_interval(d["elapsed"])
        rate = d["rate"] if d["rate"] else (n - d["initial"]) / max(d["elapsed"], 1e-9)
        parts = [f"{n:.0f}/{total:.0f} {unit} [{100 * n / total:.0f}%]" if total
                 else f"{n:.0f} {unit}"]
        if total and rate:
            parts.append(f"{elapsed}<{self.format_interval((total - n) / rate)}")
        else:
            parts.append(elapsed)
        parts.append(f"{rate:.3g} {unit}/s")
        if d.get("postfix"):
            parts.append(str(d["postfix"]))
        return f"{d['prefix'] or 'progress'}: " + ", ".join(parts)


def is_terminal(stream: IO[str] | None) -> bool:
    """Whether ``stream`` is an interactive terminal (False when it has no ``isatty``)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # a closed or stream-like object
        return False


def progress_bar(iterable: Iterable[Any] | None = None, *, total: float | None = None,
                 desc: str | None = None, unit: str = "it", disable: bool = False,
                 terminal: bool | None = None, **kwargs: Any) -> tqdm:
    """The progress bar of every long loop: a tqdm bar on a terminal, else a :class:`LogBar`.

    Args:
        iterable: what to iterate, as ``tqdm(iterable)``; or None to call ``update``.
        total: the expected count (default ``len(iterable)`` when it has one).
        desc: the label (the log lines start with it).
        unit: what is counted ("step", "img", ...).
        disable: no bar at all (a ``--quiet`` flag, or ``progress=False`` of a library call).
        terminal: whether the bar goes to a terminal; None asks ``sys.stderr.isatty()``.
        **kwargs: more tqdm arguments (``initial``, ``leave``, ...); ``every`` and
            ``fraction`` for the :class:`LogBar`.

    Returns:
        A ``tqdm`` (context manager, iterable, ``update``, ``set_postfix``, ``close``).
    """
    if terminal is None:
        terminal = is_terminal(sys.stderr)
    if terminal:
        kwargs.pop("every", None)
        kwargs.pop("fraction", None)
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, **kwargs)
    return LogBar(iterable, total=total, desc=desc, unit=unit, disable=disable, **kwargs)
