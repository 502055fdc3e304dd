"""Preprocessing: border removal, centre crop 1:1, resize; masks follow the same geometry."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from dinodiff.data.preprocess import (
    CropInfo,
    ImageTooSmall,
    find_content_box,
    preprocess_image,
    preprocess_mask,
)
from dinodiff.data.readers import UnreadableImage, load_image

RNG = np.random.default_rng(1)


def _texture(h: int, w: int, lo: int = 50, hi: int = 210) -> np.ndarray:
    """Smooth random 'anatomy' that never comes near black or white."""
    t = ndimage.gaussian_filter(RNG.standard_normal((h, w)), 4)
    t = (t - t.min()) / (t.max() - t.min())
    return (lo + (hi - lo) * t).astype(np.uint8)


def _jpeg_round_trip(img: np.ndarray, quality: int = 70) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))


def _framed(content: np.ndarray, pads: tuple[int, int, int, int], value: int) -> np.ndarray:
    top, left, bottom, right = pads
    return np.pad(content, ((top, bottom), (left, right)), constant_values=value)


def _add_text_specks(img: np.ndarray, box: tuple[int, int, int, int], value: int) -> None:
    """Burned-in 'text' (small blocks) in the frame around ``box``: a corner label and specks."""
    t, l, b, r = box
    img[3:9, 4:22] = value  # "R" label in the top-left corner
    img[b + 2 : b + 5, l + 10 : l + 13] = value  # specks below the film
    img[t + 30 : t + 36, r + 1 : r + 3] = value  # a mark in the right frame


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


# ---------------------------------------------------------------- border removal


@pytest.mark.parametrize("frame", [0, 255])
@pytest.mark.parametrize("jpeg", [False, True])
def test_content_box_found_within_2px_for_black_and_white_frames_with_text(frame, jpeg):
    content = _texture(300, 220)
    pads = (25, 40, 31, 7)
    img = _framed(content, pads, frame)
    truth = (25, 40, 25 + 300, 40 + 220)
    _add_text_specks(img, truth, 255 - frame)
    if jpeg:
        img = _jpeg_round_trip(img)
    box = find_content_box(img)
    assert np.abs(np.subtract(box, truth)).max() <= 2, (box, truth)


def test_wide_burned_in_label_inside_the_frame_is_bridged():
    content = _texture(300, 300)
    img = _framed(content, (40, 20, 20, 20), 0)
    img[12:18, 30:110] = 255  # "PA ERECT": 6 rows where a quarter of the row is text
    assert np.abs(np.subtract(find_content_box(img), (40, 20, 340, 320))).max() <= 2


def test_nested_frames_and_one_sided_letterbox_are_peeled():
    content = _texture(200, 260)
    img = _framed(_framed(content, (0, 12, 0, 12), 0), (9, 3, 9, 3), 255)  # black inside white
    assert find_content_box(img) == (9, 15, 209, 275)
    letterbox = _framed(content, (70, 0, 0, 0), 0)  # only the top is padded
    assert find_content_box(letterbox) == (70, 0, 270, 260)


def test_border_free_image_keeps_its_full_box_even_with_flat_grey_edges():
    img = _texture(180, 150)
    img[-40:] = 120 + RNG.integers(-4, 5, (40, 150))  # a flat over-exposed abdomen, not a frame
    assert find_content_box(img) == (0, 0, 180, 150)


def test_blank_image_is_rejected():
    with pytest.raises(UnreadableImage, match="blank"):
        preprocess_image(np.full((300, 300), 0, np.uint8))


# ---------------------------------------------------------------- crop and resize


def test_preprocess_of_padded_image_equals_preprocess_of_its_content():
    content = _texture(240, 180)
    img = _framed(content, (30, 11, 17, 50), 0)
    out, info = preprocess_image(img, size=128)
    ref, ref_info = preprocess_image(content, size=128, remove_borders=False)
    assert info.content_box == (30, 11, 270, 191)
    assert info.crop_box == (30 + 30, 11, 30 + 30 + 180, 191)  # centred square of the content
    assert out.shape == (128, 128) and out.dtype == np.uint8 and out.flags.writeable
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("shape", [(2000, 60), (60, 2000)])
def test_extreme_aspect_ratio_is_too_small_by_default_but_crops_centred_when_allowed(shape):
    content = _texture(*shape)
    img = _framed(content, (10, 10, 10, 10), 0)
    with pytest.raises(ImageTooSmall) as e:
        preprocess_image(img)
    assert e.value.reason == f"too small: {shape[0]}x{shape[1]} content, minimum 64"
    assert isinstance(e.value, UnreadableImage)
    out, info = preprocess_image(img, size=64, min_size=32)
    t, l, b, r = info.crop_box
    assert b - t == r - l == 60 and out.shape == (64, 64)
    long_axis = 0 if shape[0] > shape[1] else 1
    start = (t, l)[long_axis]
    assert start == 10 + (max(shape) - 60) // 2  # centred along the long side


def test_tiny_image_raises_image_too_small():
    with pytest.raises(ImageTooSmall, match="too small: 20x20 content, minimum 64"):
        preprocess_image(_texture(20, 20))


def test_non_uint8_input_is_refused():
    with pytest.raises(TypeError, match="to_uint8"):
        preprocess_image(np.zeros((100, 100), np.uint16))


def test_crop_info_json_round_trip():
    _, info = preprocess_image(_framed(_texture(120, 100), (5, 0, 5, 0), 255), size=64)
    d = json.loads(json.dumps(info.to_json()))
    assert d["size"] == 64 and d["original_size"] == [130, 100]
    assert CropInfo.from_json(d) == info


REAL_BORDER_FREE = ["3a81faf3.jpg", "f6d980a0.jpg", "4fcafe41.jpg", "6646071b.jpg", "000001-6.png"]


def test_real_images_give_512_uint8_and_border_free_ones_keep_95_percent(shared_data):
    images = shared_data / "cxr-covid" / "images"
    for name in REAL_BORDER_FREE:  # flat, low-contrast edges that a loose rule would eat
        img, _ = load_image(images / name)
        out, info = preprocess_image(img)
        assert out.shape == (512, 512) and out.dtype == np.uint8
        t, l, b, r = info.content_box
        assert (b - t) * (r - l) >= 0.95 * img.size, (name, info.content_box)
    # A letterboxed film (black bands top and bottom) loses its bands.
    img, _ = load_image(images / "16708_5_1.jpg")
    out, info = preprocess_image(img)
    t, l, b, r = info.content_box
    assert t > 100 and img.shape[0] - b > 150 and out.shape == (512, 512)
    assert img[:t].mean() < 10 and img[t + 20 : b - 20].mean() > 60


# ---------------------------------------------------------------- masks


def _reference_mask(mask: np.ndarray, info: CropInfo) -> np.ndarray:
    """Independent path: numpy slicing of the crop box, then PIL NEAREST resize."""
    t, l, b, r = info.crop_box
    crop = ((mask[t:b, l:r] >= 128) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(crop).resize((info.size, info.size), Image.NEAREST))


def _check_real_pairs(pairs, size: int = 256) -> None:
    for img_path, mask in pairs:
        img, _ = load_image(img_path)
        assert mask.shape == img.shape
        out, info = preprocess_image(img, size=size)
        pm = preprocess_mask(mask, info)
        assert pm.shape == out.shape and pm.dtype == np.uint8 and set(np.unique(pm)) <= {0, 255}
        assert pm.any()
        assert _dice(pm, _reference_mask(mask, info)) == 1.0


def test_real_montgomery_layout_masks_match_reference_crop_and_resize(shared_data):
    root = shared_data / "lungs-covid"
    pairs = []
    for p in sorted((root / "CXR_png").glob("*.png"))[:6]:
        left = np.asarray(Image.open(root / "ManualMask" / "leftMask" / p.name).convert("L"))
        right = np.asarray(Image.open(root / "ManualMask" / "rightMask" / p.name).convert("L"))
        pairs.append((p, np.maximum(left, right)))
    _check_real_pairs(pairs)


def test_real_shenzhen_soft_masks_match_reference_crop_and_resize(shared_data):
    root = shared_data / "lungs-shenzhen"
    pairs = []
    for p in sorted((root / "CXR_png").glob("*.png"))[:4]:
        mask = np.asarray(Image.open(root / "masks" / f"{p.stem}_mask.png").convert("L"))
        pairs.append((p, mask))
    _check_real_pairs(pairs)


def test_mask_lands_on_the_same_pixels_as_the_content_through_border_removal():
    h, w = 260, 200
    content = _texture(h, w, 40, 120)
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - 150) ** 2 + (xx - 70) ** 2 < 35**2
    content[disc] = 230  # a bright organ whose mask we know
    img = _framed(content, (40, 22, 13, 61), 0)
    mask = _framed(disc.astype(np.uint8) * 255, (40, 22, 13, 61), 0)
    out, info = preprocess_image(img, size=128)
    pm = preprocess_mask(mask, info)
    assert info.content_box == (40, 22, 300, 222)
    # The bright pixels of the processed image are the mask's pixels (edges blur by ~1 px).
    assert _dice(out > 175, pm) > 0.95
    # And it is the same mask as processing the unpadded content.
    _, ref_info = preprocess_image(content, size=128, remove_borders=False)
    assert np.array_equal(pm, preprocess_mask(disc, ref_info))


def test_mask_of_wrong_size_is_refused():
    _, info = preprocess_image(_texture(100, 100), size=64)
    with pytest.raises(ValueError, match="mask shape"):
        preprocess_mask(np.zeros((99, 100), np.uint8), info)
