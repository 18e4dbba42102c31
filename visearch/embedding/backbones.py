"""Convolutional trunks for the embedder, by name (looked up at the CLI edge).

Each factory takes ``pretrained: Path | None`` (a local torchvision weights file for the
*whole* classification model, loaded strictly, or None for random initialisation) and returns
``(trunk, channels)``: ``trunk(x float [B, 3, H, W]) -> float [B, channels, h, w]``. Nothing is
downloaded: torchvision models are built with ``weights=None``.
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


def _load_classifier(model: nn.Module, pretrained: Path | None) -> nn.Module:
    """Load a torchvision classification checkpoint strictly into ``model``."""
    if pretrained is None:
        return model
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights {path} not found; pass an existing torchvision .pth file or "
            "pretrained=None to start from scratch"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
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
