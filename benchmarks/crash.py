"""Crash testing of index builds: ``kill -9`` at seeded random points of ``visearch-index
rebuild`` and ``visearch-index add``, then check that nothing the service depends on broke.

    .venv/bin/python -m benchmarks.crash [--kills 20] [--commands rebuild,add] [--seed 0] \\
        [--skus 24] [--add-copies 20] [--out DIR] [--json out.json]

On a small synthetic world (``--skus``, tiny models: :data:`CONFIG`) a first, uninterrupted
run of each command is timed: its start-up (interpreter, imports: until the command's first
line of output) and its work ``W``: from that line to its last log line (the tail after it
is the final print and the interpreter's exit, nothing to interrupt). Then, per kill: the
command is started again, and when its first line of output arrives (start-up is over: the
benchmark waits for that output, not for a guessed time) it is sent SIGKILL after a delay
drawn by a seeded RNG (logged with the stage it landed in), and

1. the active version (``CURRENT``) still verifies (sizes and sha256 of every file, counts,
   self-search: ``IndexVersion.verify``);
2. it still serves: the search pipeline over it (ONNX Runtime, with its detector) answers a
   fixed set of user photos with the same SKUs and scores as before the kill;
3. the same command, re-run, completes and leaves a valid active version (a new one, unless
   the killed run had already published it: then that one is checked).

For ``rebuild`` the kill point is uniform over ``W``, counted from the ``--- stage X`` line
that starts the stage it falls in (:func:`rebuild_aim`). ``add``'s stages take from a few
milliseconds (graph, publish, activate) to a second (embedding), so uniform delays would
almost never reach the short ones: kill ``i`` aims at stage ``i mod 6`` of
:data:`ADD_STAGES`. Its delay counts from the log line that starts that stage and is uniform
over the stage's span in the timed run (the stage it really landed in is read from its log:
on a loaded machine a stage can take longer or shorter than it did in the timed run).

Each rebuild kill runs in a fresh ``--work`` folder, so the whole pipeline (ingest, cut-outs,
scenes, detector and embedder trainings, cleaning, build) is there to be killed, and the
re-run resumes from the stages the killed run completed. Every ``add`` appends the world's
catalog, ``--add-copies`` times over (so that its own work, not its start-up, takes most of
its time), to the same base version (``--version``: the one active before the timed add),
so each version it publishes has the same size. Exit status 1 when any check failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import machine

#: The rebuild configuration: the pipeline's every stage, on tiny models (seconds, not hours).
CONFIG: dict[str, Any] = {"profile": "tiny"}
COMMANDS = ("rebuild", "add")
_STAGE = re.compile(r"^--- stage ([\w.-]+)(:?)", re.M)
_LOGGER = re.compile(r"^\S+ \S+ [A-Z]+ (\S+): ")  # a log line (not a print)
#: ``add``'s log lines, in order, each with the stage that follows it (what a kill after
#: that line and before the next one interrupted)
ADD_STAGES: tuple[tuple[str, str], ...] = (
    (r"visearch\.catalog: .* row\(s\) accepted", "model + embedding"),
    (r"embedded \d+ images", "thumbnails + index update"),
    (r"visearch\.index\.build: updated index", "neighbour graph"),
    (r"visearch\.index\.build: updated neighbour graph", "write files"),
    (r"visearch\.index\.build: wrote index files", "verify + publish"),
    (r"visearch\.index\.root: published index version", "activate"),
    (r"visearch\.index\.root: activated", "after activate"),
)


@dataclass
class KillRecord:
    """One kill and the checks after it.

    Attributes:
        command: ``"rebuild"`` or ``"add"``.
        kill: 0-based kill number of this command.
        startup_s: the killed run's start-up: seconds to its first line of output (None when
            it wrote none).
        aimed: the stage the kill aimed at (add), or None (rebuild: uniform over its work).
        delay_s: seconds to the SIGKILL from the line that starts the aimed stage (add), or
            the rebuild stage the kill point fell in in the timed run (or its first line).
        returncode: the killed run's exit status (-9: killed; 0: it finished first).
        stage: the stage the killed run was in: for rebuild its ``--- stage`` name
            (``"after X"``: between stages), for add one of :data:`ADD_STAGES`; None when
            no line of the run names one.
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
    startup_s: float | None
    aimed: str | None
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


