"""The cache stage at scale: workers augment while the models run, the bytes do not depend on the number of
workers, and the count comes from each shard's sidecar (never from re-reading the shards)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

import dinodiff.cache as cache_mod
from dinodiff.cache import build_cache
from dinodiff.config import with_overrides


def _shards(folder):
    return {p.name: p.read_bytes() for p in sorted((folder / "shards").glob("*.tar"))}


def test_cache_bytes_do_not_depend_on_workers_and_the_count_is_not_reread(tmp_path, prepared_phantoms, monkeypatch):
    cfg = tiny_config(tmp_path / "run", prepared_phantoms)
    serial = build_cache(cfg, tmp_path / "serial", views=2, batch_size=3, progress=False, num_workers=0)
    parallel = build_cache(cfg, tmp_path / "parallel", views=2, batch_size=3, progress=False, num_workers=2)
    assert _shards(tmp_path / "serial") == _shards(tmp_path / "parallel") and len(_shards(tmp_path / "serial")) == 3
    sidecars = sorted((tmp_path / "serial" / "shards").glob("*.meta.json"))
    assert sum(json.loads(p.read_text())["samples"] for p in sidecars) == serial["count"] == parallel["count"] > 0

    def no_reading(*args, **kwargs):
        raise AssertionError("a finished cache shard was read again")

    monkeypatch.setattr(cache_mod, "read_samples", no_reading)
    again = build_cache(cfg, tmp_path / "serial", views=2, batch_size=3, progress=False, num_workers=0)
    assert again["count"] == serial["count"]  # summed from the sidecars
    (tmp_path / "serial" / "shards" / "train-000000.meta.json").unlink()  # a shard cached before sidecars existed
    monkeypatch.undo()
    assert build_cache(cfg, tmp_path / "serial", views=2, batch_size=3, progress=False)["count"] == serial["count"]


def test_a_worker_stops_on_a_damaged_shard_when_asked_to(tmp_path, prepared_phantoms):
    import shutil

    copy = tmp_path / "prepared"
    shutil.copytree(prepared_phantoms, copy)
    tar = sorted((copy / "shards").glob("train-*.tar"))[1]
    tar.write_bytes(tar.read_bytes()[:1500])  # cut short: its size differs from its sidecar's
    cfg = tiny_config(tmp_path / "run", copy, "data.on_corrupt=stop")
    with pytest.raises(Exception, match=tar.name):
        build_cache(cfg, tmp_path / "cache", views=1, batch_size=4, progress=False, num_workers=2)
    cfg = with_overrides(cfg, ["data.on_corrupt=skip"])
    info = build_cache(cfg, tmp_path / "cache", views=1, batch_size=4, progress=False, num_workers=2)
    assert info["skipped_shards"] == [str(tar)]
