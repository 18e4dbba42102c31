"""Convolutional trunks for the embedder, by name (looked up at the CLI edge).

Each factory takes ``pretrained: Path | None`` (a local weights file for the *whole*
classification model, loaded strictly, or None for random initialisation) and returns
``(trunk, channels)``: ``trunk(x float [B, 3, H, W]) -> float [B, channels, h, w]``. The trunk
is an ``nn.Sequential`` of its blocks in order (``frozen_blocks`` freezes a prefix of them).
Nothing is downloaded: torchvision models are built with ``weights=None``, timm models with
``pretrained=False``.

:func:`input_norm` gives the per-channel mean and std each trunk's weights were trained with.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from visearch.registry import Registry

BackboneFactory = Callable[[Path | None], tuple[nn.Module, int]]

BACKBONES: Registry[BackboneFactory] = Registry("backbone")

Norm = tuple[float, float, float]
IMAGENET_MEAN: Norm = (0.485, 0.456, 0.406)
IMAGENET_STD: Norm = (0.229, 0.224, 0.225)
#: TensorFlow's edge models (EfficientNet-Lite) were trained on ``(x - 127) / 128`` of 8-bit
#: pixels ("inception-style, for better post-quantisation"); timm's ``tf_efficientnet_lite*``
#: configs round it to 0.5 / 0.5 for values in [0, 1], as here.
INCEPTION_MEAN: Norm = (0.5, 0.5, 0.5)
INCEPTION_STD: Norm = (0.5, 0.5, 0.5)
_NORMS: dict[str, tuple[Norm, Norm]] = {"efficientnet_lite0": (INCEPTION_MEAN, INCEPTION_STD)}


def input_norm(backbone: str) -> tuple[Norm, Norm]:
    """``(mean, std)`` (RGB, for values in [0, 1]) the backbone's pretrained weights expect:
    ImageNet's unless the backbone is listed otherwise. KeyError for an unknown name."""
    BACKBONES.get(backbone)  # unknown names fail here, listing the valid ones
    return _NORMS.get(backbone, (IMAGENET_MEAN, IMAGENET_STD))


def _load_classifier(
    model: nn.Module, pretrained: Path | None,
    remap: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> nn.Module:
    """Load a classification checkpoint strictly into ``model`` (its keys first passed
    through ``remap`` when given: a checkpoint written by another implementation)."""
    if pretrained is None:
        return model
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights {path} not found; pass an existing .pth file for this "
            "backbone or pretrained=None to start from scratch"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(remap(state) if remap is not None else state, strict=True)
    return model


def _resnet(arch: Callable[..., nn.Module], pretrained: Path | None) -> tuple[nn.Module, int]:
    net = _load_classifier(arch(weights=None), pretrained)
    channels = net.fc.in_features
    trunk = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )
    return trunk, channels


@BACKBONES.register("resnet18")
def resnet18(pretrained: Path | None = None) -> tuple[nn.Module, int]:
    """torchvision ResNet-18 up to layer4 (512 channels, stride 32)."""
    return _resnet(torchvision.models.resnet18, pretrained)


@BACKBONES.register("resnet50")
def resnet50(pretrained: Path | None = None) -> tuple[nn.Module, int]:
    """torchvision ResNet-50 up to layer4 (2048 channels, stride 32)."""
    return _resnet(torchvision.models.resnet50, pretrained)


@BACKBONES.register("mobilenet_v2")
def mobilenet_v2(pretrained: Path | None = None) -> tuple[nn.Module, int]:
    """torchvision MobileNetV2 ``features`` (1280 channels, stride 32)."""
    net = _load_classifier(torchvision.models.mobilenet_v2(weights=None), pretrained)
    return net.features, net.last_channel


@BACKBONES.register("mobilenet_v3_large")
def mobilenet_v3_large(pretrained: Path | None = None) -> tuple[nn.Module, int]:
    """torchvision MobileNetV3-Large ``features`` (960 channels, stride 32)."""
    net = _load_classifier(torchvision.models.mobilenet_v3_large(weights=None), pretrained)
    channels = net.classifier[0].in_features
    return net.features, channels


