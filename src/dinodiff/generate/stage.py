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
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from tqdm.auto import tqdm

from dinodiff.data.shards import encode_png
from dinodiff.data.sources import label_names, positive_matrix
from dinodiff.embeddings.generation import sampled_conditions
from dinodiff.files import write_bytes_atomic
from dinodiff.generate.outputs import read_or_encode_sources, start_provenance, write_outputs
from dinodiff.generate.plan import GenerateSettings, image_path, item_conditions, plan_items
from dinodiff.generate.sample import load_pipeline, sample_batches
from dinodiff.pipeline import to_uint8_array

logger = logging.getLogger("dinodiff.generate")

SYNC_TIMEOUT_S = 6 * 3600  # how long the other processes wait while the main one works alone


def generate_dataset(model: str | Path, source: str | Path, out: str | Path, settings: GenerateSettings, *,
                     batch_size: int = 8, preview_rows: int = 4, progress: bool = True,
                     sync_timeout_s: float = SYNC_TIMEOUT_S) -> Path:
    """Write (or finish) a synthetic dataset in `out`; runs in every process under `accelerate launch`."""
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
