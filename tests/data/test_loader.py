"""Training/eval WebDataset pipelines over real prepared shards, and the paper's augmentation."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from dinodiff.data.augment import paper_augmentation, shear_degrees
from dinodiff.data.loader import build_eval_dataset, build_train_dataset, build_train_loader, resolve_urls
from dinodiff.data.shards import list_shards
from dinodiff.prepare import prepare

SIZE = 64


@pytest.fixture(scope="module")
def prepared(shared_data, tmp_path_factory):
    """12 real images, 4 per shard, at 96 px (the loader resizes to SIZE); Shenzhen ones carry masks."""
    out = tmp_path_factory.mktemp("prepared")
    src = tmp_path_factory.mktemp("src")
    for p in sorted((shared_data / "cxr-covid" / "images").iterdir())[:8]:
        (src / p.name).symlink_to(p)
    prepare([src, shared_data / "lungs-shenzhen"], out, size=96, shard_size=6, workers=1, progress=False)
    return out


def _take(ds, n):
    return list(itertools.islice(iter(ds), n))


def test_train_samples_have_the_right_shape_range_and_metadata(prepared):
    samples = _take(build_train_dataset(prepared, size=SIZE, shuffle_buffer=10), 20)  # resampled: endless
    for s in samples:
        x = s["pixel_values"]
        assert x.shape == (1, SIZE, SIZE) and x.dtype == torch.float32
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05
        assert s["json"]["id"] == s["key"]


def test_augmentation_changes_images_but_keeps_them_in_range(prepared):
    kw = dict(size=SIZE, resampled=False, shuffle_buffer=0)
    plain = list(build_train_dataset(prepared, augment=False, **kw))
    aug = list(build_train_dataset(prepared, augment=True, **kw))
    assert [s["key"] for s in plain] == [s["key"] for s in aug] and len(plain) == 18
    changed = [(a["pixel_values"] - p["pixel_values"]).abs().mean() > 0.01 for a, p in zip(aug, plain)]
    assert sum(changed) >= len(changed) - 1  # an identity draw is possible, not likely
    assert all(0.0 <= a["pixel_values"].min() and a["pixel_values"].max() <= 1.0 for a in aug)


def test_same_seed_gives_the_same_first_batch_and_another_seed_does_not(prepared):
    def first(seed):
        return next(iter(build_train_loader(prepared, batch_size=4, size=SIZE, seed=seed, shuffle_buffer=10)))

    a, b, c = first(0), first(0), first(1)
    assert a["pixel_values"].shape == (4, 1, SIZE, SIZE) and len(a["key"]) == 4 and len(a["json"]) == 4
    assert a["key"] == b["key"] and torch.equal(a["pixel_values"], b["pixel_values"])
    assert a["key"] != c["key"] or not torch.equal(a["pixel_values"], c["pixel_values"])


def test_loader_leaves_the_callers_torch_rng_alone(prepared):
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    _take(build_train_dataset(prepared, size=SIZE, shuffle_buffer=4), 5)
    assert torch.equal(torch.rand(3), want)


def test_resampled_loader_with_two_workers_streams_batches(prepared):
    loader = build_train_loader(prepared, batch_size=4, num_workers=2, size=SIZE, shuffle_buffer=8, seed=3)
    batches = list(itertools.islice(iter(loader), 6))  # more than the 18 images: resampling never ends
    assert all(b["pixel_values"].shape == (4, 1, SIZE, SIZE) for b in batches)
    keys = [k for b in batches for k in b["key"]]
    assert len(set(keys)) > 4  # the two workers do not replay one identical stream


def test_eval_dataset_is_in_shard_order_without_augmentation(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    ds = build_eval_dataset(prepared, size=SIZE, masks=True)
    samples = list(ds)
    keys = [s["key"] for s in samples]
    assert keys == sorted(keys) and len(keys) == manifest["counts"]["written"] == 18
    again = list(build_eval_dataset(prepared, size=SIZE))
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(samples, again))
    shenzhen = [s for s in samples if "CHNCXR" in s["key"]]
    assert len(shenzhen) == 10 and all(s["masks"]["lungs"].shape == (1, SIZE, SIZE) for s in shenzhen)


def test_urls_accept_dirs_brace_patterns_pipes_and_lists(prepared):
    shards = list_shards(prepared, "train")
    assert resolve_urls(prepared) == shards and resolve_urls(prepared / "shards") == shards
    pattern = str(prepared / "shards" / "train-{000000..000002}.tar")
    assert resolve_urls([pattern]) == shards
    n = sum(1 for _ in build_eval_dataset(pattern, size=SIZE))
    piped = sum(1 for _ in build_eval_dataset([f"pipe:cat {s}" for s in shards], size=SIZE))
    assert n == piped == 18
    with pytest.raises(FileNotFoundError):
        resolve_urls(prepared / "shards", split="validation")
    assert resolve_urls("s3://b/train-{0..1}.tar") == ["pipe:aws s3 cp s3://b/train-0.tar -",
                                                        "pipe:aws s3 cp s3://b/train-1.tar -"]


def test_paper_augmentation_maps_5_percent_shear_to_degrees():
    assert shear_degrees(0.05) == pytest.approx(2.862, abs=1e-3)
    affine = paper_augmentation().transforms[1]
    assert affine.shear == [-shear_degrees(0.05), shear_degrees(0.05)] * 2
    assert list(affine.translate) == [0.05, 0.05] and list(affine.scale) == [0.9, 1.4]
    assert list(affine.degrees) == [0, 0]
