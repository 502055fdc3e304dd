"""Which training samples each process reads under DDP, so that no two ranks train on the same sample.

The training streams resample shards with replacement. Without a split, every rank would draw from every
shard, and two ranks would often hold the same images in the same optimizer step (13 of 20 micro-batches
did, measured with 2 processes on the 3-shard phantom set). So each rank resamples only its own shards:
every `world`-th shard from its rank, as webdataset's `split_by_node` splits them. With fewer shards than
ranks, every rank reads every shard and keeps the samples whose key hashes to it instead.

The rank and world size come from webdataset's `pytorch_worker_info` (RANK / WORLD_SIZE, as `accelerate
launch` and torchrun set them, else torch.distributed), the same source `split_by_node` reads.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import webdataset as wds
from webdataset.utils import pytorch_worker_info

logger = logging.getLogger(__name__)


class KeepRankSamples:
    """A pipeline stage that keeps the samples whose key hashes to this rank: crc32(key) mod world == rank."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            if zlib.crc32(sample["__key__"].encode()) % self.world == self.rank:
                yield sample


def rank_share(urls: list[str | Path] | str) -> tuple[list[str], KeepRankSamples | None]:
    """This rank's shards, and the sample filter to add after reading them (None when the shards are split).

    One process: every shard, no filter. `world` processes and at least `world` shards: shards
    rank, rank + world, ...; otherwise every shard and a `KeepRankSamples` filter.
    """
    shards = [str(u) for u in urls] if isinstance(urls, (list, tuple)) else list(wds.shardlists.expand_urls(urls))
    rank, world, _, _ = pytorch_worker_info()
    if world <= 1:
        return shards, None
    if len(shards) >= world:
        return shards[rank::world], None
    logger.warning("%d shards for %d processes: every process reads all of them and keeps 1/%d of the samples "
                   "(by key); prepare with a smaller --shard-size to split shards instead.", len(shards), world, world)
    return shards, KeepRankSamples(rank, world)
