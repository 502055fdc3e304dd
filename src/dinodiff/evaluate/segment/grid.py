"""The grid's cells: UNet passes (one per image, timestep and noise draw), every cell's label maps, the cache.

For one model and one group of timesteps, the passes give (a) the DiffSeg aggregated attention averaged over
the passes and (b) the outputs of the encoder's self-attention layers (DiffCut's features) and the inputs of
every self-attention layer (the features of ncut-inputs and ncut-superpixels), L2-normalised per pass and
concatenated, so that their cosine similarity is the mean of the passes' similarities. Each cell's per-image scores
are cached in ``OUT/cells/`` (a re-run only computes the missing cells).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dinodiff.evaluate.segment.attention import AttentionModel, capture_pass, prepare_pass
from dinodiff.evaluate.segment.data import SegCase
from dinodiff.evaluate.segment.diffcut import diffcut, pool_superpixels, superpixel_ncut
from dinodiff.evaluate.segment.diffseg import (
    aggregate_attention,
    attention_entropy,
    diffseg,
    map_side,
)
from dinodiff.evaluate.segment.metrics import score_labels, split_components, superpixel_segments
from dinodiff.evaluate.segment.settings import CUT_FEATURES, CUT_METHODS, Cell, SegmentSettings
from dinodiff.files import write_bytes_atomic

log = logging.getLogger(__name__)
CELL_VERSION = 4  # 4: cells have a node scale (ncut-superpixels)
Labels = list[tuple[np.ndarray, dict]]


@dataclass
class Passes:
    """What the passes over one batch give: aggregated attention (B, N, N), averaged over the passes, and the
    cuts' features per method and map side (0 = the last layer): (B, N, C x passes)."""

    attention: torch.Tensor
    features: dict[str, dict[int, torch.Tensor]]


def feature_layers(names: Sequence[str], sides: Sequence[int]) -> dict[int, str]:
    """Self-attention layers (in call order) -> the one each side reads: 0 = the last one (DiffCut: the
    encoder's final self-attention, its choice), s = the last one whose map is s x s."""
    if not names:
        raise ValueError("this UNet's encoder (down blocks) has no self-attention layer: DiffCut needs one "
                         "(use a UNet with CrossAttnDownBlock2D).")
    return {0: names[-1], **dict(zip(sides, names))}  # a later layer of the same side replaces an earlier one


def _per_side(layers: dict[str, torch.Tensor], into: dict[int, list]) -> None:
    names = list(layers)
    for side, name in feature_layers(names, [map_side(layers[n].shape[1]) for n in names]).items():
        into.setdefault(side, []).append(F.normalize(layers[name], dim=-1))


def _images_tensor(cases: Sequence[SegCase]) -> torch.Tensor:
    return torch.from_numpy(np.stack([c.image for c in cases])).float().div(255.0)[:, None]


def run_passes(model: AttentionModel, images: torch.Tensor, timesteps: Sequence[int], settings: SegmentSettings,
               cuts: Sequence[str], dtype: torch.dtype) -> Passes:
    """Every (timestep, noise draw) pass over ``images``, with the features of the cut methods ``cuts``; see
    :class:`Passes`."""
    seeds = list(settings.noise_seeds) or [None]
    sources = {CUT_FEATURES[method] for method in cuts}  # two cuts on the same features share them
    attention, feats = None, {source: {} for source in sources}
    prepared = prepare_pass(model, images, settings.condition)  # encoded once for every pass
    for t in timesteps:
        for seed in seeds:
            cap = capture_pass(model, images, timestep=int(t), condition=settings.condition, noise_seed=seed,
                               dtype=dtype, features="outputs" in sources, inputs="inputs" in sources,
                               prepared=prepared)
            agg = aggregate_attention(list(cap.maps.values()), dtype=dtype)
            attention = agg if attention is None else attention.add_(agg)
            for source, layers in (("outputs", cap.features), ("inputs", cap.inputs)):
                if source in sources:
                    _per_side(layers, feats[source])
    attention.div_(len(timesteps) * len(seeds))
    joined = {source: {side: torch.cat(parts, dim=-1) for side, parts in by_side.items()}
              for source, by_side in feats.items()}
    return Passes(attention, {method: joined[CUT_FEATURES[method]] for method in cuts})