# EfficientNet-Lite0 as converted from TensorFlow's checkpoint to the key layout of the
# ``efficientnet_pytorch`` package (``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc``): the
# file scripts/fetch_weights.py installs. Its blocks are numbered flat (0..15) where timm nests
# them by stage; the renaming below is the whole difference (timm's tf_ model with these
# weights gives the reference implementation's logits exactly at 224, 128 and 96 px).
_TOP_KEYS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
             "_bn1": "bn2", "_fc": "classifier"}
_DS_KEYS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
            "_bn2": "bn2"}
_IR_KEYS = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
            "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}


def _timm_efficientnet_keys(
    state: dict[str, torch.Tensor], stage_depths: list[int]
) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch``-layout state dict to timm's EfficientNet layout.

    ``stage_depths`` are the block counts of timm's stages, in order. A block with an
    ``_expand_conv`` is an inverted residual, one without it a depthwise-separable block.
    Keys of neither layout raise ValueError naming the first one.
    """
    where = [(i, j) for i, depth in enumerate(stage_depths) for j in range(depth)]
    expands = {k.split(".")[1] for k in state if k.startswith("_blocks.") and "_expand_conv" in k}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        try:
            if parts[0] == "_blocks":
                i, j = where[int(parts[1])]
                table = _IR_KEYS if parts[1] in expands else _DS_KEYS
                out[".".join(["blocks", str(i), str(j), table[parts[2]], *parts[3:]])] = value
            else:
                out[".".join([_TOP_KEYS[parts[0]], *parts[1:]])] = value
        except (KeyError, IndexError, ValueError):
            raise ValueError(
                f"unexpected key {key!r}: not an EfficientNet-Lite checkpoint in the "
                "efficientnet_pytorch layout (run scripts/fetch_weights.py for the right file)"
            ) from None
    return out


@BACKBONES.register("efficientnet_lite0")
def efficientnet_lite0(pretrained: Path | None = None) -> tuple[nn.Module, int]:
    """timm ``tf_efficientnet_lite0`` up to its head (1280 channels, stride 32), 18 blocks:
    the stem, the 16 MBConv blocks, the head. TensorFlow "SAME" padding, ReLU6, no SE.

    ``pretrained`` is the ImageNet checkpoint in the ``efficientnet_pytorch`` layout (what
    scripts/fetch_weights.py installs) or in timm's own; either is loaded strictly. Its inputs
    are normalised with :data:`INCEPTION_MEAN` / :data:`INCEPTION_STD` (:func:`input_norm`).
    """
    import timm  # imported here: timm takes seconds to import and serving never needs it

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    sizes = [len(stage) for stage in net.blocks]

    def remap(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if any(k.startswith("_conv_stem.") for k in state):  # efficientnet_pytorch layout
            return _timm_efficientnet_keys(state, sizes)
        return state

    _load_classifier(net, pretrained, remap)
    blocks = [block for stage in net.blocks for block in stage]
    trunk = nn.Sequential(
        nn.Sequential(net.conv_stem, net.bn1), *blocks, nn.Sequential(net.conv_head, net.bn2)
    )
    return trunk, net.num_features


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


@BACKBONES.register("tiny")
def tiny(pretrained: Path | None = None) -> tuple[nn.Module, int]:
    """A 4-layer CPU test trunk (64 channels, stride 16); accepts only ``pretrained=None``.

    It exists so tests can train a real model end to end in seconds on one core.
    """
    if pretrained is not None:
        raise ValueError("the 'tiny' test backbone has no pretrained weights; pass None")
    trunk = nn.Sequential(
        _conv_bn_relu(3, 16), _conv_bn_relu(16, 32), _conv_bn_relu(32, 64), _conv_bn_relu(64, 64)
    )
    return trunk, 64
