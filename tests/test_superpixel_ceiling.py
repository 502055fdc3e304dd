"""benchmarks/superpixel_ceiling.py: the best Dice a cut over superpixels can reach (superpixels mostly lung)."""

from __future__ import annotations

import sys

import numpy as np
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import superpixel_ceiling  # noqa: E402


def test_ceiling_is_one_for_superpixels_inside_the_lungs_and_drops_when_one_straddles_the_edge():
    lungs = np.zeros((8, 8), bool)
    lungs[:, :4] = True
    aligned = (np.arange(8)[None, :] >= 4).repeat(8, 0).astype(int)  # columns 0-3 and 4-7: edge at column 4
    assert superpixel_ceiling.ceiling_dice(aligned, lungs) == 1.0
    straddling = np.zeros((8, 8), int)
    straddling[:, 3:6] = 1  # columns 3-5: one lung column of three, so called background
    straddling[:, 6:] = 2
    # chosen: columns 0-2 (24 px) of the 32 lung pixels: Dice 2 * 24 / (24 + 32)
    assert np.isclose(superpixel_ceiling.ceiling_dice(straddling, lungs), 48 / 56)
    straddling[:, 5] = 2  # superpixel 1 now columns 3-4: half lung, not more than half, still background
    assert np.isclose(superpixel_ceiling.ceiling_dice(straddling, lungs), 48 / 56)
