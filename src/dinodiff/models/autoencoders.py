"""One frozen-autoencoder interface over SD's AutoencoderKL, diffusers' AutoencoderTiny, TAEF2 and a
parameter-free pixel-unshuffle, with latent normalisation ``(z - shift_factor) * scaling_factor``.

Images are (B, 1 or 3, H, W) in [0, 1] everywhere; grey images are replicated to RGB for RGB models.
``encode_moments`` returns what the cache step stores (KL: mean ++ logvar, so a fresh latent can be
sampled per epoch; deterministic models: the latent itself).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from dinodiff.models.hub import pipeline_subfolder
from dinodiff.models.taef2 import TAEF2

KINDS = ("kl", "tiny", "taef2", "unshuffle")


def _to_rgb(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"Expected images (B, 1 or 3, H, W) in [0, 1], got shape {tuple(images.shape)}.")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _to_grey(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"Expected images (B, 1 or 3, H, W) in [0, 1], got shape {tuple(images.shape)}.")
    if images.shape[1] == 1 or (torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])):
        return images[:, :1]  # replicated grey: keep it bit-exact (a channel mean would round)
    return images.mean(dim=1, keepdim=True)


class LatentAutoencoder(ModelMixin, ConfigMixin):
    """Frozen autoencoder with normalised latents; build with ``load_autoencoder`` or ``from_pretrained``.

    A diffusers ModelMixin/ConfigMixin, so ``save_pretrained`` writes config.json (kind, stats, the inner
    model's config) + diffusion_pytorch_model.safetensors, and a DiffusionPipeline can hold it as a component.
    """

    config_name = "config.json"
    ignore_for_config = ["model"]

    @register_to_config
    def __init__(
        self,
        kind: str,
        model_config: dict[str, Any] | None = None,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        unshuffle_factor: int = 8,
        source: str | None = None,
        model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"Unknown autoencoder kind {kind!r}; choose from {KINDS}.")
        if model is None:
            model = _build_inner(kind, model_config)
        elif kind in ("kl", "tiny"):
            # the inner diffusers config travels in ours, so from_pretrained can rebuild the architecture
            self.register_to_config(model_config={k: v for k, v in model.config.items() if not k.startswith("_")})
        self.kind = kind
        self.model = model
        self.unshuffle_factor = int(unshuffle_factor)
        if kind in ("kl", "tiny"):
            cfg = model.config
            self.latent_channels, self.image_channels = cfg.latent_channels, cfg.in_channels
            blocks = cfg.block_out_channels if kind == "kl" else cfg.encoder_block_out_channels
            self.downscale = 2 ** (len(blocks) - 1)  # a stride-2 step between consecutive encoder blocks
        elif kind == "taef2":
            self.latent_channels, self.image_channels, self.downscale = model.latent_channels, 3, 8
        else:
            f = self.unshuffle_factor
            self.latent_channels, self.image_channels, self.downscale = f * f, 1, f
        self.stochastic = kind == "kl"
        self.set_latent_stats(scaling_factor, shift_factor)
        self.requires_grad_(False)
        self.train(False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> "LatentAutoencoder":
        """Rebuild a wrapper written by ``save_pretrained`` (frozen, eval); 'unshuffle' has no weights file."""
        config = cls.load_config(pretrained_model_name_or_path, subfolder=kwargs.get("subfolder"))
        if config["kind"] == "unshuffle":
            return cls.from_config(config)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def train(self, mode: bool = True) -> "LatentAutoencoder":
        """Always eval: the autoencoder is frozen."""
        return super().train(False)

    def set_latent_stats(self, scaling_factor: float, shift_factor: float = 0.0) -> None:
        """Set the normalisation: normalised latent = (z - shift_factor) * scaling_factor."""
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        self.register_to_config(scaling_factor=self.scaling_factor, shift_factor=self.shift_factor)

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype; float32 for the parameter-free pixel-unshuffle (diffusers' own lookup fails on a
        module without parameters)."""
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float32

    # -- encoding ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> raw moments: (B, 2C, h, w) mean ++ logvar for KL, else the raw latent (B, C, h, w)."""
        x = images.to(self.device, torch.float32)
        if self.kind == "kl":
            return self.model.encode(_to_rgb(x) * 2 - 1).latent_dist.parameters
        if self.kind == "tiny":
            return self.model.encode(_to_rgb(x) * 2 - 1).latents  # AutoencoderTiny takes [-1, 1]
        if self.kind == "taef2":
            return self.model.encode(_to_rgb(x))
        return F.pixel_unshuffle(_to_grey(x) * 2 - 1, self.unshuffle_factor)

    def sample_raw_latents(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw (un-normalised) latent: a sample of N(mean, exp(logvar)) for KL, the moments themselves otherwise."""
        moments = moments.float()  # caches may hold fp16 moments; latents are always fp32
        if not self.stochastic:
            return moments
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # the clamp diffusers' DiagonalGaussianDistribution applies
        # randn_tensor draws on the generator's device, so a CPU generator gives the same noise on any device
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise

    def moments_to_latents(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw moments -> normalised latents (sampled for KL)."""
        return (self.sample_raw_latents(moments, generator) - self.shift_factor) * self.scaling_factor

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] -> normalised latents (B, C, H/downscale, W/downscale)."""
        return self.moments_to_latents(self.encode_moments(images), generator)

    # -- decoding ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images (B, image_channels, H, W) float32 in [0, 1], decoded in this module's dtype
        (fp32 by default; bf16/fp16 when a pipeline was loaded in half precision)."""
        z = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        z = z.to(self.dtype)
        if self.kind in ("kl", "tiny"):
            x = (self.model.decode(z).sample + 1) / 2  # both decode to [-1, 1]
        elif self.kind == "taef2":
            x = self.model.decode(z)
        else:
            x = (F.pixel_shuffle(z, self.unshuffle_factor) + 1) / 2
        return x.float().clamp(0, 1)


def _build_inner(kind: str, model_config: dict[str, Any] | None) -> nn.Module | None:
    """A randomly initialised inner model of the right architecture (weights are loaded afterwards)."""
    if kind == "unshuffle":
        return None
    if kind == "taef2":
        return TAEF2()
    if model_config is None:
        raise ValueError(f"kind {kind!r} needs model_config (the diffusers config) or a model.")
    from diffusers import AutoencoderKL, AutoencoderTiny

    klass = AutoencoderKL if kind == "kl" else AutoencoderTiny
    return klass.from_config({k: v for k, v in model_config.items() if not k.startswith("_")})


def load_autoencoder(
    kind: str,
    path: str | None = None,
    *,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    unshuffle_factor: int = 8,
) -> LatentAutoencoder:
    """Load a frozen autoencoder.

    kind 'kl': diffusers AutoencoderKL from a hub id or dir (its 'vae' subfolder for a full SD pipeline);
    'tiny': AutoencoderTiny (e.g. madebyollin/taesd); 'taef2': a folder with taef2_encoder.pth + taef2_decoder.pth;
    'unshuffle': no weights, pixel_unshuffle(unshuffle_factor) of the grey image in [-1, 1].
    scaling_factor / shift_factor default to the model config's (1.0 / 0.0 when it has none).
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown autoencoder kind {kind!r}; choose from {KINDS}.")
    if kind != "unshuffle" and path is None:
        raise ValueError(f"Autoencoder kind {kind!r} needs a path (hub id or local folder).")
    model: nn.Module | None = None
    cfg_scale, cfg_shift = 1.0, 0.0
    if kind in ("kl", "tiny"):
        from diffusers import AutoencoderKL, AutoencoderTiny

        path = str(path)
        if kind == "kl":
            model = AutoencoderKL.from_pretrained(path, subfolder=pipeline_subfolder(AutoencoderKL, path, "vae"))
        else:
            model = AutoencoderTiny.from_pretrained(path)
        cfg_scale = model.config.get("scaling_factor") or 1.0
        cfg_shift = model.config.get("shift_factor") or 0.0
    elif kind == "taef2":
        model = TAEF2.from_folder(path)
    return LatentAutoencoder(
        kind, model=model, unshuffle_factor=unshuffle_factor, source=None if path is None else str(path),
        scaling_factor=cfg_scale if scaling_factor is None else scaling_factor,
        shift_factor=cfg_shift if shift_factor is None else shift_factor,
    )  # fmt: skip


@torch.no_grad()
def estimate_latent_stats(
    autoencoder: LatentAutoencoder,
    batches: Iterable[torch.Tensor],
    max_images: int = 256,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """(scaling_factor = 1/std, shift_factor = mean) of the raw latents over up to ``max_images`` images.

    batches yields image tensors in [0, 1] (or tuples/lists whose first item is one). KL latents are sampled,
    as in training. Set the result with ``autoencoder.set_latent_stats(*stats)``.
    """
    total, total_sq, count, seen = 0.0, 0.0, 0, 0
    for batch in batches:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        images = images[: max_images - seen]
        z = autoencoder.sample_raw_latents(autoencoder.encode_moments(images), generator).double()
        total += z.sum().item()
        total_sq += (z * z).sum().item()
        count += z.numel()
        seen += images.shape[0]
        if seen >= max_images:
            break
    if count == 0:
        raise ValueError("estimate_latent_stats got no images.")
    mean = total / count
    std = max(total_sq / count - mean * mean, 0.0) ** 0.5
    if std == 0.0:
        raise ValueError("Latents have zero variance; cannot normalise (are the images constant?).")
    return 1.0 / std, mean
