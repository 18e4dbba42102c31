"""The product detector: torchvision RetinaNet (focal loss, FPN P3-P7) over product categories.

``build_detector`` assembles a RetinaNet whose classes are the product categories (label ``i``
is ``categories[i]``; focal loss uses per-class sigmoids, so no background class is needed).
Backbones are looked up by name in ``DETECTOR_BACKBONES`` at the CLI edge:

- ``resnet50_fpn``: the RetinaNet paper's backbone (heavy on CPU);
- ``resnet18_fpn``: lighter, trains from scratch in minutes on small images;
- ``mobilenet_v2_fpn``: lightest real backbone; starts from the ImageNet MobileNetV2 file;
- ``tiny_fpn``: a few convolutions, for fast CPU tests only.

Weights are only ever read from local files; nothing here downloads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from visearch.fileio import atomic_open
from visearch.registry import Registry

logger = logging.getLogger(__name__)

FORMAT = "visearch-detector/1"

# RetinaNet's own score floor: boxes below it are dropped before NMS and never returned.
MIN_SCORE = 0.05


@dataclass(frozen=True)
class DetectorBackbone:
    """How to build one backbone: ``build(fpn_channels, weights, pretrained) -> BackboneWithFPN``.

    ``pretrained`` selects the layout used with ImageNet weights (frozen BN statistics, frozen
    stem) so that a saved detector rebuilds identically without the weights file; ``weights``
    is loaded when given. The returned module maps ``float [B, 3, H, W]`` to five feature
    maps (P3-P7, strides 8..128) of ``fpn_channels`` channels each (its ``.out_channels``).
    """

    build: Callable[[int, Path | None, bool], nn.Module]
    fpn_channels: int


DETECTOR_BACKBONES: Registry[DetectorBackbone] = Registry("detector backbone")


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path} (give a local file)")
    return torch.load(path, map_location="cpu", weights_only=True)


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def _resnet_fpn(arch: str, fpn_channels: int, weights: Path | None, pretrained: bool) -> nn.Module:
    # Pretrained BN statistics are kept frozen (detection batches are too small to re-estimate
    # them); from scratch, BN trains normally.
    norm = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    net = getattr(torchvision.models, arch)(weights=None, norm_layer=norm)
    if weights is not None:
        net.load_state_dict(_load_state(weights))
    if pretrained:
        _freeze(nn.ModuleList([net.conv1, net.bn1, net.layer1]))
    expansion = type(net.layer2[-1]).expansion
    return BackboneWithFPN(
        net,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[128 * expansion, 256 * expansion, 512 * expansion],
        out_channels=fpn_channels,
        extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
    )


def _mobilenet_v2_fpn(fpn_channels: int, weights: Path | None, pretrained: bool) -> nn.Module:
    norm = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    net = torchvision.models.mobilenet_v2(weights=None, norm_layer=norm)
    if weights is not None:
        net.load_state_dict(_load_state(weights))
    if pretrained:
        _freeze(net.features[:4])  # the stride-2/4 stem: generic edges, not worth training
    # The last block of each stride (8, 16, 32) rather than torchvision's first one, so each
    # level sees the full stage.
    return BackboneWithFPN(
        net.features,
        return_layers={"6": "0", "13": "1", "18": "2"},
        in_channels_list=[32, 96, 1280],
        out_channels=fpn_channels,
        extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
    )


def _tiny_fpn(fpn_channels: int, weights: Path | None, pretrained: bool) -> nn.Module:
    if pretrained:
        raise ValueError("tiny_fpn has no pretrained weights; leave backbone_weights unset")

    def stage(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    body = nn.Sequential(
        stage(3, 16), stage(16, 24), stage(24, 32), stage(32, 48), stage(48, 64)
    )
    return BackboneWithFPN(
        body,
        return_layers={"2": "0", "3": "1", "4": "2"},
        in_channels_list=[32, 48, 64],
        out_channels=fpn_channels,
        extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
    )


DETECTOR_BACKBONES.register("resnet50_fpn")(
    DetectorBackbone(lambda c, w, p: _resnet_fpn("resnet50", c, w, p), fpn_channels=256)
)
DETECTOR_BACKBONES.register("resnet18_fpn")(
    DetectorBackbone(lambda c, w, p: _resnet_fpn("resnet18", c, w, p), fpn_channels=128)
)
DETECTOR_BACKBONES.register("mobilenet_v2_fpn")(
    DetectorBackbone(_mobilenet_v2_fpn, fpn_channels=64)
)
DETECTOR_BACKBONES.register("tiny_fpn")(DetectorBackbone(_tiny_fpn, fpn_channels=32))


def default_anchor_sizes(min_size: int) -> tuple[int, ...]:
    """Base anchor side per level P3..P7 in resized-input pixels.

    torchvision's 32..512 suits 800-px inputs; small CPU inputs (products of 15-100 px) need
    the pyramid shifted down one octave so P3 anchors cover the smallest products.
    """
    return (32, 64, 128, 256, 512) if min_size >= 400 else (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Detections:
    """Detections in one image, in the image's original pixel coordinates.

    ``boxes`` float32 [N, 4] (x1, y1, x2, y2); ``scores`` float32 [N] in [0, 1], descending;
    ``labels`` int64 [N], indices into ``categories``.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    categories: list[str]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def category_names(self) -> list[str]:
        """The category name of each detection, ``[N]``."""
        return [self.categories[int(i)] for i in self.labels]


