"""The cached c_GLB of `dinodiff cache`, read whole into memory for the embedding generator.

`dinodiff cache` writes ``OUT/shards/train-%06d.tar`` whose samples hold ``c_glb.npy`` (K, S, N) float16 (K
augmented views) and ``json`` (the prepared image's metadata, with its ``labels``). Only those two members are
decoded here, with ``np.load(..., allow_pickle=False)``: nothing in a shard is ever unpickled.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

logger = logging.getLogger(__name__)


class EmbeddingCacheError(FileNotFoundError):
    """The cache folder is missing, empty or unreadable; the message says which file and what to run."""


@dataclass
class CachedEmbeddings:
    """c_glb (M, K, S, N) float32: K cached views of M images; keys and labels of each image."""

    c_glb: torch.Tensor
    keys: list[str]
    labels: list[dict[str, float | None]]

    @property
    def token_shape(self) -> tuple[int, int]:
        return (int(self.c_glb.shape[2]), int(self.c_glb.shape[3]))


def cache_shards(cache_dir: str | Path) -> list[str]:
    """The train shards of a cache folder, sorted; a clear error when there are none."""
    folder = Path(cache_dir)
    if not (folder / "cache.json").is_file():
        raise EmbeddingCacheError(f"{folder / 'cache.json'} not found: run `dinodiff cache --config ... --out "
                                  f"{folder}` first (or finish that run).")
    shards = sorted(str(p) for p in (folder / "shards").glob("train-*.tar"))
    if not shards:
        raise EmbeddingCacheError(f"No cached shards in {folder / 'shards'}: rerun `dinodiff cache` to complete it.")
    return shards


def _load_npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise EmbeddingCacheError(f"{where}: c_glb.npy is not a plain numeric array ({err}); rebuild the cache "
                                  "with `dinodiff cache`.") from err


def read_cached_embeddings(cache_dir: str | Path, limit: int | None = None) -> CachedEmbeddings:
    """Every cached image's K views of c_GLB, in shard order (the first `limit` images when given)."""
    arrays, keys, labels = [], [], []
    dataset = wds.WebDataset(cache_shards(cache_dir), shardshuffle=False, empty_check=False)
    for sample in dataset:
        where = f"{sample.get('__url__', cache_dir)}:{sample['__key__']}"
        if "c_glb.npy" not in sample:
            raise EmbeddingCacheError(f"{where} has no c_glb.npy: rebuild the cache with `dinodiff cache`.")
        arrays.append(_load_npy(sample["c_glb.npy"], where).astype(np.float32))
        meta = json.loads(sample["json"]) if "json" in sample else {}
        keys.append(sample["__key__"])
        labels.append(dict(meta.get("labels") or {}))
        if limit is not None and len(keys) >= limit:
            break
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise EmbeddingCacheError(f"Cached c_GLB in {cache_dir} have different shapes {sorted(shapes)}; rebuild it.")
    logger.info("read %d cached images x %d views of c_GLB %s from %s", len(keys), arrays[0].shape[0],
                arrays[0].shape[1:], cache_dir)
    return CachedEmbeddings(torch.from_numpy(np.stack(arrays)), keys, labels)


def label_names(labels: list[dict[str, float | None]]) -> list[str]:
    """Every label name any image has, sorted."""
    return sorted({name for item in labels for name in item})


def multi_hot(labels: list[dict[str, float | None]], names: list[str]) -> torch.Tensor:
    """(M, L) float: 1 where the image is positive (1.0) for the label; 0, uncertain (-1) and missing are 0."""
    return torch.tensor([[1.0 if item.get(n) == 1.0 else 0.0 for n in names] for item in labels],
                        dtype=torch.float32).reshape(len(labels), len(names))
