"""``visearch-index cutout`` and ``synth-scenes``: detector and query-domain training data
made from the catalog itself.

A real catalog has shop images and SKUs, never COCO scenes. These two stages turn it into
training data for the detector and for the embedder's query domain:

- ``cutout``: an alpha mask of the product of every catalog row (``visearch.scenes``).
  Writes ``<out>/report.jsonl`` (one status per catalog row, rejected rows included),
  ``<out>/objects.jsonl`` (the usable cut-outs: line, image, sku, category, box, quality,
  png) and ``<out>/png/*.png`` (RGBA, cropped to the product).
- ``synth-scenes``: copy-paste scenes of the cut-outs on backgrounds (user-given photos,
  else procedural), with COCO boxes of each object's visible extent, and detector-like
  crops of each scene's main object. Writes ``<out>/train.json``, ``val.json``,
  ``scenes/``, ``crops.jsonl`` and ``crops/``.

The typed functions :func:`cut_out_catalog` and :func:`synthesize_catalog_scenes` are what
``rebuild`` calls; the subcommands are thin wrappers over them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from index_builder.cmd_index import add_scale_arguments
from index_builder.cmd_ingest import add_store_argument
from visearch.catalog import CatalogRow, read_manifest
from visearch.imageio import image_files
from visearch.parallel import Runner, make_runner
from visearch.store import store_lookup

logger = logging.getLogger(__name__)

REPORT_FILE = "report.jsonl"
OBJECTS_FILE = "objects.jsonl"


@dataclass(frozen=True)
class CutoutSummary:
    """What :func:`cut_out_catalog` did: catalog rows reported, usable cut-outs, and the
    count of each status (``ok``, ``rejected``, ``excluded``, ``low_quality``, ...)."""

    rows: int
    objects: int
    statuses: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary (``cutout`` prints it; ``rebuild`` stores it in done.json)."""
        return {"rows": self.rows, "objects": self.objects, "statuses": dict(self.statuses)}


