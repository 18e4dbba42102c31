"""``make demo``: the whole system end to end on a synthetic world, on this machine's CPU.

Steps: generate a world -> ingest the catalog into the store -> draw a contact sheet.
(Later steps join as their subsystems land: the offline pipeline, the server, the recall
and latency reports.) Everything is written under ``--out``; re-running reuses what is
already there and up to date.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _run(step: str, cmd: list[str]) -> float:
    """Run one CLI step, echoing it; exit on failure. Returns seconds taken."""
    print(f"\n==> {step}\n    $ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    result = subprocess.run(cmd)
    if result.returncode != 0:
        print(f"demo: step '{step}' failed (exit {result.returncode})", file=sys.stderr)
        sys.exit(result.returncode)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--skus", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    out: Path = args.out
    world = out / "world"
    timings: dict[str, float] = {}

    if not (world / "world.json").is_file():
        timings["world"] = _run(
            "generate the synthetic world",
            [str(BIN / "visearch-synth"), "--out", str(world), "--skus", str(args.skus),
             "--seed", str(args.seed), "--workers", str(args.workers), "-q"],
        )
    timings["ingest"] = _run(
        "ingest the catalog into the image store",
        [str(BIN / "visearch-index"), "ingest", "--catalog", str(world / "catalog.jsonl"),
         "--store", str(out / "store")],
    )
    timings["sheet"] = _run(
        "draw a contact sheet",
        [str(BIN / "visearch-synth"), "sheet", "--world", str(world),
         "--out", str(out / "contact_sheet.png")],
    )
    print("\n== demo summary")
    for step, seconds in timings.items():
        print(f"  {step:<10} {seconds:7.1f} s")
    print(f"  world:         {world}")
    print(f"  contact sheet: {out / 'contact_sheet.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
