"""`dinodiff generate`: synthetic datasets by reconstruction or interpolation of the sources' c_GLB.

Output folder: ``images/NNN/NNNNNNN.png`` (10,000 per folder), ``labels.csv`` (path, one column per label,
strategy, source ids, r, seed), ``provenance.json`` and ``sources/`` (the sources' ids, labels and c_GLB, computed
once, memory-mapped by every process: `generate.sources`). Readers find an image by labels.csv's ``path``.
Item i is drawn from its own generator seeded by ``item_seed(seed, i)``, so it is the same image whatever the
batch size (up to the float rounding of batched kernels, ~1e-6) or number of processes. Items are cut into
chunks of ``batch_size``; under ``accelerate launch`` process p takes chunks p, p + P, ..., so every chunk is
the same batch as in a single process (bit-identical PNGs); a rerun regenerates only chunks with missing images.
On CUDA the UNet, projection and VAE decoder run in bf16 by default (`precision`; the encoder stays fp32, so
c_GLB matches training) and PNGs are encoded and written by a thread pool while the next batch samples.
The main process alone encodes the sources and writes the outputs while the others wait in a barrier; the
process group's timeout is ``sync_timeout_s`` (6 h by default), not torch's 10 minutes (NCCL), so a large
source set cannot time the others out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from tqdm.auto import tqdm

from dinodiff.embeddings.generation import sampled_conditions
from dinodiff.generate.outputs import open_sources, start_provenance, write_outputs
from dinodiff.generate.plan import (
    GenerateSettings,
    ItemPlan,
    image_path,
    item_conditions,
    plan_arrays,
)
from dinodiff.generate.sources import SourceTable
from dinodiff.generate.writer import ImageWriter
from dinodiff.memory import fix_mmap_threshold
from dinodiff.pipeline import DiNODiffusionPipeline, to_uint8_array
from dinodiff.pipeline.sample import default_batch_size, load_pipeline, sample_batches

logger = logging.getLogger(__name__)

SYNC_TIMEOUT_S = 6 * 3600  # how long the other processes wait while the main one works alone


@dataclass
class Job:
    """What one process has to make: the plan, its sources, the label names and its chunks still to do."""

    plan: ItemPlan
    sources: SourceTable
    names: list[str]
    batch_size: int
    mine: list[int]  # chunk indices of this process
    todo: list[int]  # those with a missing image
    sampled_c_glb: torch.Tensor | None = None  # sampled strategy: one c_GLB per item

    def bounds(self, chunk: int) -> range:
        return range(chunk * self.batch_size, min((chunk + 1) * self.batch_size, len(self.plan)))

    def items(self, chunk: int) -> list:
        span = self.bounds(chunk)
        return self.plan.items(span.start, span.stop)

    def count(self, chunks: list[int]) -> int:
        return sum(len(self.bounds(c)) for c in chunks)


def plan_job(out: Path, source: str | Path, pipeline: DiNODiffusionPipeline, settings: GenerateSettings, state: Any,
             batch_size: int) -> Job:
    """Encode (main process) or open the sources, plan the items and find this process's chunks still to make."""
    sources = open_sources(out, source, pipeline, settings, state, batch_size)
    names = list(sources.names)
    plan = plan_arrays(settings, sources.positive())
    sampled = None
    if settings.strategy == "sampled":  # one c_GLB per item, from the embedding model
        sampled, names = sampled_conditions(settings, [sources.source(i) for i in range(len(sources))],
                                            plan.items(), names, sources.all_c_glb())
    chunks = plan.chunks(batch_size)
    mine = list(range(state.process_index, chunks, state.num_processes))
    job = Job(plan, sources, names, batch_size, mine, [], sampled)
    job.todo = [c for c in mine if not all(image_path(out, i).is_file() for i in job.bounds(c))]
    return job


def generate_dataset(model: str | Path, source: str | Path, out: str | Path, settings: GenerateSettings, *,
                     batch_size: int | None = None, preview_rows: int = 4, progress: bool = True,
                     sync_timeout_s: float = SYNC_TIMEOUT_S, precision: str = "auto", writers: int = 2) -> Path:
    """Write (or finish) a synthetic dataset in `out`; runs in every process under `accelerate launch`.

    batch_size: None = 32 on CUDA, 8 on a CPU. precision: auto (bf16 on CUDA, fp32 on a CPU) | fp32 | bf16 | fp16.
    writers: threads that encode and write PNGs.
    """
    fix_mmap_threshold()  # batch-sized image tensors in mmap: memory stays flat over any number of batches
    # PartialState, unlike Accelerator, ignores ACCELERATE_USE_CPU; without it CPU processes would not form a group.
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state, out = PartialState(cpu=cpu, timeout=timedelta(seconds=sync_timeout_s)), Path(out)
    batch_size = batch_size or default_batch_size(state.device)
    pipeline = load_pipeline(model, settings.scheduler, state.device, precision)
    pipeline.check_guidance(settings.guidance_scale)  # before any work is done
    if state.is_main_process:
        start_provenance(out, model, pipeline, settings, source)
    state.wait_for_everyone()
    job = plan_job(out, source, pipeline, settings, state, batch_size)
    share, left = job.count(job.mine), job.count(job.todo)
    logger.info("process %d of %d: %d of %d images in %d chunks, %d to make (batch %d, %s)", state.process_index,
                state.num_processes, share, len(job.plan), len(job.mine), left, batch_size, pipeline.unet.dtype)
    bar = tqdm(total=share, initial=share - left, desc=f"generate {settings.strategy}", unit="img",
               disable=not (progress and state.is_main_process))
    pipeline.set_progress_bar_config(disable=True)
    with ImageWriter(workers=writers, max_pending=4 * batch_size) as writer:
        for chunk in job.todo:
            items = job.items(chunk)
            cond = (job.sampled_c_glb[[it.index for it in items]] if job.sampled_c_glb is not None
                    else item_conditions(items, job.sources.c_glb, settings.mix))
            images = next(sample_batches(pipeline, cond, [it.seed for it in items], batch_size=len(items),
                                         num_inference_steps=settings.num_inference_steps,
                                         guidance_scale=settings.guidance_scale))
            for item, image in zip(items, to_uint8_array(images[:, 0])):
                writer.submit(image_path(out, item.index), image)
            bar.update(len(items))
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        write_outputs(out, job.plan, job.sources, job.names, settings, pipeline, source,
                      0 if settings.strategy == "sampled" else preview_rows)  # no source to show beside them
    state.wait_for_everyone()
    return out
