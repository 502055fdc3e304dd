"""Deterministic, atomic shard writing; listing; reading back with our reader and webdataset's."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import webdataset as wds

from dinodiff.data.shards import list_shards, read_samples, shard_path, shard_pattern, write_shard


def _samples(n: int = 3):
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 256, (32, 32), dtype=np.uint8)
        mask = (img > 128).astype(np.uint8) * 255
        yield {"__key__": f"case-{i:02d}", "png": img, "json": {"id": f"case-{i:02d}", "labels": {"x": 1.0}},
               "mask_left.png": mask}


def test_shard_pattern_and_listing_by_split(tmp_path):
    assert shard_pattern(tmp_path, "train") == str(tmp_path / "shards" / "train-%06d.tar")
    for split, i in (("train", 0), ("train", 1), ("test", 0)):
        write_shard(shard_path(tmp_path, split, i), _samples(1))
    (tmp_path / "shards" / "train-000000.meta.json").write_text("{}")
    assert [p.rsplit("/", 1)[1] for p in list_shards(tmp_path, "train")] == ["train-000000.tar", "train-000001.tar"]
    assert len(list_shards(tmp_path)) == 3 and len(list_shards(tmp_path / "shards", "test")) == 1


def test_write_shard_is_byte_deterministic_with_fixed_headers(tmp_path):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    write_shard(a, _samples())
    write_shard(b, _samples())
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        members = tar.getmembers()
    assert [m.name for m in members][:3] == ["case-00.json", "case-00.mask_left.png", "case-00.png"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}


def test_read_samples_round_trips_images_masks_and_json(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(path, _samples())
    got = list(read_samples(path))
    want = list(_samples())
    assert [g["__key__"] for g in got] == [w["__key__"] for w in want]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g["image"], w["png"])
        np.testing.assert_array_equal(g["masks"]["left"], w["mask_left.png"])
        assert g["json"] == w["json"]


def test_webdataset_groups_our_members_into_samples(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(path, _samples())
    ds = wds.WebDataset(str(path), shardshuffle=False).decode("l")
    got = list(ds)
    assert [s["__key__"] for s in got] == ["case-00", "case-01", "case-02"]
    assert set(got[0]) >= {"png", "json", "mask_left.png"} and got[0]["png"].shape == (32, 32)


def test_failed_write_leaves_no_tar_and_no_temp_file(tmp_path):
    def broken():
        yield from _samples(2)
        raise RuntimeError("disk full")

    path = tmp_path / "shards" / "train-000000.tar"
    with pytest.raises(RuntimeError):
        write_shard(path, broken())
    assert list(path.parent.iterdir()) == []


@pytest.mark.parametrize("key", ["a.b", "a/b", ""])
def test_keys_that_webdataset_would_split_are_refused(tmp_path, key):
    with pytest.raises(ValueError, match="invalid sample key"):
        write_shard(tmp_path / "x.tar", [{"__key__": key, "png": np.zeros((4, 4), np.uint8)}])
