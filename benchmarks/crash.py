"""Crash testing of index builds: ``kill -9`` at seeded random points of ``visearch-index
rebuild`` and ``visearch-index add``, then check that nothing the service depends on broke.

    .venv/bin/python -m benchmarks.crash [--kills 20] [--commands rebuild,add] [--seed 0] \\
        [--skus 24] [--out DIR] [--json out.json]

On a small synthetic world (``--skus``, tiny models: :data:`CONFIG`) a first, uninterrupted
run of each command is timed; its duration ``D`` is the range of the kill points. Then, per
kill: the command is started again and sent SIGKILL after a delay drawn uniformly from
``[0, D)`` by a seeded RNG (logged with the stage it landed in), and

1. the active version (``CURRENT``) still verifies (sizes and sha256 of every file, counts,
   self-search: ``IndexVersion.verify``);
2. it still serves: the search pipeline over it (ONNX Runtime, with its detector) answers a
   fixed set of user photos with the same SKUs and scores as before the kill;
3. the same command, re-run, completes and leaves a valid active version (a new one, unless
   the killed run had already published it: then that one is checked).

Each rebuild kill runs in a fresh ``--work`` folder, so the whole pipeline (ingest, cut-outs,
scenes, detector and embedder trainings, cleaning, build) is there to be killed, and the
re-run resumes from the stages the killed run completed. ``add`` appends the same rows each
time (the active version grows). Exit status 1 when any check failed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import machine

#: The rebuild configuration: the pipeline's every stage, on tiny models (seconds, not hours).
CONFIG: dict[str, Any] = {
    "workers": 1,
    "dedup": {"workers": 1},
    "detector": {"backbone": "tiny_fpn", "min_size": 64, "max_size": 64, "epochs": 1},
    "embedder": {"backbone": "tiny", "dim": 32, "epochs": 1, "cleaning_epochs": 1,
                 "image_size": 48, "p": 8, "k": 2, "attention": False, "pretrained": None,
                 "frozen_blocks": 0, "steps_per_epoch": None,
                 "cleaning_steps_per_epoch": None},
    "index": {"k1": 11},
}
COMMANDS = ("rebuild", "add")
_STAGE = re.compile(r"^--- stage ([\w.-]+)(:?)", re.M)
_LOGGER = re.compile(r"^\S+ \S+ [A-Z]+ (\S+): ", re.M)


@dataclass
class KillRecord:
    """One kill and the checks after it.

    Attributes:
        command: ``"rebuild"`` or ``"add"``.
        kill: 0-based kill number of this command.
        delay_s: seconds from the start of the command to the SIGKILL.
        returncode: the killed run's exit status (-9: killed; 0: it finished first).
        stage: the stage the killed run was in (``"after X"``: between stages) for rebuild,
            the last module that logged for add, or None (killed during start-up).
        active_before, active_after: ``CURRENT`` before and right after the kill.
        verified: the version active after the kill passed ``verify``.
        same_results: it answered the probe photos as before the kill (None when the killed
            run had published and activated a new version: nothing to compare with).
        rerun_returncode: the re-run's exit status.
        rerun_s: the re-run's wall time.
        final: ``CURRENT`` after the re-run.
        final_verified: that version passed ``verify`` and served the probe photos.
        staging_left: ``.staging-*`` leftovers in the root after the re-run.
    """

    command: str
    kill: int
    delay_s: float
    returncode: int
    stage: str | None
    active_before: str
    active_after: str | None
    verified: bool
    same_results: bool | None
    rerun_returncode: int
    rerun_s: float
    final: str | None
    final_verified: bool
    staging_left: int

    @property
    def ok(self) -> bool:
        """Every check passed."""
        return (self.verified and self.same_results is not False
                and self.rerun_returncode == 0 and self.final_verified
                and (self.final != self.active_before or self.active_after != self.active_before))


def index_command(*argv: str) -> list[str]:
    """``visearch-index ARGV`` as a child process of this interpreter."""
    return [sys.executable, "-m", "index_builder.cli", *argv]


def run_command(cmd: list[str], log: Path, *, kill_after: float | None = None
                ) -> tuple[int, float]:
    """Run ``cmd`` with stdout and stderr to ``log``; SIGKILL it after ``kill_after`` seconds
    when it is still running. Returns ``(returncode, seconds)``."""
    with log.open("w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.kill()  # SIGKILL: no handler, no cleanup, like a power cut for the process
            proc.wait()
        return proc.returncode, time.perf_counter() - t0


def probe(root: Path, photos: list[bytes]) -> tuple[str | None, bool, list[Any] | None]:
    """Verify the active version of ``root`` and search ``photos`` through its pipeline.

    Returns ``(version, verified, answers)``: ``answers`` per photo the ranked ``(sku,
    score)`` pairs (scores to 5 decimals), or None when the version cannot be served.
    """
    from visearch.index import IndexRoot
    from visearch.search.pipeline import SearchPipeline

    index_root = IndexRoot(root)
    name = index_root.current()
    if name is None:
        return None, False, None
    version = index_root.open(name)
    try:
        verified = version.verify(checksums=True).ok
    finally:
        version.close()
    try:
        pipeline = SearchPipeline.from_version(index_root.open(name), runtime="onnx",
                                               device="cpu")
    except Exception:  # a version that cannot be served is a failed check, reported
        return name, False, None
    try:
        answers = [[(h.sku, round(h.score, 5)) for h in pipeline.search(p, top_k=5).results]
                   for p in photos]
    finally:
        pipeline.close()
    return name, verified and all(answers), answers


def make_world(out: Path, skus: int, seed: int) -> tuple[Path, Path, list[bytes]]:
    """A synthetic world, the rebuild config and the probe photos (8 user photos)."""
    from visearch.synth import generate_world

    world = out / "world"
    if not (world / "catalog.jsonl").is_file():
        generate_world(world, skus=skus, seed=seed, image_size=64, scenes=skus)
    config = out / "config.json"
    config.write_text(json.dumps(CONFIG))
    queries = [json.loads(x) for x in (world / "queries.jsonl").read_text().splitlines()]
    return world, config, [(world / q["image"]).read_bytes() for q in queries[:8]]


def crash_loop(out: Path, command: str, kills: int, seed: int, *, skus: int = 24,
               log: Any = None) -> dict[str, Any]:
    """Time ``command`` once, then kill it ``kills`` times at seeded random points, checking
    the index root after each kill (see the module docstring).

    Args:
        out: a scratch folder (world, index root, work folders, logs); the commands can
            share one.
        command: ``"rebuild"`` or ``"add"`` (an ``add`` needs an active version: a rebuild
            makes one first when ``out`` has none).
        kills: how many kills.
        seed: seeds the world and the kill delays.
        skus: the world's size.
        log: called with one line of text per kill (e.g. ``print``), or None.

    Returns:
        ``{"command", "duration_s" (the timed run), "kills": [KillRecord as dict], "ok"}``.
    """
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, got {command!r}")
    out.mkdir(parents=True, exist_ok=True)
    world, config, photos = make_world(out, skus, seed)
    root, logs = out / "root", out / "logs"
    logs.mkdir(exist_ok=True)

    def argv(i: int) -> list[str]:
        if command == "rebuild":
            return index_command("rebuild", "--catalog", str(world / "catalog.jsonl"),
                                 "--root", str(root), "--work", str(out / f"work-{i}"),
                                 "--config", str(config))
        return index_command("add", "--root", str(root), "--catalog",
                             str(world / "catalog.jsonl"), "--quiet")

    if command == "add" and not (root / "CURRENT").is_file():
        rc, _ = run_command(index_command("rebuild", "--catalog", str(world / "catalog.jsonl"),
                                          "--root", str(root), "--work", str(out / "work-add"),
                                          "--config", str(config)), logs / "add-base.log")
        if rc != 0:
            raise RuntimeError(f"the base rebuild failed: see {logs / 'add-base.log'}")
    rc, duration = run_command(argv(0), logs / f"{command}-timed.log")
    if rc != 0:
        raise RuntimeError(f"the timed {command} failed ({rc}): see "
                           f"{logs / f'{command}-timed.log'}")
    active, verified, answers = probe(root, photos)
    if not verified or active is None:
        raise RuntimeError(f"the timed {command} left no servable version in {root}")
    # Drawn before any kill: the same seed kills at the same offsets of D.
    fractions = np.random.default_rng([seed, COMMANDS.index(command)]).random(kills)
    records: list[KillRecord] = []
    for i, fraction in enumerate(fractions):
        delay = float(fraction * duration)
        name = f"{command}-{i + 1:02d}"
        rc, _ = run_command(argv(i + 1), logs / f"{name}-killed.log", kill_after=delay)
        text = (logs / f"{name}-killed.log").read_text(errors="replace")
        # "--- stage X" starts a stage, "--- stage X: done in ..." ends it
        stages = ([f"after {n}" if end else n for n, end in _STAGE.findall(text)]
                  or _LOGGER.findall(text))
        after, ok_after, answers_after = probe(root, photos)
        same = answers_after == answers if after == active else None
        rerun_rc, rerun_s = run_command(argv(i + 1), logs / f"{name}-rerun.log")
        final, final_ok, final_answers = probe(root, photos)
        record = KillRecord(
            command=command, kill=i, delay_s=round(delay, 3), returncode=rc,
            stage=stages[-1] if stages else None, active_before=active, active_after=after,
            verified=ok_after, same_results=same, rerun_returncode=rerun_rc,
            rerun_s=round(rerun_s, 2), final=final, final_verified=final_ok,
            staging_left=len(list(root.glob(".staging-*"))))
        records.append(record)
        if log is not None:
            log(f"{name}: kill at {delay:6.2f} s of {duration:.1f} s (rc {rc}, "
                f"{'in ' + record.stage if record.stage else 'in start-up'}): active "
                f"{after} verified {ok_after}, same answers {same}; re-run rc {rerun_rc} in "
                f"{rerun_s:.1f} s -> {final} verified {final_ok}: "
                f"{'ok' if record.ok else 'FAILED'}")
        if final is not None and final_answers is not None:
            active, answers = final, final_answers
    return {"command": command, "duration_s": round(duration, 2),
            "kills": [{**asdict(r), "ok": r.ok} for r in records],
            "ok": all(r.ok for r in records)}


def summarise(report: dict[str, Any]) -> str:
    """One line: kills that landed, where, and the checks that passed."""
    kills = report["kills"]
    landed = sum(k["returncode"] == -9 for k in kills)
    stages = Counter(k["stage"] or "(start-up)" for k in kills if k["returncode"] == -9)
    return (f"{report['command']}: {len(kills)} kills over a {report['duration_s']:.1f} s run, "
            f"{landed} landed (stages: {dict(stages)}); active version verified after "
            f"{sum(k['verified'] for k in kills)}, same answers "
            f"{sum(k['same_results'] is not False for k in kills)}, re-run completed "
            f"{sum(k['rerun_returncode'] == 0 for k in kills)}, valid version after re-run "
            f"{sum(k['final_verified'] for k in kills)}; all ok: {report['ok']}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kills", type=int, default=20, help="kills per command")
    p.add_argument("--commands", default="rebuild,add", help="comma-separated: rebuild,add")
    p.add_argument("--seed", type=int, default=0, help="the world's and the kill delays' seed")
    p.add_argument("--skus", type=int, default=24, help="SKUs of the synthetic world")
    p.add_argument("--out", type=Path, default=Path("/tmp/visearch-crash"),
                   help="scratch folder (world, roots, logs)")
    p.add_argument("--json", type=Path, help="write the report here")


def run(args: argparse.Namespace) -> int:
    """Kill each command ``--kills`` times, print a line per kill and a summary; 0 when every
    check passed."""
    commands = [c.strip() for c in args.commands.split(",") if c.strip()]
    m = machine()
    print(f"machine: {m['cpu_count']} CPUs, torch {m['torch']}, cuda {m['cuda']}", flush=True)
    reports = []
    for command in commands:
        report = crash_loop(args.out, command, args.kills, args.seed,
                            skus=args.skus, log=lambda s: print(s, flush=True))
        reports.append(report)
    for report in reports:
        print(summarise(report))
    ok = all(r["ok"] for r in reports)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"seed": args.seed, "skus": args.skus, "machine": m,
                                         "reports": reports, "ok": ok}, indent=2))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.crash", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
