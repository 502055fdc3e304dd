"""`dinodiff cache`: precompute what is frozen (LTH14 MAR/RCG style).

For every prepared image and each of K augmented views, the autoencoder's raw latent moments and the
encoder's c_GLB are stored in WebDataset shards (one output shard per input shard, written
atomically, so a rerun finishes what is missing). Training then runs only the UNet and draws one
of the K views per visit.

Layout: ``OUT/cache.json`` (models, resolution, K, latent stats, shapes) and
``OUT/shards/train-%06d.tar`` with ``moments.npy`` (K, C', h, w) and ``c_glb.npy`` (K, S, N), float16.

The frozen models run in fp32 (`models.factory.frozen_precision`), as in on-the-fly training and
generation. Reading a cache decodes only what this module writes (``.npy`` without pickles, ``.json``);
any other member, a pickle above all, is refused with UnsafeShard. A damaged prepared shard is skipped
(logged, counted in cache.json's ``skipped_shards``) or stops the run, as ``data.on_corrupt`` says.

Cost is linear in the number of images with bounded memory: `data.num_workers` DataLoader workers read and
augment the prepared shards (one shard per worker at a time, in order, so the bytes do not depend on the number
of workers) while the main process runs the frozen models on the previous batch; each cache shard gets a sidecar
(``train-NNNNNN.meta.json``: samples, bytes) so cache.json's count is summed from them, never by re-reading shards.
"""

from __future__ import annotations

import io
import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from dinodiff.config import TrainingSettings
from dinodiff.data.augment import augment_seeded, paper_augmentation
from dinodiff.data.shards import (
    CorruptShard,
    list_shards,
    read_samples,
    sidecar_path,
    write_shard,
)
from dinodiff.files import write_json_atomic
from dinodiff.memory import fix_mmap_threshold
from dinodiff.models.factory import (
    FROZEN_DTYPE,
    build_autoencoder,
    build_encoder,
    enable_tf32,
    ensure_latent_stats,
    frozen_precision,
)

logger = logging.getLogger(__name__)
CACHE_VERSION = 1


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _augmented_views(image_u8: np.ndarray, key: str, views: int, size: int, augment: bool, seed: int) -> torch.Tensor:
    """K views (K, 1, size, size) in [0, 1]; the augmentation RNG is seeded per (seed, key, view)."""
    base = TF.resize(torch.from_numpy(image_u8)[None], [size, size], antialias=True)
    transform = paper_augmentation() if augment else None
    out = []
    for view in range(views):
        img = augment_seeded(transform, base, _stable_seed(seed, key, view)) if transform is not None else base
        out.append(img.float() / 255.0)
    return torch.stack(out)


def _stable_seed(seed: int, key: str, view: int) -> int:
    return zlib.crc32(f"{seed}/{key}/{view}".encode()) & 0x7FFFFFFF


class ShardViews(torch.utils.data.IterableDataset):
    """Batches of K augmented views of the prepared shards to cache; a DataLoader worker takes every W-th shard.

    Each item: {"shard", "keys", "json", "pixels" (B*K, 1, size, size), "last"}, or {"shard", "error"} for a
    damaged shard under on_corrupt=skip (stop raises CorruptShard, re-raised by the DataLoader as one line).
    """

    def __init__(self, shards: list[str], *, size: int, views: int, augment: bool, seed: int, batch_size: int,
                 on_corrupt: str):
        self.shards, self.size, self.views, self.augment, self.seed = shards, size, views, augment, seed
        self.batch_size, self.on_corrupt = batch_size, on_corrupt

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        index, count = (worker.id, worker.num_workers) if worker else (0, 1)
        for shard in self.shards[index::count]:
            yield from self._shard(shard)

    def _shard(self, shard: str) -> Iterator[dict]:
        batch: list[dict] = []
        try:
            for sample in read_samples([shard]):
                if len(batch) == self.batch_size:
                    yield self._views(shard, batch, last=False)
                    batch = []
                batch.append(sample)
        except CorruptShard as err:
            if self.on_corrupt == "stop":
                raise
            yield {"shard": shard, "error": str(err)}
            return
        yield self._views(shard, batch, last=True)

    def _views(self, shard: str, batch: list[dict], last: bool) -> dict:
        pixels = [_augmented_views(s["image"], s["__key__"], self.views, self.size, self.augment, self.seed)
                  for s in batch]
        return {"shard": shard, "keys": [s["__key__"] for s in batch], "json": [s["json"] for s in batch],
                "pixels": torch.cat(pixels) if pixels else None, "last": last}


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # W workers augmenting small tensors: threads inside each would oversubscribe


def _encode_views(batch: dict, encoder, ae, views: int, device) -> list[dict]:
    """Cache samples of one batch of views: through the frozen models in fp32, stored as float16."""
    if not batch["keys"]:
        return []
    pixels = batch["pixels"].to(device, non_blocking=True)
    with torch.no_grad(), frozen_precision(device):  # fp32, as on-the-fly training and generation
        moments = ae.encode_moments(pixels).float().cpu().numpy().astype(np.float16)
        c_glb = encoder(pixels).float().cpu().numpy().astype(np.float16)
    out = []
    for i, (key, meta) in enumerate(zip(batch["keys"], batch["json"])):
        sl = slice(i * views, (i + 1) * views)
        out.append({"__key__": key, "moments.npy": _npy_bytes(moments[sl]), "c_glb.npy": _npy_bytes(c_glb[sl]),
                    "json": json.dumps(meta).encode()})
    return out


