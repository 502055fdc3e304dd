"""What `dinodiff generate` makes from its settings (`generate.settings`): the items (sources, r) and each item's
seed.

Item i is drawn from its own generator seeded by ``item_seed(seed, i)``, so it is the same image whatever the
batch size (up to the float rounding of batched kernels, ~1e-6) or number of processes.

The plan is held as arrays (`ItemPlan`: 20 bytes per item), and `Item` objects are made only for the slice being
worked on, so planning a million images costs megabytes, not a list of a million objects. Item i's image is
``images/<i // 10000, 3 digits>/<i, 7 digits>.png`` (10,000 files per folder; `image_path`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dinodiff.generate.settings import STRATEGIES, GenerateSettings
from dinodiff.interpolate import mix, nearer_source, plan_interpolations
from dinodiff.sampling import item_seed

IMAGES_PER_FOLDER = 10_000


@dataclass(frozen=True)
class Item:
    index: int
    a: int  # source index
    b: int | None  # second source (interpolation)
    r: float | None
    seed: int

    @property
    def label_source(self) -> int:
        return self.a if self.b is None or nearer_source(self.r) == 0 else self.b


@dataclass(frozen=True)
class ItemPlan:
    """Every item of a dataset as arrays: source a, source b (-1: none) and r (NaN: none); seeds from `seed`."""

    a: np.ndarray
    b: np.ndarray
    r: np.ndarray
    seed: int

    def __len__(self) -> int:
        return len(self.a)

    def items(self, start: int = 0, stop: int | None = None) -> list[Item]:
        """Items start..stop-1 as objects (their seeds computed here)."""
        stop = len(self) if stop is None else min(stop, len(self))
        return [Item(i, int(self.a[i]), None if self.b[i] < 0 else int(self.b[i]),
                     None if np.isnan(self.r[i]) else float(self.r[i]), item_seed(self.seed, i))
                for i in range(start, stop)]

    def chunks(self, size: int) -> int:
        """How many chunks of `size` items the plan makes."""
        return -(-len(self) // size)


def plan_arrays(settings: GenerateSettings, positive: np.ndarray) -> ItemPlan:
    """Reconstruction: `ratio` variations of each source. Interpolation: ratio x N interpolations under the pairing
    rules, each source anchoring (nearer in r, so labelling) `ratio` of them (see `plan_interpolations`)."""
    n, k = len(positive), settings.ratio
    if settings.strategy in ("reconstruction", "sampled"):  # sampled: the source gives only the labels
        a = np.repeat(np.arange(n, dtype=np.int64), k)
        return ItemPlan(a, np.full(len(a), -1, np.int64), np.full(len(a), np.nan), settings.seed)
    if settings.strategy == "interpolation":
        plan = plan_interpolations(positive, n * k, seed=settings.seed, r_range=tuple(settings.r_range),
                                   r_values=settings.r_values, shared_label=settings.shared_label)
        return ItemPlan(np.array([p.a for p in plan], np.int64), np.array([p.b for p in plan], np.int64),
                        np.array([p.r for p in plan], np.float64), settings.seed)
    raise ValueError(f"Unknown strategy {settings.strategy!r}; use one of {STRATEGIES}.")


def plan_items(settings: GenerateSettings, positive: np.ndarray) -> list[Item]:
    """`plan_arrays` as a list of Items (for small plans and callers that want objects)."""
    return plan_arrays(settings, positive).items()


def item_conditions(items: Sequence[Item], c_glb: Callable[[Sequence[int]], torch.Tensor] | torch.Tensor,
                    method: str = "lerp") -> torch.Tensor:
    """c_GLB of each item: its source's, or the mix of its two sources' at its r.

    c_glb: every source's c_GLB (N, S, D), or a function of source indices giving theirs (`SourceTable.c_glb`).
    """
    rows = c_glb if callable(c_glb) else (lambda indices: c_glb[list(indices)])
    a = rows([it.a for it in items])
    if all(it.b is None for it in items):
        return a
    b = rows([it.a if it.b is None else it.b for it in items])
    r = torch.tensor([0.0 if it.r is None else it.r for it in items], dtype=a.dtype)
    return mix(a, b, r, method)


def image_path(out: Path, index: int) -> Path:
    """``OUT/images/000/0001234.png``: nested, so no folder holds more than IMAGES_PER_FOLDER files."""
    return out / "images" / f"{index // IMAGES_PER_FOLDER:03d}" / f"{index:07d}.png"
