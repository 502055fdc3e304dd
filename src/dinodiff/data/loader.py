"""Training-time WebDataset pipelines over `prepare` shards.

`urls` may be a prepared dir (its train shards), a folder of .tar files, one tar, a brace
pattern (`shards/train-{000000..000009}.tar`), any URL webdataset opens (`pipe:cat x.tar`,
`https://...`, `s3://...`, the latter streamed with `aws s3 cp URL -`) or a list of those.

Reproducibility: shard order, the shuffle buffer and the augmentation are all seeded from
(`seed`, node rank, DataLoader worker id, epoch), so the same seed and world layout give the
same samples, in the same order, with the same augmentations; different ranks and workers get
different streams. Augmentation seeds torch per sample inside `fork_rng`, leaving the caller's
global RNG untouched.

Damaged shards follow `on_corrupt` (see `dinodiff.data.shards`): local shards whose size differs from
their sidecar's are dropped (skip) or refused (stop) before the stream starts; a tar read error met while
streaming names the shard, which is then left for the rest of the run (skip) or stops it (stop).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import v2
from webdataset.filters import _shuffle
from webdataset.utils import make_seed, pytorch_worker_info

from dinodiff.data.augment import augment_seeded, paper_augmentation
from dinodiff.data.ranks import rank_share
from dinodiff.data.shards import (
    PREPARE_FIX,
    READ_ERRORS,
    CorruptShard,
    check_shards,
    list_shards,
    report_corrupt,
)

logger = logging.getLogger(__name__)


def resolve_urls(urls: str | Path | list[str | Path], split: str = "train") -> list[str] | str:
    """Local dirs -> their `split` shards; s3:// -> `pipe:aws s3 cp`; other strings pass through to webdataset."""
    if isinstance(urls, (list, tuple)):
        out: list[str] = []
        for u in urls:
            r = resolve_urls(u, split)
            out.extend(r if isinstance(r, list) else wds.shardlists.expand_urls(r))
        return out
    u = str(urls)
    if Path(u).is_dir():
        # a folder of other tars (no split naming, no sidecars) is used whole
        ours = (Path(u) / "shards").is_dir() or any(Path(u).glob("*.meta.json"))
        shards = list_shards(u, split) or ([] if ours else list_shards(u))
        if not shards:
            raise FileNotFoundError(f"no {split} shards (*.tar) in {u}")
        return shards
    if u.startswith("s3://"):  # webdataset has no s3 opener: stream through the AWS CLI
        return [f"pipe:aws s3 cp {x} -" for x in wds.shardlists.expand_urls(u)]
    return u


class GuardedTarSamples:
    """`wds.tarfile_to_samples()` one shard at a time, with damaged shards named and handled by `on_corrupt`.

    skip: each damaged shard is logged once per process and never read again; when every shard of the
    list has failed, CorruptShard is raised rather than looping forever. stop: CorruptShard at once.
    """

    def __init__(self, on_corrupt: str = "skip", fix: str = PREPARE_FIX, total: int | None = None):
        self.on_corrupt, self.fix, self.total = on_corrupt, fix, total
        self.bad: set[str] = set()

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        for shard in src:
            url = shard["url"]
            if url in self.bad:
                continue
            try:
                yield from wds.tarfile_samples([shard])
            except READ_ERRORS as err:
                report_corrupt(url, str(err.args[0]).split(" @ ")[0] if err.args else err, self.on_corrupt, self.fix)
                self.bad.add(url)
                if self.total is not None and len(self.bad) >= self.total:
                    raise CorruptShard(f"every one of the {self.total} shards is damaged (last: {url}); "
                                       f"{self.fix}") from None


def _checked(urls: list[str] | str, on_corrupt: str, fix: str = PREPARE_FIX) -> list[str] | str:
    return check_shards(urls, on_corrupt, fix) if isinstance(urls, list) else urls


def _total(urls: list[str] | str) -> int:
    return len(urls) if isinstance(urls, list) else len(wds.shardlists.expand_urls(urls))


def _worker_seed(seed: int, *extra: int) -> int:
    rank, _, worker, _ = pytorch_worker_info()
    return make_seed(seed, rank, worker, *extra)


class _EpochShardShuffle:
    """Shuffle the shard list with a seed that changes every epoch (non-resampled mode)."""

    def __init__(self, seed: int):
        self.seed, self.epoch = seed, -1

    def __call__(self, src):
        self.epoch += 1
        items = list(src)
        random.Random(make_seed(self.seed, self.epoch)).shuffle(items)
        yield from items


class SeededShuffle:
    """Sample shuffle buffer seeded per rank/worker/epoch (webdataset's own shuffle is time-seeded)."""

    def __init__(self, bufsize: int, seed: int):
        self.bufsize, self.seed, self.epoch = bufsize, seed, -1

    def __call__(self, src):
        self.epoch += 1
        seed = _worker_seed(self.seed, self.epoch)
        yield from _shuffle(iter(src), self.bufsize, min(self.bufsize, 100), seed=seed)


def _decode_png(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("L") if im.mode != "L" else im)
    return torch.from_numpy(arr.copy()).unsqueeze(0)  # (1, H, W) uint8


