"""Self-attention capture from a diffusers UNet (DiffSeg's input), for DiNO-Diffusion and vanilla SD.

Capture swaps the processor of every ``attn1`` (self-attention) for :class:`SelfAttentionCapture`, which
computes attention explicitly (SDPA never materialises the probabilities) and records them averaged over
heads; every other processor is left as it was (SDPA). The UNet's output is unchanged. The outputs of the
encoder's (``down_blocks``) self-attention layers can be recorded too: DiffCut's features.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from dinodiff import runs
from dinodiff.evaluate.segment.settings import CONDITIONS
from dinodiff.models.autoencoders import load_autoencoder
from dinodiff.pipeline import DiNODiffusionPipeline, load_model_folder

logger = logging.getLogger(__name__)


class SelfAttentionCapture:
    """Attention processor that records head-averaged probabilities (B, N, N) into ``store[name]``.

    Same maths as diffusers' AttnProcessor2_0, computed one head at a time in fp32 so that peak memory
    is one (B, N, N) map, not (B, heads, N, N).
    """

    def __init__(self, name: str, store: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 outputs: dict[str, torch.Tensor] | None = None, inputs: dict[str, torch.Tensor] | None = None) -> None:
        self.name, self.store, self.dtype, self.outputs, self.inputs = name, store, dtype, outputs, inputs

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, length, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if self.inputs is not None:  # what the layer attends over (B, N, C): the block's normalised features
            self.inputs[self.name] = hidden_states.detach().float()
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1]).float()
        # Two (B, N, N) buffers per layer, softmax in place: at 4096 tokens each is 64 MB per image, and
        # fresh allocations per head cost more in page faults than the maths.
        outputs, mean, buf = [], None, None
        for h in range(attn.heads):
            q, k = query[:, h].float(), key[:, h].float()
            probs = torch.matmul(q, k.transpose(-1, -2), out=buf) if buf is not None else q @ k.transpose(-1, -2)
            probs.mul_(attn.scale)
            if attention_mask is not None:
                probs.add_(attention_mask[:, h])
            probs.sub_(probs.amax(-1, keepdim=True)).exp_()
            probs.div_(probs.sum(-1, keepdim=True))
            outputs.append((probs @ value[:, h].float()).to(query.dtype))
            if mean is None:
                mean = probs
            else:
                mean.add_(probs)
                buf = probs
            if buf is None and attn.heads > 1:
                buf = torch.empty_like(mean)
        self.store[self.name] = mean.div_(attn.heads).to(self.dtype)
        hidden_states = torch.stack(outputs, 1).transpose(1, 2).reshape(batch, length, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if self.outputs is not None:  # the layer's output (B, N, C), before any residual: DiffCut's features
            self.outputs[self.name] = hidden_states.detach().float()
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


ENCODER_PREFIX = "down_blocks."


@dataclass
class Capture:
    """One UNet pass: every self-attention map (name -> (B, N, N), head-averaged, in call order) and, when
    asked, the outputs of the encoder's self-attention layers (``features``, DiffCut's) and the inputs of every
    self-attention layer (``inputs``: the normalised hidden states it attends over), name -> (B, N, C)."""

    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


@contextlib.contextmanager
def capture_self_attention(unet: UNet2DConditionModel, dtype: torch.dtype = torch.float32,
                           capture: Capture | None = None, features: bool = False,
                           inputs: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every ``attn1`` of ``unet`` records into the yielded dict (name -> (B, N, N)); with
    ``features``, the encoder's ``attn1`` layers also record their outputs into ``capture.features``; with
    ``inputs``, every ``attn1`` records its inputs into ``capture.inputs``."""
    original = dict(unet.attn_processors)
    capture = capture if capture is not None else Capture()
    store = capture.maps

    def processor(name: str) -> SelfAttentionCapture:
        layer = name.removesuffix(".processor")
        encoder = features and layer.startswith(ENCODER_PREFIX)
        return SelfAttentionCapture(layer, store, dtype, capture.features if encoder else None,
                                    capture.inputs if inputs else None)

    swapped = {name: processor(name) if name.endswith("attn1.processor") else proc
               for name, proc in original.items()}
    if not any(isinstance(p, SelfAttentionCapture) for p in swapped.values()):
        raise ValueError("this UNet has no self-attention (attn1) layers: DiffSeg needs a UNet with transformer "
                         "blocks (CrossAttn*Block2D).")
    unet.set_attn_processor(swapped)
    try:
        yield store
    finally:
        unet.set_attn_processor(original)


@dataclass
class AttentionModel:
    """What one DiffSeg pass needs: a UNet, its noise schedule, image -> latents, image -> UNet context."""

    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    encode: Callable[[torch.Tensor], torch.Tensor]  # images (B, 1, H, W) in [0, 1] -> latents
    context: Callable[[torch.Tensor, str], torch.Tensor]  # (images, condition) -> encoder_hidden_states
    resolution: int  # the image size the model was trained at
    name: str = "model"

    @property
    def device(self) -> torch.device:
        return self.unet.device


def _mean_latents(autoencoder: Any, images: torch.Tensor) -> torch.Tensor:
    # The posterior mean, not a sample: one deterministic latent per image.
    moments = autoencoder.encode_moments(images)
    if autoencoder.stochastic:
        moments = moments.chunk(2, dim=1)[0]
    return (moments.float() - autoencoder.shift_factor) * autoencoder.scaling_factor


