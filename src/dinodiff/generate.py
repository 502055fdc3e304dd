"""`dinodiff generate`: synthetic datasets by reconstruction or interpolation of the sources' c_GLB.

Output folder: ``images/NNNNNNN.png``, ``labels.csv`` (path, one column per label, strategy, source ids, r,
seed), ``provenance.json`` and ``sources.pt`` (the sources' ids, labels and c_GLB, computed once).
Item i is drawn from its own generator seeded by ``item_seed(seed, i)``, so it is the same image whatever the
batch size (up to the float rounding of batched kernels, ~1e-6) or number of processes. Items are cut into
chunks of ``batch_size``; under ``accelerate launch`` process p takes chunks p, p + P, ..., so every chunk is
the same batch as in a single process (bit-identical PNGs); a rerun regenerates only chunks with missing images.
The main process alone encodes the sources and writes the outputs while the others wait in a barrier; the
process group's timeout is ``sync_timeout_s`` (6 h by default), not torch's 10 minutes (NCCL), so a large
source set cannot time the others out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dinodiff.data.shards import encode_png, write_bytes_atomic
from dinodiff.data.sources import label_names, positive_matrix
from dinodiff.embeddings.generation import sampled_conditions
from dinodiff.interpolate import MIXES, mix, nearer_source, plan_interpolations
from dinodiff.pipeline import DiNODiffusionPipeline, to_uint8_array

logger = logging.getLogger("dinodiff.generate")

STRATEGIES = ("reconstruction", "interpolation", "sampled")  # sampled: c_GLB from an embedding model (no source)
SOURCES_FILE = "sources.pt"
SYNC_TIMEOUT_S = 6 * 3600  # how long the other processes wait while the main one works alone


@dataclass
class GenerateSettings:
    """Everything the generated images depend on (saved in provenance.json; a rerun must match)."""

    strategy: str = "reconstruction"
    ratio: int = 1  # synthetic images per real source: 1, 5, 10, 50 in the paper
    seed: int = 0
    num_inference_steps: int = 25
    guidance_scale: float = 1.0
    scheduler: str = "dpm"
    mix: str = "lerp"  # interpolation of c_GLB: lerp | slerp
    r_range: tuple[float, float] = (0.0, 1.0)
    r_values: Optional[list[float]] = None  # draw r from this list instead of r_range
    shared_label: bool = True  # interpolate only pairs sharing a positive label (the paper)
    source_options: dict = field(default_factory=dict)  # iter_sources options: kind, split, limit, path_column, ...
    embedding_model: Optional[str] = None  # sampled: a `dinodiff train-embeddings` folder
    embedding_guidance: float = 1.0  # sampled: classifier-free guidance on the labels of a conditional model
    embedding_steps: int = 50  # sampled: DDIM steps of the embedding model

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown strategy {self.strategy!r}; use one of {STRATEGIES}.")
        if self.mix not in MIXES:
            raise ValueError(f"Unknown interpolation {self.mix!r}; use one of {MIXES}.")
        if self.strategy == "sampled" and not self.embedding_model:
            raise ValueError("--strategy sampled needs --embedding-model DIR (made by `dinodiff train-embeddings`).")
        if self.ratio < 1 or self.num_inference_steps < 1:
            raise ValueError(f"ratio and num_inference_steps must be >= 1, got {self.ratio} and "
                             f"{self.num_inference_steps}.")


@dataclass(frozen=True)
class Item:
    index: int
    a: int  # source index
    b: Optional[int]  # second source (interpolation)
    r: Optional[float]
    seed: int

    @property
    def label_source(self) -> int:
        return self.a if self.b is None or nearer_source(self.r) == 0 else self.b


def item_seed(seed: int, index: int) -> int:
    """Seed of item `index`'s generator: a hash of (seed, index), so neighbouring items share no noise."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def plan_items(settings: GenerateSettings, positive: np.ndarray) -> list[Item]:
    """Reconstruction: `ratio` variations of each source. Interpolation: ratio x N pairs under the pairing rules."""
    n, k = len(positive), settings.ratio
    if settings.strategy in ("reconstruction", "sampled"):  # sampled: the source gives only the labels
        pairs = [(a, None, None) for a in range(n) for _ in range(k)]
    elif settings.strategy == "interpolation":
        plan = plan_interpolations(positive, n * k, seed=settings.seed, r_range=tuple(settings.r_range),
                                   r_values=settings.r_values, shared_label=settings.shared_label)
        pairs = [(p.a, p.b, p.r) for p in plan]
    else:
        raise ValueError(f"Unknown strategy {settings.strategy!r}; use one of {STRATEGIES}.")
    return [Item(i, a, b, r, item_seed(settings.seed, i)) for i, (a, b, r) in enumerate(pairs)]


def item_conditions(items: Sequence[Item], c_glb: torch.Tensor, method: str = "lerp") -> torch.Tensor:
    """c_GLB of each item: its source's, or the mix of its two sources' at its r."""
    a = c_glb[[it.a for it in items]]
    if all(it.b is None for it in items):
        return a
    b = c_glb[[it.a if it.b is None else it.b for it in items]]
    r = torch.tensor([0.0 if it.r is None else it.r for it in items], dtype=c_glb.dtype)
    return mix(a, b, r, method)


