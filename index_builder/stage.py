"""Resumable offline stages: run a stage only when its inputs changed, publish atomically.

A stage owns ``<work_dir>/<name>/``. It is done when that directory holds ``done.json`` with
the fingerprint of the inputs and parameters it was run with. A run writes into a sibling
temp directory and renames it into place only after ``fn`` returns, so an interrupted stage
never leaves a half-written output that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DONE_FILE = "done.json"


def stat_digest(files: Iterable[tuple[str, Path]]) -> str:
    """A cheap sha256 over ``(name, path)`` pairs: each name with its file's size and mtime
    (ns), not its bytes, so a changed image changes it without reading any image. A missing
    file hashes as missing. (``visearch.fileio.file_digest`` is the digest of a file's
    bytes.)"""
    h = hashlib.sha256()
    for name, path in files:
        try:
            st = path.stat()
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{name}\0missing\n".encode())
    return h.hexdigest()


def fingerprint_digest(fingerprint: Mapping[str, Any]) -> str:
    """Stable sha256 of a JSON-serialisable mapping (keys sorted)."""
    blob = json.dumps(fingerprint, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def recorded_digest(stage_dir: str | os.PathLike[str]) -> str:
    """The fingerprint digest a completed stage recorded in its ``done.json``: what a
    downstream stage puts in its own fingerprint to depend on this one."""
    return json.loads((Path(stage_dir) / DONE_FILE).read_text())["fingerprint_digest"]


@dataclass(frozen=True)
class StageResult:
    """What ``run_stage`` did: ``out_dir`` holds the outputs; ``skipped`` when up to date."""

    name: str
    out_dir: Path
    skipped: bool
    seconds: float
    summary: dict[str, Any]


def stage_done(work_dir: str | os.PathLike[str], name: str, fingerprint: Mapping[str, Any]) -> bool:
    """True when ``<work_dir>/<name>`` was completed with exactly this fingerprint."""
    done = Path(work_dir) / name / DONE_FILE
    if not done.is_file():
        return False
    try:
        record = json.loads(done.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return record.get("fingerprint_digest") == fingerprint_digest(fingerprint)


def run_stage(
    name: str,
    work_dir: str | os.PathLike[str],
    fingerprint: Mapping[str, Any],
    fn: Callable[[Path], Mapping[str, Any] | None],
    *,
    force: bool = False,
) -> StageResult:
    """Run ``fn(tmp_out_dir)`` unless the stage is already done with the same fingerprint.

    Args:
        name: stage name, also the output folder's name under ``work_dir``.
        work_dir: the pipeline's working directory.
        fingerprint: JSON-serialisable inputs and parameters (checksums, not paths alone).
        fn: does the work, writing only into the directory it is given; may return a
            JSON-serialisable summary that is stored in ``done.json``.
        force: run even when up to date.

    Returns:
        A ``StageResult``; its ``out_dir`` is ``<work_dir>/<name>``.
    """
    work = Path(work_dir)
    out_dir = work / name
    if not force and stage_done(work, name, fingerprint):
        record = json.loads((out_dir / DONE_FILE).read_text())
        logger.info("stage %s: up to date, skipped", name)
        return StageResult(name, out_dir, True, 0.0, record.get("summary", {}))

    work.mkdir(parents=True, exist_ok=True)
    tmp = work / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    # Leftovers of an earlier, interrupted run of this stage (any pid) are garbage.
    for stale in work.glob(f".{name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        summary = dict(fn(tmp) or {})
        seconds = time.perf_counter() - t0
        record = {
            "stage": name,
            "fingerprint": fingerprint,
            "fingerprint_digest": fingerprint_digest(fingerprint),
            "seconds": round(seconds, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "summary": summary,
        }
        (tmp / DONE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
        old = work / f".{name}.old-{os.getpid()}"
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("stage %s: done in %.1f s %s", name, seconds, summary)
    return StageResult(name, out_dir, False, seconds, summary)
