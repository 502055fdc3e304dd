"""Compressed DICOM: JPEG baseline, JPEG lossless, JPEG 2000 and RLE files encoded here are read by
``read_grey`` and ``prepare``; a transfer syntax with no decoder installed is rejected with its name and the
package that would decode it."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import gdcm  # python-gdcm: a dinodiff dependency (decoder), and here the JPEG-lossless encoder
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    HTJ2K,
    ExplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

from dinodiff.data.readers import UnreadableImage, load_image, read_grey


def _radiograph(bits: int, size: int = 64) -> np.ndarray:
    """A smooth 'chest' (bright disc on a ramp) plus a little noise, using the full ``bits`` range."""
    yy, xx = np.mgrid[:size, :size] / (size - 1)
    img = 0.6 * xx + 0.4 * (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.1)
    img += np.random.default_rng(bits).normal(0, 0.01, img.shape)
    top = 2**bits - 1
    return np.clip(np.round(img / img.max() * top), 0, top).astype(np.uint8 if bits <= 8 else np.uint16)


def _dataset(path: Path, pixels: np.ndarray, bits: int, syntax=ExplicitVRLittleEndian) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition = "CR", "PA"
    ds.PhotometricInterpretation, ds.SamplesPerPixel = "MONOCHROME2", 1
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.PixelData = pixels.tobytes()
    return ds


def _uncompressed(path: Path, pixels: np.ndarray, bits: int) -> Path:
    _dataset(path, pixels, bits).save_as(path, enforce_file_format=True)
    return path


def _gdcm_encode(src: Path, dst: Path, syntax: int) -> Path:
    """Re-encode ``src`` with GDCM's own encoders (the only JPEG-lossless encoder on PyPI for cp311)."""
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(syntax))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return dst


def _pillow_jpeg_baseline(path: Path, pixels: np.ndarray) -> Path:
    """JPEG baseline (process 1) encoded by Pillow, encapsulated by pydicom: an encoder independent of GDCM."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    ds = _dataset(path, pixels, 8, JPEGBaseline8Bit)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, np.ndarray, int]]:
    """name -> (file, original pixels, max abs error allowed) for every syntax a hospital archive holds."""
    d = tmp_path_factory.mktemp("dicom")
    p12, p8 = _radiograph(12), _radiograph(8)
    raw12, raw8 = _uncompressed(d / "raw12.dcm", p12, 12), _uncompressed(d / "raw8.dcm", p8, 8)
    ts = gdcm.TransferSyntax
    rle = pydicom.dcmread(raw12)
    rle.compress(RLELossless, encoding_plugin="pydicom")
    rle.save_as(d / "rle.dcm")
    return {
        "jpeg-baseline-pillow": (_pillow_jpeg_baseline(d / "jb_pil.dcm", p8), p8, 12),
        "jpeg-baseline-gdcm": (_gdcm_encode(raw8, d / "jb_gdcm.dcm", ts.JPEGBaselineProcess1), p8, 12),
        "jpeg-lossless-sv1": (_gdcm_encode(raw12, d / "jll_sv1.dcm", ts.JPEGLosslessProcess14_1), p12, 0),
        "jpeg-lossless-14": (_gdcm_encode(raw12, d / "jll_14.dcm", ts.JPEGLosslessProcess14), p12, 0),
        "jpeg2000-lossless": (_gdcm_encode(raw12, d / "j2k_ll.dcm", ts.JPEG2000Lossless), p12, 0),
        "jpeg2000": (_gdcm_encode(raw12, d / "j2k.dcm", ts.JPEG2000), p12, 40),
        "rle": (d / "rle.dcm", p12, 0),
    }


SYNTAX = {
    "jpeg-baseline-pillow": JPEGBaseline8Bit, "jpeg-baseline-gdcm": JPEGBaseline8Bit,
    "jpeg-lossless-sv1": JPEGLosslessSV1, "jpeg-lossless-14": JPEGLossless,
    "jpeg2000-lossless": JPEG2000Lossless, "jpeg2000": JPEG2000, "rle": RLELossless,
}


@pytest.mark.parametrize("name", list(SYNTAX))
def test_compressed_dicom_reads_back_the_encoded_pixels(compressed, name):
    path, original, tolerance = compressed[name]
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == SYNTAX[name]
    arr, meta = read_grey(path)
    assert meta["format"] == "dicom" and meta["shape"] == list(original.shape)
    error = np.abs(arr.astype(np.int64) - original.astype(np.int64)).max()
    assert error <= tolerance, f"{name}: max error {error}"
    if tolerance == 0:
        np.testing.assert_array_equal(arr, original.astype(np.float32))
    # and the uint8 image prepare would shard is the min-max rescale of those values
    u8, _ = load_image(path)
    assert u8.dtype == np.uint8 and u8.min() == 0 and u8.max() == 255


def _htj2k(path: Path) -> Path:
    """A file in a syntax no installed plugin decodes (HTJ2K needs pylibjpeg-openjpeg)."""
    ds = _dataset(path, np.zeros((4, 4), np.uint8), 8, HTJ2K)
    ds.PixelData = encapsulate([b"\xffO\xffQ not a real codestream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_undecodable_syntax_is_rejected_with_its_name_and_the_package_that_decodes_it(tmp_path):
    with pytest.raises(UnreadableImage) as e:
        read_grey(_htj2k(tmp_path / "htj2k.dcm"))
    assert "High-Throughput JPEG 2000" in e.value.reason
    assert "pylibjpeg-openjpeg" in e.value.reason and str(HTJ2K) in e.value.reason


def test_missing_decoder_names_the_pip_package(tmp_path, monkeypatch):
    from pydicom.pixels import get_decoder

    decoder = get_decoder(JPEGLosslessSV1)
    monkeypatch.setattr(type(decoder), "is_available", property(lambda self: False))
    monkeypatch.setattr(type(decoder), "missing_dependencies",
                        property(lambda self: ["gdcm - requires gdcm>=3.0.10"]))
    from dinodiff.data.readers import _missing_decoder

    assert _missing_decoder(JPEGLosslessSV1) == "install a decoder: gdcm - requires python-gdcm>=3.0.10"


def test_prepare_shards_compressed_dicoms_and_lists_the_undecodable_one_in_rejects(compressed, tmp_path):
    from dinodiff.prepare import prepare

    src = tmp_path / "src"
    src.mkdir()
    for name, (path, _, _) in compressed.items():
        (src / f"{name}.dcm").write_bytes(path.read_bytes())
    _htj2k(src / "htj2k.dcm")
    manifest = prepare([src], tmp_path / "out", size=64, min_size=16, workers=0, progress=False)
    assert manifest["counts"]["written"] == len(compressed) and manifest["counts"]["rejected"] == 1
    with open(tmp_path / "out" / "rejects.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == ["htj2k.dcm"]
    assert "High-Throughput JPEG 2000" in rows[0]["reason"] + rows[0]["detail"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["written"] == len(compressed)
