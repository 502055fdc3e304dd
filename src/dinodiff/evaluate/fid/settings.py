"""The one set of FID settings: what a score depends on, for `dinodiff fid`, `dinodiff sweep` and the
training hook. Built once, from the CLI's options or from a run config's `eval` section, and passed whole."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class FidSettings:
    """FID/KID of generated images against real ones, on the features of `extractor`.

    For `fid`, `num_real` and `num_sources` are the subset sizes of the real and the generated set; for a
    sweep they are the real images and the fixed sources that every checkpoint reconstructs.
    """

    real: Optional[str] = None  # real images (folder/shards); None = the run's data.shards (sweep)
    sources: Optional[str] = None  # images whose c_GLB is reconstructed; None = the real set (sweep)
    # Split of a prepared folder. None: `fid` reports on "test"; checkpoint selection (sweep, training hook) uses
    # "val" when present, else "train", never "test" unless named (see sweep.selection_split).
    split: Optional[str] = None
    extractor: str = "xrv"  # xrv (the paper's) | inception | dinov2 | rad-dino
    weights: Optional[str] = None  # xrv cache folder / Inception state dict / DINO id; None = the library's default
    num_real: Optional[int] = 5000  # None = all
    num_sources: Optional[int] = 5000  # None = all
    per_source: int = 1  # reconstructions per source (sweep)
    sample_steps: int = 25  # sampling steps per image (sweep)
    batch_size: int = 16  # images per batch, for sampling and for the extractor
    seed: int = 0  # seed of the subsets, the sampling noise and KID's subsets
    device: str = "auto"
    cache_dir: Optional[str | Path] = None  # real-set feature cache; None = the stage's default folder
    cache: bool = True  # False: extract the real set's features every time
    kid_subsets: int = 100
    kid_subset_size: int = 1000

    @classmethod
    def from_eval_config(cls, section: Any, **changes: Any) -> "FidSettings":
        """From a run config's `eval` section (config.EvalConfig: the fields it shares with these), then `changes`."""
        shared = {f.name: getattr(section, f.name) for f in dataclasses.fields(cls) if hasattr(section, f.name)}
        return cls(**{**shared, **changes})