@dataclass(frozen=True)
class ScenesSummary:
    """What :func:`synthesize_catalog_scenes` made: the library's counts (train/val scenes,
    annotations, crops, background photos used), the objects pasted, and the backgrounds in
    words (``"<n> photo"`` or ``"procedural"``)."""

    counts: dict[str, int]
    objects: int
    background_source: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary (``synth-scenes`` prints it; ``rebuild`` stores it)."""
        return {**self.counts, "objects": self.objects,
                "background_source": self.background_source}


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows),
                    encoding="utf-8")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def cut_out_catalog(
    rows: Sequence[CatalogRow],
    out: Path,
    *,
    rejects: Sequence[Any] = (),
    exclude: Iterable[str] = (),
    min_quality: float = 0.0,
    progress: bool = False,
    runner: Runner | None = None,
) -> CutoutSummary:
    """Cut the product out of every row's image; write the report, objects and PNGs.

    Args:
        rows: catalog rows (``bbox`` optional: a row without one gets the mask's box);
            each image is read from ``row.source`` (the store, for rows read with it).
        out: output folder (created).
        rejects: the manifest reader's rejected rows (``line``, ``reason``): reported with
            status ``"rejected"`` so the report covers every line of the catalog.
        exclude: ``image`` fields not to cut out (dedup's removals), reported as
            ``"excluded"``.
        min_quality: usable cut-outs need at least this quality score (else status
            ``"low_quality"``).
        progress: a progress bar (:func:`visearch.progress.progress_bar`).
        runner: a ``visearch.parallel`` runner (e.g. Ray Data) cutting out shards of rows;
            None: this process. The same files either way.

    Returns:
        The rows reported, usable objects and the count of each status.
    """
    from visearch.progress import progress_bar

    out.mkdir(parents=True, exist_ok=True)
    (out / "png").mkdir(exist_ok=True)
    skip = set(exclude)
    report: list[dict[str, Any]] = [
        {"line": r.line, "image": None, "sku": None, "status": "rejected",
         "reason": str(r.reason), "quality": 0.0, "box": None} for r in rejects
    ]
    objects: list[dict[str, Any]] = []
    cuts = _cut_outs([(r.source, r.bbox) for r in rows if r.image not in skip], runner)
    for row in progress_bar(rows, desc="cut-outs", unit="img", disable=not progress):
        entry: dict[str, Any] = {"line": row.line, "image": row.image, "sku": row.sku}
        if row.image in skip:
            report.append({**entry, "status": "excluded", "reason": "removed by dedup",
                           "quality": 0.0, "box": None})
            continue
        cut = next(cuts)
        status, reason = cut.status, cut.reason
        if cut.ok and cut.quality < min_quality:
            status = "low_quality"
            reason = f"cut-out quality {cut.quality:.3f} is below {min_quality}"
        report.append({**entry, "status": status, "reason": reason,
                       "quality": round(float(cut.quality), 4),
                       "box": list(cut.box) if cut.box is not None else None})
        if status != "ok":
            continue
        assert cut.rgba is not None and cut.box is not None
        png = f"png/{len(objects):06d}.png"
        Image.fromarray(cut.rgba, mode="RGBA").save(out / png)
        objects.append({"line": row.line, "image": row.image, "sku": row.sku,
                        "category": row.category, "box": list(cut.box),
                        "quality": round(float(cut.quality), 4), "png": png})
    report.sort(key=lambda r: r["line"])
    _write_jsonl(out / REPORT_FILE, report)
    _write_jsonl(out / OBJECTS_FILE, objects)
    counts = Counter(r["status"] for r in report)
    not_ok = {s: n for s, n in counts.items() if s != "ok"}
    if not_ok:
        logger.warning("cut-outs: %d of %d rows usable; the others: %s (see %s)",
                       len(objects), len(report), dict(sorted(not_ok.items())),
                       out / REPORT_FILE)
    return CutoutSummary(rows=len(report), objects=len(objects),
                         statuses=dict(sorted(counts.items())))


def _cut_out_shard(todo: list[tuple[Any, Any]]) -> list[Any]:
    """A runner's task: ``cut_out_file`` of each ``(image source, bbox)``. A cut-out depends
    on its image alone (``cut_out`` seeds grabCut's generator itself), so every runner
    writes the same PNGs."""
    from visearch.scenes import cut_out_file

    return [cut_out_file(src, bbox) for src, bbox in todo]


def _cut_outs(todo: list[tuple[Any, Any]], runner: Runner | None) -> Iterator[Any]:
    """The cut-outs of ``todo`` in order: here one by one, or by ``runner`` in shards of 16
    (blocks of 4096 rows, so that memory holds at most a block of RGBA cut-outs)."""
    if runner is None:
        yield from (_cut_out_shard([t])[0] for t in todo)
        return
    for b in range(0, len(todo), 4096):
        block = todo[b:b + 4096]
        for part in runner.map(_cut_out_shard, [block[s:s + 16]
                                                for s in range(0, len(block), 16)]):
            yield from part


def read_cutout_boxes(cutouts: Path) -> dict[str, tuple[float, float, float, float]]:
    """``image`` field -> the product box found by the cut-out, for the usable cut-outs."""
    return {o["image"]: tuple(o["box"]) for o in _read_jsonl(cutouts / OBJECTS_FILE)}


def background_files(folder: Path | None) -> list[Path]:
    """The image files under ``folder`` (recursive, sorted); [] for None."""
    return [] if folder is None else image_files(folder, what="backgrounds folder")


def synthesize_catalog_scenes(
    cutouts: Path,
    out: Path,
    *,
    scenes_per_object: float,
    image_size: int,
    seed: int,
    backgrounds: Sequence[Path] = (),
    max_distractors: int = 3,
    crops_per_scene: int = 1,
    crop_jitter: float = 0.15,
    val_fraction: float = 0.1,
    workers: int = 1,
    progress: bool = False,
    runner: Runner | None = None,
) -> ScenesSummary:
    """Scenes and query-domain crops from the usable cut-outs of :func:`cut_out_catalog`.

    Returns:
        The counts of scenes, annotations and crops, objects, and the background source.
    """
    from visearch.scenes import SceneObject, synthesize_scenes

    entries = _read_jsonl(cutouts / OBJECTS_FILE)
    if not entries:
        raise ValueError(f"no usable product cut-outs in {cutouts} (see its {REPORT_FILE}): "
                         "scenes cannot be made; give COCO annotations or shop images on "
                         "plain backgrounds")
    objects = [
        SceneObject(key=e["image"], sku=e["sku"], category=e["category"],
                    rgba=np.asarray(Image.open(cutouts / e["png"]).convert("RGBA")))
        for e in entries
    ]
    result = synthesize_scenes(
        objects, out, scenes_per_object=scenes_per_object, image_size=image_size, seed=seed,
        backgrounds=list(backgrounds), max_distractors=max_distractors,
        crops_per_scene=crops_per_scene, crop_jitter=crop_jitter, val_fraction=val_fraction,
        workers=workers, progress=progress, runner=runner,
    )
    photos = result.counts.get("backgrounds", 0)
    return ScenesSummary(counts=dict(result.counts), objects=len(objects),
                         background_source=f"{photos} photo" if photos else "procedural")


# -- CLI ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _runner(args: argparse.Namespace) -> Iterator[Runner | None]:
    """The Ray runner ``--ray`` selects, closed afterwards; None: this process (or pool)."""
    runner = make_runner(args.ray, workers=None) if args.ray else None
    try:
        yield runner
    finally:
        if runner is not None:
            runner.close()


def cmd_cutout(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.catalog, strict=not args.lenient,
                             images=store_lookup(args.store))
    with _runner(args) as runner:
        summary = cut_out_catalog(manifest.rows, Path(args.out), rejects=manifest.rejects,
                                  min_quality=args.min_quality, progress=not args.quiet,
                                  runner=runner)
    print(json.dumps({"out": str(args.out), **summary.to_dict()}))
    return 0


def cmd_synth_scenes(args: argparse.Namespace) -> int:
    with _runner(args) as runner:
        summary = synthesize_catalog_scenes(
            Path(args.cutouts), Path(args.out), scenes_per_object=args.scenes_per_object,
            image_size=args.image_size, seed=args.seed,
            backgrounds=background_files(args.backgrounds),
            max_distractors=args.max_distractors, crops_per_scene=args.crops_per_scene,
            crop_jitter=args.crop_jitter, val_fraction=args.val_fraction,
            workers=args.workers, progress=not args.quiet, runner=runner,
        )
    print(json.dumps({"out": str(args.out), **summary.to_dict()}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``cutout`` and ``synth-scenes``."""
    p = sub.add_parser(
        "cutout",
        help="cut the product out of every catalog image (alpha masks, per-row status)",
        description="Estimate each shop image's background from its border, refine the "
        "product mask with OpenCV grabCut, and write RGBA cut-outs with a per-row status "
        "report (rows whose background is not plain are skipped, not guessed).",
    )
    p.add_argument("--catalog", required=True, type=Path, help="catalog.jsonl")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--min-quality", type=float, default=0.0,
                   help="cut-outs below this quality score are not used")
    p.add_argument("--lenient", action="store_true", help="skip (and report) bad catalog rows")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_store_argument(p)
    add_scale_arguments(p)
    p.set_defaults(func=cmd_cutout)

    p = sub.add_parser(
        "synth-scenes",
        help="copy-paste scenes (COCO) and query-domain crops from catalog cut-outs",
        description="Paste the cut-outs of 'visearch-index cutout' onto backgrounds (your "
        "photos, else procedural ones) with scale, rotation, perspective, occlusion, shadow, "
        "light, blur, noise and JPEG; write COCO annotations of each object's visible box "
        "and detector-like crops of each scene's main object.",
    )
    p.add_argument("--cutouts", required=True, type=Path, help="output folder of 'cutout'")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--backgrounds", type=Path,
                   help="a folder of ordinary photos to paste on (default: procedural)")
    p.add_argument("--scenes-per-object", type=float, default=0.5)
    p.add_argument("--image-size", type=int, default=128, help="scene side, px")
    p.add_argument("--max-distractors", type=int, default=3)
    p.add_argument("--crops-per-scene", type=int, default=1)
    p.add_argument("--crop-jitter", type=float, default=0.15)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="rendering processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_scale_arguments(p)
    p.set_defaults(func=cmd_synth_scenes)
