"""The paper's preprocessing: remove padded borders, centre-crop 1:1, resize (default 512).

Masks go through :func:`preprocess_mask` with exactly the same crop and resize box, so a lung mask
stays aligned with its preprocessed image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from dinodiff.data.readers import UnreadableImage

#: Pixels within this many grey levels of a black or white frame count as frame (JPEG noise).
DEFAULT_TOLERANCE = 10
#: Frames of other (grey) values are digital padding, near exactly constant: a tight tolerance
#: stops flat, low-contrast anatomy (an over-exposed abdomen at the bottom edge) from being eaten.
GREY_TOLERANCE = 2
#: Frame values at or below / at or above these are "black" / "white".
DARK_MAX, BRIGHT_MIN = 20, 235
#: A line is border while at least this fraction of it is frame-coloured (burned-in text is not).
DEFAULT_MIN_FRACTION = 0.95
#: PIL filter for the image; masks always use NEAREST so they keep 0/255 and the same geometry.
RESAMPLE = Image.Resampling.LANCZOS


class ImageTooSmall(UnreadableImage):
    """The content left after border removal is smaller than ``min_size`` on its shorter side."""


@dataclass(frozen=True)
class CropInfo:
    """Where the preprocessed image came from, in original pixel coordinates."""

    original_size: tuple[int, int]  # (height, width) of the input
    content_box: tuple[int, int, int, int]  # (top, left, bottom, right), exclusive, after borders
    crop_box: tuple[int, int, int, int]  # centred square inside content_box
    size: int  # output side length

    def to_json(self) -> dict:
        """Plain JSON-serialisable dict (lists instead of tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> CropInfo:
        """Inverse of :meth:`to_json`."""
        return cls(
            original_size=tuple(d["original_size"]),
            content_box=tuple(d["content_box"]),
            crop_box=tuple(d["crop_box"]),
            size=int(d["size"]),
        )


def _strip_side(
    lines: np.ndarray, tolerance: int, min_fraction: float, max_gap: int
) -> int:
    """How many leading lines (rows of ``lines``) are border.

    The frame value is the median of the outermost line; a line is border when
    ``min_fraction`` of it lies within ``tolerance`` of that value (``GREY_TOLERANCE`` when the
    frame is neither black nor white). Runs of at most ``max_gap``
    non-border lines (a burned-in label in the frame) are bridged when border lines follow.
    Lines are scanned in growing chunks so a border-free side costs a few lines, not the image.
    """
    n, length = lines.shape
    if n == 0 or length == 0:
        return 0
    first = lines[0]
    value = int(np.median(first))
    if DARK_MAX < value < BRIGHT_MIN:
        tolerance = min(tolerance, GREY_TOLERANCE)
    lo, hi = max(value - tolerance, 0), min(value + tolerance, 255)
    need = min_fraction * length

    def is_border(chunk: np.ndarray) -> np.ndarray:
        # Two comparisons on the raw dtype: no full-size float or int copy of the chunk.
        return np.count_nonzero((chunk >= lo) & (chunk <= hi), axis=1) >= need

    if not is_border(first[None])[0]:
        return 0
    end, gap, pos, chunk = 1, 0, 1, 8
    while pos < n:
        flags = is_border(lines[pos : pos + chunk])
        for f in flags:
            pos += 1
            if f:
                end, gap = pos, 0
            else:
                gap += 1
                if gap > max_gap:
                    return end
        chunk = min(chunk * 2, 512)
    return end


def find_content_box(
    img: np.ndarray,
    tolerance: int = DEFAULT_TOLERANCE,
    min_fraction: float = DEFAULT_MIN_FRACTION,
    max_gap_fraction: float = 0.02,
    max_passes: int = 4,
) -> tuple[int, int, int, int]:
    """Box (top, left, bottom, right), exclusive, of ``img`` without constant/padded borders.

    From each side, lines that touch the edge are stripped while >= ``min_fraction`` of their
    pixels are within ``tolerance`` of that side's frame value (the median of its outermost line;
    grey frames get the tight ``GREY_TOLERANCE``),
    so black or white frames, letterboxing, JPEG noise and small burned-in text are handled.
    Sides are re-examined (up to ``max_passes``) because stripping one side changes the lines of
    the others, and nested frames (a thin white line inside a black frame) peel off in turn.
    An empty box (bottom == top or right == left) means the whole image is frame.
    """
    if img.ndim != 2 or img.dtype != np.uint8:
        raise TypeError(f"expected a 2-D uint8 image, got {img.dtype} {img.shape}; call to_uint8 first")
    h, w = img.shape
    top, left, bottom, right = 0, 0, h, w
    for _ in range(max_passes):
        before = (top, left, bottom, right)
        for side in ("top", "bottom", "left", "right"):
            if bottom <= top or right <= left:
                return (top, left, top, left)
            view = img[top:bottom, left:right]
            if side in ("top", "bottom"):
                lines, n = (view if side == "top" else view[::-1]), bottom - top
            else:
                lines, n = (view.T if side == "left" else view.T[::-1]), right - left
            k = _strip_side(lines, tolerance, min_fraction, max(2, round(max_gap_fraction * n)))
            if side == "top":
                top += k
            elif side == "bottom":
                bottom -= k
            elif side == "left":
                left += k
            else:
                right -= k
        if (top, left, bottom, right) == before:
            break
    if bottom <= top or right <= left:
        return (top, left, top, left)
    return (top, left, bottom, right)


def centre_square(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The largest square centred in ``box`` (top, left, bottom, right); odd excess goes last."""
    top, left, bottom, right = box
    h, w = bottom - top, right - left
    s = min(h, w)
    t, l = top + (h - s) // 2, left + (w - s) // 2
    return (t, l, t + s, l + s)


def compute_crop(
    img: np.ndarray, size: int = 512, remove_borders: bool = True, min_size: int = 64
) -> CropInfo:
    """The :class:`CropInfo` that :func:`preprocess_image` would use for ``img``."""
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D single-channel image, got shape {img.shape}")
    h, w = img.shape
    content = find_content_box(img) if remove_borders else (0, 0, h, w)
    ch, cw = content[2] - content[0], content[3] - content[1]
    if ch == 0 or cw == 0:
        raise UnreadableImage("blank image (uniform, no content inside the borders)")
    if min(ch, cw) < min_size:
        raise ImageTooSmall(f"too small: {ch}x{cw} content, minimum {min_size}")
    return CropInfo((h, w), content, centre_square(content), int(size))


def _pil_box(info: CropInfo) -> tuple[int, int, int, int]:
    t, l, b, r = info.crop_box
    return (l, t, r, b)  # PIL wants (left, upper, right, lower)


def preprocess_image(
    img: np.ndarray, size: int = 512, remove_borders: bool = True, min_size: int = 64
) -> tuple[np.ndarray, CropInfo]:
    """uint8 (H, W) -> uint8 (size, size): remove borders, centre-crop 1:1, resize (Lanczos).

    Raises :class:`ImageTooSmall` if the content's shorter side is below ``min_size``
    and :class:`UnreadableImage` for a blank (uniform) image.
    """
    if img.dtype != np.uint8:
        raise TypeError(f"preprocess_image expects uint8, got {img.dtype}; call to_uint8 first")
    info = compute_crop(img, size, remove_borders, min_size)
    # Crop first, then resize: with resize(box=...) the filter would reach past the box and blend
    # the removed frame into the output's edge pixels. The crop is a cheap memcpy.
    im = Image.fromarray(np.ascontiguousarray(img)).crop(_pil_box(info))
    return np.array(im.resize((size, size), RESAMPLE)), info  # np.array: writable copy


def preprocess_mask(mask: np.ndarray, info: CropInfo) -> np.ndarray:
    """Carry a mask through the same crop and resize as its image; returns uint8 0/255.

    ``mask`` has the original image's size; bool, or any integer/float where >= 128 (or nonzero
    for a 0/1 mask) is inside. The same crop box, then a nearest-neighbour resize, keeps the
    geometry identical to the image path.
    """
    mask = np.asarray(mask)
    if mask.shape != tuple(info.original_size):
        raise ValueError(f"mask shape {mask.shape} != original image size {info.original_size}")
    if mask.dtype == np.bool_:
        binary = mask
    elif mask.size and mask.max() <= 1:
        # 0/1 label masks; soft float masks in [0, 1] at half height
        binary = mask >= 0.5 if mask.dtype.kind == "f" else mask > 0
    else:
        binary = mask >= 128  # 0/255 masks, and soft-edged ones (Shenzhen) at half height
    im = Image.fromarray(binary.astype(np.uint8) * np.uint8(255)).crop(_pil_box(info))
    return np.array(im.resize((info.size, info.size), Image.Resampling.NEAREST))
