"""Model throughput: detector and embedder images/s, torch vs ONNX Runtime, fp32 vs fp16.

One cell per (model, runtime, dtype, batch size), each timed through the public inference
path on seeded random ``uint8`` images (user photos ``--photo-size`` square for the detector,
crops of about ``--crop-size`` for the embedder), after ``--warmup`` batches, for about
``--seconds`` of wall time (at least one batch). The baseline, measured in the same run, is
torch fp32 at the same batch size; each cell's ratio to it is printed beside it.

What each cell runs:

- embedder, torch fp32: ``visearch.embedding.embed_arrays`` on the CPU; on CUDA
  ``crops_to_batch`` + ``Embedder.forward`` with channels_last, because on CUDA
  ``embed_arrays`` always runs in fp16 autocast;
- embedder, torch fp16 (CUDA only): ``embed_arrays`` (its own fp16 autocast with
  channels_last: the serving path);
- embedder, onnx: ``OrtEmbedder.embed_arrays``;
- detector, torch: ``ProductDetector.detect`` on the device; fp16 is ``torch.autocast("cuda",
  float16)`` around it (``model.half()`` would not do: torchvision's transform builds its
  normalisation tensors in the input's float32);
- detector, onnx: ``OrtDetector.detect`` (transform, anchors, decoding and NMS in torch on the
  CPU around the ORT session);
- onnx fp16: the fp32 graph converted by ``onnxruntime.transformers.float16.
  convert_float_to_float16(keep_io_types=True)``, so inputs and outputs stay float32.

fp16 runs only on CUDA (CPU cells say n/a). Models come from an index version
(``--index-root``; its ONNX files when it has them, else exported here) or are built fresh
with ``index_builder/config.py``'s defaults (ImageNet weights from ``weights/`` when present,
else random: throughput does not depend on the weights) and exported here. ONNX Runtime
providers are ``choose_providers(device)`` without TensorRT unless ``--tensorrt`` (its engine
builds, one per new input shape, take minutes); each row lists the providers the session
actually got, since ORT falls back to the CPU silently. A cell that fails records its error
and the run goes on.

    python -m benchmarks.bench_models --device cuda --json out/bench_models.json
    python -m benchmarks.bench_models --device cpu --batch-sizes 1,32 --dtypes fp32 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.machine import machine

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "weights" / "mobilenet_v2-b0353104.pth"
MODELS = ("detector", "embedder")
RUNTIMES = ("torch", "onnx")
DTYPES = ("fp32", "fp16")


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def _machine(device: str) -> dict[str, Any]:
    """``benchmarks.machine.machine`` (it describes a machine without faiss too), plus the
    onnxruntime providers and the device benchmarked."""
    info = machine(["onnxruntime"])
    try:
        import onnxruntime as ort

        info["ort_providers"] = ort.get_available_providers()
    except Exception as e:
        info["onnxruntime"] = f"unavailable ({_err(e)})"
    info["device"] = device
    return info


# ------------------------------------------------------------------------------ models
class Models:
    """The two models on the CPU (masters that cells copy), their fp32 ONNX files (or why
    there are none) and where they came from."""

    def __init__(self) -> None:
        self.embedder: Any = None
        self.detector: Any = None
        self.onnx: dict[str, Path | None] = {"embedder": None, "detector": None}
        self.errors: dict[str, str] = {}
        self.source = ""


def _fresh_models(args: argparse.Namespace, models: Models) -> None:
    from index_builder.config import DetectorConfig, EmbedderConfig
    from visearch.detection.model import build_detector
    from visearch.embedding import build_embedder

    ecfg, dcfg = EmbedderConfig(), DetectorConfig()
    e_backbone = args.embedder_backbone or ecfg.backbone
    d_backbone = args.detector_backbone or dcfg.backbone
    e_weights = WEIGHTS if e_backbone == "mobilenet_v2" and WEIGHTS.is_file() else None
    d_weights = WEIGHTS if d_backbone == "mobilenet_v2_fpn" and WEIGHTS.is_file() else None
    size = args.detector_size or dcfg.min_size
    max_size = size if args.detector_size else dcfg.max_size
    try:
        models.embedder = build_embedder(
            e_backbone, dim=args.embedder_dim or ecfg.dim, pooling=ecfg.pooling,
            attention=ecfg.attention, pretrained=e_weights,
            input_size=args.embedder_size or ecfg.image_size).eval()
    except Exception as e:
        models.errors["embedder"] = _err(e)
    try:
        models.detector = build_detector(
            d_backbone, ["main", "other"], min_size=size, max_size=max_size,
            backbone_weights=d_weights).eval()
    except Exception as e:
        models.errors["detector"] = _err(e)
    models.source = (f"fresh: embedder {e_backbone} "
                     f"({'ImageNet weights' if e_weights else 'random init'}), detector "
                     f"{d_backbone} ({'ImageNet backbone' if d_weights else 'random init'})")


def _index_models(root: Path, models: Models) -> None:
    from visearch.detection.model import load_detector
    from visearch.embedding import load_embedder
    from visearch.index import IndexRoot

    version = IndexRoot(root).open()
    models.source = f"index version {version.path}"
    try:
        models.embedder = load_embedder(version.embedder_path)
    except Exception as e:
        models.errors["embedder"] = _err(e)
    try:
        path = version.detector_path
        if path is None:
            models.errors["detector"] = "the index version ships no detector"
        else:
            models.detector = load_detector(path)
    except Exception as e:
        models.errors["detector"] = _err(e)
    for name in MODELS:
        try:
            models.onnx[name] = version.onnx_path(name)
        except Exception as e:  # corrupt or missing file: export it here instead
            print(f"  {name}: the version's ONNX file is unusable ({_err(e)}); exporting",
                  flush=True)


def _export_missing(models: Models, work: Path) -> dict[str, str]:
    """Export each model that has no ONNX file yet; returns ``{model: error}``."""
    errors: dict[str, str] = {}
    for name in MODELS:
        model = getattr(models, name)
        if model is None or models.onnx[name] is not None:
            continue
        try:
            from visearch.runtime import onnx as rt

            dest = work / f"{name}.onnx"
            t0 = time.perf_counter()
            export = rt.export_embedder if name == "embedder" else rt.export_detector
            exporter = export(model, dest)
            models.onnx[name] = dest
            print(f"  exported the {name} to ONNX ({exporter}) in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as e:
            errors[name] = f"ONNX export failed: {_err(e)}"
    return errors


def _fp16_graph(src: Path, work: Path) -> Path:
    """The fp32 graph ``src`` converted to fp16 weights and activations, float32 I/O."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    dest = work / f"{src.stem}.fp16.onnx"
    if not dest.is_file():
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        onnx.save(model, str(dest))
    return dest


