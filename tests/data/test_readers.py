"""Readers: every supported format read to a bone-bright single-channel array; bad files rejected
with a specific reason and never another exception type."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from dinodiff.data.readers import UnreadableImage, load_image, read_grey, to_uint8
from dinodiff.data.image_sets import iter_sources
from dinodiff.evaluate.fid.images import iter_images, list_images

RNG = np.random.default_rng(0)


def _dicom(
    path: Path,
    pixels: np.ndarray | None,
    photometric: str = "MONOCHROME2",
    transfer_syntax=ExplicitVRLittleEndian,
    preamble: bool = True,
    **tags,
) -> Path:
    """Write a small uncompressed DICOM (CR image storage) with optional extra tags."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128 if preamble else None)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.ViewPosition = "PA"
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.tobytes()
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=preamble)
    return path


def _png_bytes(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------- raster formats


def test_16bit_png_is_read_as_uint16_and_rescaled_to_full_uint8_range(tmp_path):
    arr = np.linspace(1000, 60000, 64 * 80).reshape(64, 80).astype(np.uint16)
    (tmp_path / "a.png").write_bytes(_png_bytes(arr))
    out, meta = read_grey(tmp_path / "a.png")
    assert out.dtype == np.uint16 and np.array_equal(out, arr) and out.flags.writeable
    assert meta["format"] == "png" and meta["bit_depth"] == 16 and meta["view"] is None
    u8 = to_uint8(out)
    assert u8.dtype == np.uint8 and u8.min() == 0 and u8.max() == 255
    assert np.all(np.diff(u8.ravel().astype(int)) >= 0)  # monotone ramp stays monotone
    assert abs(int(u8.ravel()[len(u8.ravel()) // 2]) - 128) <= 1
    u8b, meta_b = load_image(tmp_path / "a.png")
    assert np.array_equal(u8, u8b) and meta_b["uint8_rule"] == "minmax"


def test_to_uint8_keeps_uint8_unchanged_and_percentile_rule_clips_outliers():
    a = RNG.integers(0, 256, (16, 16), dtype=np.uint8)
    assert to_uint8(a) is a
    b = np.full((100, 100), 1000, np.uint16)
    b[:50] = 2000
    b[0, 0] = 65535  # a single hot pixel
    assert to_uint8(b)[50, 0] == 0 and to_uint8(b)[0, 1] == 4  # minmax: the outlier dominates
    p = to_uint8(b, "percentile")
    assert p[50, 0] == 0 and p[0, 1] == 255 and p[0, 0] == 255  # clipped ends
    assert not to_uint8(np.full((4, 4), 7.0, np.float32)).any()  # constant -> zeros
    f = np.array([[0.0, np.nan], [0.5, 1.0]], np.float32)
    assert to_uint8(f).tolist() == [[0, 0], [128, 255]]
    with pytest.raises(ValueError, match="rule"):
        to_uint8(b, "gamma")


def test_rgba_is_composited_onto_black_and_palette_becomes_luma(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:4, :, 3] = 255  # top opaque white, bottom transparent white
    rgba[4:, :, 3] = 0
    (tmp_path / "rgba.png").write_bytes(_png_bytes(rgba))
    out, meta = read_grey(tmp_path / "rgba.png")
    assert meta["mode"] == "RGBA" and out.dtype == np.uint8 and out.shape == (8, 8)
    assert (out[:4] == 255).all() and (out[4:] == 0).all()

    pal = Image.new("P", (6, 6))
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    pal.putdata([0, 1, 2] * 12)
    pal.save(tmp_path / "pal.png")
    out, meta = read_grey(tmp_path / "pal.png")
    assert meta["mode"] == "P"
    assert out[0, :3].tolist() == [0, 76, 150]  # ITU-R 601 luma of black, red, green


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_tiff_8_and_16_bit_round_trip_exactly(tmp_path, dtype):
    top = np.iinfo(dtype).max
    arr = RNG.integers(0, top, (40, 30), dtype=dtype, endpoint=True)
    Image.fromarray(arr).save(tmp_path / "a.tif")
    out, meta = read_grey(tmp_path / "a.tif")
    assert meta["format"] == "tiff" and meta["bit_depth"] == arr.itemsize * 8
    assert out.dtype == dtype and np.array_equal(out, arr)


def test_rgb_jpeg_is_read_as_single_channel(tmp_path):
    rgb = np.repeat(np.linspace(0, 255, 64 * 64).reshape(64, 64, 1), 3, axis=2).astype(np.uint8)
    (tmp_path / "x.jpg").write_bytes(_png_bytes(rgb, "JPEG", quality=95))
    out, meta = read_grey(tmp_path / "x.jpg")
    assert meta["format"] == "jpeg" and out.shape == (64, 64) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb[..., 0]).max() <= 4


def test_real_cxr_covid_files_of_each_mode_read_as_2d_uint8(shared_data):
    meta_by_mode = {}
    for p in sorted((shared_data / "cxr-covid" / "images").iterdir()):
        with Image.open(p) as im:
            mode = im.mode
        if mode not in meta_by_mode:
            arr, meta = load_image(p)
            assert arr.ndim == 2 and arr.dtype == np.uint8 and arr.shape == tuple(meta["shape"])
            assert arr.std() > 10  # a real radiograph, not a blank from a bad conversion
            meta_by_mode[mode] = meta["format"]
        if len(meta_by_mode) == 3:
            break
    assert set(meta_by_mode) == {"L", "RGB", "RGBA"}


# ---------------------------------------------------------------- DICOM


def test_dicom_modality_rescale_and_window_are_applied(tmp_path):
    stored = np.array([[0, 500, 1000, 1500, 2000]] * 4, np.uint16)
    # modality: 2x - 1000 -> [-1000, 0, 1000, 2000, 3000]; window 1000/2000 spans [0, 2000)
    p = _dicom(
        tmp_path / "w.dcm", stored,
        RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1000, WindowWidth=2000,
    )
    out, meta = read_grey(p)
    assert out.dtype == np.float32 and meta["format"] == "dicom" and meta["view"] == "PA"
    assert meta["voi"] == "window" and meta["bit_depth"] == 16
    assert to_uint8(out)[0].tolist() == [0, 0, 128, 255, 255]
    # Without the window only the rescale applies.
    q = _dicom(tmp_path / "r.dcm", stored, RescaleSlope=2, RescaleIntercept=-1000)
    out_q, _ = read_grey(q)
    assert out_q[0].tolist() == [-1000, 0, 1000, 2000, 3000]


def test_dicom_monochrome1_is_inverted_so_bone_is_bright(tmp_path):
    px = np.full((16, 16), 3000, np.uint16)
    px[8, 8] = 100  # MONOCHROME1: bone (high attenuation) is stored *low*
    out1, meta1 = read_grey(_dicom(tmp_path / "m1.dcm", px, "MONOCHROME1"))
    out2, _ = read_grey(_dicom(tmp_path / "m2.dcm", px, "MONOCHROME2"))
    assert meta1["mode"] == "MONOCHROME1"
    assert out1[8, 8] == out1.max() > out1[0, 0]
    assert out2[8, 8] == out2.min() < out2[0, 0]
    assert to_uint8(out1)[8, 8] == 255 and to_uint8(out2)[8, 8] == 0


def test_dicom_without_preamble_is_found_by_extension(tmp_path):
    px = RNG.integers(0, 4096, (8, 8), dtype=np.uint16)
    p = _dicom(tmp_path / "raw.dcm", px, preamble=False)
    assert p.read_bytes()[128:132] != b"DICM"
    out, _ = read_grey(p)
    assert np.array_equal(out, px.astype(np.float32))


def test_dicom_without_pixel_data_is_rejected(tmp_path):
    p = _dicom(tmp_path / "sr.dcm", None)
    with pytest.raises(UnreadableImage) as e:
        read_grey(p)
    assert e.value.reason == "DICOM without pixel data"


def test_compressed_dicom_without_decoder_gives_a_clear_reason(tmp_path):
    p = _dicom(tmp_path / "c.dcm", None, transfer_syntax=JPEGLSLossless)
    ds = pydicom.dcmread(p)
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([b"\xff\xd8not really jpeg-ls\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(p)
    with pytest.raises(UnreadableImage) as e:
        read_grey(p)
    assert "JPEG-LS" in e.value.reason
    assert "decoder" in e.value.reason or "cannot decode" in e.value.reason


# ---------------------------------------------------------------- bad files


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    img = RNG.integers(0, 256, (120, 160), dtype=np.uint8)
    png, jpg = _png_bytes(img), _png_bytes(img, "JPEG", quality=90)
    files = {
        "zero": ("empty.png", b"", "zero-byte file"),
        "text": ("notes.png", b"this is a text file, not a picture\n" * 5, "not an image"),
        "png-half": ("half.png", png[: len(png) // 2], "truncated image"),
        "jpeg-half": ("half.jpg", jpg[: len(jpg) // 2], "truncated image"),
        "png-header": ("head.png", png[:20], "truncated image"),
        "text-dcm": ("notes.dcm", b"hello, not DICOM at all" * 20, None),
    }
    out = {}
    for key, (name, data, reason) in files.items():
        (tmp / name).write_bytes(data)
        out[key] = (tmp / name, reason)
    return out


@pytest.mark.parametrize("key", ["zero", "text", "png-half", "jpeg-half", "png-header", "text-dcm"])
def test_bad_files_raise_unreadable_with_specific_reason(tmp_path, key):
    path, reason = _bad_files(tmp_path)[key]
    with pytest.raises(UnreadableImage) as e:
        read_grey(path)
    assert type(e.value) is UnreadableImage and e.value.reason
    if reason is not None:
        assert e.value.reason == reason


def test_missing_file_and_directory_raise_unreadable(tmp_path):
    for p in (tmp_path / "nope.png", tmp_path):
        with pytest.raises(UnreadableImage):
            read_grey(p)


def test_a_jsrt_img_is_read_by_generate_sources_and_listed_and_read_by_fid_image_sets(tmp_path):
    """JSRT's headerless .IMG (2048^2 big-endian 12-bit, stored inverted) is read wherever `prepare` reads it."""
    stored = RNG.integers(0, 4096, (2048, 2048)).astype(np.uint16)  # texture: nothing looks like a border
    folder = tmp_path / "jsrt"
    folder.mkdir()
    stored.astype(">u2").tofile(folder / "JPCLN001.IMG")
    u8, meta = load_image(folder / "JPCLN001.IMG")
    assert meta["format"] == "jsrt-raw" and meta["bit_depth"] == 12
    np.testing.assert_array_equal(u8, to_uint8(4095 - stored))  # inverted back to bone bright

    sources = list(iter_sources(folder, size=32, min_size=16))
    assert [s.id for s in sources] == ["JPCLN001"] and sources[0].image.shape == (32, 32)

    refs = list_images(folder, split=None)
    assert [Path(r.path).name for r in refs] == ["JPCLN001.IMG"]
    (image,) = iter_images(refs, 16)
    assert image.shape == (1, 16, 16) and 0.0 <= image.min() < image.max() <= 1.0


def test_a_file_named_img_that_is_no_jsrt_raw_is_rejected_with_a_reason(tmp_path):
    (tmp_path / "x.img").write_bytes(b"\x00" * 100)
    with pytest.raises(UnreadableImage, match="JSRT"):
        load_image(tmp_path / "x.img")
