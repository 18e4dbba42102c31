"""The embedder model: registry, shapes, normalisation, pooling, attention, save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw

from visearch.embedding import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    GeM,
    SpatialAttention,
    build_embedder,
    input_norm,
    load_embedder,
    save_embedder,
)
from visearch.embedding.backbones import _timm_efficientnet_keys

WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "mobilenet_v2-b0353104.pth"
LITE0 = WEIGHTS.with_name("efficientnet-lite0-57934424.pth")


def test_registry_lists_the_backbones() -> None:
    assert {
        "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_lite0", "tiny"
    } <= set(BACKBONES.names())
    with pytest.raises(KeyError, match="mobilenet_v2"):
        build_embedder("vgg16")


@pytest.mark.parametrize(
    "backbone", ["tiny", "resnet18", "mobilenet_v3_large", "efficientnet_lite0"]
)
def test_forward_gives_unit_vectors_of_dim(backbone: str) -> None:
    torch.manual_seed(0)
    model = build_embedder(backbone, dim=24, attention=True).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, 24) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    assert model.config["backbone"] == backbone and model.config["attention"] is True
    assert {"dim", "pooling", "input_size", "mean", "std"} <= set(model.config)


def test_gem_matches_formula_and_p1_is_average_pooling() -> None:
    x = torch.rand(2, 5, 4, 3) + 0.1
    gem = GeM(p=3.0)
    expected = (x**3).mean(dim=(2, 3)) ** (1 / 3)
    torch.testing.assert_close(gem(x), expected)
    torch.testing.assert_close(GeM(p=1.0)(x), x.mean(dim=(2, 3)))
    assert gem(x).sum().requires_grad and gem.p.requires_grad


def test_spatial_attention_starts_as_scaled_identity_and_learns_a_spatial_mask() -> None:
    att = SpatialAttention(kernel_size=3)
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(att(x), 1.5 * x)  # zero-initialised: mask = sigmoid(0)
    assert att.mask(x).shape == (2, 1, 5, 5)  # one weight per location, none per channel
    att(x).square().sum().backward()
    assert att.conv.weight.grad.abs().sum() > 0


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_embedder("tiny", dim=16, pooling="avg", attention=True, input_size=40)
    model.train()
    model(torch.randn(4, 3, 40, 40))  # move the BN running statistics off their defaults
    model.eval()
    path = tmp_path / "m" / "embedder.pt"
    save_embedder(model, path)
    loaded = load_embedder(path)
    assert loaded.config == model.config and not loaded.training
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_forward_features_without_neck_is_the_necks_input() -> None:
    torch.manual_seed(0)
    model = build_embedder("tiny", dim=16, attention=True, input_size=40).eval()
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        z = model.forward_features(x, neck=False)
        by_hand = model.proj(model.pool(model.attention(model.trunk(x))))
        assert z.shape == (3, 16)
        assert torch.equal(z, by_hand)
        assert torch.equal(model.neck(z), model.forward_features(x))


def test_a_failed_save_leaves_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    old, new = (build_embedder("tiny", dim=8, input_size=32) for _ in range(2))
    path = tmp_path / "embedder.pt"
    save_embedder(old, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space left"):
        save_embedder(new, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["embedder.pt"]  # no temp file left
    loaded = load_embedder(path)
    for name, value in old.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_load_rejects_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_embedder(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a visearch embedder"):
        load_embedder(tmp_path / "other.pt")


def test_bad_arguments_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="pooling"):
        build_embedder("tiny", pooling="max")
    with pytest.raises(ValueError, match="no pretrained"):
        build_embedder("tiny", pretrained="x.pth")
    with pytest.raises(FileNotFoundError, match="pretrained=None"):
        build_embedder("resnet18", pretrained="/nonexistent/weights.pth")


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="ImageNet MobileNetV2 weights not installed")
def test_pretrained_mobilenet_v2_loads_the_official_weights_strictly() -> None:
    model = build_embedder("mobilenet_v2", pretrained=WEIGHTS).eval()
    reference = torchvision.models.mobilenet_v2(weights=None)
    reference.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    reference.eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model.trunk(x), reference.features(x))
        # ImageNet features are meaningful: the reference classifier still works on them.
        logits = reference.classifier(F.adaptive_avg_pool2d(model.trunk(x), 1).flatten(1))
    assert logits.shape == (1, 1000)


def test_each_backbone_is_normalised_as_its_weights_were_trained() -> None:
    assert input_norm("mobilenet_v2") == (IMAGENET_MEAN, IMAGENET_STD)
    # TensorFlow's EfficientNet-Lite: (x - 127) / 128 on 8-bit pixels
    assert input_norm("efficientnet_lite0") == ((0.5,) * 3, (0.5,) * 3)
    assert build_embedder("efficientnet_lite0", dim=8).config["mean"] == [0.5] * 3
    assert build_embedder("resnet18", dim=8).config["std"] == list(IMAGENET_STD)
    explicit = build_embedder("efficientnet_lite0", dim=8, mean=(0.1, 0.2, 0.3), std=(1, 1, 1))
    assert explicit.config["mean"] == [0.1, 0.2, 0.3]
    with pytest.raises(KeyError, match="efficientnet_lite0"):
        input_norm("vgg16")


def test_efficientnet_lite0_trunk_is_its_blocks_in_order() -> None:
    torch.manual_seed(0)
    trunk, channels = BACKBONES.get("efficientnet_lite0")(None)
    # stem, 16 MBConv blocks (stages of 1, 2, 2, 3, 3, 4, 1), head: frozen_blocks counts these
    assert isinstance(trunk, torch.nn.Sequential) and len(trunk) == 18 and channels == 1280
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert trunk.eval()(x).shape == (2, 1280, 3, 3)  # stride 32
        assert trunk[:6](x).shape == (2, 40, 12, 12)  # 7 frozen blocks end at stride 8


def test_efficientnet_key_renaming_rejects_a_foreign_checkpoint() -> None:
    with pytest.raises(ValueError, match="efficientnet_pytorch layout"):
        _timm_efficientnet_keys({"_conv_stem.weight": torch.zeros(1), "fc.weight": torch.zeros(1)},
                                [1, 2, 2, 3, 3, 4, 1])
    with pytest.raises(ValueError, match="unexpected key '_blocks.16"):
        _timm_efficientnet_keys({"_blocks.16._bn0.weight": torch.zeros(1)}, [1, 2, 2, 3, 3, 4, 1])


def _drawn_images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    """``float [n, 3, side, side]`` in [0, 1]: seeded coloured rectangles and ellipses."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        image = Image.new("RGB", (side, side), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 8))):
            x0, x1 = sorted(int(v) for v in rng.integers(0, side, 2))
            y0, y1 = sorted(int(v) for v in rng.integers(0, side, 2))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if i % 2 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
    return torch.stack(images)


