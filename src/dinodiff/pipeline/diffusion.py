"""`DiNODiffusionPipeline`: images (or their c_GLB) in, new images out, as a diffusers DiffusionPipeline.

Components: ``unet`` (UNet2DConditionModel), ``vae`` (LatentAutoencoder), ``scheduler`` (any diffusers
scheduler; DPM-Solver++ by default), ``image_encoder`` (GlobalTokenEncoder: the frozen DINO encoder with
its preprocessing) and ``projection`` (ConditionProjection). ``save_pretrained`` writes ``model_index.json``
and one folder per component; ``from_pretrained`` reads it back from a folder or the hub. The pipeline
config also records ``cond_dropout``, the training probability of the null (all-zero) condition:
classifier-free guidance is only meaningful when it was > 0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from omegaconf import OmegaConf

from dinodiff.config import ModelSettings, save_config
from dinodiff.data.readers import grey_to_unit
from dinodiff.models.autoencoders import LatentAutoencoder
from dinodiff.models.encoders import GlobalTokenEncoder
from dinodiff.models.factory import Components, build_encoder
from dinodiff.models.projection import ConditionProjection
from dinodiff.runs import run_config
from dinodiff.sampling import Generators, inference_scheduler, sample_latents

logger = logging.getLogger(__name__)

ImageInput = torch.Tensor | np.ndarray | PIL.Image.Image | Sequence[PIL.Image.Image] | Sequence[np.ndarray]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class DiNODiffusionPipelineOutput(BaseOutput):
    """`images`: list of grey PIL images ("pil"), (B, H, W, 1) float array ("np"), (B, 1, H, W) tensor in [0, 1]
    ("pt") or normalised latents ("latent"). `c_glb`: the (B, S, N) global tokens each image was conditioned on."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    c_glb: torch.Tensor


class DiNODiffusionPipeline(DiffusionPipeline):
    """Generate chest X-rays conditioned on the DINO global tokens c_GLB of source images."""

    model_cpu_offload_seq = "image_encoder->projection->unet->vae"
    # How non-8-bit source images are brought to [0, 1]: prepare's default rule (``data.readers.to_uint8``);
    # set "percentile" for sources prepared with ``--intensity percentile``.
    intensity_rule: str = "minmax"

    def __init__(self, unet: UNet2DConditionModel, vae: LatentAutoencoder, scheduler: SchedulerMixin,
                 image_encoder: GlobalTokenEncoder, projection: ConditionProjection, cond_dropout: float = 0.0) -> None:
        super().__init__()
        for module in (vae, image_encoder, projection):
            _anchor_dtype(module)
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler, image_encoder=image_encoder,
                              projection=projection)
        self.register_to_config(cond_dropout=float(cond_dropout))

    @classmethod
    def from_components(cls, parts: Any, *, cond_dropout: float = 0.0,
                        scheduler: str = "dpm") -> "DiNODiffusionPipeline":
        """From a `models.factory.Components` (its DDPM training scheduler becomes `scheduler`, by name)."""
        return cls(unet=parts.unet, vae=parts.autoencoder, image_encoder=parts.encoder, projection=parts.projection,
                   scheduler=inference_scheduler(parts.noise_scheduler, scheduler), cond_dropout=cond_dropout)

    # ------------------------------------------------------------------------------------ sizes
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    @property
    def resolution(self) -> int:
        """Side in pixels of the generated images."""
        return self.unet.config.sample_size * self.vae.downscale

    # ---------------------------------------------------------------------------------- helpers
    def to_tensor(self, images: ImageInput) -> torch.Tensor:
        """PIL image(s), arrays or a tensor -> (B, 1|3, resolution, resolution) float in [0, 1].

        uint8 data is divided by 255; 16-bit PIL images, uint16/int arrays and float arrays outside [0, 1] are
        rescaled by prepare's rule (``intensity_rule``, see ``data.readers.grey_to_unit``), and so are integer
        tensors (B, C, H, W), image by image; float tensors are taken as already in [0, 1].
        """
        if isinstance(images, torch.Tensor) and not images.is_floating_point() and images.ndim in (3, 4):
            # integer tensors (uint8, uint16 ...): per image, the same rule as arrays; (C, H, W) -> (H, W[, C])
            batch = images[None] if images.ndim == 3 else images
            images = [a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0) for a in batch.cpu().numpy()]
        if isinstance(images, torch.Tensor):
            x = images.float()
            x = x[None] if x.ndim == 3 else x
        else:
            items = [images] if isinstance(images, (PIL.Image.Image, np.ndarray)) else list(images)
            # prepare's rule (data.readers): 16-bit PIL images, uint16/int arrays and out-of-range floats are
            # rescaled min-max to uint8 like prepared shards, never clipped (which turned them white)
            tensors = [torch.from_numpy(grey_to_unit(im, self.intensity_rule)) for im in items]
            # (H, W) grey or (H, W, C): each resized on its own, since sources may differ in size
            x = torch.cat([self._resize((t[None] if t.ndim == 2 else t.permute(2, 0, 1))[None]) for t in tensors])
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"Expected images (B, 1 or 3, H, W) in [0, 1], got shape {tuple(x.shape)}.")
        return self._resize(x)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        size = self.resolution
        if x.shape[-2:] == (size, size):
            return x
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: ImageInput) -> torch.Tensor:
        """Source images -> c_GLB (B, S, N), float32, on the pipeline's device."""
        return self.image_encoder(self.to_tensor(images).to(self.device)).float()

    # ------------------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(
        self,
        images: ImageInput | None = None,
        c_glb: torch.Tensor | None = None,
        num_images_per_condition: int = 1,
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        generator: Generators = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> DiNODiffusionPipelineOutput | tuple:
        """Sample `num_images_per_condition` images per source image (or per c_GLB row).

        generator: one torch.Generator, or a list with one per output image (each image then depends on its own
        generator only, whatever the batch). guidance_scale != 1: classifier-free guidance against the all-zero
        c_GLB, allowed only for models trained with cond_dropout > 0. Outputs are grey, ordered source-major.
        """
        if (images is None) == (c_glb is None):
            raise ValueError("Pass exactly one of images= (source images) or c_glb= (precomputed global tokens).")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: use one of {OUTPUT_TYPES}.")
        if num_images_per_condition < 1:
            raise ValueError(f"num_images_per_condition must be >= 1, got {num_images_per_condition}.")
        self.check_guidance(guidance_scale)
        guided = guidance_scale != 1.0
        if c_glb is None:
            c_glb = self.encode_images(images)
        elif c_glb.ndim != 3:
            raise ValueError(f"c_glb must be (B, S, N) global tokens, got shape {tuple(c_glb.shape)}.")
        c_glb = c_glb.to(self.device, torch.float32).repeat_interleave(num_images_per_condition, dim=0)
        width = self.projection.dtype  # bf16/fp16 when the pipeline was loaded in half precision
        context = self.projection(c_glb.to(width))
        null = self.projection(torch.zeros_like(c_glb, dtype=width)) if guided else None
        sampled = sample_latents(self.unet, self.scheduler, context, latent_shape=self.latent_shape,
                                 num_inference_steps=num_inference_steps, generator=generator,
                                 guidance_scale=guidance_scale, null_cond=null, latents=latents,
                                 progress=lambda steps: self.progress_bar(steps))
        out = sampled if output_type == "latent" else self.postprocess(self.vae.decode(sampled), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (out, c_glb)
        return DiNODiffusionPipelineOutput(images=out, c_glb=c_glb)

    def check_guidance(self, guidance_scale: float) -> None:
        """Refuse classifier-free guidance for a model that never learnt the unconditional prediction."""
        if guidance_scale != 1.0 and not self.config.cond_dropout > 0:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs a model trained with condition dropout "
                "(train.cond_dropout > 0), which learns the unconditional (all-zero c_GLB) prediction; this model "
                "was trained without it (cond_dropout=0). Use guidance_scale=1.0.")

    @staticmethod
    def postprocess(decoded: torch.Tensor, output_type: str) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        """Decoded (B, C, H, W) in [0, 1] -> grey images of `output_type` ("pt", "np" or "pil")."""
        grey = decoded.float().cpu()
        grey = grey.mean(dim=1, keepdim=True).clamp(0, 1) if grey.shape[1] > 1 else grey
        if output_type == "pt":
            return grey
        array = grey.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return array
        return [PIL.Image.fromarray(to_uint8_array(a[..., 0])) for a in array]


