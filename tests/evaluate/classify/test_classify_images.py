"""classify's real-image cache and the id filter at scale (issue 22): images are matched by key before they are
decoded, and streamed into the cache's memmap instead of held."""

from __future__ import annotations

import gc
import weakref

import numpy as np

import dinodiff.data.image_sets as sources
import dinodiff.evaluate.classify.images as images
from dinodiff.data.shards import shard_path, write_shard
from dinodiff.evaluate.classify.settings import DataSettings
from dinodiff.evaluate.classify.split import FROM_DATA


def _prepared(folder, n=40, size=16):
    rng = np.random.default_rng(0)
    for split, part in (("train", range(0, 30)), ("test", range(30, n))):
        write_shard(shard_path(folder, split, 0), [
            {"__key__": f"img{i:03d}", "png": rng.integers(0, 255, (size, size), dtype=np.uint8),
             "json": {"split": split, "subject": f"p{i // 2}", "labels": {"a": float(i % 2), "b": float(i % 3 == 0)}}}
            for i in part])
    return folder


def test_ids_are_matched_before_decoding_and_give_the_same_images(tmp_path, monkeypatch):
    folder = _prepared(tmp_path / "prepared")
    every = {s.id: s for s in sources.iter_sources(folder, size=16)}
    decoded = []
    decode = sources.decode_png
    monkeypatch.setattr(sources, "decode_png", lambda data: decoded.append(1) or decode(data))
    wanted = {"img003", "img017", "img021"}
    found = list(sources.iter_sources(folder, size=16, split="train", ids=wanted))
    assert [s.id for s in found] == sorted(wanted) and len(decoded) == len(wanted)  # nothing else decoded
    for s in found:
        assert np.array_equal(s.image, every[s.id].image) and s.labels == every[s.id].labels
        assert s.subject == every[s.id].subject


def test_real_cache_streams_images_into_the_memmap(tmp_path, monkeypatch):
    folder = _prepared(tmp_path / "prepared")
    alive, most = [], [0]
    stream = images.iter_sources

    def watched(*args, **kwargs):
        for item in stream(*args, **kwargs):
            gc.collect()
            most[0] = max(most[0], sum(r() is not None for r in alive))
            alive.append(weakref.ref(item.image))
            yield item

    monkeypatch.setattr(images, "iter_sources", watched)
    real = images.load_real(DataSettings(source=str(folder)), 16, tmp_path / "cache")
    assert len(alive) == 40 and most[0] <= 2  # at most the image being written and the test split's first
    every = list(sources.iter_sources(folder, size=16, split="train")) + list(
        sources.iter_sources(folder, size=16, split="test"))
    assert real.ids == [s.id for s in every] and list(real.split) == ["train"] * 30 + ["test"] * 10
    assert np.array_equal(np.asarray(real.images), np.stack([s.image for s in every]))
    assert real.names == ["a", "b"] and real.positive[:, 0].tolist() == [i % 2 == 1 for i in range(40)]
    assert real.subjects[0] == real.subjects[1] != real.subjects[2]  # p0, p0, p1
    assert real.subject_counts[FROM_DATA] == 40


def test_real_index_is_compact_arrays_read_back_without_pickle(tmp_path):
    """The index is arrays (ids as a UTF-8 buffer, subjects as codes, positives, split codes), tens of bytes per
    image, readable with allow_pickle=False, and a second load_real reads the same index back from the cache."""
    folder = _prepared(tmp_path / "prepared")
    built = images.load_real(DataSettings(source=str(folder)), 16, tmp_path / "cache")
    with np.load(tmp_path / "cache" / "real-16.npz", allow_pickle=False) as f:
        assert all(f[name].dtype != object for name in f.files)
        assert sum(f[name].nbytes for name in f.files) / 40 < 40  # bytes per image (a JSON list: ~1.4 KB)
    again = images.load_real(DataSettings(source=str(folder)), 16, tmp_path / "cache")
    assert list(again.ids) == [f"img{i:03d}" for i in range(40)] and again.ids == built.ids
    assert list(again.subjects) == [f"p{i // 2}" for i in range(40)] and again.subjects[-1] == "p19"
    assert again.ids[-1] == "img039" and again.ids[1:3] == ["img001", "img002"] and len(again.subjects.table) == 20
    assert np.array_equal(again.positive, built.positive) and again.positive.dtype == bool
    assert list(again.split) == list(built.split) == ["train"] * 30 + ["test"] * 10
