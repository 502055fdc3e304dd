"""What the demo runs: one typed settings object, with the full (`make demo`) and quick (tests) sizes. A light
module: the CLI makes the demo's options from its fields at start-up."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dinodiff.config import setting


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of every stage. The defaults are the `make demo` run (~7 CPU minutes on 2 cores, see BENCHMARKS.md)."""

    out: str = setting("demo-output", "Folder for everything the demo makes.", flags=("--out", "-o"))
    data: str | None = setting(None, "A folder of real images (masks and labels used when present) instead of the "
                                     "built-in phantoms.")
    n: int = 320  # phantoms written (prepare keeps test_fraction of them apart as held-out images)
    phantom_size: int = 128
    size: int = 32  # side of the prepared images, the encoder's input and the diffusion model's output
    test_fraction: float = 0.2
    seed: int = 0
    threads: int = 1  # torch CPU threads: the demo's models are small, and 1 thread never spins on a busy machine
    # 2 pretrain-encoder: the cpu-encoder preset, fewer steps and a smaller batch
    encoder_steps: int = 200
    encoder_batch: int = 32
    # 3-4 cache + train: the tiny UNet (widened) on the cached latents and c_GLB
    views: int = 2
    train_steps: int = setting(3000, "Diffusion training steps (--quick starts from fewer).")
    batch_size: int = 32
    lr: float = 2.0e-3
    unet_channels: tuple[int, int] = (32, 64)
    prediction: str = "v_prediction"  # epsilon | v_prediction
    latent_factor: int = 4  # the parameter-free pixel-unshuffle autoencoder's factor (latents: size / factor)
    # 5 generate, and the learning checks
    sampler: str = "dpm"  # DPM-Solver++ never clips x0 (DDIM's default clip to [-1, 1] greys the samples)
    sample_steps: int = 20
    generate_sources: int = 16
    eval_images: int = 48  # held-out images the checks use (FD, reconstruction retrieval)
    interpolation_pairs: int = 6
    # 7 classify (configs/classify-phantoms.yaml, smaller)
    classify_regimes: list[int] = field(default_factory=lambda: [64])
    classify_ratios: list[int] = field(default_factory=lambda: [1])
    classify_folds: int = 3
    classify_seeds: list[int] = field(default_factory=lambda: [0])  # repetitions of the cross-validation
    classify_epochs: int = 15
    # 8 segment
    segment_limit: int = 24
    segment_timesteps: list[int] = field(default_factory=lambda: [100, 300])
    segment_grids: list[int] = field(default_factory=lambda: [4, 8])
    segment_thresholds: list[float] = field(default_factory=lambda: [0.1, 0.3])

    def fingerprint(self, *names: str) -> str:
        """A short hash of the named settings (what a stage's outputs depend on)."""
        record = asdict(self)
        payload = json.dumps({k: record[k] for k in names}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def record(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))

    @property
    def root(self) -> Path:
        return Path(self.out)


def quick_settings(out: str, data: str | None = None) -> DemoSettings:
    """The smallest demo that still shows learning: the test's size (32 px, a few hundred steps)."""
    return replace(DemoSettings(out=out, data=data), n=160, phantom_size=128, size=32, encoder_steps=20,
                   encoder_batch=32, train_steps=600, generate_sources=8, eval_images=32,
                   interpolation_pairs=4, classify_regimes=[48], classify_epochs=10, segment_limit=12,
                   segment_timesteps=[300], segment_grids=[4], segment_thresholds=[0.2])