def dinodiff_model(encoder: Any, autoencoder: Any, unet: UNet2DConditionModel, projection: Any,
                   scheduler: DDPMScheduler, name: str = "model") -> AttentionModel:
    """A DiNO-Diffusion model: context = projection(c_GLB); 'null' = projection of an all-zero c_GLB
    (the null condition of training's condition dropout)."""

    def context(images: torch.Tensor, condition: str) -> torch.Tensor:
        c_glb = encoder(images.to(encoder.mean.device))
        if condition == "null":
            c_glb = torch.zeros_like(c_glb)
        return projection(c_glb.to(unet.device, unet.dtype))

    return AttentionModel(unet, scheduler, lambda x: _mean_latents(autoencoder, x), context,
                          unet.config.sample_size * autoencoder.downscale, name)


def load_attention_model(folder: str | Path, device: str | torch.device = "cpu") -> AttentionModel:
    """A dinodiff model folder, checkpoint or pipeline folder, or a Stable Diffusion 1.x pipeline folder."""
    folder = runs.resolve_model(folder).path  # a checkpoint -> its model/; a run -> its best/ or newest checkpoint's
    if (folder / "text_encoder").is_dir():
        return load_sd15(folder, device)
    if (folder / "model_index.json").is_file():
        pipe = DiNODiffusionPipeline.from_pretrained(folder).to(device)
        # the pipeline holds a sampler; noising to t needs only the training schedule (same betas)
        ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
        return dinodiff_model(pipe.image_encoder, pipe.vae, pipe.unet.eval(), pipe.projection, ddpm, str(folder))
    parts = load_model_folder(folder, device)
    return dinodiff_model(parts.encoder, parts.autoencoder, parts.unet, parts.projection, parts.noise_scheduler,
                          str(folder))


def load_sd15(folder: str | Path, device: str | torch.device = "cpu") -> AttentionModel:
    """Vanilla Stable Diffusion 1.x (folder with unet/, vae/, text_encoder/, tokenizer/[, scheduler/]).

    The context is the empty prompt's text embedding whatever the condition, as in DiffSeg.
    """
    from transformers import (  # only for the SD 1.5 baseline
        CLIPTextModel,
        CLIPTokenizer,
    )

    folder = Path(folder)
    missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer") if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a Stable Diffusion folder: missing {', '.join(missing)}/ "
                                "(save one with StableDiffusionPipeline.save_pretrained).")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").to(device).eval()
    autoencoder = load_autoencoder("kl", str(folder)).to(device)
    scheduler = (DDPMScheduler.from_pretrained(folder, subfolder="scheduler") if (folder / "scheduler").is_dir()
                 else DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").to(device).eval()
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        empty = text_encoder(ids.to(device))[0].to(unet.dtype)

    def context(images: torch.Tensor, condition: str) -> torch.Tensor:
        return empty.expand(images.shape[0], -1, -1)

    return AttentionModel(unet, scheduler, lambda x: _mean_latents(autoencoder, x), context,
                          unet.config.sample_size * autoencoder.downscale, str(folder))


@torch.no_grad()
def capture_attention(model: AttentionModel, images: torch.Tensor, *, timestep: int = 300, condition: str = "image",
                      noise_seed: int | None = None, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """One UNet pass on the images' latents at ``timestep``; returns every self-attention map (B, N_i, N_i).

    The clean latent goes in with timestep t (DiffSeg); with ``noise_seed`` it is first noised to t by the
    model's scheduler. ``condition``: 'image' (the image's own c_GLB) or 'null'. Maps are stored in ``dtype``.
    """
    return list(capture_pass(model, images, timestep=timestep, condition=condition, noise_seed=noise_seed,
                             dtype=dtype).maps.values())


@torch.no_grad()
def prepare_pass(model: AttentionModel, images: torch.Tensor, condition: str = "image") -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """The images' clean latents and UNet context: what every pass over them at any timestep or noise shares."""
    latents = model.encode(images.to(model.device)).to(model.device, model.unet.dtype)
    return latents, model.context(images, condition)


@torch.no_grad()
def capture_pass(model: AttentionModel, images: torch.Tensor, *, timestep: int = 300, condition: str = "image",
                 noise_seed: int | None = None, dtype: torch.dtype = torch.float32, features: bool = False,
                 inputs: bool = False, prepared: tuple[torch.Tensor, torch.Tensor] | None = None) -> Capture:
    """:func:`capture_attention` keeping the layer names; with ``features`` the encoder's self-attention
    outputs (DiffCut's features), with ``inputs`` every self-attention layer's inputs. ``prepared``: the images'
    (latents, context) from :func:`prepare_pass`, so that several passes over the same images encode them once."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}.")
    device = model.device
    latents, context = prepared if prepared is not None else prepare_pass(model, images, condition)
    t = torch.full((latents.shape[0],), int(timestep), dtype=torch.long, device=device)
    if noise_seed is not None:
        gen = torch.Generator("cpu").manual_seed(int(noise_seed))
        noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
        latents = model.scheduler.add_noise(latents, noise, t)
    capture = Capture()
    with capture_self_attention(model.unet, dtype, capture, features, inputs):
        model.unet(latents, t, encoder_hidden_states=context)
    return capture
