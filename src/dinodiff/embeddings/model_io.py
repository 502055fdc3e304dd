"""Embedding-model folders and sampling new c_GLB from them (DDIM, with classifier-free guidance on labels).

A folder holds ``denoiser/`` (EmbeddingDenoiser: config.json + safetensors, with the normalisation statistics),
``scheduler/`` (the DDPM training scheduler's config) and ``embedding_model.json`` (label names, c_GLB shape, the
cache and encoder it was trained on, label dropout). A training run folder is accepted too (its ``model/``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from dinodiff.files import write_bytes_atomic
from dinodiff.models.embedding_denoiser import EmbeddingDenoiser
from dinodiff.runs import resolve_model
from dinodiff.sampling import inference_scheduler

logger = logging.getLogger(__name__)

INFO_FILE = "embedding_model.json"


@dataclass
class EmbeddingModel:
    denoiser: EmbeddingDenoiser
    scheduler: DDPMScheduler
    info: dict

    @property
    def label_names(self) -> list[str]:
        return list(self.info.get("label_names") or [])


def resolve_embedding_folder(folder: str | Path) -> Path:
    """A model folder, or a run folder of `dinodiff train-embeddings` (-> its model/)."""
    path = Path(folder)
    try:
        return resolve_model(path, marker=INFO_FILE).path
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not an embedding model (no {INFO_FILE} in it or in its model/): train "
                                "one with `dinodiff train-embeddings --cache CACHE --out DIR`, then pass DIR.") from None


def save_embedding_model(folder: str | Path, denoiser: EmbeddingDenoiser, scheduler: DDPMScheduler,
                         info: dict) -> Path:
    """Write denoiser/, scheduler/ and embedding_model.json (the JSON last: its presence marks the folder complete)."""
    folder = Path(folder)
    denoiser.save_pretrained(folder / "denoiser", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    write_bytes_atomic(folder / INFO_FILE, (json.dumps(info, indent=1) + "\n").encode())
    return folder


def load_embedding_model(folder: str | Path, device: torch.device | str = "cpu") -> EmbeddingModel:
    """Read a folder written by `save_embedding_model` (or a run folder holding one in model/)."""
    path = resolve_embedding_folder(folder)
    denoiser = EmbeddingDenoiser.from_pretrained(path / "denoiser").to(device).eval()
    scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
    return EmbeddingModel(denoiser, scheduler, json.loads((path / INFO_FILE).read_text()))


def label_tensor(model: EmbeddingModel, labels: torch.Tensor | list[dict] | None, n: int) -> torch.Tensor | None:
    """(n, L) multi-hot labels from a tensor or from label dicts (named as the model's labels), or None."""
    if labels is None:
        return None
    if not model.label_names:
        raise ValueError("This embedding model was trained without labels; call it with labels=None.")
    if not isinstance(labels, torch.Tensor):
        labels = torch.tensor([[1.0 if item.get(name) == 1.0 else 0.0 for name in model.label_names]
                               for item in labels], dtype=torch.float32)
    if labels.shape != (n, len(model.label_names)):
        raise ValueError(f"labels must be ({n}, {len(model.label_names)}) for {model.label_names}, "
                         f"got {tuple(labels.shape)}.")
    return labels.float()


@torch.no_grad()
def ddim_sample(model: EmbeddingModel, n: int, labels: torch.Tensor | None = None, guidance: float = 1.0,
                steps: int = 50, generator: torch.Generator | None = None) -> torch.Tensor:
    """n normalised embeddings (n, dim) by DDIM (eta = 0) from diffusers' DDIMScheduler over the DDPM config.

    guidance != 1 with labels: eps = eps(null) + guidance * (eps(labels) - eps(null)) (classifier-free guidance,
    Ho & Salimans 2022, eq. 6).
    """
    denoiser = model.denoiser
    device = denoiser.mean.device
    scheduler = inference_scheduler(model.scheduler, "ddim")  # no x0 clipping: the embeddings have unit variance
    scheduler.set_timesteps(steps)
    x = torch.randn(n, denoiser.config.dim, generator=generator).to(device) * scheduler.init_noise_sigma
    guided = labels is not None and guidance != 1.0
    if labels is not None:
        labels = labels.to(device)
    for t in scheduler.timesteps:
        if guided:
            drop = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]).to(device)
            cond, uncond = denoiser(torch.cat([x, x]), t, torch.cat([labels, labels]), drop).chunk(2)
            eps = uncond + guidance * (cond - uncond)
        else:
            eps = denoiser(x, t, labels)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def sample_embeddings(folder: str | Path | EmbeddingModel, n: int, labels: torch.Tensor | list[dict] | None = None,
                      guidance: float = 1.0, seed: int = 0, steps: int = 50, batch_size: int = 1024) -> torch.Tensor:
    """n new c_GLB (n, S, N), float32 on the CPU, from an embedding model folder; the same seed gives the same draw.

    labels: None (the unconditional / null-label model), an (n, L) multi-hot tensor or n label dicts.
    guidance: classifier-free guidance scale on the labels (1 = none).
    """
    model = folder if isinstance(folder, EmbeddingModel) else load_embedding_model(folder)
    labels = label_tensor(model, labels, n)
    generator = torch.Generator().manual_seed(int(seed))
    out = []
    for start in range(0, n, batch_size):
        part = None if labels is None else labels[start:start + batch_size]
        x = ddim_sample(model, min(batch_size, n - start), part, guidance, steps, generator)
        out.append(model.denoiser.denormalize(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, *model.denoiser.token_shape)