class ProductDetector(nn.Module):
    """RetinaNet over product categories, plus its config and a numpy ``detect`` API.

    ``forward`` is RetinaNet's: in training, ``(images: list[float [3, H, W] in 0..1],
    targets: list[{"boxes": float [N, 4], "labels": int64 [N]}]) -> dict of losses``; in eval,
    a list of ``{"boxes", "scores", "labels"}`` in each input's own pixel coordinates.
    """

    def __init__(self, retinanet: RetinaNet, categories: Sequence[str], config: dict[str, Any]):
        super().__init__()
        self.retinanet = retinanet
        self.categories = list(categories)
        self.config = dict(config)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None) -> Any:
        return self.retinanet(images, targets)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def detect(
        self,
        images: Sequence[np.ndarray],
        *,
        score_thresh: float | None = None,
        batch_size: int = 8,
        head_maps: HeadMapsFn | None = None,
    ) -> list[Detections]:
        """Detect products in RGB ``uint8 [H, W, 3]`` images (any sizes).

        Boxes come back in each image's original pixels (RetinaNet's transform resizes to
        ``min_size``/``max_size`` and maps boxes back). ``score_thresh`` drops weaker boxes;
        boxes under ``MIN_SCORE`` are never returned.

        ``head_maps`` replaces the tensor part (what :class:`HeadMaps` computes), e.g. by an
        ONNX Runtime session; torchvision's transform, anchors, box decoding and NMS still run
        here, so both paths decode identically. None runs the whole RetinaNet in torch.
        """
        was_training = self.training
        self.eval()
        device = self.device
        out: list[Detections] = []
        try:
            for start in range(0, len(images), batch_size):
                chunk = [_to_tensor(im, device) for im in images[start : start + batch_size]]
                if head_maps is None:
                    results = self.retinanet(chunk)
                else:
                    results = decode_head_maps(self.retinanet, chunk, head_maps)
                for res in results:
                    scores = res["scores"].float().cpu().numpy()
                    keep = scores >= score_thresh if score_thresh is not None else slice(None)
                    order = np.argsort(-scores[keep], kind="stable")
                    out.append(
                        Detections(
                            boxes=res["boxes"].float().cpu().numpy()[keep][order],
                            scores=scores[keep][order],
                            labels=res["labels"].cpu().numpy().astype(np.int64)[keep][order],
                            categories=self.categories,
                        )
                    )
        finally:
            self.train(was_training)
        return out


HeadMapsFn = Callable[[torch.Tensor], Sequence[torch.Tensor]]


class HeadMaps(nn.Module):
    """The tensor part of a RetinaNet: backbone + FPN + head convolutions, without the
    transform, anchors, box decoding or NMS (the part exported to ONNX).

    Input ``float [B, 3, H, W]``: images as ``retinanet.transform`` leaves them (resized,
    normalised, zero-padded to multiples of 32). Output: ``2 * L`` maps for the L = 5 pyramid
    levels P3..P7, first the classification logits ``float [B, A * K, H_l, W_l]`` of each
    level, then the box regressions ``float [B, A * 4, H_l, W_l]`` (A anchors per location,
    K classes). Raw maps rather than torchvision's flattened head outputs, because anchor
    generation needs each level's H_l x W_l.
    """

    def __init__(self, retinanet: RetinaNet) -> None:
        super().__init__()
        self.backbone = retinanet.backbone
        self.cls_head = retinanet.head.classification_head
        self.reg_head = retinanet.head.regression_head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = list(self.backbone(x).values())
        cls = [self.cls_head.cls_logits(self.cls_head.conv(f)) for f in feats]
        reg = [self.reg_head.bbox_reg(self.reg_head.conv(f)) for f in feats]
        return (*cls, *reg)


def _flatten(maps: Sequence[torch.Tensor], per_anchor: int) -> torch.Tensor:
    # torchvision's head layout: (N, A * K, H, W) -> (N, H * W * A, K), levels concatenated.
    flat = []
    for m in maps:
        n, _, h, w = m.shape
        m = m.view(n, -1, per_anchor, h, w).permute(0, 3, 4, 1, 2)
        flat.append(m.reshape(n, -1, per_anchor))
    return torch.cat(flat, dim=1)