def label_cell(cell: Cell, passes: Passes, b: int, image: np.ndarray, settings: SegmentSettings,
               done: dict[Cell, tuple] | None = None, nodes: dict[tuple, tuple] | None = None) -> tuple:
    """One image's label map and info for one cell; ``done`` holds this image's unrefined maps, so that a
    refined cell reuses its method's map instead of running the method again, and ``nodes`` its superpixels and
    their pooled features, shared by the cells that differ only in tau and alpha."""
    plain = dataclasses.replace(cell, refine="none")
    if done is None or plain not in done:
        result = _method_labels(plain, passes, b, image, settings, {} if nodes is None else nodes)
        if done is None:
            done = {}
        done[plain] = result
    labels, info = done[plain]
    if cell.refine == "components":
        labels = torch.from_numpy(split_components(labels.cpu().numpy()))
    return labels, dict(info)


def _superpixel_nodes(cell: Cell, features: torch.Tensor, image: np.ndarray,
                      nodes: dict[tuple, tuple]) -> tuple[np.ndarray, np.ndarray]:
    """The image's superpixels at the cell's scale and the features pooled over them, computed once per image,
    scale and feature map: Felzenszwalb takes ~45 ms per 256 px image and pooling upsamples every channel."""
    key = (cell.grid, cell.scale)
    if key not in nodes:
        superpixels = superpixel_segments(image, cell.scale)
        nodes[key] = superpixels, pool_superpixels(features.detach(), superpixels)
    return nodes[key]


def _method_labels(cell: Cell, passes: Passes, b: int, image: np.ndarray, settings: SegmentSettings,
                   nodes: dict[tuple, tuple]) -> tuple:
    shape = image.shape
    if cell.method in CUT_METHODS:
        features = passes.features[cell.method]
        if cell.grid not in features:
            where = "encoder self-attention" if cell.method == "diffcut" else "self-attention"
            raise ValueError(f"no {where} map of side {cell.grid} (sides: {sorted(s for s in features if s)}); "
                             "use --feature-sides 0 for the final one.")
        if cell.method == "ncut-superpixels":
            superpixels, pooled = _superpixel_nodes(cell, features[cell.grid][b], image, nodes)
            labels, found = superpixel_ncut(pooled, superpixels, cell.threshold, cell.alpha)
            return labels, {"feature_segments": found, "superpixels": int(superpixels.max()) + 1}
        labels, found = diffcut(features[cell.grid][b], cell.threshold, cell.alpha, shape)
        return labels, {"feature_segments": found}
    labels, used = diffseg(passes.attention[b], cell.grid, [cell.threshold] * settings.merge_iterations, shape,
                           mode=settings.threshold_mode)
    return labels, {"thresholds": [round(t, 6) for t in used]}


def segment_cases(model: AttentionModel, cases: Sequence[SegCase], cells: Sequence[Cell],
                  settings: SegmentSettings) -> dict[Cell, Labels]:
    """Label maps and per-image info for every cell (all with the same timesteps) from the batched passes."""
    timesteps = {c.timesteps for c in cells}
    if len(timesteps) != 1:
        raise ValueError(f"segment_cases takes cells of one timestep group, got {sorted(timesteps)}")
    half = model.device.type == "cuda"  # fp16 maps on GPU: half the memory of the 4-D attention tensor
    dtype = torch.float16 if half else torch.float32
    cuts = sorted({c.method for c in cells if c.method in CUT_METHODS})
    side_needed = max((c.grid for c in cells if c.method == "diffseg"), default=0)
    results: dict[Cell, Labels] = {c: [] for c in cells}
    for start in range(0, len(cases), settings.batch_size):
        batch = cases[start:start + settings.batch_size]
        images = _images_tensor(batch)
        passes = run_passes(model, images, next(iter(timesteps)), settings, cuts, dtype)
        side = map_side(passes.attention.shape[-1])
        if side_needed > side:
            raise ValueError(f"grid size {side_needed} larger than the model's largest self-attention map "
                             f"({side}x{side}) at {images.shape[-1]} px: use --grid-size <= {side}.")
        for b, case in enumerate(batch):
            entropy, max_entropy = attention_entropy(passes.attention[b])
            done: dict[Cell, tuple] = {}
            nodes: dict[tuple, tuple] = {}
            for cell in cells:
                labels, info = label_cell(cell, passes, b, case.image, settings, done, nodes)
                info.update(entropy=round(entropy, 4), max_entropy=round(max_entropy, 4))
                results[cell].append((labels.cpu().numpy(), info))
    return results


