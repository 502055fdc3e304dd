"""Reading what `dinodiff cache` wrote: ``cache.json``, its shards, their samples decoded safely, and the training
loader that draws one cached view per visit. The cache stage (`dinodiff.cache`) writes; training and the embedding
generator read through here.

Reading a cache decodes only the members `cache` writes (``moments.npy`` and ``c_glb.npy`` with
``allow_pickle=False``, ``json``): any other member, a pickle above all, is refused with UnsafeShard.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinodiff.data.loader import GuardedTarSamples, SeededShuffle
from dinodiff.data.ranks import rank_share
from dinodiff.data.shards import UnsafeShard

CACHE_FILE = "cache.json"
CACHE_FIX = "delete that cache shard and rerun `dinodiff cache` (finished shards are kept)"
# The members `build_cache` writes, and the only ones a cache reader decodes (see decode_cache_sample).
CACHE_MEMBERS = ("moments.npy", "c_glb.npy", "json")


class CacheError(FileNotFoundError):
    """The cache folder is missing, unfinished or empty; the message says which file and what to run."""


def cache_key(resolution: int, encoder: Mapping[str, Any], autoencoder_kind: str,
              autoencoder_path: str | None) -> dict[str, Any]:
    """What a cache was made for and a run must match: resolution, encoder settings, autoencoder kind and path."""
    return {"resolution": resolution, "encoder": dict(encoder), "autoencoder.kind": autoencoder_kind,
            "autoencoder.path": autoencoder_path}


def cache_shards(cache_dir: str | Path) -> list[str]:
    """The train shards of a cache folder, sorted; a clear error when there are none."""
    folder = Path(cache_dir)
    shards = sorted(str(p) for p in (folder / "shards").glob("train-*.tar"))
    if not shards:
        raise CacheError(f"No cached shards in {folder / 'shards'}: rerun `dinodiff cache --out {folder}` to "
                         "complete it.")
    return shards


def read_cache_info(cache_dir: str | Path, wanted: Mapping[str, Any] | None = None) -> dict:
    """cache.json; with `wanted` (see `cache_key`), checked against the model a run is about to use."""
    path = Path(cache_dir) / CACHE_FILE
    if not path.is_file():
        raise CacheError(f"{path} not found: run `dinodiff cache --config ... --out {cache_dir}` first "
                         "(or the cache run did not finish; rerun it to complete).")
    info = json.loads(path.read_text())
    if wanted is None:
        return info
    have = {"resolution": info["resolution"], "encoder": info["encoder"],
            "autoencoder.kind": info["autoencoder"]["kind"], "autoencoder.path": info["autoencoder"]["path"]}
    mismatched = [k for k in wanted if wanted[k] != have[k]]
    if mismatched:
        details = "; ".join(f"{k}: cache has {have[k]!r}, config wants {wanted[k]!r}" for k in mismatched)
        raise ValueError(f"The cache in {cache_dir} was made for another model ({details}). "
                         "Rebuild it with `dinodiff cache` using this config, or drop data.cache.")
    return info


def decode_cache_sample(sample: dict) -> dict:
    """Decode the members `build_cache` writes, refusing every other one (a `.pkl`/`.pyd` could run code).

    webdataset's default `wds.decode()` would unpickle such members; here `.npy` is read with
    `allow_pickle=False` and anything else stops the run with UnsafeShard.
    """

    url, key = sample.get("__url__", "?"), sample.get("__key__")
    out = {k: v for k, v in sample.items() if k.startswith("__")}
    for name, data in sample.items():
        if name.startswith("__"):
            continue
        if name not in CACHE_MEMBERS:
            raise UnsafeShard(f"cache shard {url} holds '{key}.{name}', a member dinodiff never writes (only "
                              f"{', '.join(CACHE_MEMBERS)}); refusing to decode it (a pickle can run code). "
                              "Rebuild the cache with `dinodiff cache` from trusted prepared shards.")
        try:
            out[name] = np.load(io.BytesIO(data), allow_pickle=False) if name.endswith(".npy") else json.loads(data)
        except ValueError as err:  # an object array needs pickle: refused
            raise UnsafeShard(f"cache shard {url}: '{key}.{name}' is not a plain array ({err}); refusing it. "
                              "Rebuild the cache with `dinodiff cache`.") from None
    return out


def iter_cached(cache_dir: str | Path) -> Iterator[dict]:
    """Every cached sample in shard order, decoded by `decode_cache_sample` (keys ``__key__``, ``__url__``, ...)."""
    import webdataset as wds

    read_cache_info(cache_dir)  # an unfinished cache (no cache.json yet) is named with the fix
    for sample in wds.WebDataset(cache_shards(cache_dir), shardshuffle=False, empty_check=False):
        yield decode_cache_sample(sample)


def build_cache_loader(cache_dir: str | Path, *, batch_size: int, num_workers: int = 0, seed: int = 0,
                       shuffle_buffer: int = 1000, on_corrupt: str = "skip"):
    """Endless batches {"moments": (B, C', h, w), "c_glb": (B, S, N)}, one random view per visit.

    Decodes only our own members (`decode_cache_sample`); a damaged shard is skipped or stops, per `on_corrupt`.
    """
    import webdataset as wds

    shards = cache_shards(cache_dir)

    def pick_view(stream: Iterator[dict]) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        rng = random.Random(seed * 1000 + (worker.id if worker else 0))
        for sample in stream:
            sample = decode_cache_sample(sample)
            view = rng.randrange(sample["moments.npy"].shape[0])
            yield {"moments": torch.from_numpy(sample["moments.npy"][view].astype(np.float32)),
                   "c_glb": torch.from_numpy(sample["c_glb.npy"][view].astype(np.float32))}

    shards, keep = rank_share(shards)  # each rank resamples its own shards: ranks never share a sample
    pipeline = wds.DataPipeline(
        # Resampled shards are distinct per rank and worker (webdataset seeds them so); deterministic=True
        # makes the stream a function of the seed, which resume relies on. The shuffle is seeded per rank,
        # worker and epoch too: one seeded Random here would be copied into every worker, giving all the same order.
        wds.ResampledShards(shards, seed=seed, deterministic=True),
        GuardedTarSamples(on_corrupt, fix=CACHE_FIX, total=len(shards)),
        *([keep] if keep is not None else []),
        SeededShuffle(shuffle_buffer, seed),
        # no wds.decode(): it unpickles .pkl/.pyd members; pick_view decodes our own members only
        pick_view,
        wds.batched(batch_size, partial=False),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available())
