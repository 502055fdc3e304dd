"""Images for encoder pretraining, held in memory, and batches that are a pure function of the step.

Self-supervised pretraining on a user's own images is a small-data job on CPU (hundreds to tens of
thousands of images): the prepared images are decoded once, resized to `data.load_size` and kept as
uint8. Step `t` of a run with global batch G uses positions [t*G, (t+1)*G) of an endless sequence of
epoch permutations (epoch e shuffled by seed (run seed, e)); rank r takes its slice of that global
batch, and its crops are drawn from a generator seeded by (run seed, step, rank). A resumed run therefore
rebuilds exactly the batches an uninterrupted run would have seen, without replaying anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dinodiff.data.image_sets import image_records, resize_square
from dinodiff.data.shards import list_shards
from dinodiff.encoder.augment import MultiCrop
from dinodiff.models.training_images import TrainingImages

logger = logging.getLogger(__name__)


class NoImages(FileNotFoundError):
    """The shards hold no usable images; the message names the folder and the fix."""


@dataclass
class PretrainImages:
    """uint8 images (N, 1, size, size) and, per image, its prepared id, source file and subject."""

    images: torch.Tensor
    ids: list[str]
    paths: list[str | None]
    subjects: list[str | None]
    shards: str
    split: str | None

    def __len__(self) -> int:
        return len(self.ids)

    def record(self, step: int) -> TrainingImages:
        """What the encoder folder saved at `step` records as its training images (training_images.json)."""
        return TrainingImages(ids=tuple(self.ids), paths=tuple(self.paths), subjects=tuple(self.subjects),
                              shards=self.shards, split=self.split, step=step)


def load_images(shards: str | Path, split: str | None, size: int, limit: int | None = None) -> PretrainImages:
    """The prepared images of `shards` (one split, or all when None), resized to `size`, with their ids."""
    path = Path(shards)
    if not str(shards) or not path.exists():
        raise NoImages(f"data.shards={str(shards)!r} does not exist; point it at a `dinodiff prepare` output folder.")
    urls = [str(path)] if path.is_file() else list_shards(path, split)
    if not urls:
        raise NoImages(f"No {split or ''} shards (*.tar) in {shards}; run `dinodiff prepare SRC --out {shards}` "
                       "first, or set data.split=null to use every split.")
    images, ids, paths, subjects = [], [], [], []
    for record in image_records(path, size=size, kind="shards", split=split):
        images.append(torch.from_numpy(resize_square(record.decode(), size, Image.Resampling.BICUBIC)))
        ids.append(record.id)
        paths.append(record.path)
        subjects.append(record.subject)
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise NoImages(f"The shards in {shards} hold no images; prepare them again.")
    logger.info("loaded %d images at %d px from %s", len(images), size, shards)
    return PretrainImages(torch.stack(images)[:, None], ids, paths, subjects, str(path.resolve()), split)


def step_indices(step: int, num_images: int, global_batch: int, seed: int) -> list[int]:
    """Image indices of the global batch of `step` (positions step*G .. step*G+G-1 over epoch permutations)."""
    start = step * global_batch
    out: list[int] = []
    epoch = start // num_images
    offset = start - epoch * num_images
    while len(out) < global_batch:
        perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[offset:].tolist())
        epoch, offset = epoch + 1, 0
    return out[:global_batch]


class StepBatches(Dataset):
    """Item i = the multi-crop batch of step `first_step + i` for one rank: a list of (B, 1, s, s) crops."""

    def __init__(self, images: torch.Tensor, crops: MultiCrop, *, first_step: int, last_step: int,
                 batch_size: int, rank: int, world: int, seed: int) -> None:
        self.images, self.crops = images, crops
        self.first, self.last = first_step, last_step
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed

    def __len__(self) -> int:
        return max(0, self.last - self.first)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        step = self.first + i
        idx = step_indices(step, len(self.images), self.batch_size * self.world, self.seed)
        mine = idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_009 + self.rank)
        return self.crops(self.images[mine], gen)


def batch_loader(dataset: StepBatches, num_workers: int) -> DataLoader:
    """Batches in step order; workers only build them ahead of time (each is seeded by its step)."""
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                      persistent_workers=False, prefetch_factor=2 if num_workers else None)
