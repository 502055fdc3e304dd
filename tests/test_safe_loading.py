"""Reading a latent cache never unpickles anything (issue 10, item 6).

webdataset's `wds.decode()` unpickles `.pkl`/`.pyd` members, so a tampered cache shard could run code
in the trainer. The cache loader decodes only what `dinodiff cache` writes and refuses anything else.
"""

from __future__ import annotations

import io
import itertools
import pickle
from pathlib import Path

import numpy as np
import pytest

from dinodiff.data.cached import build_cache_loader
from dinodiff.data.shards import UnsafeShard, write_shard



class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _cache_sample(key: str, **extra: bytes) -> dict:
    rng = np.random.default_rng(0)
    return {"__key__": key, "moments.npy": _npy(rng.standard_normal((2, 8, 4, 4)).astype(np.float16)),
            "c_glb.npy": _npy(rng.standard_normal((2, 1, 16)).astype(np.float16)), "json": b"{}", **extra}


def _cache_dir(root: Path, samples: list[dict]) -> Path:
    write_shard(root / "cache" / "shards" / "train-000000.tar", samples)
    return root / "cache"


def _first_batch(cache: Path):
    loader = build_cache_loader(cache, batch_size=2, num_workers=0, shuffle_buffer=1)
    return next(iter(loader))


def test_clean_cache_shard_gives_float_batches(tmp_path):
    batch = _first_batch(_cache_dir(tmp_path, [_cache_sample(f"s{i}") for i in range(3)]))
    assert tuple(batch["moments"].shape) == (2, 8, 4, 4) and tuple(batch["c_glb"].shape) == (2, 1, 16)


@pytest.mark.parametrize("member", ["pyd", "pkl", "pickle"])
def test_cache_shard_with_a_pickle_member_is_refused_before_any_code_runs(tmp_path, member):
    marker = tmp_path / "code-ran"
    evil = _cache_sample("s0", **{member: pickle.dumps(_Payload(marker))})
    cache = _cache_dir(tmp_path, [evil, _cache_sample("s1")])
    with pytest.raises(UnsafeShard, match=rf"train-000000\.tar holds 's0\.{member}'.*refusing.*dinodiff cache"):
        _first_batch(cache)
    assert not marker.exists()


def test_npy_member_holding_a_pickled_object_array_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    evil = _cache_sample("s0")
    evil["c_glb.npy"] = _npy(np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(UnsafeShard, match=r"s0\.c_glb\.npy' is not a plain array"):
        _first_batch(_cache_dir(tmp_path, [evil, _cache_sample("s1")]))
    assert not marker.exists()


def test_the_same_shard_through_webdataset_decode_would_have_run_the_code(tmp_path):
    """The reference behaviour this guards against (why `wds.decode()` is not used on cache shards)."""
    import webdataset as wds

    marker = tmp_path / "code-ran"
    cache = _cache_dir(tmp_path, [_cache_sample("s0", pyd=pickle.dumps(_Payload(marker)))])
    list(itertools.islice(wds.WebDataset(str(cache / "shards" / "train-000000.tar"), shardshuffle=False).decode(), 1))
    assert marker.exists()


def test_cache_loader_refuses_in_dataloader_workers_with_one_clean_line(tmp_path):
    evil = _cache_sample("s0", pkl=pickle.dumps({"x": 1}))
    loader = build_cache_loader(_cache_dir(tmp_path, [evil, _cache_sample("s1")]), batch_size=2, num_workers=1,
                                shuffle_buffer=1)
    with pytest.raises(UnsafeShard) as err:
        next(iter(loader))
    assert "Traceback" not in str(err.value) and "\n" not in str(err.value)
    assert "s0.pkl" in str(err.value)
