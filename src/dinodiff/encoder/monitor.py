"""Collapse monitor of DINO training: the two ways self-distillation fails, measured on the teacher.

- *One point*: every image gets the same embedding. The per-dimension std of the L2-normalised teacher
  embeddings, times sqrt(D) (`embedding_std`), falls from ~1 towards 0.
- *One prototype*: one output dimension dominates for every image. The entropy of the teacher's
  batch-mean output distribution (`teacher_marginal_entropy`) falls from ln K towards 0.

The per-sample teacher entropy (`teacher_entropy`) is logged too: near ln K means a uniform, sharpening-free
teacher (the loss then stays near ln K and nothing is learnt); DINO's centring/sharpening balance keeps it
between the two.
"""

from __future__ import annotations

import logging
import math

import torch

from dinodiff.encoder.dino import normalised_std

logger = logging.getLogger(__name__)


class EncoderCollapsed(RuntimeError):
    """The teacher's outputs collapsed; the message gives the measured values and what to change."""


@torch.no_grad()
def teacher_stats(targets: torch.Tensor, embeddings: torch.Tensor) -> dict[str, float]:
    """Entropies (nats) of the teacher's targets (V, B, K) (centred and sharpened) and the normalised embedding std."""
    p = targets.float()
    per_sample = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    marginal = p.mean(dim=(0, 1))
    marginal_entropy = -(marginal * marginal.clamp_min(1e-12).log()).sum()
    return {"teacher_entropy": float(per_sample), "teacher_marginal_entropy": float(marginal_entropy),
            "embedding_std": normalised_std(embeddings)}


class CollapseMonitor:
    """Counts consecutive collapsed checks; `check` returns a message once `patience` is reached."""

    def __init__(self, std_ratio: float, entropy: float, patience: int, output_dim: int) -> None:
        self.std_ratio, self.entropy, self.patience = std_ratio, entropy, max(1, patience)
        self.max_entropy = math.log(output_dim)
        self.count = 0

    def is_collapsed(self, stats: dict[str, float]) -> bool:
        return stats["embedding_std"] < self.std_ratio or stats["teacher_marginal_entropy"] < self.entropy

    def check(self, stats: dict[str, float], step: int) -> str | None:
        self.count = self.count + 1 if self.is_collapsed(stats) else 0
        if self.count < self.patience:
            return None
        return (f"DINO collapsed at step {step}: normalised embedding std {stats['embedding_std']:.3f} "
                f"(healthy ~1, limit {self.std_ratio}), teacher mean-output entropy "
                f"{stats['teacher_marginal_entropy']:.2f} nats (max ln K = {self.max_entropy:.2f}, limit "
                f"{self.entropy}) for {self.count} checks in a row. Lower optim.lr, raise "
                "loss.center_momentum or loss.teacher_temp, or shorten run.momentum_start's warm-up; resume from "
                "an earlier checkpoint with run.resume=PATH.")
