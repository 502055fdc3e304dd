"""TAEF2: the tiny autoencoder for FLUX.2 latents (TAESD architecture with group-norm mid-blocks).

Layout follows madebyollin's TAESD: each side is an ``nn.Sequential`` of 3x3 convs and 3-conv residual
``Block``s of 64 channels with three stride-2 convs (encoder) / nearest x2 upsamplings (decoder) and 32
latent channels. The TAEF2 variant adds, in the three Blocks next to the latent on each side, a residual
pre-branch ``x + Conv1x1(64->256) -> GroupNorm(4, 256) -> ReLU -> Conv1x1(256->64)``. The module indices
are kept so that the released state dicts (``taef2_encoder.pth`` / ``taef2_decoder.pth``) load with
``strict=True``. Images are RGB in [0, 1]; latents are the raw 32-channel encoder output.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

LATENT_CHANNELS = 32
DOWNSCALE = 8
ENCODER_FILE = "taef2_encoder.pth"
DECODER_FILE = "taef2_decoder.pth"


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of the latent to (-3, 3) at the decoder's input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """3-conv residual block; ``midblock_gn`` adds TAEF2's group-norm pre-branch (keys ``pool.*``)."""

    def __init__(self, n_in: int, n_out: int, midblock_gn: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool: nn.Module | None = None
        if midblock_gn:
            n_gn = 4 * n_in
            self.pool = nn.Sequential(
                nn.Conv2d(n_in, n_gn, 1, bias=False),
                nn.GroupNorm(4, n_gn),
                nn.ReLU(),
                nn.Conv2d(n_gn, n_in, 1, bias=False),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def build_encoder(latent_channels: int = LATENT_CHANNELS) -> nn.Sequential:
    """Image (B, 3, H, W) in [0, 1] -> latent (B, latent_channels, H/8, W/8)."""
    gn = dict(midblock_gn=True)
    return nn.Sequential(
        _conv(3, 64), Block(64, 64),
        _conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),
        _conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),
        _conv(64, 64, stride=2, bias=False), Block(64, 64, **gn), Block(64, 64, **gn), Block(64, 64, **gn),
        _conv(64, latent_channels),
    )  # fmt: skip


def build_decoder(latent_channels: int = LATENT_CHANNELS) -> nn.Sequential:
    """Latent (B, latent_channels, h, w) -> image (B, 3, 8h, 8w), roughly in [0, 1] (not clamped here)."""
    gn = dict(midblock_gn=True)
    return nn.Sequential(
        Clamp(), _conv(latent_channels, 64), nn.ReLU(),
        Block(64, 64, **gn), Block(64, 64, **gn), Block(64, 64, **gn),
        nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        Block(64, 64), _conv(64, 3),
    )  # fmt: skip


class TAEF2(nn.Module):
    """Encoder + decoder pair; ``encode``/``decode`` work on RGB images in [0, 1]."""

    def __init__(self, latent_channels: int = LATENT_CHANNELS) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.encoder = build_encoder(latent_channels)
        self.decoder = build_decoder(latent_channels)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents).clamp(0, 1)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "TAEF2":
        """Load the released fp16 state dicts (``taef2_encoder.pth``, ``taef2_decoder.pth``) as fp32."""
        folder = Path(folder)
        missing = [f for f in (ENCODER_FILE, DECODER_FILE) if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"TAEF2 folder {folder} lacks {missing} (needs {ENCODER_FILE}, {DECODER_FILE}).")
        model = cls()
        for part, fname in ((model.encoder, ENCODER_FILE), (model.decoder, DECODER_FILE)):
            state = torch.load(folder / fname, map_location="cpu", weights_only=True)
            # fp16 on disk; CPU fp16 convs are slow and lossy, so compute in fp32.
            part.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return model
