"""Phantoms: deterministic synthetic chest X-rays with sane masks and labels, written in the
Montgomery layout."""

from __future__ import annotations

import csv
import time

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from dinodiff.data import phantoms
from dinodiff.data.phantoms import LABELS, make_phantom, phantom_labels, write_phantoms
from dinodiff.data.preprocess import find_content_box, preprocess_image, preprocess_mask


def test_same_index_and_seed_give_identical_bytes_and_others_differ():
    a, b = make_phantom(5, size=128, seed=3), make_phantom(5, size=128, seed=3)
    assert a.image.tobytes() == b.image.tobytes()
    assert np.array_equal(a.left_mask, b.left_mask) and a.labels == b.labels
    assert make_phantom(6, 128, 3).image.tobytes() != a.image.tobytes()
    assert make_phantom(5, 128, 4).image.tobytes() != a.image.tobytes()


@pytest.mark.parametrize("index", range(8))
def test_masks_are_inside_the_image_non_empty_and_on_the_correct_sides(index):
    ph = make_phantom(index, size=128)
    img, left, right = ph.image, ph.left_mask, ph.right_mask
    assert img.dtype == np.uint8 and left.dtype == right.dtype == np.bool_
    assert left.shape == right.shape == img.shape
    assert left.sum() > 0.03 * img.size and right.sum() > 0.03 * img.size
    assert not (left & right).any()
    centre = img.shape[1] / 2
    # The patient's left lung is on the image's right.
    assert np.nonzero(left)[1].min() > centre > np.nonzero(right)[1].max()
    # Aerated lung is darker than the body around it.
    body = ndimage.binary_dilation(left | right, iterations=6) & ~(left | right)
    if not ph.labels["Pleural Effusion"]:
        assert img[left | right].mean() < img[body].mean() - 20
    assert set(ph.labels) == set(LABELS) and set(ph.labels.values()) <= {0, 1}


def test_labels_have_30_to_40_percent_prevalence_and_match_the_phantom():
    counts = {k: 0 for k in LABELS}
    n = 600
    for i in range(n):
        for k, v in phantom_labels(i, seed=0).items():
            counts[k] += v
    for k, c in counts.items():
        assert 0.28 <= c / n <= 0.42, (k, c / n)
    assert make_phantom(9, 64).labels == phantom_labels(9)


def _heart_width(ph) -> int:
    """Width of the bright run through the heart centre (row v = 0.3), in pixels."""
    img = ndimage.gaussian_filter(ph.image.astype(np.float32), 1.5)
    h, w = img.shape
    row = img[int(round((0.3 + 1) / 2 * (h - 1)))] > 172
    c = int(0.55 * w)  # the heart sits right of centre (patient's left)
    lo, hi = c, c
    while lo > 0 and row[lo - 1]:
        lo -= 1
    while hi < w - 1 and row[hi + 1]:
        hi += 1
    return hi - lo + 1 if row[c] else 0


def test_cardiomegaly_phantoms_have_a_wider_heart():
    widths = {0: [], 1: []}
    for i in range(40):
        if i % 4 == 3:
            continue  # framed canvases have another scale
        ph = make_phantom(i, size=128)
        widths[ph.labels["Cardiomegaly"]].append(_heart_width(ph))
    assert len(widths[1]) >= 5 and len(widths[0]) >= 5
    assert min(widths[1]) > max(widths[0]), widths


@pytest.mark.parametrize("index,frame", [(3, 0), (7, 255), (11, 0)])
def test_framed_phantoms_exercise_border_removal_and_masks_follow(index, frame):
    ph = make_phantom(index, size=128)
    img = ph.image
    assert img[-1, -1] == frame and img[img.shape[0] // 2, 0] == frame
    pad = 128 // 16
    if index == 11:  # letterboxed, non-square canvas
        assert img.shape == (128, 128 + 6 * pad)
        truth = (0, 3 * pad, 128, 128 + 3 * pad)
    else:
        assert img.shape == (128, 128)
        truth = (pad, pad, 128 - pad, 128 - pad)
    assert np.abs(np.subtract(find_content_box(img), truth)).max() <= 1
    out, info = preprocess_image(img, size=64)
    lungs = preprocess_mask(ph.left_mask | ph.right_mask, info)
    assert out.shape == lungs.shape == (64, 64)
    # The lungs keep their area (scaled) through crop and resize, and land on dark pixels.
    side = info.crop_box[2] - info.crop_box[0]
    expected = (ph.left_mask | ph.right_mask).sum() * (64 / side) ** 2
    assert abs((lungs > 0).sum() - expected) < 0.05 * expected
    assert out[lungs > 0].mean() < out[lungs == 0].mean() - 20


def test_make_phantom_is_fast():
    make_phantom(0)
    t = time.perf_counter()
    for i in range(10):
        make_phantom(i, size=256)
    per = (time.perf_counter() - t) / 10
    assert per < 0.2, f"{per * 1000:.0f} ms per 256 px phantom (target < 50 ms)"


def test_write_phantoms_layout_labels_and_restart(tmp_path, monkeypatch):
    out = write_phantoms(tmp_path / "ph", n=5, size=64, seed=2, progress=False)
    for i in range(5):
        name = f"phantom_{i:05d}.png"
        img = np.asarray(Image.open(out / "CXR_png" / name))
        left = np.asarray(Image.open(out / "ManualMask" / "leftMask" / name))
        right = np.asarray(Image.open(out / "ManualMask" / "rightMask" / name))
        ph = make_phantom(i, 64, 2)
        assert np.array_equal(img, ph.image)
        assert left.shape == right.shape == img.shape and set(np.unique(left)) == {0, 255}
        assert np.array_equal(left > 0, ph.left_mask) and np.array_equal(right > 0, ph.right_mask)
    with open(out / "labels.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "Cardiomegaly", "Pleural Effusion", "Consolidation"]
    assert rows[1][0] == "CXR_png/phantom_00000.png" and len(rows) == 6
    for r in rows[1:]:
        i = int(r[0][-9:-4])
        assert [int(x) for x in r[1:]] == [make_phantom(i, 64, 2).labels[k] for k in LABELS]
    assert "NOT real patient data" in (out / "README.txt").read_text()
    assert not list(out.rglob("*.tmp"))

    # Restart: complete files are skipped (no phantom is drawn); a missing one is redone.
    before = (out / "labels.csv").read_bytes()
    (out / "ManualMask" / "rightMask" / "phantom_00003.png").unlink()
    drawn = []
    real = phantoms.make_phantom
    monkeypatch.setattr(phantoms, "make_phantom", lambda i, *a: drawn.append(i) or real(i, *a))
    write_phantoms(out, n=5, size=64, seed=2, progress=False)
    assert drawn == [3] and (out / "labels.csv").read_bytes() == before
    right3 = np.asarray(Image.open(out / "ManualMask" / "rightMask" / "phantom_00003.png"))
    assert np.array_equal(right3 > 0, make_phantom(3, 64, 2).right_mask)
    with pytest.raises(ValueError, match="seed"):
        write_phantoms(out, n=5, size=64, seed=9, progress=False)
