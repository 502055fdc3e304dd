"""Read PNG/JPEG/TIFF/DICOM/JSRT .IMG files into one single-channel array, bone bright; :func:`load_image` is the
one way the stages read an image (grey uint8).

DICOM: uncompressed, RLE, JPEG baseline/extended, JPEG lossless (process 14 and SV1), JPEG-LS and JPEG 2000
transfer syntaxes (decoded by pydicom with its Pillow and python-gdcm plugins). A syntax with no decoder
installed (e.g. HTJ2K) is rejected with its name and the package that would decode it.

Every failure on a bad input is turned into :class:`UnreadableImage` with a short reason, so
``prepare`` can log it to ``rejects.csv`` and go on; no other exception type escapes
:func:`read_grey` for a bad file.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
JSRT_SUFFIX = ".img"  # JSRT raw: headerless, known by its name only
TO_UINT8_RULES = ("minmax", "percentile")
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"GIF8")


class UnreadableImage(Exception):
    """An input that cannot be used; ``reason`` is short and goes to ``rejects.csv``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(132)


def _is_dicom(path: Path) -> bool:
    return _head(path)[128:132] == b"DICM" or path.suffix.lower() in DICOM_SUFFIXES


def has_dicom_preamble(path: Path) -> bool:
    """Whether the file starts with DICOM's 128-byte preamble and ``DICM`` (False when it cannot be read)."""
    try:
        head = _head(path)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def read_grey(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read an image file into a 2-D single-channel array with bone bright.

    Raster files (PNG, JPEG, TIFF, BMP, ...) give ``uint8`` (8-bit data) or ``uint16`` (16-bit
    data); colour is reduced to luma (ITU-R 601, PIL's ``convert('L')``), RGBA is composited onto
    black first, multi-page files give their first page. DICOM gives ``float32`` after the
    modality LUT (rescale slope/intercept) and the VOI LUT or window when present; MONOCHROME1
    is inverted (reflected about its own min/max) so bone ends up bright.

    ``meta`` holds ``format``, ``bit_depth``, ``mode`` (PIL mode or DICOM photometric
    interpretation), ``view`` (DICOM ViewPosition, else None) and ``shape`` (height, width).
    Raises :class:`UnreadableImage` for anything unusable.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableImage("zero-byte file")
        is_dicom = _is_dicom(path)
    except UnreadableImage:
        raise
    except IsADirectoryError:
        raise UnreadableImage("not a file") from None
    except OSError as e:
        raise UnreadableImage(f"cannot open file: {e.strerror or e}") from None
    try:
        arr, meta = _read_dicom(path) if is_dicom else _read_raster(path)
    except UnreadableImage:
        raise
    except MemoryError:
        raise UnreadableImage("image too large for memory") from None
    except Exception as e:  # a decoder bug on a strange file must not stop a whole prepare run
        raise UnreadableImage(f"unreadable: {type(e).__name__}: {e}"[:200]) from None
    if not arr.flags.writeable:
        arr = arr.copy()  # PIL hands out read-only buffers; callers (torch.from_numpy) expect writable
    meta["shape"] = [int(arr.shape[0]), int(arr.shape[1])]
    if min(arr.shape) == 0:
        raise UnreadableImage("empty image (0 pixels)")
    return arr, meta


def _read_raster(path: Path) -> tuple[np.ndarray, dict]:
    try:
        with warnings.catch_warnings(), Image.open(path) as im:
            # A decompression-bomb *warning* is only a size hint; the *error* is handled below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            fmt = (im.format or path.suffix.lstrip(".") or "unknown").lower()
            mode = im.mode
            # Force the full decode now: Image.open is lazy and truncation only shows on load().
            # (PIL's ImageFile.LOAD_TRUNCATED_IMAGES must stay False, its default.)
            im.load()
            arr, bit_depth = pil_to_grey(im)
    except UnidentifiedImageError:
        with open(path, "rb") as f:
            magic = f.read(8)
        if magic.startswith(IMAGE_MAGIC):
            raise UnreadableImage("truncated image") from None  # right signature, broken header
        raise UnreadableImage("not an image") from None
    except Image.DecompressionBombError:
        raise UnreadableImage("image too large (decompression bomb limit)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e).lower()
        if "truncated" in msg or "broken" in msg or isinstance(e, EOFError) or "premature" in msg:
            raise UnreadableImage("truncated image") from None
        raise UnreadableImage(f"corrupt image: {e}"[:200]) from None
    fmt = {"jpg": "jpeg", "tif": "tiff"}.get(fmt, fmt)
    return arr, {"format": fmt, "bit_depth": bit_depth, "mode": mode, "view": None}


def pil_to_grey(im: Image.Image) -> tuple[np.ndarray, int]:
    """PIL image (any mode) -> (2-D uint8/uint16/float32 array, bits per sample); what ``read_grey`` does to rasters.

    16-bit images stay uint16 (PIL's ``convert('L')`` would clip them to 255, i.e. white).
    """
    mode = im.mode
    if mode == "L":
        return np.asarray(im), 8
    if mode.startswith("I;16"):
        # I;16 / I;16B / I;16L: numpy gives the right byte order; make it native uint16.
        return np.asarray(im).astype(np.uint16, copy=False), 16
    if mode in ("I", "I;32"):
        arr = np.asarray(im)
        lo, hi = int(arr.min()), int(arr.max())
        # Pillow opens 16-bit grey PNG/TIFF as 'I' in some versions: keep them uint16.
        if lo >= 0 and hi <= 0xFFFF:
            return arr.astype(np.uint16), 16
        return arr.astype(np.float32), 32
    if mode == "F":
        return np.asarray(im, dtype=np.float32), 32
    if mode == "1":
        return np.asarray(im.convert("L")), 1
    if mode == "P":
        # A palette with a transparent entry behaves like RGBA; otherwise plain RGB.
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        black = Image.new("RGBA", im.size, (0, 0, 0, 255))
        # Transparent pixels carry no film: composite onto black before taking luma.
        return np.asarray(Image.alpha_composite(black, im).convert("L")), 8
    if mode != "RGB":  # CMYK, YCbCr, LAB, HSV, RGBX ...
        im = im.convert("RGB")
    return np.asarray(im.convert("L")), 8


def _read_dicom(path: Path) -> tuple[np.ndarray, dict]:
    ds = _open_dicom(path)
    arr = _dicom_pixels(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        arr = arr[0]  # a multi-frame radiograph: the first frame is the image
    meta: dict[str, Any] = {
        "format": "dicom",
        "bit_depth": int(ds.get("BitsStored", arr.dtype.itemsize * 8)),
        "mode": photometric,
        "view": (str(ds.get("ViewPosition", "")).strip() or None),
        "frames": frames,
    }
    if samples > 1 or arr.ndim == 3:
        # pydicom already converted YBR to RGB; reduce to luma like the raster path.
        rgb = arr.astype(np.float32)
        out = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        meta["voi"] = None
        return out.astype(np.float32), meta
    out, meta["voi"] = _dicom_values(arr, ds, path)
    if photometric == "MONOCHROME1":
        # MONOCHROME1 stores bone dark; reflect about the data's own range so bone is bright.
        out = np.float32(out.max()) + np.float32(out.min()) - out
    return out, meta


def _open_dicom(path: Path) -> Any:
    """The dataset of a file holding pixel data; UnreadableImage otherwise."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # force=True: files named .dcm without the 128-byte preamble are still common.
        ds = pydicom.dcmread(path, force=True)
    except InvalidDicomError:
        raise UnreadableImage("not a DICOM file") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise UnreadableImage(f"corrupt DICOM: {e}"[:200]) from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if len(ds) == 0 or "SOPClassUID" not in ds and "Rows" not in ds:
            raise UnreadableImage("not an image")
        raise UnreadableImage("DICOM without pixel data")
    return ds


def _dicom_pixels(ds: Any) -> np.ndarray:
    """The decoded pixel array; a missing decoder, truncated or corrupt data -> UnreadableImage with the reason."""
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        return ds.pixel_array
    except (RuntimeError, NotImplementedError) as e:
        compressed = tsyntax is not None and tsyntax.is_compressed
        hint = _missing_decoder(tsyntax) if compressed else None
        if hint:
            raise UnreadableImage(
                f"compressed DICOM '{tsyntax.name}' ({tsyntax}) cannot be decoded here: {hint}"
            ) from None
        what = f"compressed DICOM ({tsyntax.name})" if compressed else "DICOM pixel data"
        raise UnreadableImage(f"cannot decode {what}: {e}"[:200]) from None
    except (ValueError, EOFError, AttributeError, KeyError, TypeError) as e:
        msg = str(e).lower()
        if "length" in msg or "truncat" in msg or "buffer" in msg or isinstance(e, EOFError):
            raise UnreadableImage("truncated DICOM pixel data") from None
        raise UnreadableImage(f"corrupt DICOM pixel data: {e}"[:200]) from None


def _dicom_values(arr: np.ndarray, ds: Any, path: Path) -> tuple[np.ndarray, str | None]:
    """Grey pixels -> float32 after the modality LUT and the VOI LUT or window, and which VOI was applied."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    out = apply_modality_lut(arr, ds)
    voi = None
    if ds.get("VOILUTSequence") or "WindowCenter" in ds:
        try:
            out = apply_voi_lut(out, ds)
            voi = "lut" if ds.get("VOILUTSequence") else "window"
        except (ValueError, TypeError, IndexError, AttributeError) as e:
            # A broken window must not reject a good image; say so in the log and the metadata.
            log.warning("%s: ignoring invalid VOI LUT/window (%s)", path, e)
            voi = "invalid, ignored"
    return np.asarray(out, dtype=np.float32), voi


def _missing_decoder(tsyntax: Any) -> str | None:
    """None when pydicom has a working decoder for this transfer syntax, else what would decode it.

    Compressed radiographs decode through pydicom's pixel-data plugins: JPEG baseline/extended and JPEG 2000
    by Pillow or python-gdcm, JPEG lossless (process 14, SV1) and JPEG-LS by python-gdcm (all installed with
    dinodiff), RLE by pydicom itself. The packages named come from pydicom's own decoder table.
    """
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        return "pydicom has no decoder for this transfer syntax; convert the file (e.g. gdcmconv --raw) first"
    if decoder.is_available:
        return None
    # pydicom names the import ('gdcm'); pip's name is python-gdcm
    needs = "; or ".join(d.replace("requires gdcm", "requires python-gdcm") for d in decoder.missing_dependencies)
    needs = needs or "a pydicom pixel-data plugin"
    return f"install a decoder: {needs}"


def to_uint8(
    arr: np.ndarray, rule: str = "minmax", percentiles: tuple[float, float] = (0.5, 99.5)
) -> np.ndarray:
    """Rescale any bit depth to uint8.

    Rule: a ``uint8`` array is returned unchanged (same object). Anything else (16-bit PNG/TIFF,
    DICOM floats) is mapped linearly so that its own minimum becomes 0 and its own maximum 255,
    rounded to the nearest integer (``rule="minmax"``, the default); with ``rule="percentile"``
    the ``percentiles`` (default 0.5th and 99.5th) are the ends instead and values outside are
    clipped. A constant image becomes all zeros. NaN becomes 0.
    """
    if rule not in TO_UINT8_RULES:
        raise ValueError(f"unknown to_uint8 rule {rule!r}; use one of {TO_UINT8_RULES}")
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    finite = np.isfinite(arr) if arr.dtype.kind == "f" else None
    has_bad = finite is not None and not finite.all()
    values = arr[finite] if has_bad else arr  # NaN/inf must not decide the range
    if values.size == 0:
        return np.zeros(arr.shape, np.uint8)
    if rule == "percentile":
        lo, hi = (float(x) for x in np.percentile(values, percentiles))
    else:
        lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        return np.zeros(arr.shape, np.uint8)
    # float32 is exact for 16-bit integers and halves the memory traffic of float64.
    scale = np.float32(255.0 / (hi - lo))
    out = (arr.astype(np.float32) - np.float32(lo)) * scale + np.float32(0.5)
    np.clip(out, 0, 255, out=out)
    if has_bad:
        out[~finite] = 0
    return out.astype(np.uint8)


def grey_to_unit(image: Image.Image | np.ndarray, rule: str = "minmax") -> np.ndarray:
    """An in-memory image -> float32 in [0, 1] by prepare's rule: :func:`pil_to_grey` for PIL images, then
    :func:`to_uint8` (``rule``) / 255 for anything but a float array already within [0, 1].

    uint8 data is only divided by 255; 16-bit PIL images, uint16/int arrays and float arrays outside [0, 1]
    (e.g. DICOM values) are rescaled exactly as ``prepare`` rescales files of the same data.
    """
    arr = pil_to_grey(image)[0] if isinstance(image, Image.Image) else np.asarray(image)
    if arr.dtype.kind == "f" and arr.size and np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0:
        return arr.astype(np.float32, copy=False)
    return to_uint8(arr, rule).astype(np.float32) / np.float32(255.0)


def read_jsrt_raw(path: str | os.PathLike) -> np.ndarray:
    """A JSRT `.IMG`: headerless 2048x2048 big-endian 12-bit, stored inverted (0 = dense/white).

    Returned as uint16 with the usual display polarity (bone bright).
    """
    arr = np.fromfile(path, dtype=">u2")
    if arr.size != 2048 * 2048:
        raise ValueError(f"{path}: {arr.size * 2} bytes, expected a 2048x2048 16-bit JSRT .IMG")
    return (4095 - np.clip(arr, 0, 4095)).reshape(2048, 2048).astype(np.uint16)


def load_image(path: str | os.PathLike, rule: str = "minmax") -> tuple[np.ndarray, dict]:
    """Any image `prepare` accepts -> (2-D uint8 grey, meta): :func:`read_grey` (or :func:`read_jsrt_raw` for a
    JSRT ``.IMG``, which no reader can sniff) then :func:`to_uint8` by ``rule``; ``meta['uint8_rule']`` records
    the rule applied. Raises :class:`UnreadableImage` for anything unusable.
    """
    path = Path(path)
    if path.suffix.lower() == JSRT_SUFFIX:
        try:
            arr, meta = read_jsrt_raw(path), {"format": "jsrt-raw", "bit_depth": 12, "view": "PA"}
        except (ValueError, OSError):
            raise UnreadableImage("not a JSRT .IMG (expected 2048x2048 16-bit raw)") from None
    else:
        arr, meta = read_grey(path)
    meta["uint8_rule"] = "none (already 8-bit)" if arr.dtype == np.uint8 else rule
    return to_uint8(arr, rule), meta


def load_mask(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """A mask file at an image's (height, width): one of another size but the same aspect (SCR masks are half
    the JSRT resolution) is resized, nearest neighbour so 0/255 stay 0/255. Raises ValueError otherwise."""
    mask, _ = read_grey(path)
    if mask.shape != tuple(shape):
        (mh, mw), (h, w) = mask.shape, shape
        if abs(mh / mw - h / w) > 0.01:
            raise ValueError(f"mask {mw}x{mh} does not match image {w}x{h}")
        mask = np.asarray(Image.fromarray(to_uint8(mask)).resize((w, h), Image.Resampling.NEAREST))
    return mask