def _anchor_dtype(module: torch.nn.Module) -> None:
    """Give a module without parameters or buffers (pixel-unshuffle VAE, identity projection) a dtype.

    diffusers 0.42's ModelMixin.dtype raises UnboundLocalError for such modules, which breaks pipeline.to();
    an empty, non-persistent buffer fixes it without changing what is saved.
    """
    if next(module.parameters(), None) is None and next(module.buffers(), None) is None:
        module.register_buffer("_dtype_anchor", torch.zeros(0), persistent=False)


def to_uint8_array(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Float grey image(s) in [0, 1] -> uint8, rounded to nearest (what every PNG written by dinodiff holds)."""
    values = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


# ------------------------------------------------------------------ model folders
def save_model_folder(folder: str | Path, *, unet: UNet2DConditionModel, projection: ConditionProjection,
                      autoencoder: LatentAutoencoder, noise_scheduler: DDPMScheduler, model_cfg: ModelSettings,
                      encoder: GlobalTokenEncoder | None = None, cond_dropout: float | None = None) -> Path:
    """Write an inference-ready model folder through ``DiNODiffusionPipeline.save_pretrained``.

    encoder: the frozen encoder (built from ``model_cfg.encoder`` when not given). cond_dropout: the training
    probability of the null condition; when not given it is read from the run's config.yaml (see run_cond_dropout).
    """
    folder = Path(folder)
    parts = Components(encoder or build_encoder(model_cfg.encoder), autoencoder, unet, projection, noise_scheduler)
    dropout = run_cond_dropout(folder) if cond_dropout is None else float(cond_dropout)
    DiNODiffusionPipeline.from_components(parts, cond_dropout=dropout).save_pretrained(folder)
    save_config(model_cfg, folder / "model_config.yaml")
    return folder


def run_cond_dropout(model_folder: str | Path) -> float:
    """train.cond_dropout of the run a model folder belongs to (RUN/checkpoints/checkpoint-N/model or RUN/best/model).

    0.0 (no classifier-free guidance) when the folder is not inside a run with a config.yaml.
    """
    config = run_config(model_folder)
    return float(OmegaConf.select(OmegaConf.load(config), "train.cond_dropout") or 0.0) if config else 0.0


def load_model_folder(folder: str | Path, device: str | torch.device = "cpu") -> Components:
    """Read back a model folder as Components (training DDPM scheduler)."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a dinodiff model folder: no model_index.json (give RUN/best/model, "
                                "a checkpoint's model/ or a folder written by DiNODiffusionPipeline.save_pretrained).")
    pipe = DiNODiffusionPipeline.from_pretrained(folder)
    parts = Components(pipe.image_encoder, pipe.vae, pipe.unet, pipe.projection,
                       DDPMScheduler.from_config(pipe.scheduler.config))
    for module in (parts.encoder, parts.autoencoder, parts.unet, parts.projection):
        module.to(device).eval()
    return parts
