"""What `dinodiff generate` makes: its settings, the items (sources, r) and each item's seed.

Item i is drawn from its own generator seeded by ``item_seed(seed, i)``, so it is the same image whatever the
batch size (up to the float rounding of batched kernels, ~1e-6) or number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from dinodiff.interpolate import MIXES, mix, nearer_source, plan_interpolations

STRATEGIES = ("reconstruction", "interpolation", "sampled")  # sampled: c_GLB from an embedding model (no source)
SOURCES_FILE = "sources.pt"


@dataclass
class GenerateSettings:
    """Everything the generated images depend on (saved in provenance.json; a rerun must match)."""

    strategy: str = "reconstruction"
    ratio: int = 1  # synthetic images per real source: 1, 5, 10, 50 in the paper
    seed: int = 0
    num_inference_steps: int = 25
    guidance_scale: float = 1.0
    scheduler: str = "dpm"
    mix: str = "lerp"  # interpolation of c_GLB: lerp | slerp
    r_range: tuple[float, float] = (0.0, 1.0)
    r_values: Optional[list[float]] = None  # draw r from this list instead of r_range
    shared_label: bool = True  # pairs share a positive label (the paper) or both have none (see dinodiff.interpolate)
    source_options: dict = field(default_factory=dict)  # iter_sources options: kind, split, limit, path_column, ...
    embedding_model: Optional[str] = None  # sampled: a `dinodiff train-embeddings` folder
    embedding_guidance: float = 1.0  # sampled: classifier-free guidance on the labels of a conditional model
    embedding_steps: int = 50  # sampled: DDIM steps of the embedding model

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown strategy {self.strategy!r}; use one of {STRATEGIES}.")
        if self.mix not in MIXES:
            raise ValueError(f"Unknown interpolation {self.mix!r}; use one of {MIXES}.")
        if self.strategy == "sampled" and not self.embedding_model:
            raise ValueError("--strategy sampled needs --embedding-model DIR (made by `dinodiff train-embeddings`).")
        if self.ratio < 1 or self.num_inference_steps < 1:
            raise ValueError(f"ratio and num_inference_steps must be >= 1, got {self.ratio} and "
                             f"{self.num_inference_steps}.")


@dataclass(frozen=True)
class Item:
    index: int
    a: int  # source index
    b: Optional[int]  # second source (interpolation)
    r: Optional[float]
    seed: int

    @property
    def label_source(self) -> int:
        return self.a if self.b is None or nearer_source(self.r) == 0 else self.b


def item_seed(seed: int, index: int) -> int:
    """Seed of item `index`'s generator: a hash of (seed, index), so neighbouring items share no noise."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def plan_items(settings: GenerateSettings, positive: np.ndarray) -> list[Item]:
    """Reconstruction: `ratio` variations of each source. Interpolation: ratio x N interpolations under the pairing
    rules, each source anchoring (nearer in r, so labelling) `ratio` of them (see `plan_interpolations`)."""
    n, k = len(positive), settings.ratio
    if settings.strategy in ("reconstruction", "sampled"):  # sampled: the source gives only the labels
        pairs = [(a, None, None) for a in range(n) for _ in range(k)]
    elif settings.strategy == "interpolation":
        plan = plan_interpolations(positive, n * k, seed=settings.seed, r_range=tuple(settings.r_range),
                                   r_values=settings.r_values, shared_label=settings.shared_label)
        pairs = [(p.a, p.b, p.r) for p in plan]
    else:
        raise ValueError(f"Unknown strategy {settings.strategy!r}; use one of {STRATEGIES}.")
    return [Item(i, a, b, r, item_seed(settings.seed, i)) for i, (a, b, r) in enumerate(pairs)]


def item_conditions(items: Sequence[Item], c_glb: torch.Tensor, method: str = "lerp") -> torch.Tensor:
    """c_GLB of each item: its source's, or the mix of its two sources' at its r."""
    a = c_glb[[it.a for it in items]]
    if all(it.b is None for it in items):
        return a
    b = c_glb[[it.a if it.b is None else it.b for it in items]]
    r = torch.tensor([0.0 if it.r is None else it.r for it in items], dtype=c_glb.dtype)
    return mix(a, b, r, method)

def image_path(out: Path, index: int) -> Path:
    return out / "images" / f"{index:07d}.png"