def sample_batches(pipeline: DiNODiffusionPipeline, c_glb: torch.Tensor, seeds: Sequence[int], *, batch_size: int,
                   num_inference_steps: int = 25, guidance_scale: float = 1.0) -> Iterator[torch.Tensor]:
    """Images (b, 1, H, W) in [0, 1] for consecutive slices of `batch_size` conditions, one generator per item."""
    for start in range(0, len(seeds), batch_size):
        gens = [torch.Generator().manual_seed(s) for s in seeds[start:start + batch_size]]
        yield pipeline(c_glb=c_glb[start:start + batch_size], generator=gens, num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, output_type="pt").images


@torch.no_grad()
def encode_sources(pipeline: DiNODiffusionPipeline, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """c_GLB (N, S, N_tok) of source images (N, 1, H, W) in [0, 1], on the CPU."""
    return torch.cat([pipeline.encode_images(images[i:i + batch_size]).cpu()
                      for i in range(0, len(images), batch_size)])


def generate_reconstructions(pipeline: DiNODiffusionPipeline, images: torch.Tensor, per_source: int, seed: int,
                             batch_size: int, *, num_inference_steps: int = 25,
                             guidance_scale: float = 1.0) -> torch.Tensor:
    """`per_source` variations of each image, source-major: (N * per_source, 1, H, W) in [0, 1], on the CPU.

    Variation j of source s is item s * per_source + j of `dinodiff generate --strategy reconstruction` with
    the same seed, so the two give the same images.
    """
    c_glb = encode_sources(pipeline, images, batch_size).repeat_interleave(per_source, dim=0)
    seeds = [item_seed(seed, i) for i in range(len(c_glb))]
    return torch.cat(list(sample_batches(pipeline, c_glb, seeds, batch_size=batch_size,
                                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)))


def image_path(out: Path, index: int) -> Path:
    return out / "images" / f"{index:07d}.png"


def generate_dataset(model: str | Path, source: str | Path, out: str | Path, settings: GenerateSettings, *,
                     batch_size: int = 8, preview_rows: int = 4, progress: bool = True,
                     sync_timeout_s: float = SYNC_TIMEOUT_S) -> Path:
    """Write (or finish) a synthetic dataset in `out`; runs in every process under `accelerate launch`."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from dinodiff.generate_io import load_pipeline, read_or_encode_sources, start_provenance, write_outputs

    # PartialState, unlike Accelerator, ignores ACCELERATE_USE_CPU; without it CPU processes would not form a group.
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state, out = PartialState(cpu=cpu, timeout=timedelta(seconds=sync_timeout_s)), Path(out)
    pipeline = load_pipeline(model, settings.scheduler, state.device)
    pipeline.check_guidance(settings.guidance_scale)  # before any work is done
    if state.is_main_process:
        start_provenance(out, model, pipeline, settings, source)
    state.wait_for_everyone()
    sources, c_glb = read_or_encode_sources(out, source, pipeline, settings, state, batch_size)
    names = label_names(sources)
    items = plan_items(settings, positive_matrix(sources, names))
    if settings.strategy == "sampled":  # one c_GLB per item, from the embedding model
        c_glb, names = sampled_conditions(settings, sources, items, names, c_glb)
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    mine = [c for n, c in enumerate(chunks) if n % state.num_processes == state.process_index]
    todo = [c for c in mine if not all(image_path(out, it.index).is_file() for it in c)]
    (out / "images").mkdir(parents=True, exist_ok=True)
    share, left = sum(len(c) for c in mine), sum(len(c) for c in todo)
    logger.info("process %d of %d: %d of %d images in %d chunks, %d to make", state.process_index,
                state.num_processes, share, len(items), len(mine), left)
    bar = tqdm(total=share, initial=share - left, desc=f"generate {settings.strategy}", unit="img",
               disable=not (progress and state.is_main_process))
    pipeline.set_progress_bar_config(disable=True)
    for chunk in todo:
        cond = c_glb[[it.index for it in chunk]] if settings.strategy == "sampled" else item_conditions(
            chunk, c_glb, settings.mix)
        images = next(sample_batches(pipeline, cond, [it.seed for it in chunk], batch_size=len(chunk),
                                     num_inference_steps=settings.num_inference_steps,
                                     guidance_scale=settings.guidance_scale))
        for item, image in zip(chunk, images):
            path = image_path(out, item.index)
            if not path.is_file():  # a rerun redraws a partly written chunk whole, so its batch is unchanged
                write_bytes_atomic(path, encode_png(to_uint8_array(image[0])))
        bar.update(len(chunk))
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        write_outputs(out, items, sources, names, settings, pipeline, source,
                      0 if settings.strategy == "sampled" else preview_rows)  # no source to show beside them
    state.wait_for_everyone()
    return out
