"""Copy a lung-mask dataset (Montgomery or Shenzhen layout) with images and masks shrunk together.

    python benchmarks/gpu/shrink_lungs.py SRC DST --size 256 [--limit N]

The shorter side becomes SIZE (never enlarged), images with bilinear/antialiased resizing, masks with
nearest neighbour, so `dinodiff segment` reads DST exactly like SRC (same layout, same geometry up to
scale; its own preprocessing then crops and resizes image and masks together). Files are written as PNG.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from PIL import Image

logger = logging.getLogger(__name__)
IMAGE_DIRS = ("CXR_png",)
MASK_DIRS = ("ManualMask/leftMask", "ManualMask/rightMask", "masks")


def _scaled(size: tuple[int, int], short: int) -> tuple[int, int]:
    w, h = size
    factor = min(1.0, short / min(w, h))
    return max(1, round(w * factor)), max(1, round(h * factor))


def shrink_file(src: Path, dst: Path, short: int, mask: bool) -> None:
    """Resize one PNG so its shorter side is at most ``short`` (nearest for masks) and save it at ``dst``."""
    with Image.open(src) as im:
        im.load()
        new = _scaled(im.size, short)
        out = im.resize(new, Image.NEAREST if mask else Image.BILINEAR, reducing_gap=None if mask else 2.0)
    dst.parent.mkdir(parents=True, exist_ok=True)
    out.save(dst, optimize=True)


def shrink_dataset(src: Path, dst: Path, short: int = 256, limit: int | None = None) -> int:
    """Shrink every image of ``src`` (first ``limit`` by name) and its masks into ``dst``; returns the count."""
    images = sorted(p for d in IMAGE_DIRS for p in (src / d).glob("*.png"))[:limit]
    for image in images:
        shrink_file(image, dst / image.relative_to(src), short, mask=False)
        for mask_dir in MASK_DIRS:
            for mask in (src / mask_dir).glob(f"{image.stem}*.png"):
                if mask.stem in (image.stem, f"{image.stem}_mask"):
                    shrink_file(mask, dst / mask.relative_to(src), short, mask=True)
    for extra in ("metadata.csv",):
        if (src / extra).is_file():
            (dst / extra).write_bytes((src / extra).read_bytes())
    return len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    n = shrink_dataset(args.src, args.dst, args.size, args.limit)
    print(f"{n} images with masks -> {args.dst}")


if __name__ == "__main__":
    main()
