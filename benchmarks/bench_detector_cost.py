"""Detector cost: main-object hit rate against CPU latency, per backbone and input size.

    python -m benchmarks.bench_detector_cost --work /tmp/demo17/work --world /tmp/demo17/world \
        --out runs/detector_cost --threads 1 --json runs/detector_cost/report.json

Each variant ``BACKBONE@SIZE`` (``min_size = max_size = SIZE``) is trained exactly as
``visearch-index rebuild`` trains the detector (``index_builder.cmd_rebuild.detector_params``
on the rebuild config found in ``--work``, then ``train_detector_on_coco`` on the main-vs-other
COCO files ``<work>/detector_inputs/{train,val}_main.json`` with ``--images-root``
``<work>/scenes``, the same epochs, batch, learning rate and seed). The config's own variant
reuses ``<work>/detector/detector.pt`` (the rebuild's, its training seconds from
``done.json``) unless ``--retrain-default``.

Measured on the world's user photos (``queries.jsonl``, one ground-truth box each):
- main-object hit rate: the main object as the search picks it (``select_main_object`` at
  ``MAIN_SCORE_THRESH``, batch 1) has IoU >= 0.5 with the ground truth; torch and ONNX Runtime
  (they should agree; both are printed);
- ms per image at batch 1 on the CPU (decode excluded; transform, network, decoding and NMS
  included): ``ProductDetector.detect`` in torch and ``OrtDetector.detect`` (the exported
  ``detector.onnx``), at each of ``--latency-threads`` (torch threads = ORT intra-op threads).
  Variants are timed in interleaved rounds so a load change hits them all; p50 over all rounds.
  The load average before and after is printed: on a shared machine the figures are only
  comparable within one run.

Trained variants are kept under ``--out/<variant>/``; a rerun reuses them (``--train-budget-s``
stops starting new trainings after that many seconds, so a partial sweep still reports).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.machine import machine
from index_builder.cmd_detector import train_detector_on_coco
from index_builder.cmd_rebuild import detector_params
from index_builder.config import load_config
from visearch.catalog import read_manifest
from visearch.detection.evaluate import main_object_hit_rate
from visearch.detection.main_object import MAIN_SCORE_THRESH, select_main_object
from visearch.detection.model import DETECTOR_BACKBONES, ProductDetector, load_detector
from visearch.imageio import decode_image

DEFAULT_VARIANTS = ("mobilenet_v2_fpn@96,mobilenet_v2_fpn@64,mobilenet_v2_fpn@128,"
                    "tiny_fpn@96,resnet18_fpn@96")


@dataclasses.dataclass(frozen=True)
class Variant:
    backbone: str
    size: int  # min_size = max_size, px

    @property
    def name(self) -> str:
        return f"{self.backbone}@{self.size}"


def parse_variants(text: str) -> list[Variant]:
    """``"a@96,b@64"`` -> variants; backbones are checked against ``DETECTOR_BACKBONES``."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        backbone, _, size = item.partition("@")
        DETECTOR_BACKBONES.get(backbone)  # raises with the valid names
        if not size.isdigit() or int(size) < 32:
            raise ValueError(f"variant {item!r}: want BACKBONE@SIZE with SIZE >= 32 px")
        out.append(Variant(backbone, int(size)))
    return out


