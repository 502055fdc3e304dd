"""Image sets to score: a folder of image files, `prepare` shards, or a synthetic dataset (`images/**/*.png`).

An image set is a sorted list of :class:`ImageRef` (a file, or a sample key inside a shard), so a seeded
subset and a cache key over exactly the files used are both well defined.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dinodiff.data.image_sets import image_records
from dinodiff.data.readers import load_image
from dinodiff.data.shards import list_shards, open_shard
from dinodiff.evaluate.fid.features import center_crop_resize

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".img"}  # .img: JSRT raw


@dataclass(frozen=True, order=True)
class ImageRef:
    path: str  # an image file, or a shard .tar
    key: str | None = None  # the sample key inside a shard; None for a plain file

    def __str__(self) -> str:
        return f"{self.path}#{self.key}" if self.key else self.path


def _shard_keys(tar_path: str) -> list[str]:
    # tarfile reads only headers here (it seeks over member data), so listing is cheap. open_shard names a
    # damaged shard (its size differs from the sidecar's, or a read error) with the fix: scoring stops there.
    with open_shard(tar_path) as tar:
        keys = []
        for name in tar.getnames():
            base = name.rsplit("/", 1)[-1]
            stem, _, ext = base.partition(".")
            if ext == "png":
                keys.append(name[: len(name) - len(base)] + stem)
    return keys


def _is_mask(relative: Path) -> bool:
    # Dataset layouts keep lung masks beside the images (Montgomery's ManualMask/, Shenzhen's masks/): not X-rays.
    return ".mask_" in relative.name or any(re.search(r"masks?$", part.lower()) for part in relative.parts[:-1])


def list_images(source: str | Path, split: str | None = "test") -> list[ImageRef]:
    """Every image of `source`, in a stable order.

    A prepared folder or a folder of shards gives its `split` shards when it has any, else all its
    shards; a synthetic dataset (a folder with ``images/``) gives ``images/``; any other folder gives its
    image files, recursively, except those in mask folders; a ``.tar`` gives its samples.
    """
    root = Path(source)
    if not root.exists():
        raise FileNotFoundError(f"Image set {root} does not exist; give a folder of images, a `dinodiff prepare` "
                                "folder, shards, or a `dinodiff generate` output folder.")
    if root.is_file():
        if root.suffix != ".tar":
            raise ValueError(f"{root} is a file but not a shard (.tar); give a folder or shards.")
        tars = [str(root)]
    else:
        tars = (split and list_shards(root, split)) or list_shards(root)
    if tars:
        refs = [ImageRef(t, k) for t in sorted(tars) for k in _shard_keys(t)]
    else:
        folder = root / "images" if (root / "images").is_dir() else root
        refs = [ImageRef(str(p)) for p in sorted(folder.rglob("*"))
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not _is_mask(p.relative_to(folder))]
    if not refs:
        raise FileNotFoundError(f"No images found in {root} (looked for shards and {sorted(IMAGE_SUFFIXES)} files).")
    return refs


def select(refs: list[ImageRef], num: int | None, seed: int = 0) -> list[ImageRef]:
    """A seeded random subset of `num` images (all when `num` is None or >= len), kept in list order."""
    if num is None or num >= len(refs):
        return list(refs)
    if num <= 0:
        raise ValueError(f"sample size must be positive, got {num}")
    chosen = sorted(random.Random(seed).sample(range(len(refs)), num))
    return [refs[i] for i in chosen]


def fingerprint(refs: Iterable[ImageRef]) -> str:
    """SHA-256 over the images used and their files' size and mtime: changes when any of them changes."""
    digest = hashlib.sha256()
    stats: dict[str, str] = {}
    for ref in refs:
        if ref.path not in stats:
            st = Path(ref.path).stat()
            stats[ref.path] = f"{st.st_size}:{st.st_mtime_ns}"
        digest.update(f"{Path(ref.path).resolve()}|{ref.key}|{stats[ref.path]}\n".encode())
    return digest.hexdigest()


def _read_file(path: str) -> torch.Tensor:
    arr, _ = load_image(path)  # any bit depth / DICOM / JSRT .IMG -> uint8 grey, as `prepare` does
    return torch.from_numpy(arr)[None].float().div_(255.0)


def iter_images(refs: list[ImageRef], size: int) -> Iterator[torch.Tensor]:
    """Yield each image as (1, size, size) float in [0, 1] (centre-cropped, resized), in `refs` order."""
    wanted: dict[str, set[str]] = defaultdict(set)
    for ref in refs:
        if ref.key is not None:
            wanted[ref.path].add(ref.key)
    loaded: dict[ImageRef, torch.Tensor] = {}
    for ref in refs:
        if ref.key is None:
            yield center_crop_resize(_read_file(ref.path), size)
            continue
        if ref not in loaded:  # read the shard once, decoding only the selected samples
            loaded.update(_read_shard(ref.path, wanted.pop(ref.path, set()), size))
        if ref not in loaded:
            raise FileNotFoundError(f"Sample {ref.key} has no image in {ref.path}; was the shard rewritten? "
                                    "Delete the cached statistics and run again.")
        yield loaded.pop(ref)


def _read_shard(path: str, keys: set[str], size: int) -> dict[ImageRef, torch.Tensor]:
    """The selected samples of one shard (the others are not decoded), centre-cropped and resized."""
    return {ImageRef(path, record.id): center_crop_resize(torch.from_numpy(record.decode())[None].float().div_(255.0),
                                                          size)
            for record in image_records(path, size=size, kind="shards", ids=keys)}


def load_images(refs: list[ImageRef], size: int) -> torch.Tensor:
    """All of `refs` as one tensor (N, 1, size, size) in [0, 1] (source images for reconstructions)."""
    return torch.stack(list(iter_images(refs, size)))
