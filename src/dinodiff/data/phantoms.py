"""Synthetic chest-X-ray-like phantoms with known lung masks and labels.

They stand in for a labelled chest X-ray set in tests and demos: every stage (prepare, train,
generate, classify, segment) can run on them without real data. Deterministic: the same
(index, size, seed) always gives the same bytes. numpy + scipy.ndimage only, vectorised.

Geometry is in normalised coordinates: u in [-1, 1] left to right, v in [-1, 1] top to bottom.
The patient faces the viewer, so the patient's *left* lung is on the image's *right* (u > 0).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from dinodiff.files import write_bytes_atomic

LABELS = ("Cardiomegaly", "Pleural Effusion", "Consolidation")
PREVALENCE = 0.35  # each label independently, ~30-40% as in a small labelled pool
GENERATOR = "dinodiff.data.phantoms v1"


@dataclass
class Phantom:
    """A phantom image, its anatomical lung masks and its labels."""

    image: np.ndarray  # uint8 (H, W)
    left_mask: np.ndarray  # bool (H, W): the patient's left lung = the image's right side
    right_mask: np.ndarray  # bool (H, W): the patient's right lung = the image's left side
    labels: dict[str, int] = field(default_factory=dict)


def phantom_labels(index: int, seed: int = 0) -> dict[str, int]:
    """The labels of phantom ``index``: cheap, without drawing the image."""
    rng = np.random.default_rng([seed, index, 0])  # a stream of its own: labels never shift
    return {name: int(rng.random() < PREVALENCE) for name in LABELS}


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, au: float, av: float) -> np.ndarray:
    """Normalised elliptic radius (< 1 inside)."""
    return ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2


def _smooth_step(d: np.ndarray, width: float) -> np.ndarray:
    """0 -> 1 as a signed distance-like quantity d goes from -width to +width."""
    return np.clip(0.5 + d / (2 * width), 0.0, 1.0)


def _draw(h: int, w: int, labels: dict[str, int], rng: np.random.Generator):
    """Float image in [0, 1] and the two lung masks for an (h, w) canvas of thorax."""
    v, u = np.mgrid[-1 : 1 : h * 1j, -1 : 1 : w * 1j].astype(np.float32)
    j = lambda s: float(rng.uniform(-s, s))  # noqa: E731  small anatomical jitter
    # Body: a squarish superellipse running off the bottom, its top corners the shoulders.
    body_r = (np.abs(u) / (0.88 + j(0.04))) ** 3 + (np.abs(v - 0.32 - j(0.03)) / 1.2) ** 3
    body = _smooth_step(1.0 - body_r, 0.06)
    neck = (np.abs(u) < 0.2) & (v < -0.6)
    body = np.maximum(body, neck.astype(np.float32))
    # Heart: an ellipse left of centre (patient's left = image right); cardiomegaly widens it.
    heart_au = (0.36 if labels["Cardiomegaly"] else 0.22) + j(0.02)
    heart_cu = 0.08 + (0.05 if labels["Cardiomegaly"] else 0.0)
    heart = _ellipse(u, v, heart_cu, 0.3 + j(0.03), heart_au, 0.25 + j(0.02)) < 1
    mediastinum = (np.abs(u - 0.01) < 0.1 + 0.06 * np.clip(v + 0.2, 0, 1)) & (v > -0.75)
    trachea = (np.abs(u) < 0.035) & (v > -1) & (v < -0.25)
    # Lungs: tall ellipses with domed bases; anatomical masks exclude heart and mediastinum.
    lungs = []
    for side in (-1, 1):  # image left (patient's right), image right (patient's left)
        r = _ellipse(u, v, side * (0.4 + j(0.02)), 0.0 + j(0.03), 0.28 + j(0.02), 0.58 + j(0.03))
        lungs.append((r < 1) & ~heart & ~mediastinum)
    right_mask, left_mask = lungs
    img = 0.12 + 0.46 * body  # air outside the body stays above black, unlike a frame
    lung_field = ndimage.gaussian_filter((right_mask | left_mask).astype(np.float32), 1.0)
    img = img - 0.33 * lung_field  # aerated lung attenuates little: dark
    # Ribs: faint bands curving down laterally, inside the thorax only.
    thorax = (np.abs(u) < 0.72) & (v > -0.65) & (v < 0.55)
    phase = (v - 0.35 * u**2) * (9.0 + j(0.5)) * np.pi + j(1.0)
    img = img + 0.07 * (np.cos(phase) > 0.55) * thorax
    # Clavicles: bright oblique bars from the sternal notch outwards.
    clav = (np.abs(v - (-0.66 + 0.14 * np.abs(u))) < 0.025) & (np.abs(u) > 0.06) & (np.abs(u) < 0.6)
    img = img + 0.22 * clav
    img = np.where(heart | mediastinum, np.maximum(img, 0.62 + 0.1 * heart), img)
    img = np.where(trachea, img - 0.2, img)
    if labels["Pleural Effusion"]:
        # Fluid fills one lung base with a meniscus rising laterally; masks stay anatomical.
        mask = lungs[int(rng.integers(2))]
        level = 0.25 + j(0.1)
        fluid = mask & (v > level - 0.35 * (np.abs(u) - 0.15) ** 2 / 0.4)
        img = np.where(fluid, np.maximum(img, 0.58), img)
    if labels["Consolidation"]:
        mask = lungs[int(rng.integers(2))]
        ys, xs = np.nonzero(mask)
        k = int(rng.integers(len(ys)))  # a blob centred on a random lung pixel
        blob = np.exp(-((u - u[ys[k], xs[k]]) ** 2 + (v - v[ys[k], xs[k]]) ** 2) / (2 * 0.09**2))
        img = img + 0.32 * blob * ndimage.gaussian_filter(mask.astype(np.float32), 2.0)
    noise = ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), 3.0)
    img = ndimage.gaussian_filter(img, 0.8) + 0.12 * noise + 0.015 * rng.standard_normal((h, w))
    return np.clip(img, 0.0, 1.0), left_mask, right_mask


def make_phantom(index: int, size: int = 256, seed: int = 0) -> Phantom:
    """Phantom ``index``: a ``size`` x ``size`` image, except every 4th (index % 4 == 3),
    which sits in a black frame, a white frame, or a non-square black letterbox (in turn) with a
    small burned-in marker, to exercise border removal. Masks have the image's size."""
    if size < 32:
        raise ValueError(f"phantom size must be >= 32, got {size}")
    labels = phantom_labels(index, seed)
    rng = np.random.default_rng([seed, index, 1])
    framed = index % 4 == 3
    kind = (index // 4) % 3 if framed else None
    pad = max(4, size // 16)
    inner = size - 2 * pad if kind in (0, 1) else size
    img, left, right = _draw(inner, inner, labels, rng)
    img8 = np.round(img * 255).astype(np.uint8)
    if framed:
        if kind == 2:  # letterboxed to a wide canvas, as when a portrait film is shown landscape
            widths = ((0, 0), (pad * 3, pad * 3))
            frame_value = 0
        else:
            widths = ((pad, pad), (pad, pad))
            frame_value = 0 if kind == 0 else 255
        img8 = np.pad(img8, widths, constant_values=frame_value)
        left, right = np.pad(left, widths), np.pad(right, widths)
        # A small "R" marker in the frame corner, like burned-in text.
        mark = 255 - frame_value
        img8[2 : 2 + max(2, pad // 2), 2 : 2 + max(2, size // 64)] = mark
    return Phantom(img8, left, right, labels)


def _save_png(arr: np.ndarray, path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def write_phantoms(
    out_dir: str | os.PathLike, n: int, size: int = 256, seed: int = 0, progress: bool = True
) -> Path:
    """Write ``n`` phantoms in the Montgomery layout and return ``out_dir``.

    ``CXR_png/phantom_00000.png``, ``ManualMask/leftMask/...``, ``ManualMask/rightMask/...``
    (0/255, image size), ``labels.csv`` (``path,Cardiomegaly,Pleural Effusion,Consolidation``,
    paths relative to ``out_dir``), ``README.txt`` and ``phantoms.json`` (the parameters).
    Restartable: existing files are kept (all writes are atomic, so an existing file is
    complete); a folder made with another size or seed is refused.
    """
    out = Path(out_dir)
    params_path = out / "phantoms.json"
    params = {"generator": GENERATOR, "size": size, "seed": seed}
    if params_path.exists():
        old = json.loads(params_path.read_text())
        if {k: old.get(k) for k in ("size", "seed")} != {"size": size, "seed": seed}:
            raise ValueError(
                f"{out} holds phantoms made with size={old.get('size')} seed={old.get('seed')}; "
                f"asked for size={size} seed={seed}: use another folder or delete it"
            )
    dirs = [out / "CXR_png", out / "ManualMask" / "leftMask", out / "ManualMask" / "rightMask"]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(params_path, json.dumps({**params, "n": n}).encode())
    rows = []
    try:
        from tqdm.auto import tqdm

        it = tqdm(range(n), desc="phantoms", disable=not progress)
    except ImportError:  # tqdm is a dependency, but a bare environment should still work
        it = range(n)
    for i in it:
        name = f"phantom_{i:05d}.png"
        paths = [d / name for d in dirs]
        if all(p.exists() for p in paths):
            labels = phantom_labels(i, seed)
        else:
            ph = make_phantom(i, size, seed)
            labels = ph.labels
            for p, arr in zip(paths, (ph.image, ph.left_mask, ph.right_mask)):
                _save_png(arr.astype(np.uint8) * 255 if arr.dtype == np.bool_ else arr, p)
        rows.append([f"CXR_png/{name}", *(labels[k] for k in LABELS)])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", *LABELS])
    writer.writerows(rows)
    write_bytes_atomic(out / "labels.csv", buf.getvalue().encode())
    write_bytes_atomic(out / "README.txt", _readme(n, size, seed).encode())
    return out


def _readme(n: int, size: int, seed: int) -> str:
    return (
        "Synthetic chest-X-ray-like phantoms written by dinodiff.data.phantoms.write_phantoms\n"
        f"({GENERATOR}; n={n}, size={size}, seed={seed}). NOT real patient data.\n\n"
        "Layout (Montgomery County style):\n"
        "  CXR_png/phantom_NNNNN.png              grey uint8 image\n"
        "  ManualMask/leftMask/phantom_NNNNN.png  patient's left lung (image right), 0/255\n"
        "  ManualMask/rightMask/phantom_NNNNN.png patient's right lung (image left), 0/255\n"
        "  labels.csv                             path,Cardiomegaly,Pleural Effusion,Consolidation\n\n"
        "Labels (0/1, ~35% each, independent): Cardiomegaly = enlarged heart; Pleural Effusion =\n"
        "bright fluid with a meniscus in one lung base (masks stay the anatomical lung);\n"
        "Consolidation = a bright blob inside one lung. Every 4th image has a black or white frame\n"
        "or a non-square letterbox, to exercise border removal.\n"
    )