def _write_cache_shard(target: Path, samples: list[dict]) -> None:
    """The cache shard, then its sidecar (samples, bytes): what cache.json's count is summed from."""
    write_shard(target, samples)
    write_json_atomic(sidecar_path(target), {"samples": len(samples), "bytes": target.stat().st_size})


def _cached_count(tar: Path) -> int:
    """Samples in a cache shard: its sidecar, or (a shard written before sidecars) its headers."""
    try:
        return int(json.loads(sidecar_path(tar).read_text())["samples"])
    except (OSError, ValueError, KeyError):
        return sum(1 for _ in read_samples([tar]))


def _cache_shards(loader, out: Path, encoder, ae, views: int, device, progress: bool, total: int) -> list[str]:
    """Encode the loader's batches and write each shard once its last batch is in; returns the skipped shards."""
    pending: dict[str, list[dict]] = {}
    skipped: list[str] = []
    bar = tqdm(total=total, desc="cache", unit="shard", disable=not progress)
    for batch in loader:
        shard = batch["shard"]
        if "error" in batch:
            logger.warning("skipping %s", batch["error"])
            pending.pop(shard, None)
            skipped.append(shard)
            bar.update(1)
            continue
        pending.setdefault(shard, []).extend(_encode_views(batch, encoder, ae, views, device))
        if batch["last"]:
            _write_cache_shard(out / "shards" / Path(shard).name, pending.pop(shard))
            bar.update(1)
    bar.close()
    return skipped


def build_cache(cfg: TrainingSettings, out: str | Path, *, views: int = 4, batch_size: int = 16, progress: bool = True,
                num_workers: int | None = None) -> dict:
    """Cache K views of every prepared train image; returns the contents of cache.json.

    num_workers: DataLoader workers that read and augment (None: data.num_workers).
    """
    fix_mmap_threshold()  # batch-sized tensors in mmap: memory stays flat over any number of shards
    state, out, source = PartialState(), Path(out), str(cfg.data.shards)
    if not source or not Path(source).is_dir():
        raise FileNotFoundError(f"data.shards={source!r} must be a folder made by `dinodiff prepare`.")
    inputs = list_shards(source, "train")
    if not inputs:
        raise FileNotFoundError(f"No train shards in {source}/shards; run `dinodiff prepare` first.")
    device = state.device
    if device.type == "cuda" and cfg.train.tf32:
        enable_tf32()  # as the trainer does for its on-the-fly frozen models, so both give the same numbers
    encoder = build_encoder(cfg.model.encoder).to(device).eval()
    ae = build_autoencoder(cfg.model.autoencoder).to(device).eval()
    ensure_latent_stats(ae, cfg, device)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    mine = [path for index, path in enumerate(inputs) if index % state.num_processes == state.process_index]
    todo = [shard for shard in mine if not (out / "shards" / Path(shard).name).is_file()]  # the rest: done earlier
    workers = cfg.data.num_workers if num_workers is None else num_workers
    dataset = ShardViews(todo, size=cfg.model.resolution, views=views, augment=bool(cfg.data.augment),
                         seed=int(cfg.train.seed), batch_size=batch_size, on_corrupt=cfg.data.on_corrupt)
    workers = min(workers, len(todo))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, worker_init_fn=_one_thread,
                                         pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    skipped = _cache_shards(loader, out, encoder, ae, views, device, progress and state.is_main_process, len(todo))
    skipped = sorted(gather_object(skipped)) if state.num_processes > 1 else skipped
    if skipped:
        logger.warning("%d of %d prepared shards were damaged and not cached (data.on_corrupt=skip): %s",
                       len(skipped), len(inputs), ", ".join(skipped))
    state.wait_for_everyone()
    info = {
        "version": CACHE_VERSION, "source_shards": str(Path(source).resolve()), "views": views,
        "resolution": cfg.model.resolution, "augment": bool(cfg.data.augment), "seed": int(cfg.train.seed),
        "encoder": asdict(cfg.model.encoder),
        "autoencoder": asdict(cfg.model.autoencoder),
        "scaling_factor": float(ae.scaling_factor), "shift_factor": float(ae.shift_factor),
        "count": sum(_cached_count(p) for p in sorted((out / "shards").glob("train-*.tar")))
        if state.is_main_process else None,
        "latent_channels": ae.latent_channels, "hidden_size": encoder.hidden_size, "num_tokens": encoder.num_tokens,
        "frozen_dtype": str(FROZEN_DTYPE).removeprefix("torch."), "skipped_shards": skipped,
    }
    if state.is_main_process:
        write_json_atomic(out / "cache.json", info, indent=2)
    return info