@pytest.mark.skipif(
    not (LITE0.is_file() and WEIGHTS.is_file()),
    reason="ImageNet EfficientNet-Lite0 or MobileNetV2 weights not installed "
    "(python scripts/fetch_weights.py --out weights)",
)
def test_pretrained_efficientnet_lite0_loads_strictly_and_classifies_like_imagenet() -> None:
    import timm

    model = build_embedder("efficientnet_lite0", pretrained=LITE0).eval()
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state = torch.load(LITE0, weights_only=True)
    net.load_state_dict(_timm_efficientnet_keys(state, [1, 2, 2, 3, 3, 4, 1]), strict=True)
    assert net.classifier.out_features == 1000
    reference = torchvision.models.mobilenet_v2(weights=None).eval()
    reference.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    x = _drawn_images(16, 224)
    half = (x - 0.5) / 0.5  # the model's own normalisation
    with torch.no_grad():
        torch.testing.assert_close(model.trunk(half), net.forward_features(half))
        lite = net(half).topk(5).indices
        mobile = reference(torchvision.transforms.functional.normalize(
            x, IMAGENET_MEAN, IMAGENET_STD)).topk(5).indices
    # Two independently trained ImageNet classifiers share top-5 classes on the same drawings
    # (2.0 of 5 on average here); a wrong renaming that still loads strictly (e.g. swapping
    # the same-shaped BNs of the inverted residuals) or another label order falls to chance
    # (25 / 1000 = 0.025; 0.06 measured for the swap).
    pairs = zip(lite.tolist(), mobile.tolist(), strict=True)
    shared = np.mean([len(set(a) & set(b)) for a, b in pairs])
    assert shared >= 1.0