def train_variant(v: Variant, args: argparse.Namespace, cfg: Any) -> tuple[Path, dict]:
    """Train (or reuse) ``v``'s detector as the rebuild would; returns its file and a record
    ``{"train_s", "source", "val_map50"}``."""
    d = cfg.detector
    default = (v.backbone == d.backbone and v.size == d.min_size == d.max_size)
    reused = args.work / "detector" / "detector.pt"
    if default and not args.retrain_default and reused.is_file():
        done = json.loads((args.work / "detector" / "done.json").read_text())
        hist = json.loads((args.work / "detector" / "history.json").read_text())
        return reused, {"train_s": done.get("seconds"), "val_map50": hist[-1].get("map50"),
                        "source": f"reused {reused} (the rebuild's, its own threads)"}
    out = args.out / v.name
    record_path = out / "train_record.json"
    if (out / "detector.pt").is_file() and record_path.is_file():
        return out / "detector.pt", json.loads(record_path.read_text())
    vcfg = dataclasses.replace(cfg, detector=dataclasses.replace(
        d, backbone=v.backbone, min_size=v.size, max_size=v.size))
    epochs = cfg.scenes.detector_epochs or d.epochs  # catalog-scene source, as the rebuild
    params = dataclasses.replace(detector_params(vcfg, epochs=epochs), threads=args.threads,
                                 progress=False)
    inputs = args.work / "detector_inputs"
    val = inputs / "val_main.json"
    print(f"--- training {v.name}: {params}", flush=True)
    result = train_detector_on_coco(inputs / "train_main.json", out, params,
                                    val=val if val.is_file() else None,
                                    images_root=args.work / "scenes")
    record = {"train_s": round(result.seconds, 1),
              "val_map50": result.history[-1].get("map50") if result.history else None,
              "source": f"trained here, {params.threads} torch thread(s), {epochs} epochs"}
    record_path.write_text(json.dumps(record, indent=1))
    return result.detector_path, record


def hit_rate(detect: Any, images: list[np.ndarray], gt: np.ndarray) -> float:
    """Main-object hit rate (IoU >= 0.5) with the search's rule, one image per call."""
    pred = []
    for im in images:
        dets = detect([im], batch_size=1)[0]
        pred.append(select_main_object(dets, im.shape, score_thresh=MAIN_SCORE_THRESH).box)
    return main_object_hit_rate(np.asarray(pred, np.float32), gt)