# ------------------------------------------------------------------------------ images
def photos(n: int, size: int, seed: int) -> list[np.ndarray]:
    """``n`` seeded RGB ``uint8 [size, size, 3]`` noise photos with a few flat blobs."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        for _ in range(3):
            y, x = (int(v) for v in rng.integers(0, size // 2, 2))
            img[y : y + size // 3, x : x + size // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
        out.append(img)
    return out


def crops(n: int, size: int, seed: int) -> list[np.ndarray]:
    """``n`` seeded RGB ``uint8`` crops of about ``size`` (each side 0.8-1.2 x ``size``)."""
    rng = np.random.default_rng(seed)
    lo, hi = max(1, int(size * 0.8)), max(2, int(size * 1.2) + 1)
    return [rng.integers(0, 256, (int(rng.integers(lo, hi)), int(rng.integers(lo, hi)), 3),
                         dtype=np.uint8) for _ in range(n)]


# ------------------------------------------------------------------------------ cells
def _runner(
    models: Models, name: str, runtime: str, dtype: str, dev: torch.device,
    providers: list[str], threads: int | None, work: Path, cache: dict[str, Any],
) -> tuple[Callable[[list[np.ndarray], int], Any], str, list[str] | None]:
    """``(run(images, batch), path in words, ORT providers in use or None)`` for one cell;
    raises when the cell cannot run."""
    cuda = dev.type == "cuda"
    if runtime == "torch":
        key = f"torch-{name}"
        if key not in cache:
            cache[key] = copy.deepcopy(getattr(models, name)).to(dev).eval()
        model = cache[key]
        autocast = (torch.autocast("cuda", dtype=torch.float16) if dtype == "fp16"
                    else contextlib.nullcontext())
        if name == "embedder":
            if dtype == "fp16" or not cuda:
                from visearch.embedding import embed_arrays

                path = "embed_arrays" + (" (fp16 autocast, channels_last)" if cuda else "")
                return (lambda ims, b: embed_arrays(model, ims, batch_size=b, device=dev),
                        path, None)
            from visearch.embedding import model_transform
            from visearch.embedding.infer import crops_to_batch

            transform = model_transform(model)
            fmt = torch.channels_last  # as embed_arrays on CUDA: only the dtype differs
            model.to(memory_format=fmt)

            def run_embed(ims: list[np.ndarray], b: int) -> np.ndarray:
                with torch.inference_mode():
                    x = crops_to_batch(transform, ims).to(dev).contiguous(memory_format=fmt)
                    return model(x).cpu().numpy()

            return run_embed, "crops_to_batch + Embedder.forward (fp32, channels_last)", None

        def run_detect(ims: list[np.ndarray], b: int) -> Any:
            with autocast:
                return model.detect(ims, batch_size=b)

        path = "ProductDetector.detect" + (" under fp16 autocast" if dtype == "fp16" else "")
        return run_detect, path, None
    # onnx
    from visearch.runtime.onnx import OrtDetector, OrtEmbedder

    src = models.onnx[name]
    if src is None:
        raise RuntimeError("no ONNX file")
    key = f"onnx-{name}-{dtype}"
    if key not in cache:
        graph = _fp16_graph(src, work) if dtype == "fp16" else src
        if name == "embedder":
            cache[key] = OrtEmbedder(graph, models.embedder.config, providers=providers,
                                     intra_op_threads=threads)
        else:  # OrtDetector moves its detector to the CPU: give it its own copy
            cache[key] = OrtDetector(graph, copy.deepcopy(models.detector), providers=providers,
                                     intra_op_threads=threads)
    runner = cache[key]
    used = list(runner.session.get_providers())
    if name == "embedder":
        return (lambda ims, b: runner.embed_arrays(ims, batch_size=b),
                "OrtEmbedder.embed_arrays", used)
    return lambda ims, b: runner.detect(ims, batch_size=b), "OrtDetector.detect", used


def time_cell(
    run: Callable[[list[np.ndarray], int], Any], images: list[np.ndarray], batch: int, *,
    seconds: float, warmup: int, sync: Callable[[], None],
) -> dict[str, float]:
    """Run ``run(images[:batch], batch)`` ``warmup`` times, then repeatedly for ``seconds``
    (at least once, ``sync`` after each); returns images/s and ms per batch."""
    chunk = images[:batch]
    for _ in range(warmup):
        run(chunk, batch)
    sync()
    batches = 0
    t0 = time.perf_counter()
    while True:
        run(chunk, batch)
        sync()
        batches += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    return {"images_per_s": batches * batch / elapsed, "ms_per_batch": 1000 * elapsed / batches,
            "batches": batches, "seconds": elapsed}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from visearch.device import choose_device

    dev = choose_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_models_"))
    work.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    wanted_models = [m for m in args.models.split(",") if m]
    runtimes = [r for r in args.runtimes.split(",") if r]
    dtypes = [d for d in args.dtypes.split(",") if d]
    for given, valid in ((wanted_models, MODELS), (runtimes, RUNTIMES), (dtypes, DTYPES)):
        bad = sorted(set(given) - set(valid))
        if bad:
            raise ValueError(f"unknown {bad}; choose from {list(valid)}")

    models = Models()
    print("loading models ...", flush=True)
    if args.index_root:
        _index_models(Path(args.index_root), models)
    else:
        _fresh_models(args, models)
    onnx_errors: dict[str, str] = {}
    if "onnx" in runtimes:
        onnx_errors = _export_missing(models, work)
    providers: list[str] = []
    if "onnx" in runtimes:
        try:
            from visearch.runtime.onnx import choose_providers

            providers = [p for p in choose_providers(dev)
                         if args.tensorrt or p != "TensorrtExecutionProvider"]
        except Exception as e:  # no onnxruntime: every onnx cell says so
            for name in MODELS:
                onnx_errors.setdefault(name, f"onnxruntime unavailable: {_err(e)}")

    images = {"detector": photos(max(batches), args.photo_size, args.seed),
              "embedder": crops(max(batches), args.crop_size, args.seed + 1)}
    rows: list[dict[str, Any]] = []
    cache: dict[str, Any] = {}
    for name in wanted_models:
        for runtime in runtimes:
            for dtype in dtypes:
                for batch in batches:
                    row: dict[str, Any] = {"model": name, "runtime": runtime, "dtype": dtype,
                                           "batch": batch, "device": str(dev),
                                           "images_per_s": None, "ms_per_batch": None,
                                           "providers": None, "path": None, "error": None}
                    rows.append(row)
                    if dtype == "fp16" and dev.type != "cuda":
                        row["error"] = "n/a (fp16 runs on CUDA only)"
                        continue
                    if getattr(models, name) is None:
                        row["error"] = models.errors.get(name, "no model")
                        continue
                    if runtime == "onnx" and name in onnx_errors:
                        row["error"] = onnx_errors[name]
                        continue
                    try:
                        run, row["path"], row["providers"] = _runner(
                            models, name, runtime, dtype, dev, providers, args.threads, work,
                            cache)
                        row.update(time_cell(run, images[name], batch, seconds=args.seconds,
                                             warmup=args.warmup, sync=sync))
                        if (dev.type == "cuda" and row["providers"] is not None
                                and not any(p != "CPUExecutionProvider"
                                            for p in row["providers"])):
                            row["note"] = "ORT fell back to the CPU provider"
                    except Exception as e:
                        row["error"] = _err(e)
                    _print_progress(row)
                    if dev.type == "cuda":
                        with contextlib.suppress(Exception):
                            torch.cuda.empty_cache()
    _add_ratios(rows)
    return {
        "benchmark": "bench_models",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": _machine(str(dev)),
        "source": models.source,
        "onnx_files": {k: str(v) if v else None for k, v in models.onnx.items()},
        "settings": {"seconds": args.seconds, "warmup": args.warmup, "batches": batches,
                     "photo_size": args.photo_size, "crop_size": args.crop_size,
                     "threads": args.threads, "ort_providers_asked": providers,
                     "seed": args.seed},
        "rows": rows,
    }


def _print_progress(row: dict[str, Any]) -> None:
    what = f"  {row['model']:8s} {row['runtime']:5s} {row['dtype']} b={row['batch']:<3d}"
    if row["error"]:
        print(f"{what} error: {row['error']}", flush=True)
    else:
        print(f"{what} {row['images_per_s']:9.1f} img/s  {row['ms_per_batch']:8.2f} ms/batch",
              flush=True)


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    base = {(r["model"], r["batch"]): r["images_per_s"] for r in rows
            if r["runtime"] == "torch" and r["dtype"] == "fp32" and r["images_per_s"]}
    for r in rows:
        ref = base.get((r["model"], r["batch"]))
        r["vs_torch_fp32"] = (r["images_per_s"] / ref if ref and r["images_per_s"] else None)


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table, with the machine and the model source above it."""
    m = report["machine"]
    lines = [
        f"Model throughput ({report['date']}), device {m.get('device')}"
        f"{' (' + m['gpu'] + ')' if m.get('gpu') else ''}, torch {m.get('torch')}, "
        f"onnxruntime {m.get('onnxruntime')}, torch threads {m.get('torch_threads')}; "
        f"{report['source']}.",
        "",
        "| model | runtime | dtype | batch | images/s | ms/batch | vs torch fp32 | path / note |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        if r["error"]:
            lines.append(f"| {r['model']} | {r['runtime']} | {r['dtype']} | {r['batch']} | "
                         f"n/a | n/a | | {r['error'].replace('|', '/')[:160]} |")
            continue
        ratio = f"{r['vs_torch_fp32']:.2f}x" if r.get("vs_torch_fp32") else ""
        note = r["path"] or ""
        if r.get("providers"):
            note += f" [{', '.join(p.replace('ExecutionProvider', '') for p in r['providers'])}]"
        if r.get("note"):
            note += f"; {r['note']}"
        lines.append(f"| {r['model']} | {r['runtime']} | {r['dtype']} | {r['batch']} | "
                     f"{r['images_per_s']:.1f} | {r['ms_per_batch']:.2f} | {ratio} | {note} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_models",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--index-root", type=Path,
                   help="take the models (and ONNX files) from this root's active version")
    p.add_argument("--models", default="detector,embedder")
    p.add_argument("--runtimes", default="torch,onnx")
    p.add_argument("--dtypes", default="fp32,fp16")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per cell")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches per cell")
    p.add_argument("--photo-size", type=int, default=256, help="detector input photos (px)")
    p.add_argument("--crop-size", type=int, default=96, help="embedder input crops (px, about)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads and ORT intra-op threads (default: each's own)")
    p.add_argument("--tensorrt", action="store_true",
                   help="let ORT use TensorRT when offered (builds an engine per shape)")
    p.add_argument("--work", type=Path, help="where exported ONNX files go (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    fresh = p.add_argument_group("fresh models (no --index-root; defaults: index_builder "
                                 "config's)")
    fresh.add_argument("--embedder-backbone")
    fresh.add_argument("--embedder-dim", type=int)
    fresh.add_argument("--embedder-size", type=int, help="embedder input side (px)")
    fresh.add_argument("--detector-backbone")
    fresh.add_argument("--detector-size", type=int, help="detector min_size (px)")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--md", type=Path, help="write the markdown table here")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its table; returns the report (``rows``: one dict per cell)."""
    args = build_parser().parse_args(argv)
    report = run_benchmark(args)
    table = markdown(report)
    print()
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(table + "\n")
    return report


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # e.g. --device cuda on a machine without a GPU
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