def record(case: SegCase, labels: np.ndarray, extra: dict | None = None) -> dict:
    """One image's scores (Hungarian per lung and both, union, best single segment) and its identity."""
    score = score_labels(labels, case.lungs)
    hung = {k: v for k, v in score["hungarian"].items() if k != "segments"}
    return {"id": case.id, "dataset": case.dataset, "n_segments": score["n_segments"], "hungarian": hung,
            "union": {k: v for k, v in score["union"].items() if k != "n_segments"}, "single": score["single"],
            **(extra or {})}


def _cell_path(out: Path, cell: Cell, settings: SegmentSettings) -> Path:
    s = settings
    noise = "" if not s.noise_seeds else "_noise" + "-".join(str(n) for n in s.noise_seeds)
    params = (f"g{cell.grid}_{s.threshold_mode[:3]}{cell.threshold:g}x{s.merge_iterations}" if cell.method == "diffseg"
              else f"side{cell.grid}_tau{cell.threshold:g}_alpha{cell.alpha:g}")
    if cell.method == "ncut-superpixels":
        params += f"_scale{cell.scale:g}"
    refine = "" if cell.refine == "none" else f"_{cell.refine}"
    name = f"{cell.method}_t{cell.timestep_label}_{params}{refine}_{s.condition}{noise}_r{s.resolution}.json"
    return out / "cells" / cell.model / name


def _cell_key(cell: Cell, settings: SegmentSettings, images: str, model_path: Path) -> dict:
    return {"version": CELL_VERSION, **asdict(cell), **settings.cell_settings(), "images": images,
            "model_path": str(model_path.resolve())}


def _read_cell(path: Path, key: dict) -> list[dict] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data["images"] if data.get("key") == json.loads(json.dumps(key)) else None


def run_grid(models: Sequence[Path], cases: Sequence[SegCase], out: Path, settings: SegmentSettings,
             load: Callable[[Path], AttentionModel], label: Callable[[Path], str]) -> dict[Cell, list[dict]]:
    """Every cell's per-image records, from the cache where it is complete, else computed and cached."""
    images = hashlib.sha1(json.dumps([(c.dataset, c.id) for c in cases]).encode()).hexdigest()[:12]
    table: dict[Cell, list[dict]] = {}
    for path in models:
        for group in settings.timestep_groups():
            todo = []
            for cell in settings.method_cells(label(path), group):
                cached = _read_cell(_cell_path(out, cell, settings), _cell_key(cell, settings, images, path))
                if cached is None:
                    todo.append(cell)
                else:
                    table[cell] = cached
            if not todo:
                continue
            started = time.perf_counter()
            for cell, items in segment_cases(load(path), cases, todo, settings).items():
                table[cell] = [record(c, labels, info) for c, (labels, info) in zip(cases, items)]
                body = {"key": _cell_key(cell, settings, images, path), "images": table[cell]}
                write_bytes_atomic(_cell_path(out, cell, settings), json.dumps(body, indent=1).encode())
            log.info("%s t=%s: %d cells on %d images in %.1f s", label(path), todo[0].timestep_label, len(todo),
                     len(cases), time.perf_counter() - started)
    return table
