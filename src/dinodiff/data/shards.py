"""WebDataset shards: deterministic writing, listing and plain reading.

A shard is a POSIX tar; each sample is `<id>.png` (uint8 grey), `<id>.json` (metadata) and
`<id>.mask_<name>.png` (uint8 0/255) per mask. Tars are byte-deterministic: members in sample
order then name order, with fixed mtime/uid/gid/owner/mode, and PNGs encoded without metadata at
a fixed compression level, so re-running `prepare` reproduces every byte.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

SHARD_DIR = "shards"
# zlib level 4: on 512^2 CXRs as small as the default 6 (~103 KB) at 2.6x the speed (11 vs 28 ms);
# level 1 is 2x faster again but 17% bigger, which every training epoch pays for when streaming.
PNG_COMPRESS_LEVEL = 4


def shard_pattern(out_dir: str | Path, split: str) -> str:
    """`out_dir/shards/{split}-%06d.tar`: the printf pattern of a split's shard files."""
    return str(Path(out_dir) / SHARD_DIR / f"{split}-%06d.tar")


def shard_path(out_dir: str | Path, split: str, index: int) -> Path:
    """Path of shard number `index` of `split`."""
    return Path(shard_pattern(out_dir, split) % index)


def list_shards(prepared_dir: str | Path, split: str | None = None) -> list[str]:
    """Sorted shard paths of a prepared dir (or of a folder of .tar files), optionally one split."""
    root = Path(prepared_dir)
    folder = root / SHARD_DIR if (root / SHARD_DIR).is_dir() else root
    pattern = f"{split}-*.tar" if split else "*.tar"
    return sorted(str(p) for p in folder.glob(pattern) if p.is_file())


def encode_png(arr: np.ndarray) -> bytes:
    """Deterministic PNG of a 2-D uint8 array (no metadata chunks, fixed compression level)."""
    if arr.dtype != np.uint8 or arr.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 array, got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> 2-D uint8 array."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L") if im.mode != "L" else im).copy()


def encode_json(obj: dict) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces that depend on anything but content)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _sample_members(sample: dict) -> list[tuple[str, bytes]]:
    """Tar members of one sample: `{key}.{ext}` for every field not starting with `__`."""
    key = sample["__key__"]
    if "." in key or "/" in key or not key:
        raise ValueError(f"invalid sample key {key!r}: must be non-empty, without '.' or '/'")
    out = []
    for ext, value in sample.items():
        if ext.startswith("__"):
            continue
        if isinstance(value, np.ndarray):
            value = encode_png(value)
        elif isinstance(value, dict):
            value = encode_json(value)
        elif isinstance(value, str):
            value = value.encode("utf-8")
        out.append((f"{key}.{ext}", bytes(value)))
    return sorted(out)


def write_shard(path: str | Path, samples: Iterable[dict]) -> None:
    """Write samples (`__key__` + `ext: bytes | ndarray | dict`) to a tar, atomically.

    The tar goes to a hidden temp file beside `path` and is renamed into place only once it is
    complete and fsynced, so a crash never leaves a partial `.tar` behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for sample in samples:
                    for name, data in _sample_members(sample):
                        info = tarfile.TarInfo(name)
                        info.size, info.mtime, info.mode = len(data), 0, 0o644
                        info.uid = info.gid = 0
                        info.uname = info.gname = ""
                        tar.addfile(info, io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write a small file atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _group(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    key, fields = None, {}
    for member in tar:
        if not member.isfile():
            continue
        base = member.name.rsplit("/", 1)[-1]
        k, _, ext = base.partition(".")
        k = member.name[: len(member.name) - len(base)] + k
        if k != key and key is not None:
            yield key, fields
            fields = {}
        key = k
        fields[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, fields


def read_samples(paths: str | Path | Iterable[str | Path]) -> Iterator[dict]:
    """Decoded samples of local shards, in order: `__key__`, `image`, `json`, `masks` {name: array}.

    `paths` may be one tar, a list of tars, or a prepared dir / shard folder (all its shards).
    """
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        paths = list_shards(p) if p.is_dir() else [p]
    for path in paths:
        with tarfile.open(path, mode="r") as tar:
            for key, fields in _group(tar):
                sample = {"__key__": key, "masks": {}, "__url__": str(path)}
                for ext, data in fields.items():
                    if ext == "png":
                        sample["image"] = decode_png(data)
                    elif ext == "json":
                        sample["json"] = json.loads(data)
                    elif ext.startswith("mask_") and ext.endswith(".png"):
                        sample["masks"][ext[len("mask_"):-len(".png")]] = decode_png(data)
                    else:
                        sample[ext] = data
                yield sample
