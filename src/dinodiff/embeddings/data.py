"""The cached c_GLB of `dinodiff cache`, read whole into memory for the embedding generator.

`dinodiff cache` writes ``OUT/shards/train-%06d.tar`` whose samples hold ``c_glb.npy`` (K, S, N) float16 (K
augmented views) and ``json`` (the prepared image's metadata, with its ``labels``). Only those two members are
decoded, by `dinodiff.data.cached` (``np.load(..., allow_pickle=False)``): nothing in a shard is ever unpickled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dinodiff.data.cached import CacheError, iter_cached
from dinodiff.data.image_sets import subject_of
from dinodiff.data.subjects import hash_split, subject_key

logger = logging.getLogger(__name__)


@dataclass
class CachedEmbeddings:
    """c_glb (M, K, S, N) float32: K cached views of M images; keys, labels and subjects (None: unknown) of each."""

    c_glb: torch.Tensor
    keys: list[str]
    labels: list[dict[str, float | None]]
    subjects: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.subjects = list(self.subjects) or [None] * len(self.keys)

    @property
    def token_shape(self) -> tuple[int, int]:
        return (int(self.c_glb.shape[2]), int(self.c_glb.shape[3]))

    def subset(self, index: np.ndarray) -> "CachedEmbeddings":
        index = np.asarray(index, dtype=np.int64)
        return CachedEmbeddings(self.c_glb[torch.from_numpy(index)], [self.keys[i] for i in index],
                                [self.labels[i] for i in index], [self.subjects[i] for i in index])

    def groups(self) -> list[str]:
        """Each image's subject when known, else the image itself (dinodiff.data.subjects.subject_key)."""
        return [subject_key(k, s) for k, s in zip(self.keys, self.subjects)]


@dataclass
class HoldoutSplit:
    """Indices of the cached images the embedding model trains on and of those held out from it."""

    train: np.ndarray
    holdout: np.ndarray
    fraction: float
    seed: int
    by: str  # "subject", "subject (image where unknown)", "image" or "none"

    def describe(self, data: CachedEmbeddings) -> dict:
        return {"fraction": self.fraction, "seed": self.seed, "by": self.by, "train_images": int(len(self.train)),
                "holdout_images": int(len(self.holdout)), "holdout_keys": [data.keys[i] for i in self.holdout]}


def split_holdout(data: CachedEmbeddings, fraction: float, seed: int) -> HoldoutSplit:
    """Hold out a seeded `fraction` of the subjects (images when unknown) with prepare's hash rule
    (dinodiff.data.subjects.hash_split): every image of a held-out patient is held out; 0 holds out nothing."""
    everything = np.arange(len(data.keys))
    if fraction <= 0:
        return HoldoutSplit(everything, everything[:0], 0.0, seed, "none")
    held = np.array([hash_split(g, fraction, seed) == "test" for g in data.groups()], dtype=bool)
    known = sum(s is not None for s in data.subjects)
    by = "image" if not known else "subject" if known == len(data.keys) else "subject (image where unknown)"
    if held.all() or not held.any():
        raise ValueError(f"--holdout-fraction {fraction} (seed {seed}) holds out {int(held.sum())} of "
                         f"{len(held)} cached images (by {by}): change the fraction or the seed, or pass "
                         "--holdout-fraction 0 to measure against the training embeddings (transductive).")
    return HoldoutSplit(everything[~held], everything[held], fraction, seed, by)


def read_cached_embeddings(cache_dir: str | Path, limit: int | None = None) -> CachedEmbeddings:
    """Every cached image's K views of c_GLB, in shard order (the first `limit` images when given)."""
    arrays, keys, labels, subjects = [], [], [], []
    for sample in iter_cached(cache_dir):
        if "c_glb.npy" not in sample:
            raise CacheError(f"{sample.get('__url__', cache_dir)}:{sample['__key__']} has no c_glb.npy: rebuild the "
                             "cache with `dinodiff cache`.")
        arrays.append(sample["c_glb.npy"].astype(np.float32))
        meta = sample.get("json") or {}
        keys.append(sample["__key__"])
        labels.append(dict(meta.get("labels") or {}))
        subjects.append(subject_of(meta))
        if limit is not None and len(keys) >= limit:
            break
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise CacheError(f"Cached c_GLB in {cache_dir} have different shapes {sorted(shapes)}; rebuild it.")
    logger.info("read %d cached images x %d views of c_GLB %s from %s", len(keys), arrays[0].shape[0],
                arrays[0].shape[1:], cache_dir)
    return CachedEmbeddings(torch.from_numpy(np.stack(arrays)), keys, labels, subjects)


def label_names(labels: list[dict[str, float | None]]) -> list[str]:
    """Every label name any image has, sorted."""
    return sorted({name for item in labels for name in item})


def multi_hot(labels: list[dict[str, float | None]], names: list[str]) -> torch.Tensor:
    """(M, L) float: 1 where the image is positive (1.0) for the label; 0, uncertain (-1) and missing are 0."""
    return torch.tensor([[1.0 if item.get(n) == 1.0 else 0.0 for n in names] for item in labels],
                        dtype=torch.float32).reshape(len(labels), len(names))