def decode_head_maps(
    retinanet: RetinaNet, images: list[torch.Tensor], head_maps: HeadMapsFn
) -> list[dict[str, torch.Tensor]]:
    """RetinaNet's eval forward with the tensor part computed by ``head_maps``.

    ``images``: ``float [3, H, W]`` in 0..1, any sizes. Returns torchvision's per-image
    ``{"boxes" float [N, 4] (original pixels), "scores" float [N], "labels" int64 [N]}``,
    computed by torchvision's own transform, anchor generator, ``postprocess_detections``
    (score floor, top-k, per-class NMS) and ``transform.postprocess``.
    """
    original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    image_list, _ = retinanet.transform(images)
    device = image_list.tensors.device
    maps = [torch.as_tensor(m, device=device) for m in head_maps(image_list.tensors)]
    levels = len(maps) // 2
    cls_maps, reg_maps = maps[:levels], maps[levels:]
    num_classes = retinanet.head.classification_head.num_classes
    head_outputs = {"cls_logits": _flatten(cls_maps, num_classes),
                    "bbox_regression": _flatten(reg_maps, 4)}
    # The anchor generator reads only each map's H_l x W_l, dtype and device.
    anchors = retinanet.anchor_generator(image_list, cls_maps)
    per_level = [int(m.shape[1] // num_classes * m.shape[2] * m.shape[3]) for m in cls_maps]
    split = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
    split_anchors = [list(a.split(per_level)) for a in anchors]
    dets = retinanet.postprocess_detections(split, split_anchors, image_list.image_sizes)
    return retinanet.transform.postprocess(dets, image_list.image_sizes, original_sizes)


def _to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
        raise TypeError("detect() takes RGB uint8 numpy arrays [H, W, 3]; decode images first")
    if image.shape[2] != 3:
        raise ValueError(f"expected 3 channels (RGB), got shape {image.shape}")
    t = torch.from_numpy(image.copy()).to(device)
    return t.permute(2, 0, 1).float().div_(255.0)


def build_detector(
    backbone: str,
    categories: Sequence[str],
    *,
    min_size: int,
    max_size: int,
    backbone_weights: Path | None = None,
    fpn_channels: int | None = None,
    anchor_sizes: Sequence[int] | None = None,
) -> ProductDetector:
    """A RetinaNet product detector with ``categories`` as its classes.

    Args:
        backbone: a name in ``DETECTOR_BACKBONES``.
        categories: class names; label ``i`` is ``categories[i]``.
        min_size, max_size: the input is resized so its short side is ``min_size`` unless
            that makes the long side exceed ``max_size`` (torchvision's rule), in pixels.
        backbone_weights: a local torchvision ImageNet state_dict for the backbone (e.g.
            ``mobilenet_v2-b0353104.pth``); None trains from scratch.
        fpn_channels: FPN/head width; None uses the backbone's default.
        anchor_sizes: base anchor side per level P3..P7; None uses ``default_anchor_sizes``.
    """
    categories = list(categories)
    if not categories:
        raise ValueError("a detector needs at least one category")
    if len(set(categories)) != len(categories):
        raise ValueError(f"category names must be unique, got {categories}")
    if min_size <= 0 or max_size < min_size:
        raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
    spec: DetectorBackbone = DETECTOR_BACKBONES.get(backbone)
    sizes = [int(s) for s in (anchor_sizes or default_anchor_sizes(min_size))]
    if len(sizes) != 5:
        raise ValueError(f"anchor_sizes needs one size per level P3..P7 (5), got {sizes}")
    config = {
        "backbone": backbone,
        "categories": categories,
        "min_size": int(min_size),
        "max_size": int(max_size),
        "fpn_channels": int(fpn_channels or spec.fpn_channels),
        "anchor_sizes": sizes,
        "pretrained": backbone_weights is not None,
    }
    return _assemble(config, Path(backbone_weights) if backbone_weights else None)


def _assemble(config: dict[str, Any], weights: Path | None) -> ProductDetector:
    spec: DetectorBackbone = DETECTOR_BACKBONES.get(config["backbone"])
    body = spec.build(config["fpn_channels"], weights, bool(config["pretrained"]))
    sizes = config["anchor_sizes"]
    anchors = AnchorGenerator(
        tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes),
        ((0.5, 1.0, 2.0),) * len(sizes),
    )
    # GroupNorm in the head (torchvision's RetinaNet v2 recipe): from scratch, on small CPU
    # batches, the plain v1 head often collapses to "background everywhere" for many epochs.
    channels = config["fpn_channels"]
    head = RetinaNetHead(
        channels,
        anchors.num_anchors_per_location()[0],
        len(config["categories"]),
        norm_layer=partial(nn.GroupNorm, max(1, min(32, channels // 4))),
    )
    net = RetinaNet(
        body,
        num_classes=len(config["categories"]),
        head=head,
        min_size=config["min_size"],
        max_size=config["max_size"],
        anchor_generator=anchors,
        score_thresh=MIN_SCORE,
        detections_per_img=100,
    )
    return ProductDetector(net, config["categories"], config)


def save_detector(model: ProductDetector, path: str | os.PathLike[str]) -> None:
    """Write ``{"format", "config", "state_dict"}`` (tensors on the CPU) to one file,
    atomically (:func:`visearch.fileio.atomic_open`); missing parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_open(path, "wb") as f:
        torch.save({"format": FORMAT, "config": model.config, "state_dict": state}, f)


def load_detector(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> ProductDetector:
    """Read a file written by ``save_detector``; the model comes back in eval mode."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a visearch detector file (expected format {FORMAT})")
    model = _assemble(dict(blob["config"]), None)
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()