def _time_once(detect: Any, images: list[np.ndarray], threads: int) -> list[float]:
    torch.set_num_threads(threads)
    for im in images[:5]:  # warm-up
        detect([im], batch_size=1)
    ms = []
    for im in images:
        t0 = time.perf_counter()
        detect([im], batch_size=1)
        ms.append(1000 * (time.perf_counter() - t0))
    return ms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True,
                    help="a finished rebuild's work directory (config.json, scenes/, "
                         "detector_inputs/, detector/)")
    ap.add_argument("--world", type=Path, required=True, help="holds queries.jsonl")
    ap.add_argument("--out", type=Path, default=Path("runs/detector_cost"))
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="BACKBONE@SIZE,... in priority order (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training")
    ap.add_argument("--latency-threads", default="1,2", help="thread counts to time")
    ap.add_argument("--latency-images", type=int, default=100,
                    help="user photos timed per round and variant")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--train-budget-s", type=float, default=None,
                    help="start no new training after this many seconds")
    ap.add_argument("--no-train", action="store_true",
                    help="only variants already trained (or reused)")
    ap.add_argument("--retrain-default", action="store_true",
                    help="train the config's own variant too instead of reusing the rebuild's")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)
    args.work, args.out = args.work.resolve(), args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        variants = parse_variants(args.variants)
    except (KeyError, ValueError) as exc:
        ap.error(str(exc))
    lat_threads = [int(t) for t in args.latency_threads.split(",") if t]
    cfg_path = args.work / "config.json"
    cfg = load_config(cfg_path if cfg_path.is_file() else None)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    rows = [r for r in read_manifest(args.world / "queries.jsonl").rows if r.bbox is not None]
    images = [decode_image(r.path) for r in rows]
    gt = np.asarray([r.bbox for r in rows], np.float32)

    from visearch.runtime.onnx import OrtDetector, export_detector

    trained: list[tuple[Variant, ProductDetector, dict, Path]] = []
    for v in variants:
        out = args.out / v.name
        have = (out / "train_record.json").is_file() or (
            v.backbone == cfg.detector.backbone and v.size == cfg.detector.min_size
            and not args.retrain_default)
        if not have and (args.no_train or (args.train_budget_s is not None and
                                           time.perf_counter() - t_start > args.train_budget_s)):
            print(f"--- {v.name}: not trained (no time left / --no-train), skipped", flush=True)
            continue
        path, record = train_variant(v, args, cfg)
        model = load_detector(path).eval()
        onnx_path = out / "detector.onnx"
        out.mkdir(parents=True, exist_ok=True)
        if not onnx_path.is_file():
            export_detector(model, onnx_path)
        torch.set_num_threads(args.threads)
        record["hit_rate"] = hit_rate(model.detect, images, gt)
        ort = OrtDetector(onnx_path, model, providers=["CPUExecutionProvider"],
                          intra_op_threads=args.threads)
        record["hit_rate_ort"] = hit_rate(ort.detect, images, gt)
        record["onnx_bytes"] = onnx_path.stat().st_size
        record["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        print(f"--- {v.name}: hit rate {record['hit_rate']:.3f} (ORT "
              f"{record['hit_rate_ort']:.3f}), train {record['train_s']} s", flush=True)
        trained.append((v, model, record, onnx_path))

    # Latency: interleaved rounds over variants, so a change in the machine's load is shared.
    load_before = os.getloadavg()
    timed = images[: args.latency_images]
    runners: dict[tuple[str, str, int], Any] = {}
    for v, model, _, onnx_path in trained:
        for t in lat_threads:
            runners[(v.name, "torch", t)] = model.detect
            runners[(v.name, "ort", t)] = OrtDetector(
                onnx_path, model, providers=["CPUExecutionProvider"], intra_op_threads=t).detect
    samples: dict[tuple[str, str, int], list[float]] = {k: [] for k in runners}
    for r in range(args.rounds):
        for key, detect in runners.items():
            samples[key].extend(_time_once(detect, timed, key[2]))
        print(f"--- timing round {r + 1}/{args.rounds} done, load {os.getloadavg()}", flush=True)
    load_after = os.getloadavg()
    torch.set_num_threads(args.threads)

    table = []
    for v, _, record, _ in trained:
        row = {"variant": v.name, "backbone": v.backbone, "size": v.size, **record}
        for (name, runtime, t), ms in samples.items():
            if name == v.name:
                row[f"{runtime}_ms_p50_t{t}"] = round(statistics.median(ms), 2)
                row[f"{runtime}_ms_mean_t{t}"] = round(statistics.fmean(ms), 2)
        table.append(row)
    base = next((r for r in table if r["backbone"] == cfg.detector.backbone
                 and r["size"] == cfg.detector.min_size), None)

    measured_on = machine(["onnxruntime"]) | {"date": time.strftime("%Y-%m-%d"),
                                               "loadavg_before": load_before,
                                               "loadavg_after": load_after}
    print(f"\n## Detector cost: hit rate vs CPU latency ({len(images)} user photos of "
          f"{args.world}, batch 1, p50 over {args.rounds} x {len(timed)} calls)\n")
    head = ["variant", "hit rate", "vs default"]
    head += [f"torch ms ({t} thr)" for t in lat_threads]
    head += [f"ORT ms ({t} thr)" for t in lat_threads]
    head += ["train s", "val mAP@.5", "params M"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in table:
        delta = "baseline" if r is base else (
            f"{r['hit_rate'] - base['hit_rate']:+.3f}" if base else "-")
        hit = f"{r['hit_rate']:.3f}"
        if abs(r["hit_rate_ort"] - r["hit_rate"]) > 1e-9:
            hit += f" (ORT {r['hit_rate_ort']:.3f})"
        cells = [r["variant"] + (" (default)" if r is base else ""), hit, delta]
        cells += [f"{r[f'torch_ms_p50_t{t}']:.1f}" for t in lat_threads]
        cells += [f"{r[f'ort_ms_p50_t{t}']:.1f}" for t in lat_threads]
        val = r.get("val_map50")
        cells += [str(r["train_s"]), "-" if val is None else f"{val:.3f}", str(r["params_m"])]
        print("| " + " | ".join(cells) + " |")
    for r in table:
        print(f"- {r['variant']}: {r['source']}")
    print(f"\nload average before/after timing: {load_before} / {load_after}")
    print(f"machine: {measured_on}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": table, "machine": measured_on,
                                         "world": str(args.world), "work": str(args.work),
                                         "threads": args.threads, "rounds": args.rounds,
                                         "latency_images": len(timed)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
