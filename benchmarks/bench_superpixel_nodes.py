"""ncut-superpixels per-image cost: superpixels and pooled features once per image and scale (the product) against
once per grid cell (the previous code), on real lung images, through `dinodiff segment`'s own `label_cell`.

    python benchmarks/bench_superpixel_nodes.py --data ../shared/data/lungs-covid              # 256 px, GPU grid
    python benchmarks/bench_superpixel_nodes.py --data ../shared/data/lungs-covid --px 64 --scales 50,100

The grid is the GPU recipe's (benchmarks/gpu/segrecipe.py: taus 0.5/0.7/0.9 x alphas 5/10 x node scales 50/100), both
refinements. The previous code ran Felzenszwalb (~45 ms on a 256 px image) and upsampled every feature channel to
pixels for every cell; the cells that differ only in tau and alpha now share both (``label_cell``'s ``nodes``;
without it, each cell computes its own, as before). The features are bench_ncut's random blobs of --channels channels on a
--side map (384: a gpu-seg256 16x16 layer's 128 channels x 3 timesteps). Prints ms per image for each and whether
every label map is equal.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from bench_ncut import blob_features  # benchmarks/bench_ncut.py, beside this file

from dinodiff.evaluate.segment.data import load_cases
from dinodiff.evaluate.segment.grid import Passes, label_cell
from dinodiff.evaluate.segment.settings import Cell, SegmentSettings


def label_all(cells: list[Cell], passes: Passes, images: list[np.ndarray], shared: bool) -> tuple[float, list]:
    """Seconds per image for every cell's label map, with the per-image ``nodes`` shared or not."""
    settings, maps = SegmentSettings(), []
    start = time.perf_counter()
    for b, image in enumerate(images):
        done: dict = {}
        nodes: dict | None = {} if shared else None
        maps += [label_cell(cell, passes, b, image, settings, done, nodes)[0] for cell in cells]
    return (time.perf_counter() - start) / len(images), maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a lung set (lungs-covid layout)")
    parser.add_argument("--px", type=int, default=256, help="image side (the model's resolution)")
    parser.add_argument("--side", type=int, default=16, help="feature map side")
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--scales", default="50,100", help="node scales (Felzenszwalb)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a GPU run's host side: the cuts run on one CPU thread beside the device's work
    images = [c.image for c in load_cases(args.data, args.px, limit=args.images)]
    passes = Passes(attention=torch.empty(0),
                    features={"ncut-superpixels": {args.side: blob_features(len(images), args.side, args.channels)}})
    cells = [Cell("m", "ncut-superpixels", (50,), args.side, tau, alpha, refine, float(scale))
             for scale in args.scales.split(",") for tau in (0.5, 0.7, 0.9) for alpha in (5.0, 10.0)
             for refine in ("none", "components")]
    before, old = label_all(cells, passes, images, shared=False)
    after, new = label_all(cells, passes, images, shared=True)
    same = sum(bool(torch.equal(a, b)) for a, b in zip(old, new))
    print(f"{len(images)} images at {args.px} px, {len(cells)} cells (node scales {args.scales}), "
          f"{args.side}x{args.side} features x {args.channels} channels")
    print("| superpixels and pooled features | ms per image | label maps equal |")
    print("|---|---|---|")
    print(f"| per cell (previous) | {before * 1e3:.0f} | - |")
    print(f"| per image and scale (product) | {after * 1e3:.0f} | {same} of {len(old)} |")
    print(f"\nratio previous / product: {before / after:.1f}x")


if __name__ == "__main__":
    main()
