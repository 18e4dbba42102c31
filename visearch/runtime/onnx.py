"""ONNX export of the embedder and the detector, parity checks, and ONNX Runtime inference.

What is exported:

- the embedder whole: ``float32 [B, 3, S, S]`` (the batch :func:`crops_to_batch` makes:
  resized to S = ``config["input_size"]``, normalised) -> ``float32 [B, dim]`` L2-normalised,
  plus one logits output per head when the model has
  :class:`~visearch.embedding.heads.TaskHeads` (``"category"``, ``"attr.<name>"``: the same
  forward pass, so the heads cost the server no second run); preprocessing stays in
  numpy/torch, shared with the torch path;
- the detector's tensor part only (:class:`~visearch.detection.model.HeadMaps`: backbone +
  FPN + head convolutions -> per-level logit and box-regression maps), with dynamic batch,
  height and width. torchvision's transform, anchors, box decoding and NMS keep running in
  torch around the ONNX Runtime outputs (``ProductDetector.detect(head_maps=...)``), so the
  decoded detections are torchvision's own. NMS and anchor generation in ONNX would need
  data-dependent shapes that exporters handle poorly, and they cost little next to the
  convolutions.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based exporter, the
default since torch 2.9, needs ``onnxscript``). It exports both models with dynamic axes on
torch 2.11 (the GPU machine) and 2.14; the legacy TorchScript exporter (``dynamo=False``)
also works on both but is deprecated and warns that it will be removed, so it is only the
fallback when ``torch.export`` fails on a model. The graph is written as one self-contained
file (weights inline, no ``.onnx.data`` side file) so one checksum covers it.

Serving picks execution providers from what ``onnxruntime.get_available_providers()``
offers, best first: TensorRT, CUDA, CPU.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import onnxruntime as ort
import torch

from visearch import fileio
from visearch.embedding.infer import crops_to_batch
from visearch.transforms import eval_transform

if TYPE_CHECKING:
    from visearch.detection.model import Detections, ProductDetector
    from visearch.embedding.model import Embedder

logger = logging.getLogger(__name__)

EMBEDDER_ONNX = "embedder.onnx"
DETECTOR_ONNX = "detector.onnx"
OPSET = 18
#: TensorRT is opt-in (``choose_providers(tensorrt=True)``): it builds an engine for every new
#: input shape on first sight (minutes), which a server taking photos of any size would pay
#: on live requests unless an engine cache and shape profiles are set up.
PROVIDER_ORDER = ("CUDAExecutionProvider", "CPUExecutionProvider")
TENSORRT = "TensorrtExecutionProvider"

# Parity tolerances at export (absolute): float32 reorderings in ORT's fused kernels move
# embeddings by ~1e-7 and logits by ~1e-6 on the models here; 100x headroom.
EMBED_TOL = 1e-4
MAP_TOL = 1e-3  # detector logits / box deltas, which are not normalised
SCORE_TOL = 1e-4
BOX_TOL = 1e-2  # pixels
INT8_MIN_COSINE = 0.98  # int8 embeddings vs float: each vector's cosine, worst case


# ------------------------------------------------------------------------------ sessions
def choose_providers(
    device: str | torch.device | None = None, available: Sequence[str] | None = None, *,
    tensorrt: bool = False,
) -> list[str]:
    """Execution providers, best first, among those onnxruntime offers (``available``,
    default ``onnxruntime.get_available_providers()``). A CPU ``device`` keeps the CPU one;
    ``tensorrt`` puts TensorRT first when offered."""
    offered = list(available if available is not None else ort.get_available_providers())
    wanted = (TENSORRT, *PROVIDER_ORDER) if tensorrt else PROVIDER_ORDER
    if device is not None and torch.device(device).type == "cpu":
        wanted = ("CPUExecutionProvider",)
    chosen = [p for p in wanted if p in offered]
    return chosen or ["CPUExecutionProvider"]


def make_session(
    path: str | os.PathLike[str],
    *,
    providers: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
) -> ort.InferenceSession:
    """An ONNX Runtime session on ``path`` with all graph optimisations.

    Args:
        path: the ``.onnx`` file.
        providers: execution providers, best first; None: :func:`choose_providers`.
        intra_op_threads: threads per operator; None leaves ORT's default (one per physical
            core). Inter-op parallelism is off (sequential graphs, one batch at a time).
    """
    if intra_op_threads is not None and intra_op_threads < 1:
        raise ValueError(f"intra_op_threads must be >= 1 or None, got {intra_op_threads}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if intra_op_threads is not None:
        opts.intra_op_num_threads = int(intra_op_threads)
    chosen = list(providers) if providers is not None else choose_providers()
    session = ort.InferenceSession(os.fspath(path), sess_options=opts, providers=chosen)
    logger.debug("ORT session %s on %s", path, session.get_providers())
    return session


# ------------------------------------------------------------------------------ export
class _EmbedderWithHeads(torch.nn.Module):
    """``Embedder.forward_with_heads`` as a tuple (exporters need a fixed output list):
    ``(embeddings float [B, dim], *logits float [B, C] in heads.names order)``."""

    def __init__(self, model: Embedder) -> None:
        super().__init__()
        self.model = model
        self.names = model.heads.names if model.heads is not None else []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        emb, logits = self.model.forward_with_heads(x)
        return (emb, *[logits[n] for n in self.names])


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    # The exporter's IR passes log every rewrite at INFO; keep the build log readable.
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    output_names: list[str],
    dynamic: dict[int, Any],
    dynamic_names: dict[int, str],
) -> str:
    """Export ``module(example)`` to one self-contained ONNX file, atomically; returns the
    exporter used (``"dynamo"`` or ``"torchscript"``)."""
    try:
        with warnings.catch_warnings(), _quiet_loggers():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, (example,), None, dynamo=True, verbose=False,
                input_names=["images"], output_names=output_names,
                dynamic_shapes=(dynamic,), opset_version=OPSET, optimize=True,
            )
        assert program is not None
        fileio.atomic_write_bytes(path, program.model_proto.SerializeToString())
        return "dynamo"
    except OSError:
        raise
    except Exception as e:  # torch.export could not trace the model: try the legacy exporter
        logger.warning("dynamo ONNX export of %s failed (%s: %s); trying the TorchScript "
                       "exporter", type(module).__name__, type(e).__name__, e)
    axes = {"images": dynamic_names} | {name: {0: "batch"} for name in output_names}
    if len(dynamic_names) > 1:  # detector maps: every spatial axis is dynamic too
        axes |= {name: {0: "batch", 2: f"{name}_h", 3: f"{name}_w"} for name in output_names}
    with fileio.atomic_open(path, "wb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), f, dynamo=False, input_names=["images"],
            output_names=output_names, dynamic_axes=axes, opset_version=17,
        )
    return "torchscript"


def export_embedder(
    model: Embedder, path: str | os.PathLike[str], *, int8: bool = False,
    calibration: np.ndarray | None = None,
) -> str:
    """Export ``model`` (any device; a CPU copy is exported) to ``path``, atomically.

    The graph maps ``images float32 [B, 3, S, S]`` (dynamic B) to ``embeddings float32
    [B, dim]``, L2-normalised, exactly ``Embedder.forward``, and, for a model with heads, to
    one more output per head (``model.heads.names``: logits ``float32 [B, C]``, exactly
    ``Embedder.forward_with_heads``'s). With ``int8``, the written file
    is the int8-quantised graph (:func:`quantize_embedder`; static with ``calibration``,
    else dynamic). Returns the exporter used.
    """
    path = Path(path)
    cpu = copy.deepcopy(model).cpu().eval()
    size = int(cpu.config["input_size"])
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    module: torch.nn.Module = cpu
    names = ["embeddings"]
    if cpu.heads is not None:
        module = _EmbedderWithHeads(cpu).eval()
        names += cpu.heads.names
    exporter = _export(module, example, path, output_names=names, dynamic={0: batch},
                       dynamic_names={0: "batch"})
    if int8:
        quantize_embedder(path, path, calibration=calibration)
    return exporter


def export_detector(model: ProductDetector, path: str | os.PathLike[str]) -> str:
    """Export the detector's tensor part (:class:`~visearch.detection.model.HeadMaps`) to
    ``path``, atomically. Inputs ``images float32 [B, 3, H, W]`` (dynamic B, H, W; H and W
    multiples of 32, as RetinaNet's transform pads them); outputs ``cls0..cls4`` ``float32
    [B, A * K, H_l, W_l]`` and ``reg0..reg4`` ``float32 [B, A * 4, H_l, W_l]``. Returns the
    exporter used."""
    from visearch.detection.model import HeadMaps

    cpu = copy.deepcopy(model).cpu().eval()
    maps = HeadMaps(cpu.retinanet).eval()
    cfg = cpu.config
    h = 32 * -(-int(cfg["min_size"]) // 32)
    w = 32 * -(-int(cfg["max_size"]) // 32)
    # Batch 2 and H != W: torch.export specialises dimensions whose example size is 1 (or
    # equal to another's), which would make them static.
    example = torch.rand(2, 3, h, w + 32 * (h == w), generator=torch.Generator().manual_seed(0))
    levels = len(maps(example)) // 2
    names = [f"cls{i}" for i in range(levels)] + [f"reg{i}" for i in range(levels)]
    dims = {
        0: torch.export.Dim("batch", min=1, max=256),
        2: 32 * torch.export.Dim("h32", min=1, max=256),
        3: 32 * torch.export.Dim("w32", min=1, max=256),
    }
    return _export(maps, example, Path(path), output_names=names, dynamic=dims,
                   dynamic_names={0: "batch", 2: "height", 3: "width"})


def quantize_embedder(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
    calibration: np.ndarray | None = None,
) -> None:
    """int8-quantise an exported embedder with ``onnxruntime.quantization``.

    Without ``calibration``: dynamic quantisation (int8 weights, activations quantised per
    batch at run time). With ``calibration`` (``float32 [N, 3, S, S]`` model inputs):
    static QDQ quantisation, activation ranges from those inputs (faster on CPU, needs
    representative crops). ``dst`` may equal ``src``; it is replaced atomically.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst = Path(dst)
    tmp_pre = dst.with_name(f".{dst.name}.pre-{os.getpid()}.onnx")
    tmp_out = dst.with_name(f".{dst.name}.q-{os.getpid()}.onnx")
    try:
        quant_pre_process(os.fspath(src), os.fspath(tmp_pre), skip_symbolic_shape=True)
        if calibration is None:
            quantize_dynamic(tmp_pre, tmp_out, weight_type=QuantType.QInt8)
        else:
            batches = [{"images": calibration[i : i + 8].astype(np.float32)}
                       for i in range(0, len(calibration), 8)]

            class _Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self._it = iter(batches)

                def get_next(self) -> dict[str, np.ndarray] | None:
                    return next(self._it, None)

            quantize_static(tmp_pre, tmp_out, _Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            per_channel=True)
        fileio.atomic_write_bytes(dst, tmp_out.read_bytes())
    finally:
        tmp_pre.unlink(missing_ok=True)
        tmp_out.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ parity
def embedder_parity(
    model: Embedder, session: ort.InferenceSession, *, batch: int = 4, seed: int = 0
) -> dict[str, float | int]:
    """Embed a seeded ``float32 [batch, 3, S, S]`` input with ``model`` (torch, on the CPU)
    and ``session``; returns ``max_abs_diff`` (over all embedding components) and
    ``min_cosine`` (worst row's cosine between the two embeddings), and for a model with
    heads ``heads_max_abs_diff`` (over every head's logits) and ``heads_argmax_agree`` (the
    share of (row, head) pairs whose top class is the same); a head missing from the
    session's outputs makes ``heads_max_abs_diff`` infinite."""
    cpu = copy.deepcopy(model).cpu().eval()
    size = int(cpu.config["input_size"])
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        ref_t, ref_heads = cpu.forward_with_heads(x)
    ref = ref_t.numpy()
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    out = outputs[0]
    cos = np.sum(ref * out, axis=1) / (
        np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1) + 1e-12)
    result: dict[str, float | int] = {
        "max_abs_diff": float(np.abs(ref - out).max()), "min_cosine": float(cos.min()),
        "batch": batch, "seed": seed}
    if ref_heads:
        got = dict(zip([o.name for o in session.get_outputs()], outputs, strict=True))
        diffs, agree = [], []
        for name, logits in ref_heads.items():
            if name not in got:
                diffs.append(float("inf"))
                continue
            diffs.append(float(np.abs(logits.numpy() - got[name]).max()))
            agree.extend(logits.numpy().argmax(1) == got[name].argmax(1))
        result["heads_max_abs_diff"] = max(diffs)
        result["heads_argmax_agree"] = float(np.mean(agree)) if agree else 0.0
    return result


def _parity_images(model: ProductDetector, seed: int) -> list[np.ndarray]:
    """Two seeded RGB images at the detector's scale: smooth colour blobs on noise."""
    rng = np.random.default_rng(seed)
    side = int(model.config["min_size"])
    images = []
    for h, w in ((side, side * 4 // 3), (side * 3 // 4, side)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for _ in range(4):
            y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            img[y : y + h // 3, x : x + w // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
        images.append(img)
    return images


def detector_parity(
    model: ProductDetector, session: ort.InferenceSession, *, seed: int = 0
) -> dict[str, Any]:
    """Compare the torch detector with ``session`` on two seeded images.

    Returns ``max_abs_diff_maps`` (head logits and box deltas), and over the decoded
    detections: ``detections`` (torch's count), ``same_count``, ``same_labels``,
    ``max_score_diff`` and ``max_box_diff`` (pixels). Detections are compared in their
    (score-descending) order.
    """
    from visearch.detection.model import HeadMaps

    cpu = copy.deepcopy(model).cpu().eval()
    images = _parity_images(cpu, seed)
    runner = _SessionMaps(session)
    tensors = [torch.from_numpy(im.copy()).permute(2, 0, 1).float().div_(255.0) for im in images]
    batch, _ = cpu.retinanet.transform(tensors)
    with torch.inference_mode():
        ref_maps = HeadMaps(cpu.retinanet)(batch.tensors)
    ort_maps = runner(batch.tensors)
    map_diff = max(float((r - o).abs().max()) for r, o in zip(ref_maps, ort_maps, strict=True))
    ref = cpu.detect(images)
    got = cpu.detect(images, head_maps=runner)
    same_count = all(len(a) == len(b) for a, b in zip(ref, got, strict=True))
    report: dict[str, Any] = {
        "max_abs_diff_maps": map_diff,
        "detections": int(sum(len(a) for a in ref)),
        "same_count": bool(same_count),
        "same_labels": False,
        "max_score_diff": None,
        "max_box_diff": None,
        "seed": seed,
    }
    if same_count:
        pairs = [(a, b) for a, b in zip(ref, got, strict=True) if len(a)]
        report["same_labels"] = all(np.array_equal(a.labels, b.labels) for a, b in pairs)
        report["max_score_diff"] = max(
            (float(np.abs(a.scores - b.scores).max()) for a, b in pairs), default=0.0)
        report["max_box_diff"] = max(
            (float(np.abs(a.boxes - b.boxes).max()) for a, b in pairs), default=0.0)
    return report


def _detector_parity_ok(p: Mapping[str, Any]) -> bool:
    return bool(
        p["max_abs_diff_maps"] <= MAP_TOL and p["same_count"] and p["same_labels"]
        and p["max_score_diff"] <= SCORE_TOL and p["max_box_diff"] <= BOX_TOL
    )


# ------------------------------------------------------------------------------ runtimes
class _SessionMaps:
    """``ProductDetector.detect``'s ``head_maps`` hook, run by an ORT session:
    ``float [B, 3, H, W]`` -> the 10 head maps as CPU tensors."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.input = session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        arr = x.detach().cpu().numpy().astype(np.float32, copy=False)
        return [torch.from_numpy(m) for m in self.session.run(None, {self.input: arr})]


class OrtEmbedder:
    """The embedder on ONNX Runtime, with the torch path's preprocessing.

    Args:
        path: an ``embedder.onnx`` written by :func:`export_embedder`.
        config: the embedder's config (``Embedder.config``: ``dim``, ``input_size``,
            ``mean``, ``std``).
        providers, intra_op_threads: see :func:`make_session`.
    """

    def __init__(
        self, path: str | os.PathLike[str], config: Mapping[str, Any], *,
        providers: Sequence[str] | None = None, intra_op_threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.config = dict(config)
        self.session = make_session(self.path, providers=providers,
                                    intra_op_threads=intra_op_threads)
        self._input = self.session.get_inputs()[0].name
        #: the head outputs this graph has (``"category"``, ``"attr.<name>"``), in order
        self.head_names = [o.name for o in self.session.get_outputs()[1:]]
        self.transform = eval_transform(int(self.config["input_size"]),
                                        mean=self.config["mean"], std=self.config["std"])

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.config["dim"])

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Model input ``float32 [B, 3, S, S]`` -> ``float32 [B, dim]`` L2-normalised."""
        out = self.session.run(None, {self._input: np.ascontiguousarray(batch, np.float32)})[0]
        return np.asarray(out, dtype=np.float32)

    def embed_arrays(self, images: Sequence[np.ndarray], *, batch_size: int = 64) -> np.ndarray:
        """Embed RGB crops ``uint8 [H, W, 3]`` (any sizes) into ``float32 [N, dim]``,
        L2-normalised, in input order (as :func:`visearch.embedding.embed_arrays`)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            out[start : start + len(chunk)] = self.run(
                crops_to_batch(self.transform, chunk).numpy())
        return out

    def embed_arrays_with_heads(
        self, images: Sequence[np.ndarray], *, batch_size: int = 64
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """As :func:`visearch.embedding.embed_arrays_with_heads`: ``(float32 [N, dim],
        {head name: float32 [N, C]})`` (empty dict for a graph without head outputs)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        logits: dict[str, list[np.ndarray]] = {n: [] for n in self.head_names}
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = np.ascontiguousarray(crops_to_batch(self.transform, chunk).numpy(),
                                         np.float32)
            outputs = self.session.run(None, {self._input: batch})
            out[start : start + len(chunk)] = outputs[0]
            for name, v in zip(self.head_names, outputs[1:], strict=True):
                logits[name].append(np.asarray(v, np.float32))
        return out, {n: np.concatenate(v) if v else np.zeros((0, 0), np.float32)
                     for n, v in logits.items()}


class OrtDetector:
    """The detector's tensor part on ONNX Runtime; transform, anchors, decoding and NMS in
    torch (``detector``'s own torchvision code, on the CPU).

    Args:
        path: a ``detector.onnx`` written by :func:`export_detector` from ``detector``.
        detector: the torch detector it was exported from (its config, categories and
            post-processing are used; its convolutions are not run).
        providers, intra_op_threads: see :func:`make_session`.
    """

    def __init__(
        self, path: str | os.PathLike[str], detector: ProductDetector, *,
        providers: Sequence[str] | None = None, intra_op_threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.detector = detector.cpu().eval()
        self.categories = list(detector.categories)
        self.config = dict(detector.config)
        self.session = make_session(self.path, providers=providers,
                                    intra_op_threads=intra_op_threads)
        self._maps = _SessionMaps(self.session)

    def detect(
        self, images: Sequence[np.ndarray], *, score_thresh: float | None = None,
        batch_size: int = 8,
    ) -> list[Detections]:
        """As ``ProductDetector.detect``: RGB ``uint8 [H, W, 3]`` images -> detections in
        original pixels, scores descending."""
        return self.detector.detect(images, score_thresh=score_thresh, batch_size=batch_size,
                                    head_maps=self._maps)


# ------------------------------------------------------------------------------ versions
def _parity_failed(model: str, parity: Mapping[str, Any]) -> NoReturn:
    raise ValueError(f"{model} parity failed: {dict(parity)}")


def _file_entry(path: Path) -> dict[str, Any]:
    return {"file": path.name, "sha256": fileio.file_digest(path), "bytes": path.stat().st_size}


def export_version_models(
    directory: str | os.PathLike[str],
    embedder_path: str | os.PathLike[str],
    detector_path: str | os.PathLike[str] | None = None,
    *,
    int8: bool = False,
) -> dict[str, Any]:
    """Export a version's models into ``directory`` and check parity; the manifest's
    ``onnx`` entry.

    Each model is exported, loaded in an ORT CPU session and compared with torch on fixed
    seeded inputs (:func:`embedder_parity`, :func:`detector_parity`). A model whose export
    or parity check fails is logged as a warning, its file is removed, and the entry says
    why (``errors``): that model then serves on torch. A failed export never fails the
    build, but I/O errors (``OSError``, e.g. a full disk) do, as for every other file.

    Returns ``{"opset", "torch", "onnxruntime", "int8", "embedder": {"file", "sha256",
    "bytes", "exporter", "parity"} | None, "detector": {...} | None, "errors": {model: why},
    "seconds"}``.
    """
    from visearch.detection.model import load_detector
    from visearch.embedding.model import load_embedder

    directory = Path(directory)
    t0 = time.perf_counter()
    entry: dict[str, Any] = {
        "opset": OPSET, "torch": torch.__version__, "onnxruntime": ort.__version__,
        "int8": bool(int8), "embedder": None, "detector": None, "errors": {},
    }
    cpu = ["CPUExecutionProvider"]

    def embedder(dest: Path) -> tuple[str, dict[str, Any]]:
        model = load_embedder(embedder_path)
        exporter = export_embedder(model, dest, int8=int8)
        parity = embedder_parity(model, make_session(dest, providers=cpu))
        ok = (parity["min_cosine"] >= INT8_MIN_COSINE if int8
              else parity["max_abs_diff"] <= EMBED_TOL)
        if "heads_max_abs_diff" in parity:  # int8 moves logits; the top class must hold
            ok = ok and (parity["heads_argmax_agree"] >= INT8_MIN_COSINE if int8
                         else parity["heads_max_abs_diff"] <= MAP_TOL)
        return exporter, parity if ok else _parity_failed("embedder", parity)

    def detector(dest: Path) -> tuple[str, dict[str, Any]]:
        det = load_detector(detector_path)
        exporter = export_detector(det, dest)
        parity = detector_parity(det, make_session(dest, providers=cpu))
        return exporter, parity if _detector_parity_ok(parity) else _parity_failed(
            "detector", parity)

    jobs = [("embedder", EMBEDDER_ONNX, embedder)]
    if detector_path is not None:
        jobs.append(("detector", DETECTOR_ONNX, detector))
    for name, file, export in jobs:
        dest = directory / file
        try:
            exporter, parity = export(dest)
            entry[name] = _file_entry(dest) | {"exporter": exporter, "parity": parity}
        except OSError:
            raise
        except Exception as e:  # any export or parity failure: this model serves on torch
            dest.unlink(missing_ok=True)
            entry["errors"][name] = f"{type(e).__name__}: {e}"
            logger.warning("no ONNX %s in this version, it will serve on torch: %s", name, e)
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    logger.info("ONNX export in %.2f s: embedder %s, detector %s", entry["seconds"],
                "ok" if entry["embedder"] else "none", "ok" if entry["detector"] else "none")
    return entry
