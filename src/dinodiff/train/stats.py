"""Per-step training figures kept on the device, read by the host only every `train.log_every` steps.

Reading a CUDA tensor's value (`.item()`, `float(t)`, `if t:`) waits for every queued kernel: one such
read per step stalls the GPU once per step. The trainer therefore adds each step's loss and gradient norm
to the accumulators below without looking at them, and reads them (one collective across processes, one
device->host copy) at log steps and before anything is written (sample grid, checkpoint, evaluation).

A non-finite loss or gradient norm is remembered with the first step it happened at, so training stops,
at the latest at that read, with the step named, and no checkpoint is ever written after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator

# Packed in this order: sums, counts, then the first bad steps (+inf when none).
_FIELDS = ("loss_sum", "grad_norm_sum", "grad_norm_steps", "steps", "first_bad_loss", "first_bad_grad")


@dataclass(frozen=True)
class StatsReading:
    """What the host sees at a read: window means (over steps and processes) and the first non-finite steps."""

    loss: float
    grad_norm: float  # nan when no gradient norm was computed (optim.max_grad_norm unset)
    steps: int
    first_bad_loss: int | None
    first_bad_grad: int | None


class StepStats:
    """Device-side accumulators of one logging window."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Start a new logging window (the first-bad-step records are kept: a divergence is never forgotten)."""
        keep = getattr(self, "_values", None)
        values = torch.zeros(len(_FIELDS), dtype=torch.float64, device=self.device)
        values[4:] = math.inf
        if keep is not None:
            values[4:] = keep[4:]
        self._values = values

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, step: int, check_grad: bool = True) -> None:
        """Account one optimizer step (`loss` averaged over its micro-batches); no host read."""
        v = self._values
        loss = loss.detach().to(v.dtype)
        v[0] += loss
        v[3] += 1
        bad = torch.where(torch.isfinite(loss), math.inf, float(step))
        torch.minimum(v[4], bad, out=v[4])
        if grad_norm is not None:
            norm = grad_norm.detach().to(v.dtype)
            v[1] += norm
            v[2] += 1
            if check_grad:
                torch.minimum(v[5], torch.where(torch.isfinite(norm), math.inf, float(step)), out=v[5])

    def read(self, accelerator: Accelerator) -> StatsReading:
        """Gather every process's accumulators (one collective) and copy them to the host (one sync)."""
        gathered = accelerator.gather(self._values[None]).reshape(-1, len(_FIELDS)).cpu()
        sums = gathered[:, :4].sum(dim=0).tolist()
        bad = gathered[:, 4:].amin(dim=0).tolist()
        loss_sum, norm_sum, norm_steps, steps = sums
        return StatsReading(
            loss=loss_sum / steps if steps else math.nan,
            grad_norm=norm_sum / norm_steps if norm_steps else math.nan,
            steps=int(steps) // max(accelerator.num_processes, 1),
            first_bad_loss=None if math.isinf(bad[0]) else int(bad[0]),
            first_bad_grad=None if math.isinf(bad[1]) else int(bad[1]),
        )
