"""The query pipeline, usable without gRPC.

decode and validate -> detect -> main object crop (or the caller's box) -> embed (+ the
model's category and attribute heads, same forward pass) -> top-k neighbours over the whole
index -> category vote (detector, neighbours, category head) and attribute vote (neighbours'
catalog attributes, attribute heads) -> search that category (or the
caller's hint) -> k-reciprocal re-ranking -> best item per SKU -> top-K.

:meth:`SearchPipeline.describe` stops after the vote (category top-k and attributes, no
retrieval); :meth:`SearchPipeline.cutout` cuts the product out of the photo
(:func:`visearch.scenes.cut_out_product`).

Model inference goes through :class:`~visearch.search.batching.MicroBatcher` workers, so concurrent
searches share forward passes (and the models, which are not thread-safe, see one caller).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from visearch.detection.main_object import MAIN_SCORE_THRESH
from visearch.device import choose_device
from visearch.embedding import embed_arrays, embed_arrays_with_heads
from visearch.embedding.heads import Prediction, softmax
from visearch.imageio import MAX_PIXELS, crop, decode_image, encode_png
from visearch.index.blas import faiss_threads
from visearch.search.batching import MicroBatcher
from visearch.search.rerank import KReciprocalReranker
from visearch.search.voting import (
    AttributeVote,
    AttributeWeights,
    CategoryDecision,
    VoteWeights,
    vote_attributes,
    vote_category,
)

if TYPE_CHECKING:
    from visearch.detection.main_object import MainObject
    from visearch.detection.model import Detections, ProductDetector
    from visearch.embedding import Embedder
    from visearch.index import IndexVersion
    from visearch.runtime.onnx import OrtDetector, OrtEmbedder

log = logging.getLogger(__name__)

#: restrict the search to the voted category only when the vote's probability is at least
#: this. Swept on the 1,000-SKU tuning world (true boxes, re-ranking on): R@1 0.422 vs 0.425
#: always restricting, R@10 0.749 vs 0.689 (a wrong vote no longer hides the item);
#: benchmarks/RESULTS.md, issue 22
RESTRICT_MIN_SCORE = 0.6

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class RerankParams:
    """k-reciprocal parameters (the defaults of Zhong et al., CVPR 2017) and how many hits
    get re-ranked."""

    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    shortlist: int = 50


@dataclass(frozen=True)
class Detection:
    """One detected object: box (x1, y1, x2, y2) in original pixels, category, score."""

    box: Box
    category: str
    score: float


@dataclass(frozen=True)
class ChosenObject:
    """The region that was embedded. ``source``: "detector", "request" or "image"."""

    box: Box
    category: str | None
    score: float
    fallback: bool
    source: str


@dataclass(frozen=True)
class Hit:
    """One result SKU, represented by its best item. ``score`` ranks (higher is better):
    ``1 - d*`` when re-ranked, else the cosine ``similarity``."""

    sku: str
    score: float
    item_id: int
    category: str
    title: str
    image_key: str
    similarity: float
    attributes: dict[str, str] = field(default_factory=dict)  # the item's catalog attributes


@dataclass
class SearchResult:
    """Everything a search decided, with per-stage timings in milliseconds."""

    detections: list[Detection]
    main_object: ChosenObject
    category: CategoryDecision
    results: list[Hit]
    index_version: str
    reranked: bool
    timings: dict[str, float] = field(default_factory=dict)
    #: the best categories after the vote with their combined probabilities, best first
    category_top: list[tuple[str, float]] = field(default_factory=list)
    #: attribute name -> its top-k values voted by the neighbours and the attribute heads
    #: (empty without heads)
    attributes: dict[str, Prediction] = field(default_factory=dict)
    #: attribute name -> every value's vote per source (what ``attributes`` is the top of)
    attribute_votes: dict[str, tuple[AttributeVote, ...]] = field(default_factory=dict)


@dataclass
class DescribeResult:
    """What the product is, without retrieval: detections, the described region, the
    category vote, its top-k and the predicted attributes; timings in milliseconds."""

    detections: list[Detection]
    main_object: ChosenObject
    category: CategoryDecision
    category_top: list[tuple[str, float]]
    attributes: dict[str, Prediction]
    index_version: str
    timings: dict[str, float] = field(default_factory=dict)
    attribute_votes: dict[str, tuple[AttributeVote, ...]] = field(default_factory=dict)


@dataclass
class CutoutResult:
    """A product cut-out: ``rgba_png`` (the product cropped to ``box``, straight alpha) and
    ``mask_png`` (its 8-bit alpha) as PNG bytes, both empty unless ``status == "ok"``;
    ``reason`` says why not. ``box`` is in the photo's pixels (the tight box of the mask
    when ok, else the box that was tried); timings in milliseconds."""

    status: str
    reason: str
    rgba_png: bytes
    mask_png: bytes
    quality: float
    box: Box | None
    source: str  # where the box came from: "request", "detector" or "image"
    index_version: str
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class DetectResult:
    """Detections and the main object of one image (``width`` x ``height`` pixels)."""

    detections: list[Detection]
    main_object: ChosenObject
    width: int
    height: int
    timings: dict[str, float] = field(default_factory=dict)


class _Clock:
    """Per-stage wall-clock timings (ms) and the deadline check between stages."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.timings: dict[str, float] = {}
        self._t0 = self._last = time.perf_counter()

    def remaining(self, before: str) -> float | None:
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"deadline exceeded before {before}")
        return left

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + (now - self._last) * 1000.0
        self._last = now

    def done(self) -> dict[str, float]:
        self.timings["total"] = (time.perf_counter() - self._t0) * 1000.0
        return self.timings


