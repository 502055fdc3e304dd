"""Where computations run: the one resolver of "auto" devices and mixed precision for every stage."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """None or "auto": the GPU when there is one, else the CPU; anything else as torch reads it ("cuda:1")."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_mixed_precision(setting: str) -> str:
    """accelerate's mixed_precision for "auto": bf16 on a GPU that has it, else "no".

    bf16 autocast is 5-14x slower than fp32 on CPUs without AMX, so CPUs run fp32.
    """
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
