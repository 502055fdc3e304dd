"""Projection of the encoder's global tokens (width N) to the UNet's cross-attention width."""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


class ConditionProjection(ModelMixin, ConfigMixin):
    """Identity (no parameters) when ``in_dim == out_dim`` — the paper's case, N = 768 = SD v1's
    cross_attention_dim; otherwise a Linear trained with the UNet and saved with ``save_pretrained``."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj: nn.Module = nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "ConditionProjection":
        """As ModelMixin.from_pretrained; the identity has no weights file, so it is rebuilt from its config."""
        config = cls.load_config(pretrained_model_name_or_path, subfolder=kwargs.get("subfolder"))
        if config["in_dim"] == config["out_dim"]:
            return cls.from_config(config)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def is_identity(self) -> bool:
        return isinstance(self.proj, nn.Identity)

    def forward(self, c_glb: torch.Tensor) -> torch.Tensor:
        """(B, S, in_dim) -> (B, S, out_dim)."""
        if c_glb.shape[-1] != self.config.in_dim:
            raise ValueError(f"c_glb has width {c_glb.shape[-1]}, projection expects {self.config.in_dim}.")
        return self.proj(c_glb)