class _ToSample:
    """Raw tar fields -> {"pixel_values", "key", "json"} (+ "masks"), resized and augmented."""

    def __init__(self, size: int, augment: v2.Transform | None, seed: int, masks: bool = False):
        self.size, self.augment, self.seed, self.masks = size, augment, seed, masks
        self.epoch = -1

    def _resize(self, img: torch.Tensor, nearest: bool = False) -> torch.Tensor:
        if img.shape[-1] == self.size and img.shape[-2] == self.size:
            return img
        mode = v2.InterpolationMode.NEAREST if nearest else v2.InterpolationMode.BILINEAR
        return v2.functional.resize(img, [self.size, self.size], interpolation=mode, antialias=not nearest)

    def __call__(self, src):
        self.epoch += 1
        rng = random.Random(_worker_seed(self.seed, self.epoch, 1))
        for raw in src:
            img = self._resize(_decode_png(raw["png"]))
            if self.augment is not None:
                img = augment_seeded(self.augment, img, rng.getrandbits(62))
            sample = {
                "pixel_values": img.to(torch.float32).div_(255.0), "key": raw["__key__"],
                "json": json.loads(raw["json"]) if "json" in raw else {},
            }
            if self.masks:
                sample["masks"] = {k[5:-4]: self._resize(_decode_png(v), nearest=True)
                                   for k, v in raw.items() if k.startswith("mask_") and k.endswith(".png")}
            yield sample


def build_train_dataset(
    urls: str | list[str], *, size: int, augment: bool = True, resampled: bool = True,
    shuffle_buffer: int = 1000, seed: int = 0, split_by_node: bool = True, on_corrupt: str = "skip",
) -> wds.DataPipeline:
    """Endless (resampled) or epoch-wise stream of `{"pixel_values": (1,size,size) float in [0,1], "key", "json"}`.

    Resampled: each rank and worker draws shards with replacement from its own seeded stream, every step
    sees data however many shards there are, and with `split_by_node` each rank draws only from its own
    share of the shards, so ranks never share a sample (`dinodiff.data.ranks`). Otherwise
    shards are shuffled per epoch, split across nodes (`split_by_node`) and DataLoader workers.
    `on_corrupt`: skip or stop at a damaged shard (module docstring).
    """
    urls = _checked(resolve_urls(urls), on_corrupt)
    keep = None
    if resampled:
        if split_by_node:
            urls, keep = rank_share(urls)
        stages = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls), _EpochShardShuffle(seed)]
        if split_by_node:
            stages.append(wds.split_by_node)
        stages.append(wds.split_by_worker)
    stages.append(GuardedTarSamples(on_corrupt, total=_total(urls)))
    if keep is not None:
        stages.append(keep)
    if shuffle_buffer > 1:
        stages.append(SeededShuffle(shuffle_buffer, seed))
    stages.append(_ToSample(size, paper_augmentation() if augment else None, seed))
    return wds.DataPipeline(*stages)


def collate(samples: list[dict]) -> dict:
    """Stack `pixel_values` (B, 1, H, W); keep `key` and `json` (and `masks`) as lists."""
    batch = {"pixel_values": torch.stack([s["pixel_values"] for s in samples]),
             "key": [s["key"] for s in samples], "json": [s["json"] for s in samples]}
    if "masks" in samples[0]:
        batch["masks"] = [s["masks"] for s in samples]
    return batch


def build_train_loader(urls: str | list[str], *, batch_size: int, num_workers: int = 0, **kw) -> wds.WebLoader:
    """`build_train_dataset(urls, **kw)` batched in the workers and wrapped in a WebLoader."""
    dataset = build_train_dataset(urls, **kw).compose(wds.batched(batch_size, collation_fn=collate, partial=False))
    return wds.WebLoader(dataset, batch_size=None, num_workers=num_workers,
                         persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())


def build_eval_dataset(
    urls: str | list[str], *, size: int, split: str = "train", masks: bool = False, split_by_node: bool = False,
    on_corrupt: str = "stop",
) -> wds.DataPipeline:
    """Samples in shard order, no augmentation, no resampling (held-out images, the cache step).

    A prepared dir resolves to its `split` shards. `masks=True` adds `"masks": {name: (1,size,size) uint8}`.
    A damaged shard stops the stream by default (`on_corrupt="stop"`): a fixed image set must not shrink silently.
    """
    resolved = _checked(resolve_urls(urls, split), on_corrupt)
    stages = [wds.SimpleShardList(resolved)]
    if split_by_node:
        stages.append(wds.split_by_node)
    stages += [wds.split_by_worker, GuardedTarSamples(on_corrupt, total=_total(resolved)),
               _ToSample(size, None, 0, masks=masks)]
    return wds.DataPipeline(*stages)


def first_images(shards: str, count: int, size: int, prefer_test: bool = True, on_corrupt: str = "stop") -> torch.Tensor:
    """The first `count` images, in shard order, of a prepared folder (its test split when asked and present).

    A damaged shard stops with its name (`on_corrupt="stop"`) or is left out (`"skip"`, as training's data.on_corrupt).
    """
    urls: str | list[str] = shards
    if Path(shards).is_dir():
        urls = (prefer_test and list_shards(shards, "test")) or list_shards(shards, "train") or list_shards(shards)
        if not urls:
            raise FileNotFoundError(f"No shards found in {shards}; run `dinodiff prepare ... --out {shards}` first.")
    dataset = build_eval_dataset(urls, size=size, on_corrupt=on_corrupt)
    images = [sample["pixel_values"] for sample in itertools.islice(iter(dataset), count)]
    if not images:
        raise FileNotFoundError(f"No images could be read from {shards}.")
    return torch.stack(images)
