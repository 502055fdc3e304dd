"""The copy search's parts on real chest X-rays: equalisation removes intensity maps, registration undoes a
rotation, zoom and shift. (Every disguise flagged by the whole audit: test_audit.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinodiff.data.image_sets import iter_sources
from dinodiff.evaluate.audit import copies

from audit_data import SIZE, disguise


@pytest.fixture(scope="module")
def images(shared_data) -> list[np.ndarray]:
    return [s.image for s in iter_sources(shared_data / "cxr-covid", size=SIZE, limit=40)]


def test_equalisation_makes_monotone_intensity_maps_vanish(images):
    image = images[20]
    brighter = disguise(image, gamma=0.6)
    assert np.abs(brighter.astype(int) - image).mean() > 15  # a visible change
    a, b = (copies.working(torch.from_numpy(x[None])) for x in (image, brighter))
    assert (a - b).abs().max() < 0.02


def test_registration_recovers_a_rotation_zoom_and_shift(images):
    image = images[30]
    moved = disguise(image, angle=5.0, zoom=1.08, shift=(0.04, -0.03))
    query, source = (copies.working(torch.from_numpy(x[None])) for x in (moved, image))
    distance, params = copies.register(query, source[:, None])
    angle, log_zoom, tx, ty = params[0, 0].tolist()
    assert abs(np.degrees(angle) - 5.0) < 1.0 and abs(np.exp(log_zoom) - 1.08) < 0.03
    assert abs(tx / 2 - 0.04) < 0.01 and abs(ty / 2 + 0.03) < 0.01
    unaligned = (copies.crops(query, copies.IDENTITY, copies.CROP) - copies.crops(source, copies.IDENTITY, copies.CROP))
    assert distance.item() < 0.25 * unaligned.norm().item()
