"""`EmbeddingDenoiser`: an MLP that predicts the noise added to a flattened, normalised c_GLB.

The representation generator of representation-conditioned generation (RCG; Li, Katabi & He, 2023,
"Return of Unconditional Generation", Sec. 3.1 and its ``rdm`` SimpleMLP): residual blocks of
LayerNorm -> SiLU -> Linear, modulated (adaLN: shift, scale, gate) by the sum of a sinusoidal timestep
embedding and an optional label embedding. Labels are multi-hot vectors (chest X-rays carry several findings);
a learned *null* embedding replaces them when they are dropped in training, which gives classifier-free guidance
at sampling time. The per-dimension mean and std of the training embeddings are buffers of the model, so they are
saved with it (``save_pretrained`` writes ``config.json`` + safetensors, ``from_pretrained`` reads them back).
The noise maths live in diffusers schedulers (DDPM for training, DDIM for sampling), never here; what the output
means (noise, velocity or clean sample) is the scheduler config's ``prediction_type``.
"""

from __future__ import annotations

import logging

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

logger = logging.getLogger(__name__)


class ResidualBlock(nn.Module):
    """x + gate * MLP(LayerNorm(x) * (1 + scale) + shift), the modulation read from the condition (RCG/DiT adaLN)."""

    def __init__(self, width: int, cond_width: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Dropout(dropout), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_width, 3 * width))
        nn.init.zeros_(self.modulation[1].weight)  # each block starts as the identity
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(cond).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class EmbeddingDenoiser(ModelMixin, ConfigMixin):
    """The scheduler's prediction (noise, velocity or clean sample) at x_t, t, labels.

    x = (c_GLB.flatten() - mean) / std has size ``dim`` = S * N.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, dim: int, width: int = 512, depth: int = 4, time_dim: int = 256, num_labels: int = 0,
                 dropout: float = 0.0, tokens: int = 1) -> None:
        super().__init__()
        if dim % tokens:
            raise ValueError(f"dim={dim} is not a multiple of tokens={tokens} (c_GLB of shape (S, N) has dim S*N).")
        self.time_proj = Timesteps(time_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_dim, width)
        self.label_embedding = nn.Linear(num_labels, width) if num_labels else None
        self.null_label = nn.Parameter(torch.zeros(width)) if num_labels else None
        self.input = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, width, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.output = nn.Linear(width, dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @property
    def token_shape(self) -> tuple[int, int]:
        """(S, N) of the c_GLB this model generates."""
        return (self.config.tokens, self.config.dim // self.config.tokens)

    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-dimension mean and std of the flattened training embeddings (std floored to avoid division by 0)."""
        self.mean.copy_(mean.reshape(-1).to(self.mean))
        self.std.copy_(std.reshape(-1).clamp_min(1e-6).to(self.std))

    def normalize(self, c_glb: torch.Tensor) -> torch.Tensor:
        """(B, S, N) or (B, S*N) c_GLB -> (B, S*N) normalised."""
        return (c_glb.reshape(len(c_glb), -1).to(self.mean) - self.mean) / self.std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S*N) normalised -> (B, S, N) c_GLB."""
        return (x * self.std + self.mean).reshape(len(x), *self.token_shape)

    def condition(self, timesteps: torch.Tensor, labels: torch.Tensor | None,
                  drop: torch.Tensor | None) -> torch.Tensor:
        """Timestep embedding + label embedding (the null embedding where `drop` is True or no labels are given)."""
        cond = self.time_embedding(self.time_proj(timesteps).to(self.input.weight.dtype))
        if self.label_embedding is None:
            if labels is not None:
                raise ValueError("This embedding model was trained without labels; sample it with labels=None.")
            return cond
        null = self.null_label.expand_as(cond)
        if labels is None:
            return cond + null
        embedded = self.label_embedding(labels.to(cond.dtype))
        if drop is not None:
            embedded = torch.where(drop[:, None], null, embedded)
        return cond + embedded

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, labels: torch.Tensor | None = None,
                drop_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The prediction (B, dim) for noisy normalised embeddings `sample` (B, dim) at `timestep`.

        labels: (B, num_labels) multi-hot, or None for the null label. drop_labels: (B,) bool, True -> null label.
        """
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(len(sample))
        cond = self.condition(timesteps, labels, drop_labels)
        x = self.input(sample)
        for block in self.blocks:
            x = block(x, cond)
        return self.output(self.out_norm(x))
