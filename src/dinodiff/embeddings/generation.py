"""`dinodiff generate --strategy sampled`: each item's c_GLB drawn from an embedding model instead of a source image.

Items are planned as for reconstruction (`ratio` per source); a label-conditioned embedding model is sampled with
the labels of the item's source (so the synthetic set keeps the pool's label mix, and labels.csv is right), an
unconditional one without labels (labels.csv then has no label columns: the images have no known labels).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from dinodiff.embeddings.model_io import load_embedding_model, sample_embeddings

logger = logging.getLogger(__name__)


def sampled_conditions(settings: Any, sources: Sequence[Any], items: Sequence[Any], names: list[str],
                       source_c_glb: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """c_GLB (len(items), S, N), row i for item i, and the label names the synthetic labels.csv may claim.

    settings: a GenerateSettings with embedding_model, embedding_guidance, embedding_steps and seed.
    """
    if not settings.embedding_model:
        raise ValueError("--strategy sampled needs --embedding-model DIR (a `dinodiff train-embeddings` folder).")
    model = load_embedding_model(settings.embedding_model)
    shape = tuple(model.denoiser.token_shape)
    if tuple(source_c_glb.shape[1:]) != shape:
        raise ValueError(f"The embedding model {settings.embedding_model} makes c_GLB of shape {shape}, but the image "
                         f"model's encoder gives {tuple(source_c_glb.shape[1:])}: train the embedding model on a cache "
                         "made with the image model's encoder.")
    labels = [sources[it.a].labels for it in items] if model.label_names else None
    c_glb = sample_embeddings(model, len(items), labels, guidance=settings.embedding_guidance, seed=settings.seed,
                              steps=settings.embedding_steps)
    logger.info("sampled %d c_GLB from %s (%s)", len(items), settings.embedding_model,
                f"conditioned on {model.label_names}" if model.label_names else "unconditional")
    return c_glb, (names if model.label_names else [])
