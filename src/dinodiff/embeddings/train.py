"""`dinodiff train-embeddings`: train the embedding generator on the cached c_GLB (RCG's representation generator).

Every cached augmented view of the training images is a training example; a seeded `holdout_fraction` of the
cached images (by subject when the metadata names one) is held out of training and of the normalisation
statistics, to measure the samples against (embeddings/evaluation.py). Batch indices and noise of step s are drawn
from a generator seeded by (seed, s, process), so a resumed run draws exactly what an uninterrupted one would. The
run folder gets ``settings.json``, ``metrics.csv``, ``checkpoints/checkpoint-STEP/`` (accelerate state +
``trainer/state.json``), ``model/`` (an embedding model folder) and ``eval.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from dinodiff.embeddings.data import (
    CachedEmbeddings,
    HoldoutSplit,
    label_names,
    multi_hot,
    read_cached_embeddings,
    split_holdout,
)
from dinodiff.embeddings.evaluation import evaluate_against_cache
from dinodiff.embeddings.model_io import save_embedding_model
from dinodiff.embeddings.settings import EmbeddingTrainSettings
from dinodiff.files import write_json_atomic
from dinodiff.models.embedding_denoiser import EmbeddingDenoiser
from dinodiff.runs import (
    MetricsLog,
    commit,
    latest_checkpoint,
    prune,
    remove_stale_staging,
    staging_dir,
)

logger = logging.getLogger(__name__)


def _step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1
    return torch.Generator().manual_seed(int(state))


def build_denoiser(settings: EmbeddingTrainSettings, data: CachedEmbeddings, names: list[str]) -> EmbeddingDenoiser:
    """A fresh denoiser sized for the cached c_GLB, its statistics set from every cached view."""
    views = data.c_glb.reshape(-1, data.token_shape[0] * data.token_shape[1])
    model = EmbeddingDenoiser(dim=views.shape[1], width=settings.width, depth=settings.depth,
                              num_labels=len(names), dropout=settings.dropout, tokens=data.token_shape[0])
    model.set_statistics(views.mean(0), views.std(0))
    return model


def _checkpoint(accelerator: Accelerator, run: Path, step: int, keep_last: int) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        staging = staging_dir(run, step)
        accelerator.save_state(str(staging))
        (staging / "trainer").mkdir()
        write_json_atomic(staging / "trainer" / "state.json", {"step": step})
        commit(staging, step)
        prune(run, keep_last)
    accelerator.wait_for_everyone()


def _resume(accelerator: Accelerator, run: Path, metrics: MetricsLog) -> int:
    found = latest_checkpoint(run)
    if found is None:
        return 0
    accelerator.load_state(str(found))
    step = int(json.loads((found / "trainer" / "state.json").read_text())["step"])
    if accelerator.is_main_process:
        metrics.truncate_after(step)
    logger.info("resumed from %s (step %d)", found, step)
    return step


def _check_settings(run: Path, settings: EmbeddingTrainSettings) -> None:
    path = run / "settings.json"
    fixed = {k: v for k, v in asdict(settings).items() if k not in ("max_steps", "checkpoint_every", "keep_last",
                                                                   "log_every", "eval_steps", "eval_samples",
                                                                   "metrics_chunk")}
    if path.is_file() and latest_checkpoint(run) is not None:
        old = json.loads(path.read_text())
        changed = sorted(k for k in fixed if old.get(k) != fixed[k])
        if changed:
            raise ValueError(f"{run} holds a run with other settings ({', '.join(changed)}): use the same "
                             "settings to resume it, or another --out.")
    write_json_atomic(path, asdict(settings))


def _train_step(model, optimizer, scheduler: DDPMScheduler, x: torch.Tensor, y: torch.Tensor | None,
                settings: EmbeddingTrainSettings, gen: torch.Generator, accelerator: Accelerator) -> float:
    """One DDPM step: MSE to the scheduler's target (noise, velocity or sample) at uniform timesteps, labels dropped
    with probability label_dropout."""
    noise = torch.randn(x.shape, generator=gen).to(x.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x),), generator=gen).to(x.device)
    drop = (torch.rand(len(x), generator=gen) < settings.label_dropout).to(x.device) if y is not None else None
    noisy = scheduler.add_noise(x, noise, t)
    kind = scheduler.config.prediction_type
    target = noise if kind == "epsilon" else x if kind == "sample" else scheduler.get_velocity(x, noise, t)
    loss = F.mse_loss(model(noisy, t, y, drop), target)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def train_embeddings(settings: EmbeddingTrainSettings, progress: bool = True) -> Path:
    """Train (or resume, or finish) an embedding generator on the cached images outside the hold-out; returns the
    model folder RUN/model."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    run = Path(settings.out)
    cached = read_cached_embeddings(settings.cache, settings.limit)
    split = split_holdout(cached, settings.holdout_fraction, settings.seed)
    data = cached.subset(split.train)
    logger.info("training on %d cached images, %d held out (by %s)", len(split.train), len(split.holdout), split.by)
    names = label_names(data.labels) if settings.labels == "auto" else []
    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        _check_settings(run, settings)
        remove_stale_staging(run)
    torch.manual_seed(settings.seed)  # initial weights
    model = build_denoiser(settings, data, names)
    scheduler = DDPMScheduler(num_train_timesteps=settings.num_train_timesteps, beta_schedule=settings.beta_schedule,
                              prediction_type=settings.prediction_type,
                              clip_sample=False)  # normalised embeddings exceed [-1, 1]: never clip
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    metrics = MetricsLog(run / "metrics.csv", ["step", "loss"])
    step = _resume(accelerator, run, metrics)
    base = accelerator.unwrap_model(model)
    x_all = base.normalize(data.c_glb.reshape(-1, base.config.dim)).cpu()
    views = data.c_glb.shape[1]
    y_all = multi_hot(data.labels, names).repeat_interleave(views, dim=0) if names else None
    bar = tqdm(total=settings.max_steps, initial=step, desc="train-embeddings",
               disable=not (progress and accelerator.is_main_process))
    model.train()
    running = []
    while step < settings.max_steps:
        gen = _step_generator(settings.seed, step, accelerator.process_index)
        idx = torch.randint(0, len(x_all), (settings.batch_size,), generator=gen)
        y = y_all[idx].to(accelerator.device) if y_all is not None else None
        running.append(_train_step(model, optimizer, scheduler, x_all[idx].to(accelerator.device), y, settings,
                                   gen, accelerator))
        step += 1
        bar.update(1)
        if accelerator.is_main_process and (step % settings.log_every == 0 or step == settings.max_steps):
            metrics.append({"step": step, "loss": f"{np.mean(running):.6f}"})
            running = []
        if step % settings.checkpoint_every == 0 or step == settings.max_steps:
            _checkpoint(accelerator, run, step, settings.keep_last)
    bar.close()
    folder = run / "model"
    if accelerator.is_main_process:
        _save_and_evaluate(accelerator.unwrap_model(model).eval(), scheduler, folder, cached, split, names, settings,
                           step)
    accelerator.wait_for_everyone()
    return folder


def _save_and_evaluate(denoiser: EmbeddingDenoiser, scheduler: DDPMScheduler, folder: Path, cached: CachedEmbeddings,
                       split: HoldoutSplit, names: list[str], settings: EmbeddingTrainSettings, step: int) -> None:
    """RUN/model (embedding_model.json names the held-out images) and RUN/eval.json."""
    holdout = split.describe(cached)
    info = {"label_names": names, "token_shape": list(cached.token_shape),
            "cache": str(Path(settings.cache).resolve()),
            "cache_info": _cache_info(settings.cache), "label_dropout": settings.label_dropout if names else 0.0,
            "step": step, "num_train_images": len(split.train), "views": int(cached.c_glb.shape[1]),
            "holdout": holdout}
    save_embedding_model(folder, denoiser, scheduler, info)
    write_json_atomic(Path(settings.out) / "eval.json", evaluate_against_cache(folder, cached, split, names, settings))


def _cache_info(cache: str) -> dict:
    path = Path(cache) / "cache.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    return {k: info.get(k) for k in ("encoder", "resolution", "views", "count", "num_tokens", "hidden_size")}
