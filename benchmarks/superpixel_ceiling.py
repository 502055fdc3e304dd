"""How far can a cut over superpixels go? The ceiling of ncut-superpixels per image side and node scale.

    python benchmarks/superpixel_ceiling.py --data ../shared/data/lungs-covid --data ../shared/data/lungs-shenzhen
    python benchmarks/superpixel_ceiling.py --data ... --sides 256 --scales 25,50,100,200,400,800

ncut-superpixels can only join whole superpixels, so its Dice is bounded by the best grouping of them: every
superpixel that is mostly lung (by the masks) called lung. This prints that ceiling (both lungs, mean over
images) with the superpixel count per image and Felzenszwalb's time, for each image side (the model's
resolution) and scale. The ceiling reads the masks: it is a diagnostic for choosing `--node-scales`, not a result.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dinodiff.evaluate.segment.data import load_cases
from dinodiff.evaluate.segment.metrics import superpixel_segments


def ceiling_dice(superpixels: np.ndarray, lungs: np.ndarray) -> float:
    """Dice of the best union of superpixels: those whose pixels are more than half lung."""
    fraction = np.bincount(superpixels.ravel(), weights=lungs.ravel()) / np.bincount(superpixels.ravel())
    chosen = (fraction > 0.5)[superpixels]
    return float(2 * (chosen & lungs).sum() / (chosen.sum() + lungs.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True, help="a lung set (repeatable)")
    parser.add_argument("--sides", default="64,256", help="image sides in pixels")
    parser.add_argument("--scales", default="25,50,100,200,400,800", help="Felzenszwalb scales")
    args = parser.parse_args()
    print("| side | scale | ceiling Dice (both lungs) | superpixels per image (median, max) | ms per image |")
    print("|---|---|---|---|---|")
    for side in map(int, args.sides.split(",")):
        cases = [case for source in args.data for case in load_cases(source, side)]
        for scale in map(float, args.scales.split(",")):
            dice, counts, start = [], [], time.perf_counter()
            for case in cases:
                superpixels = superpixel_segments(np.asarray(case.image), scale)
                dice.append(ceiling_dice(superpixels, np.logical_or.reduce(list(case.lungs.values()))))
                counts.append(int(superpixels.max()) + 1)
            ms = (time.perf_counter() - start) / len(cases) * 1e3
            print(f"| {side} | {scale:g} | {100 * np.mean(dice):.1f} | {np.median(counts):g}, {max(counts)} | {ms:.0f} |")
    print(f"\n{len(cases)} images per row")


if __name__ == "__main__":
    main()