class SearchPipeline:
    """Search one index version with its embedder and an optional detector.

    Args:
        version: the index version (its index, graph and item map are used; closed by
            :meth:`close`).
        embedder: the model the version's gallery was embedded with (torch, or its ONNX
            Runtime session, :class:`~visearch.runtime.onnx.OrtEmbedder`).
        detector: the product detector (torch or :class:`~visearch.runtime.onnx.OrtDetector`);
            None embeds the whole image (or the caller's box).
        vote_weights: the category vote's mix (default: equal).
        attribute_weights: the attribute vote's mix of the ``vote_k`` neighbours' catalog
            attributes and the attribute heads (default: :class:`AttributeWeights`).
        rerank: k-reciprocal parameters; None disables re-ranking altogether.
        vote_k: neighbours over the whole index that vote on the category.
        restrict_min_score: search only the voted category when the vote's combined score
            (its probability, 0-1) is at least this; a less confident vote searches the
            whole index (0: always restrict; a category hint always restricts). Default
            :data:`RESTRICT_MIN_SCORE`.
        detect_thresh: minimum score of a main object (else the whole image is used); the
            main object is the passing box with the highest score x sqrt(relative area)
            (``visearch.detection.model.select_main_object``).
        default_top_k, max_top_k: SKUs returned when the caller says 0, and the limit.
        max_pixels: larger images are rejected (decompression bombs, huge photos).
        max_batch_size, batch_window_ms: dynamic micro-batching of model inference.
        device: torch device for the models' inputs (default: where the models are).
        search_threads: faiss OpenMP threads per query search, in the calling thread (1: a
            server's requests run in parallel on their own threads; None: faiss's default,
            every core, for one large index searched one query at a time).
        heads: use the embedder's category and attribute heads when it has them (the
            category head joins the vote with ``vote_weights.head``; the attributes the
            heads name are voted with the neighbours); False ignores them (no attributes).
        category_top_k, attribute_top_k: categories and values per attribute reported.
    """

    def __init__(
        self,
        version: IndexVersion,
        embedder: Embedder | OrtEmbedder,
        detector: ProductDetector | OrtDetector | None = None,
        *,
        vote_weights: VoteWeights | None = None,
        attribute_weights: AttributeWeights | None = None,
        rerank: RerankParams | None = None,
        vote_k: int = 20,
        restrict_min_score: float = RESTRICT_MIN_SCORE,
        detect_thresh: float = MAIN_SCORE_THRESH,
        default_top_k: int = 10,
        max_top_k: int = 100,
        max_pixels: int = MAX_PIXELS,
        max_batch_size: int = 8,
        batch_window_ms: float = 2.0,
        search_threads: int | None = 1,
        device: str | torch.device | None = None,
        heads: bool = True,
        category_top_k: int = 5,
        attribute_top_k: int = 3,
    ) -> None:
        if vote_k < 1 or not 1 <= default_top_k <= max_top_k:
            raise ValueError(
                f"need vote_k >= 1 and 1 <= default_top_k <= max_top_k, got {vote_k=}, "
                f"{default_top_k=}, {max_top_k=}"
            )
        self.version = version
        self.index = version.index
        if self.index.dim != embedder.dim:
            raise ValueError(
                f"index {version.version} holds {self.index.dim}-d vectors but the embedder "
                f"makes {embedder.dim}-d ones; load the embedder the index was built with"
            )
        self.items = version.items  # opened here: lazy opening from many threads would race
        self.embedder = embedder
        self.detector = detector
        # Which runtime serves each model ("torch", "onnx"; "none": no detector), for logs
        # and benchmarks.
        self.runtimes = {
            "embed": "torch" if isinstance(embedder, torch.nn.Module) else "onnx",
            "detect": "none" if detector is None
            else "torch" if isinstance(detector, torch.nn.Module) else "onnx",
        }
        self.vote_weights = vote_weights or VoteWeights()
        self.attribute_weights = attribute_weights or AttributeWeights()
        self.rerank_params = rerank
        self.vote_k = vote_k
        if not 0.0 <= restrict_min_score <= 1.0:
            raise ValueError(f"restrict_min_score must be in [0, 1], got {restrict_min_score}")
        self.restrict_min_score = float(restrict_min_score)
        self.detect_thresh = detect_thresh
        self.default_top_k = default_top_k
        self.max_top_k = max_top_k
        self.max_pixels = max_pixels
        self.device = device
        self.search_threads = search_threads
        self.categories = list(self.index.categories)
        if category_top_k < 1 or attribute_top_k < 1:
            raise ValueError(f"need category_top_k, attribute_top_k >= 1, got "
                             f"{category_top_k}, {attribute_top_k}")
        self.category_top_k = category_top_k
        self.attribute_top_k = attribute_top_k
        #: head output name ("category", "attr.<name>") -> its classes; {} without heads
        self.head_labels: dict[str, list[str]] = {}
        head_cfg = embedder.config.get("heads") if heads else None
        if head_cfg:
            if head_cfg.get("categories"):
                self.head_labels["category"] = list(head_cfg["categories"])
            for name, values in head_cfg.get("attributes", {}).items():
                self.head_labels[f"attr.{name}"] = list(values)
        self.reranker: KReciprocalReranker | None = None
        if rerank is not None and self.index.ntotal > 1:
            graph = version.graph
            xb = self.index.reconstruct(np.asarray(graph.ids))
            self.reranker = KReciprocalReranker(
                np.asarray(graph.ids), np.asarray(graph.I), xb,
                k1=rerank.k1, k2=rerank.k2, lambda_value=rerank.lambda_value,
                vectors=graph.kreciprocal,
            )
        self._embed = MicroBatcher(
            self._embed_batch, max_batch_size=max_batch_size, max_wait_ms=batch_window_ms,
            name=f"embed-{version.version}",
        )
        self._detect: MicroBatcher | None = None
        if detector is not None:
            self._detect = MicroBatcher(
                self._detect_batch, max_batch_size=max_batch_size,
                max_wait_ms=batch_window_ms, name=f"detect-{version.version}",
            )

    @classmethod
    def from_version(
        cls,
        version: IndexVersion,
        *,
        detector_path: str | None = None,
        use_detector: bool = True,
        device: str | torch.device | None = None,
        runtime: Literal["torch", "onnx"] = "torch",
        intra_op_threads: int | None = None,
        **kwargs: Any,
    ) -> SearchPipeline:
        """Load the version's embedder (and its detector, or ``detector_path``) on
        ``device`` (default: the first GPU when one is visible, else the CPU) and build.
        The version is closed again when anything fails (it can then be reopened).

        ``runtime="onnx"`` runs each model through ONNX Runtime from the version's ONNX
        files (TensorRT, CUDA or CPU provider, the best available; CPU only for a CPU
        ``device``), with ``intra_op_threads`` threads per operator (None: ORT's default).
        A model the version has no ONNX file for (built without, export failed, or a
        ``detector_path`` other than the version's) runs on torch, with a warning. An ONNX
        file that is missing or fails its checksum raises IndexFormatError: the version is
        refused, not served on a fallback.
        """
        from visearch.detection.model import load_detector
        from visearch.embedding import load_embedder

        if runtime not in ("torch", "onnx"):
            raise ValueError(f"runtime must be 'torch' or 'onnx', got {runtime!r}")
        try:
            device = choose_device(device)
            onnx = runtime == "onnx"
            embedder: Embedder | OrtEmbedder = load_embedder(
                version.embedder_path, device="cpu" if onnx else device)
            detector: ProductDetector | OrtDetector | None = None
            det_path = detector_path or version.detector_path
            if use_detector and det_path is not None:
                detector = load_detector(det_path, device="cpu" if onnx else device)
            if onnx:
                embedder, detector = cls._onnx_models(
                    version, embedder, detector, device=device,
                    own_detector=detector_path is None, intra_op_threads=intra_op_threads)
            return cls(version, embedder, detector, device=device, **kwargs)
        except BaseException:
            version.close()
            raise

    @staticmethod
    def _onnx_models(
        version: IndexVersion, embedder: Embedder, detector: ProductDetector | None, *,
        device: torch.device, own_detector: bool, intra_op_threads: int | None,
    ) -> tuple[Embedder | OrtEmbedder, ProductDetector | OrtDetector | None]:
        """Swap the CPU-loaded torch models for ORT sessions where the version has ONNX
        files; the torch ones that stay move to ``device``."""
        from visearch.runtime.onnx import OrtDetector, OrtEmbedder, choose_providers

        providers = choose_providers(device)
        errors = (version.manifest.get("onnx") or {}).get("errors", {})
        path = version.onnx_path("embedder")
        emb: Embedder | OrtEmbedder = embedder
        if path is not None:
            emb = OrtEmbedder(path, embedder.config, providers=providers,
                              intra_op_threads=intra_op_threads)
        else:
            log.warning("%s has no ONNX embedder (%s); embedding on torch", version.version,
                        errors.get("embedder", "not exported"))
            emb = embedder.to(device)
        det: ProductDetector | OrtDetector | None = detector
        if detector is not None:
            path = version.onnx_path("detector") if own_detector else None
            if path is not None:
                det = OrtDetector(path, detector, providers=providers,
                                  intra_op_threads=intra_op_threads)
            else:
                why = errors.get("detector", "not exported") if own_detector else (
                    "the detector is not the version's")
                log.warning("%s: no ONNX detector (%s); detecting on torch", version.version,
                            why)
                det = detector.to(device)
        log.info("serving %s on ONNX Runtime (%s)", version.version, ", ".join(providers))
        return emb, det

    # ------------------------------------------------------------------ batched models
    def _embed_batch(
        self, crops: list[np.ndarray]
    ) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Per crop: (float32 [d] embedding, {head name: float32 [C] logits})."""
        if not self.head_labels:  # heads off: the embedding alone, as before the heads
            if not isinstance(self.embedder, torch.nn.Module):
                vecs = self.embedder.embed_arrays(crops, batch_size=len(crops))
            else:
                vecs = embed_arrays(self.embedder, crops, batch_size=len(crops),
                                    device=self.device)
            return [(vecs[i], {}) for i in range(len(crops))]
        if not isinstance(self.embedder, torch.nn.Module):  # an ORT session
            vecs, logits = self.embedder.embed_arrays_with_heads(crops, batch_size=len(crops))
        else:
            vecs, logits = embed_arrays_with_heads(self.embedder, crops, batch_size=len(crops),
                                                   device=self.device)
        logits = {k: v for k, v in logits.items() if k in self.head_labels}
        return [(vecs[i], {k: v[i] for k, v in logits.items()}) for i in range(len(crops))]

    def _detect_batch(self, images: list[np.ndarray]) -> list[Detections]:
        assert self.detector is not None
        return self.detector.detect(images, batch_size=len(images))

    @property
    def batchers(self) -> dict[str, MicroBatcher]:
        """The micro-batchers by model name (``"embed"``, and ``"detect"`` with a detector),
        e.g. to set their ``on_batch`` observers."""
        out = {"embed": self._embed}
        if self._detect is not None:
            out["detect"] = self._detect
        return out

    @property
    def batch_sizes(self) -> dict[str, list[int]]:
        """Recent micro-batch sizes per model (for benchmarks)."""
        out = {"embed": list(self._embed.batch_sizes)}
        if self._detect is not None:
            out["detect"] = list(self._detect.batch_sizes)
        return out

    def close(self) -> None:
        """Stop the inference workers and release the index version's files."""
        self._embed.close()
        if self._detect is not None:
            self._detect.close()
        self.version.close()

    # ------------------------------------------------------------------ validation
    def check_top_k(self, top_k: int) -> int:
        """0 -> the default; otherwise 1..max_top_k (ValueError saying so)."""
        if top_k == 0:
            return self.default_top_k
        if not 1 <= top_k <= self.max_top_k:
            raise ValueError(f"top_k must be between 1 and {self.max_top_k} (0 for the "
                             f"default {self.default_top_k}), got {top_k}")
        return int(top_k)

    def check_category(self, category: str | None) -> str | None:
        """None/"" -> None; otherwise one of the index's categories (ValueError listing them)."""
        if not category:
            return None
        if category not in self.categories:
            raise ValueError(f"unknown category {category!r}; this index has: "
                             f"{', '.join(self.categories)}")
        return category

    @staticmethod
    def check_box(box: Sequence[float], width: int, height: int) -> Box:
        """A box inside the ``width`` x ``height`` image, at least 1 px (ValueError if not)."""
        if len(box) != 4:
            raise ValueError(f"a bbox has 4 numbers (x1, y1, x2, y2), got {len(box)}")
        x1, y1, x2, y2 = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            raise ValueError(f"bbox has non-finite coordinates: {(x1, y1, x2, y2)}")
        if x2 - x1 < 1 or y2 - y1 < 1:
            raise ValueError(f"bbox {(x1, y1, x2, y2)} is empty: need x2 > x1 and y2 > y1 "
                             "(pixels, at least 1 wide and high)")
        tol = 0.5
        if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
            raise ValueError(f"bbox {(x1, y1, x2, y2)} lies outside the {width}x{height} "
                             "image; give pixel coordinates inside it")
        return (max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)))

    # ------------------------------------------------------------------ stages
    def _decode(self, image_bytes: bytes) -> np.ndarray:
        if not image_bytes:
            from visearch.errors import ImageDecodeError

            raise ImageDecodeError("empty image: send the encoded bytes of a photo")
        return decode_image(bytes(image_bytes), max_pixels=self.max_pixels)

    def _locate(
        self, image: np.ndarray, bbox: Sequence[float] | None, skip_detection: bool,
        clock: _Clock,
    ) -> tuple[list[Detection], ChosenObject, MainObject | None]:
        h, w = image.shape[:2]
        if bbox is not None:
            box = self.check_box(bbox, w, h)
            return [], ChosenObject(box, None, 1.0, False, "request"), None
        if self._detect is None or skip_detection:
            return [], ChosenObject((0.0, 0.0, float(w), float(h)), None, 0.0, True, "image"), None
        from visearch.detection.main_object import select_main_object

        dets = self._detect(image, timeout=clock.remaining("detect"))
        names = dets.category_names()
        detections = [
            Detection(tuple(float(v) for v in b), c, float(s))  # type: ignore[arg-type]
            for b, c, s in zip(dets.boxes, names, dets.scores, strict=True)
        ]
        main = select_main_object(dets, image.shape, score_thresh=self.detect_thresh)
        chosen = ChosenObject(tuple(float(v) for v in main.box), main.category,  # type: ignore[arg-type]
                              float(main.score), bool(main.fallback),
                              "image" if main.fallback else "detector")
        return detections, chosen, main

    def _embed_crop(
        self, image: np.ndarray, box: Box, clock: _Clock
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        region = np.array(crop(image, box))  # a writable copy for torch
        vec, logits = self._embed(region, timeout=clock.remaining("embed"))
        return np.asarray(vec, np.float32), logits

    def _understand(
        self, logits: dict[str, np.ndarray]
    ) -> tuple[dict[str, float] | None, dict[str, dict[str, float]]]:
        """The heads' logits -> (category head probabilities over the index's categories,
        or None; attribute name -> value -> the head's probability)."""
        head_scores = None
        if "category" in logits:
            p = softmax(logits["category"])
            head_scores = {c: float(v) for c, v in zip(self.head_labels["category"], p,
                                                       strict=True) if c in self.categories}
        attributes = {
            name[len("attr."):]: dict(zip(self.head_labels[name],
                                          softmax(v).reshape(-1).tolist(), strict=True))
            for name, v in logits.items() if name.startswith("attr.")
        }
        return head_scores, attributes

    def _vote_attributes(
        self, head_attributes: dict[str, dict[str, float]], nn_ids: np.ndarray,
        nn_sims: np.ndarray,
    ) -> tuple[dict[str, Prediction], dict[str, tuple[AttributeVote, ...]]]:
        """The heads' attributes voted with the ``vote_k`` neighbours' catalog attributes
        -> (name -> top-k values, name -> every value's votes)."""
        if not head_attributes:
            return {}, {}
        ids = nn_ids[: self.vote_k]
        metas = self.items.get_many(ids.tolist())
        votes = vote_attributes(
            list(head_attributes), [(m or {}).get("attributes") or {} for m in metas],
            nn_sims[: self.vote_k], head_scores=head_attributes,
            weights=self.attribute_weights,
        )
        top = {name: Prediction(tuple(v.value for v in vs[: self.attribute_top_k]),
                                tuple(v.combined for v in vs[: self.attribute_top_k]))
               for name, vs in votes.items()}
        return top, votes

    def _vote(
        self, main: MainObject | None, nn_ids: np.ndarray, nn_sims: np.ndarray,
        head_scores: dict[str, float] | None, hint: str | None,
    ) -> CategoryDecision:
        vote_ids = nn_ids[: self.vote_k]
        det_scores = None
        if main is not None and not main.fallback:
            det_scores = {c: s for c, s in main.category_scores.items() if c in self.categories}
        return vote_category(
            det_scores, self.index.categories_of(vote_ids), nn_sims[: self.vote_k],
            weights=self.vote_weights, hint=hint, head_scores=head_scores,
        )

    # ------------------------------------------------------------------ public API
    def detect(self, image_bytes: bytes, *, deadline: float | None = None) -> DetectResult:
        """Detections and the main object (the whole image without a detector)."""
        clock = _Clock(deadline)
        image = self._decode(image_bytes)
        clock.lap("decode")
        detections, chosen, _ = self._locate(image, None, False, clock)
        clock.lap("detect")
        h, w = image.shape[:2]
        return DetectResult(detections, chosen, w, h, clock.done())

    def embed(
        self, image_bytes: bytes, *, bbox: Sequence[float] | None = None,
        skip_detection: bool = False, deadline: float | None = None,
    ) -> tuple[np.ndarray, ChosenObject, dict[str, float]]:
        """(float32 [d] L2-normalised embedding, the embedded region, timings ms)."""
        clock = _Clock(deadline)
        image = self._decode(image_bytes)
        clock.lap("decode")
        _, chosen, _ = self._locate(image, bbox, skip_detection, clock)
        clock.lap("detect")
        vec, _ = self._embed_crop(image, chosen.box, clock)
        clock.lap("embed")
        return vec, chosen, clock.done()

    def describe(
        self, image_bytes: bytes, *, bbox: Sequence[float] | None = None,
        skip_detection: bool = False, deadline: float | None = None,
    ) -> DescribeResult:
        """What the product in a photo is: detect, embed, the heads and the category vote
        (over the neighbours of the whole index), without retrieval results. Raises as
        :meth:`search`."""
        clock = _Clock(deadline)
        image = self._decode(image_bytes)
        clock.lap("decode")
        detections, chosen, main = self._locate(image, bbox, skip_detection, clock)
        clock.lap("detect")
        xq, logits = self._embed_crop(image, chosen.box, clock)
        clock.lap("embed")
        head_scores, head_attributes = self._understand(logits)
        if self.head_labels:
            clock.lap("heads")
        with faiss_threads(self.search_threads):
            D, I = self.index.search(xq[None], self.vote_k)  # noqa: E741
        keep = I[0] >= 0
        clock.lap("search_all")
        decision = self._vote(main, I[0][keep], D[0][keep], head_scores, None)
        attributes, attribute_votes = self._vote_attributes(head_attributes, I[0][keep],
                                                            D[0][keep])
        clock.lap("vote")
        return DescribeResult(detections, chosen, decision, decision.top(self.category_top_k),
                              attributes, self.version.version, clock.done(), attribute_votes)

    def cutout(
        self, image_bytes: bytes, *, bbox: Sequence[float] | None = None,
        deadline: float | None = None,
    ) -> CutoutResult:
        """Cut the product out of a photo: the caller's ``bbox``, else the detector's main
        object (without one, or when nothing is detected, the cut-out module decides from
        the whole image: a plain background works, a cluttered one answers
        ``"needs_bbox"``). The alpha is refined by pymatting
        (:func:`visearch.scenes.cut_out_product`).

        Raises:
            ImageDecodeError (a ValueError): empty, broken, non-image or oversized input.
            ValueError: a bbox outside the image, or one the cut-out module rejects.
            TimeoutError: the deadline passed.
        """
        from visearch.scenes import cut_out_product

        clock = _Clock(deadline)
        if not image_bytes:
            from visearch.errors import ImageDecodeError

            raise ImageDecodeError("empty image: send the encoded bytes of a photo")
        # Keep the photo's own transparency: a PNG with alpha is its own best cut-out.
        image = decode_image(bytes(image_bytes), max_pixels=self.max_pixels, keep_alpha=True)
        clock.lap("decode")
        rgb = image[..., :3] if image.shape[2] == 4 else image
        box: Box | None
        if bbox is not None:
            h, w = image.shape[:2]
            box, source = self.check_box(bbox, w, h), "request"
        else:
            _, chosen, _ = self._locate(np.ascontiguousarray(rgb), None, False, clock)
            box = None if chosen.source == "image" else chosen.box
            source = chosen.source
        clock.lap("detect")
        clock.remaining("cutout")
        result = cut_out_product(image, box)
        clock.lap("cutout")
        if result.status == "bad_bbox":
            raise ValueError(result.reason)
        if not result.ok or result.rgba is None or result.box is None:
            return CutoutResult(result.status, result.reason, b"", b"", 0.0, box, source,
                                self.version.version, clock.done())
        rgba_png = encode_png(result.rgba)
        mask_png = encode_png(np.ascontiguousarray(result.rgba[..., 3]))
        clock.lap("encode")
        out_box = tuple(float(v) for v in result.box)
        return CutoutResult("ok", "", rgba_png, mask_png, float(result.quality),
                            out_box, source, self.version.version,  # type: ignore[arg-type]
                            clock.done())

    def search(
        self,
        image_bytes: bytes,
        *,
        top_k: int = 0,
        category_hint: str | None = None,
        bbox: Sequence[float] | None = None,
        rerank: bool = True,
        skip_detection: bool = False,
        all_categories: bool = False,
        deadline: float | None = None,
    ) -> SearchResult:
        """Find the SKUs of the product in a photo.

        Args:
            image_bytes: the encoded photo.
            top_k: SKUs to return (0: the default; at most ``max_top_k``).
            category_hint: search this category instead of the voted one.
            bbox: (x1, y1, x2, y2) pixels of the product, instead of the detector's.
            rerank: k-reciprocal re-ranking (when the pipeline has it).
            skip_detection: embed the whole image (or ``bbox``) without detecting.
            all_categories: search the whole index, not the voted category (the vote is
                still made and reported). On the demo world it trades 0.004 Recall@1 for
                0.074 Recall@10 (benchmarks/RESULTS.md).
            deadline: ``time.monotonic()`` instant after which ``TimeoutError`` is raised.

        Raises:
            ImageDecodeError (a ValueError): empty, broken, non-image or oversized input.
            ValueError: bad top_k, unknown category, bbox outside the image, a category
                hint with ``all_categories``.
            TimeoutError: the deadline passed.
        """
        top_k = self.check_top_k(top_k)
        hint = self.check_category(category_hint)
        if hint is not None and all_categories:
            raise ValueError("category_hint and all_categories exclude each other")
        clock = _Clock(deadline)
        image = self._decode(image_bytes)
        clock.lap("decode")
        detections, chosen, main = self._locate(image, bbox, skip_detection, clock)
        clock.lap("detect")
        vec, logits = self._embed_crop(image, chosen.box, clock)
        xq = vec[None]
        clock.lap("embed")
        head_scores, head_attributes = self._understand(logits)
        if self.head_labels:
            clock.lap("heads")

        use_rerank = rerank and self.reranker is not None
        k_all = self.vote_k
        if use_rerank:
            assert self.reranker is not None
            k_all = max(k_all, self.reranker.k1)
        with faiss_threads(self.search_threads):
            D, I = self.index.search(xq, k_all)  # noqa: E741
        nn_ids, nn_sims = I[0][I[0] >= 0], D[0][I[0] >= 0]
        clock.lap("search_all")

        decision = self._vote(main, nn_ids, nn_sims, head_scores, hint)
        attributes, attribute_votes = self._vote_attributes(head_attributes, nn_ids, nn_sims)
        clock.lap("vote")

        clock.remaining("search_category")
        shortlist = max(4 * top_k, self.rerank_params.shortlist if self.rerank_params else 0)
        searched = None if all_categories else decision.category
        if (searched is not None and hint is None
                and decision.score < self.restrict_min_score):
            searched = None  # a doubtful vote: the whole index, not a possibly wrong category
        with faiss_threads(self.search_threads):
            Dc, Ic = self.index.search(xq, shortlist, category=searched)
        keep = Ic[0] >= 0
        cand_ids, cand_sims = Ic[0][keep], Dc[0][keep]
        clock.lap("search_category")

        scores = cand_sims.astype(np.float32)
        if use_rerank and len(cand_ids):
            assert self.reranker is not None
            clock.remaining("rerank")
            final, _ = self.reranker.rerank(xq[0], nn_ids, cand_ids)
            scores = 1.0 - final
            order = np.argsort(final, kind="stable")
            cand_ids, cand_sims, scores = cand_ids[order], cand_sims[order], scores[order]
        clock.lap("rerank")

        hits = self._group(cand_ids, cand_sims, scores, top_k)
        clock.lap("group")
        return SearchResult(detections, chosen, decision, hits, self.version.version,
                            bool(use_rerank), clock.done(), decision.top(self.category_top_k),
                            attributes, attribute_votes)

    def _group(
        self, ids: np.ndarray, sims: np.ndarray, scores: np.ndarray, top_k: int
    ) -> list[Hit]:
        """Best (first) item per SKU, in rank order, ``top_k`` SKUs."""
        metas = self.items.get_many(ids.tolist())
        hits: list[Hit] = []
        seen: set[str] = set()
        for item_id, sim, score, meta in zip(ids, sims, scores, metas, strict=True):
            if meta is None:
                log.warning("item %d is in the index but not in the item map", item_id)
                continue
            sku = str(meta["sku"])
            if sku in seen:
                continue
            seen.add(sku)
            attrs = meta.get("attributes") or {}
            hits.append(Hit(sku, float(score), int(item_id), str(meta.get("category", "")),
                            str(meta.get("title", "")), str(meta.get("image_key", "")),
                            float(sim), {str(k): str(v) for k, v in attrs.items()}))
            if len(hits) == top_k:
                break
        return hits

