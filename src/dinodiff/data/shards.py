"""WebDataset shards: deterministic writing, listing and plain reading.

A shard is a POSIX tar; each sample is `<id>.png` (uint8 grey), `<id>.json` (metadata) and
`<id>.mask_<name>.png` (uint8 0/255) per mask. Tars are byte-deterministic: members in sample
order then name order, with fixed mtime/uid/gid/owner/mode, and PNGs encoded without metadata at
a fixed compression level, so re-running `prepare` reproduces every byte.

Damaged shards (a copy cut short, a full disk) are reported as :class:`CorruptShard`, a one-line
error that names the shard and the fix. `prepare` records each shard's size and sha256 in its sidecar
(`<shard>.meta.json`); readers compare the size before they open a shard (cheap), and any tar read error
met later is turned into the same error. Policy (`on_corrupt`): ``"stop"`` raises; ``"skip"`` logs the
shard once and goes on without it (the samples read before the damage have already been used).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from dinodiff.files import atomic_path

SHARD_DIR = "shards"
# zlib level 4: on 512^2 CXRs as small as the default 6 (~103 KB) at 2.6x the speed (11 vs 28 ms);
# level 1 is 2x faster again but 17% bigger, which every training epoch pays for when streaming.
PNG_COMPRESS_LEVEL = 4
ON_CORRUPT = ("skip", "stop")
PREPARE_FIX = "rerun `dinodiff prepare` with the same sources and --out to rewrite it"
# What reading a damaged tar raises: tarfile's errors, EOF/OS errors of a short file, zlib for .tar.gz.
READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)

logger = logging.getLogger(__name__)


class ShardError(ValueError):
    """A shard that cannot be used; the one-line message names the shard and the fix."""

    def __init__(self, message: str):
        # torch's DataLoader re-raises a worker's exception as type(err)(text + worker traceback):
        # keep only our own last line, so the CLI still prints one clean line.
        marker = f"{type(self).__name__}: "
        if "Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class CorruptShard(ShardError):
    """A shard cut short or damaged (tar read error, or a size that differs from its sidecar's)."""


class UnsafeShard(ShardError):
    """A shard member in a format dinodiff never writes (e.g. a pickle), refused rather than decoded."""


def sidecar_path(tar: str | Path) -> Path:
    """`<name>.meta.json` beside `<name>.tar`: what `prepare` wrote about that shard."""
    tar = Path(tar)
    return tar.with_name(tar.name[: -len(".tar")] + ".meta.json")


def file_digest(path: str | Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return os.path.getsize(path), digest


def corrupt_message(shard: str | Path, why: object, fix: str = PREPARE_FIX) -> str:
    text = " ".join(str(why).split()) or type(why).__name__
    return f"corrupt shard {shard}: {text}; {fix} (or delete the shard)"


def size_problem(tar: str | Path) -> str | None:
    """Why a local shard is damaged, judged cheaply against its sidecar's size; None when it looks whole."""
    tar = Path(tar)
    if not tar.is_file():
        return None if tar.exists() else "file missing"
    try:
        expected = json.loads(sidecar_path(tar).read_text()).get("bytes")
    except (OSError, ValueError, AttributeError):
        return None  # no sidecar (not a `prepare` shard) or an unreadable one: nothing to compare with
    size = tar.stat().st_size
    if expected is not None and size != expected:
        return f"{size} bytes, but its sidecar {sidecar_path(tar).name} records {expected}"
    return None


def report_corrupt(shard: str | Path, why: object, on_corrupt: str, fix: str = PREPARE_FIX) -> None:
    """Apply the policy to one damaged shard: raise (stop) or log a warning (skip)."""
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt={on_corrupt!r}: use one of {', '.join(ON_CORRUPT)}")
    message = corrupt_message(shard, why, fix)
    if on_corrupt == "stop":
        raise CorruptShard(message)
    logger.warning("skipping %s", message)


def check_shards(paths: Iterable[str], on_corrupt: str = "stop", fix: str = PREPARE_FIX) -> list[str]:
    """`paths` without the local shards whose size differs from their sidecar's (each logged, or raised).

    Raises CorruptShard when every shard is damaged, whatever the policy. Non-local URLs pass unchecked.
    """
    paths = list(paths)
    kept = []
    for path in paths:
        problem = None if ":" in str(path).split("/", 1)[0] else size_problem(path)
        if problem is None:
            kept.append(path)
        else:
            report_corrupt(path, problem, on_corrupt, fix)
    if paths and not kept:
        raise CorruptShard(corrupt_message(paths[0], f"all {len(paths)} shards are damaged", fix))
    if len(kept) < len(paths):
        logger.warning("%d of %d shards skipped as damaged (data.on_corrupt=skip)", len(paths) - len(kept), len(paths))
    return kept


@contextlib.contextmanager
def open_shard(path: str | Path, fix: str = PREPARE_FIX) -> Iterator[tarfile.TarFile]:
    """`tarfile.open(path)` whose read errors (and a size that differs from the sidecar's) are CorruptShard."""
    problem = size_problem(path)
    if problem is not None:
        raise CorruptShard(corrupt_message(path, problem, fix))
    try:
        with tarfile.open(path, mode="r") as tar:
            yield tar
    except READ_ERRORS as err:
        raise CorruptShard(corrupt_message(path, err, fix)) from None


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


def available_splits(prepared_dir: str | Path) -> list[str]:
    """The splits a prepared dir (or folder of .tar files) has shards of (`train-000000.tar` -> 'train'), sorted."""
    return sorted({Path(p).name.rsplit("-", 1)[0] for p in list_shards(prepared_dir)})


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
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for sample in samples:
                for name, data in _sample_members(sample):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))


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


def read_samples(paths: str | Path | Iterable[str | Path], on_corrupt: str = "stop") -> Iterator[dict]:
    """Decoded samples of local shards, in order: `__key__`, `image`, `json`, `masks` {name: array}.

    `paths` may be one tar, a list of tars, or a prepared dir / shard folder (all its shards). A damaged
    shard raises CorruptShard (`on_corrupt="stop"`) or is logged and left (`"skip"`).
    """
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        paths = list_shards(p) if p.is_dir() else [p]
    for path in paths:
        try:
            yield from _read_one(path)
        except CorruptShard as err:
            if on_corrupt != "skip":
                raise
            logger.warning("skipping %s", err)


def read_members(paths: Iterable[str | Path]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of each sample of local shards, in order, nothing decoded (for readers that decode only
    the samples they need). A damaged shard raises CorruptShard."""
    for path in paths:
        with open_shard(path) as tar:
            yield from _group(tar)


def _read_one(path: str | Path) -> Iterator[dict]:
    for key, fields in read_members([path]):
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
