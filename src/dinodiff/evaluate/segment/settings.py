"""The segment stage's settings (what the grid search and its outputs depend on) and one grid cell."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dinodiff.evaluate.segment.attention import CONDITIONS
from dinodiff.evaluate.segment.diffseg import THRESHOLD_MODES


@dataclass(frozen=True)
class Cell:
    """One grid-search configuration."""

    model: str  # model label (see stage.model_label)
    timestep: int
    grid: int
    threshold: float

    def describe(self, mode: str, iterations: int) -> str:
        return f"{self.model} t={self.timestep} grid={self.grid}x{self.grid} {mode} {self.threshold:g}x{iterations}"


@dataclass(frozen=True)
class SegmentSettings:
    """DiffSeg grid search over thresholds x timesteps x grid sizes, and how it runs.

    Defaults are the paper's DiNO-Diffusion setting (absolute 0.05, t=300, 16x16). ``threshold_mode='relative'``
    reads each threshold as a quantile of the image's anchor-to-anchor KL instead.
    """

    thresholds: tuple[float, ...] = (0.05,)
    threshold_mode: str = "absolute"
    merge_iterations: int = 3
    timesteps: tuple[int, ...] = (300,)
    grid_sizes: tuple[int, ...] = (16,)
    condition: str = "image"  # the UNet's condition: the image's own c_GLB, or null
    noise_seed: int | None = None  # noise the latent to the timestep with this seed (None: the clean latent)
    resolution: int | None = None  # image size in pixels; None = the (first) model's
    sd15: str | None = None  # a Stable Diffusion 1.x folder, run through the same code as a baseline
    batch_size: int = 8  # images per UNet pass
    device: str = "auto"
    limit: int | None = None  # only the first N images of each dataset
    n_overlay: int = 3  # best and worst cases per dataset drawn in OUT/overlays/

    def check(self) -> None:
        if self.threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"--threshold-mode must be one of {THRESHOLD_MODES}, got {self.threshold_mode!r}.")
        if self.condition not in CONDITIONS:
            raise ValueError(f"--condition must be one of {CONDITIONS}, got {self.condition!r}.")
        if self.merge_iterations < 1 or not self.thresholds or not self.timesteps or not self.grid_sizes:
            raise ValueError("need >= 1 merge iteration, threshold, timestep and grid size.")

    def cell_settings(self) -> dict[str, Any]:
        """What every cell's labels depend on besides the cell itself: part of a cached cell's key, and
        results.json's "settings"."""
        return {"threshold_mode": self.threshold_mode, "merge_iterations": self.merge_iterations,
                "condition": self.condition, "noise_seed": self.noise_seed, "resolution": self.resolution}

    def describe(self, cell: Cell) -> str:
        return cell.describe(self.threshold_mode, self.merge_iterations)
