"""`train-embeddings`' eval.json: sampled c_GLB against held-out embeddings, beside the real floor.

In the model's normalised space (see embeddings.metrics):
- **quality** (precision/recall, k = 3, and FD) of one sampled embedding per training image (a seeded
  `eval_samples` of them when there are more) against the first cached view of each *held-out* image, which the
  model never trained on (`--holdout-fraction`, by subject);
- **the real floor** beside it: the same training images' own first views against the same held-out reference
  (what a perfect generator of the training distribution would score);
- **copies**: each sample's distance to the nearest training image, the minimum over all K cached views of
  each, judged against the training images' distances to their nearest other image (of another subject);
- a per-dimension Gaussian (a model that learnt only the mean and std) as the weak baseline.
Without a hold-out (`--holdout-fraction 0`) the reference is the training set itself, and eval.json says
`transductive`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinodiff.embeddings.data import CachedEmbeddings, HoldoutSplit, multi_hot
from dinodiff.embeddings.metrics import (
    MAX_ROWS,
    embedding_report,
    frechet_distance,
    nearest_training,
    precision_recall,
)
from dinodiff.embeddings.model_io import (
    EmbeddingModel,
    load_embedding_model,
    sample_embeddings,
)

logger = logging.getLogger(__name__)


@torch.no_grad()
def _normalised(model: EmbeddingModel, data: CachedEmbeddings) -> torch.Tensor:
    """(M, K, D) every cached view of `data`, in the model's normalised space."""
    m, k = data.c_glb.shape[:2]
    return model.denoiser.normalize(data.c_glb.reshape(m * k, -1)).reshape(m, k, -1)


def _quality(reference: torch.Tensor, rows: torch.Tensor, k: int, chunk: int) -> dict[str, float]:
    precision, recall = precision_recall(reference, rows, k, chunk, MAX_ROWS)  # as embedding_report's
    return {"precision": precision, "recall": recall, "fd": frechet_distance(reference, rows)}


def eval_rows(n_train: int, samples: int | None, seed: int) -> np.ndarray:
    """The training images the evaluation draws one sample for (labels, and the real floor's rows): all of them, or
    a seeded `samples` of them, so that the copy search (samples x every cached view) grows linearly in M."""
    if samples is None or samples >= n_train:
        return np.arange(n_train)
    return np.sort(np.random.default_rng(seed + 2).choice(n_train, samples, replace=False))


def evaluate_against_cache(folder: Path, data: CachedEmbeddings, split: HoldoutSplit, names: list[str],
                           settings: Any) -> dict:
    """eval.json of a trained embedding model; settings: an EmbeddingTrainSettings (seed, eval_steps, metrics_chunk)."""
    model = load_embedding_model(folder)
    train, held = data.subset(split.train), data.subset(split.holdout)
    drawn = eval_rows(len(train.keys), settings.eval_samples, settings.seed)
    labels = multi_hot([train.labels[i] for i in drawn], names) if names else None
    sampled = sample_embeddings(model, len(drawn), labels, seed=settings.seed + 1, steps=settings.eval_steps)
    with torch.no_grad():
        sampled = model.denoiser.normalize(sampled)
    train_views = _normalised(model, train)
    transductive = not len(held.keys)
    reference = train_views[:, 0] if transductive else _normalised(model, held)[:, 0]
    groups = np.unique(train.groups(), return_inverse=True)[1]  # copies are judged against other patients
    chunk, k = settings.metrics_chunk, 3
    report = embedding_report(sampled, train_views, reference, groups, k=k, chunk=chunk)
    report.update(
        space="normalised c_GLB", conditional=bool(names), ddim_steps=settings.eval_steps,
        samples=f"{len(drawn)}: one per training image" + ("" if len(drawn) == len(train.keys) else
                                                           f" of a seeded {len(drawn)} of {len(train.keys)}"),
        protocol="transductive" if transductive else "held-out",
        reference=("first cached view of each training image (TRANSDUCTIVE: nothing held out)" if transductive else
                   "first cached view of each held-out image (never trained on)"),
        copy_reference=f"nearest of all {train_views.shape[1]} cached views of each training image",
        holdout=split.describe(data))
    if transductive and train_views.shape[1] > 1:  # scale: each image's second cached view against the first
        report["real_second_view"] = _quality(reference, train_views[:, 1], k, chunk)
    elif not transductive:  # the floor: real training embeddings, as many as the samples, against the same reference
        report["real_floor"] = {"set": "first cached view of the same training images", "n": len(drawn),
                                **_quality(reference, train_views[torch.from_numpy(drawn), 0], k, chunk)}
    gaussian = torch.randn(sampled.shape, generator=torch.Generator().manual_seed(0))
    report["diagonal_gaussian"] = {"nn_median": float(nearest_training(gaussian, train_views, chunk)[0].median()),
                                   **_quality(reference, gaussian, k, chunk)}
    logger.info("embedding model: %s", {key: v for key, v in report.items() if key != "holdout"})
    return report
