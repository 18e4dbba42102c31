"""Image -> tensor pipelines (torchvision.transforms.v2) for training and inference.

Both take an RGB ``uint8 [H, W, 3]`` numpy array (what ``visearch.imageio.decode_image``
returns) and give a normalised ``float32 [3, S, S]`` tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

AUGMENTS = ("light", "strong")


def _optional(name: str, *args: object, **kwargs: object) -> list[v2.Transform]:
    """``[v2.<name>(*args, **kwargs)]`` when this torchvision has it, else ``[]`` (v2.JPEG and
    v2.GaussianNoise are recent additions)."""
    cls = getattr(v2, name, None)
    return [cls(*args, **kwargs)] if cls is not None else []


def train_transform(
    image_size: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    scale: tuple[float, float] = (0.35, 1.0),
    flip: float = 0.5,
    jitter: float = 0.3,
    erasing: float = 0.5,
    augment: str = "light",
) -> v2.Compose:
    """Augmentations for metric learning on product images.

    ``augment="light"``: random resized crop (``scale`` of the area, aspect 3/4..4/3),
    horizontal flip with probability ``flip``, colour jitter of brightness/contrast/saturation
    by ``jitter`` (no hue), then random erasing with probability ``erasing`` (a hidden patch
    stops the model from matching on one distinctive region, so it learns shape as well as
    texture).

    ``augment="strong"`` adds general photometric and geometric corruptions that close the gap
    between clean catalog images and photos taken in the wild: random perspective and
    rotation (+-20 deg), stronger colour jitter with a small hue shift, random grayscale,
    Gaussian blur, JPEG re-compression and Gaussian noise (the last two when this torchvision
    has them). Set ``jitter`` or ``erasing`` to 0 to switch those off.
    """
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    strong = augment == "strong"
    steps: list[v2.Transform] = [v2.ToImage()]
    if strong:
        steps += [
            v2.RandomApply([v2.RandomRotation(20)], p=0.5),
            v2.RandomPerspective(distortion_scale=0.3, p=0.5),
        ]
    steps.append(
        v2.RandomResizedCrop(
            (image_size, image_size), scale=scale, ratio=(0.75, 4 / 3), antialias=True
        )
    )
    if flip > 0:
        steps.append(v2.RandomHorizontalFlip(flip))
    if jitter > 0:
        if strong:
            steps.append(
                v2.RandomApply(
                    [v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05)],
                    p=0.8,
                )
            )
        else:
            steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    if strong:
        steps += [
            v2.RandomGrayscale(p=0.05),
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.3),
            *[v2.RandomApply(t, p=0.3) for t in [_optional("JPEG", (30, 90))] if t],
        ]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if strong:
        steps += [v2.RandomApply(t, p=0.3) for t in [_optional("GaussianNoise", sigma=0.03)] if t]
    steps.append(v2.Normalize(list(mean), list(std)))
    if erasing > 0:
        steps.append(v2.RandomErasing(p=erasing, scale=(0.02, 0.25), value=0))
    return v2.Compose(steps)


def eval_transform(image_size: int, *, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Resize to ``image_size`` x ``image_size`` (aspect not kept, as in training's random
    resized crop) and normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