def run_command(cmd: list[str], log: Path, *, kill_after: float | None = None,
                kill_from: str | None = None) -> tuple[int, float, list[tuple[float, str]]]:
    """Run ``cmd`` with stdout and stderr copied to ``log`` line by line; SIGKILL it
    ``kill_after`` seconds after its first line of output (the end of its start-up), or
    after its first line that matches the regular expression ``kill_from``, when it is
    still running.

    Returns:
        ``(returncode, seconds, lines)``: the exit status, the wall time, and each line of
        output with the seconds from the start to its arrival.
    """
    with log.open("w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        assert proc.stdout is not None
        first, done = threading.Event(), threading.Event()
        lines: list[tuple[float, str]] = []

        def copy() -> None:
            # The parent writes the log, so a SIGKILL of the child loses none of its lines.
            for line in proc.stdout:  # type: ignore[union-attr]
                lines.append((time.perf_counter() - t0, line))
                if kill_from is None or re.search(kill_from, line):
                    first.set()
                out.write(line)
                out.flush()
            first.set()  # end of output: the command exited (maybe without a line)
            done.set()

        reader = threading.Thread(target=copy, name="crash-log", daemon=True)
        reader.start()
        # Event.wait with a timeout wakes on time (Popen.wait's timeout polls, up to 50 ms
        # late: longer than add's shortest stages).
        if kill_after is not None and first.wait() and not done.wait(kill_after):
            proc.kill()  # SIGKILL: no handler, no cleanup, like a power cut for the process
        proc.wait()
        reader.join()
        proc.stdout.close()
        return proc.returncode, time.perf_counter() - t0, lines


def add_spans(lines: list[tuple[float, str]]) -> list[float]:
    """The seconds each of ``add``'s stages but the last (:data:`ADD_STAGES`) took, from a
    run's ``lines`` (:func:`run_command`): from the line that starts it to the next one's,
    by the log lines' own timestamps (milliseconds; on a loaded machine lines can reach
    this process in bursts, so their arrival times would squash the short stages)."""
    starts = []
    for pattern, _ in ADD_STAGES:
        line = next((line for _, line in lines if re.search(pattern, line)), None)
        if line is None:
            raise RuntimeError(f"the timed add logged no line like {pattern!r}")
        stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        starts.append(stamp.timestamp())
    return [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]


def rebuild_aim(lines: list[tuple[float, str]], at: float) -> tuple[str | None, float]:
    """Where a rebuild kill at ``at`` seconds of the timed run (``lines``) falls, as the line
    its delay counts from and the delay: the ``--- stage X`` line that started the stage
    it falls in (so a stage done faster or slower than in the timed run does not move the
    kill out of the stage it aims at), or None (the first line) before the first stage."""
    anchor, t_anchor = None, lines[0][0]
    for t, line in lines:
        if t > at:
            break
        if re.match(r"--- stage [\w.-]+$", line.strip()):
            anchor, t_anchor = f"^{re.escape(line.strip())}$", t
    return anchor, at - t_anchor


def add_stage(log_text: str) -> str | None:
    """The :data:`ADD_STAGES` stage an ``add`` whose output is ``log_text`` was in at its end
    (None: before its first stage line)."""
    stage = None
    for pattern, following in ADD_STAGES:
        if re.search(pattern, log_text):
            stage = following
    return stage


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
               add_copies: int = 20, log: Any = None) -> dict[str, Any]:
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
        add_copies: an ``add`` appends the world's catalog this many times over.
        log: called with one line of text per kill (e.g. ``print``), or None.

    Returns:
        ``{"command", "duration_s" (the timed run), "startup_s" and "work_s" (its start-up
        and the rest), "rows" (an add's), "kills": [KillRecord as dict], "ok"}``.
    """
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, got {command!r}")
    if add_copies < 1:
        raise ValueError(f"add_copies must be >= 1, got {add_copies}")
    out.mkdir(parents=True, exist_ok=True)
    world, config, photos = make_world(out, skus, seed)
    root, logs = out / "root", out / "logs"
    logs.mkdir(exist_ok=True)
    rows = (world / "catalog.jsonl").read_text().splitlines()
    # Beside the world's catalog: its image paths are relative to the manifest's folder.
    add_catalog = world / f"add-catalog-x{add_copies}.jsonl"
    add_catalog.write_text("".join(f"{r}\n" for r in rows * add_copies))

    if command == "add" and not (root / "CURRENT").is_file():
        rc, _, _ = run_command(index_command(
            "rebuild", "--catalog", str(world / "catalog.jsonl"), "--root", str(root),
            "--work", str(out / "work-add"), "--config", str(config)), logs / "add-base.log")
        if rc != 0:
            raise RuntimeError(f"the base rebuild failed: see {logs / 'add-base.log'}")
    base = (root / "CURRENT").read_text().strip() if command == "add" else None

    def argv(i: int) -> list[str]:
        if command == "rebuild":
            return index_command("rebuild", "--catalog", str(world / "catalog.jsonl"),
                                 "--root", str(root), "--work", str(out / f"work-{i}"),
                                 "--config", str(config))
        return index_command("add", "--root", str(root), "--catalog", str(add_catalog),
                             "--version", str(base), "--quiet")

    rc, duration, lines = run_command(argv(0), logs / f"{command}-timed.log")
    if rc != 0:
        raise RuntimeError(f"the timed {command} failed ({rc}): see "
                           f"{logs / f'{command}-timed.log'}")
    active, verified, answers = probe(root, photos)
    if not verified or active is None:
        raise RuntimeError(f"the timed {command} left no servable version in {root}")
    logged = [t for t, line in lines if _LOGGER.match(line)]
    if not logged:
        raise RuntimeError(f"the timed {command} logged nothing: no end of start-up to time "
                           "the kills from")
    startup = lines[0][0]
    work = logged[-1] - startup
    # Drawn before any kill: the same seed kills at the same offsets of the work.
    fractions = np.random.default_rng([seed, COMMANDS.index(command)]).random(kills)
    # (aimed stage, the line its delay counts from, the delay)
    aims: list[tuple[str | None, str | None, float]]
    if command == "add":
        spans = add_spans(lines)
        aims = [(ADD_STAGES[i % len(spans)][1], ADD_STAGES[i % len(spans)][0],
                 float(f * spans[i % len(spans)])) for i, f in enumerate(fractions)]
    else:
        aims = [(None, *rebuild_aim(lines, startup + f * work)) for f in fractions]
    records: list[KillRecord] = []
    for i, (aimed, kill_from, delay) in enumerate(aims):
        name = f"{command}-{i + 1:02d}"
        rc, _, killed_lines = run_command(argv(i + 1), logs / f"{name}-killed.log",
                                          kill_after=delay, kill_from=kill_from)
        killed_startup = killed_lines[0][0] if killed_lines else None
        text = (logs / f"{name}-killed.log").read_text(errors="replace")
        if command == "rebuild":
            # "--- stage X" starts a stage, "--- stage X: done in ..." ends it
            stages = [f"after {n}" if end else n for n, end in _STAGE.findall(text)]
        else:
            stages = [s for s in [add_stage(text)] if s is not None]
        after, ok_after, answers_after = probe(root, photos)
        same = answers_after == answers if after == active else None
        rerun_rc, rerun_s, _ = run_command(argv(i + 1), logs / f"{name}-rerun.log")
        final, final_ok, final_answers = probe(root, photos)
        record = KillRecord(
            command=command, kill=i,
            startup_s=None if killed_startup is None else round(killed_startup, 2),
            aimed=aimed,
            delay_s=round(delay, 3), returncode=rc,
            stage=stages[-1] if stages else None, active_before=active, active_after=after,
            verified=ok_after, same_results=same, rerun_returncode=rerun_rc,
            rerun_s=round(rerun_s, 2), final=final, final_verified=final_ok,
            staging_left=len(list(root.glob(".staging-*"))))
        records.append(record)
        if log is not None:
            aim = (f"{delay:.3f} s after the start of {aimed}" if aimed
                   else f"{delay:.2f} s into {work:.1f} s of work")
            log(f"{name}: kill {aim}, after {record.startup_s} s of start-up (rc {rc}, "
                f"landed in {record.stage}): active "
                f"{after} verified {ok_after}, same answers {same}; re-run rc {rerun_rc} in "
                f"{rerun_s:.1f} s -> {final} verified {final_ok}: "
                f"{'ok' if record.ok else 'FAILED'}")
        if final is not None and final_answers is not None:
            active, answers = final, final_answers
    return {"command": command, "duration_s": round(duration, 2),
            "startup_s": round(startup, 2), "work_s": round(work, 2),
            "rows": len(rows) * add_copies if command == "add" else None,
            "kills": [{**asdict(r), "ok": r.ok} for r in records],
            "ok": all(r.ok for r in records)}


def summarise(report: dict[str, Any]) -> str:
    """One line: kills that landed, where, and the checks that passed."""
    kills = report["kills"]
    landed = sum(k["returncode"] == -9 for k in kills)
    stages = Counter(k["stage"] or "(no stage line)" for k in kills if k["returncode"] == -9)
    return (f"{report['command']}: {len(kills)} kills over the {report['work_s']:.1f} s of work "
            f"after {report['startup_s']:.1f} s of start-up, "
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
    p.add_argument("--add-copies", type=int, default=20,
                   help="an add appends the world's catalog this many times over")
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
                            skus=args.skus, add_copies=args.add_copies,
                            log=lambda s: print(s, flush=True))
        reports.append(report)
    for report in reports:
        print(summarise(report))
    ok = all(r["ok"] for r in reports)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"seed": args.seed, "skus": args.skus,
                                         "add_copies": args.add_copies, "machine": m,
                                         "reports": reports, "ok": ok}, indent=2))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.crash", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
