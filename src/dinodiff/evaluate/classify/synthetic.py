"""The synthetic training sets of a classification grid, made with `dinodiff.generate` and keyed on the model.

The model: `synthetic.model` through `dinodiff.runs.resolve_model` (a run's selected ``best/model`` first, else
its newest checkpoint). Synthetic sets and synthetic cells are keyed on the model's identity (resolved path +
sha256 of its weight and config files) and the generation settings, so a changed model or setting makes new
sets and reruns the synthetic cells, while real-only and control cells stay cached.

Every arm sees exactly ``ratio x |training real images|`` synthetic images in every fold, none made from a
validation image (which early stopping sees):

- reconstruction: one set per regime from the whole subset, ``ratio`` variations of each source; a fold keeps
  the variations of its own training sources only (exact, since each source has exactly ``ratio``);
- interpolation: one set per regime x repetition seed x fold, planned from that fold's training sources only
  (``ratio x |train|`` interpolations, each source anchoring ``ratio`` of them; see `dinodiff.interpolate`).

Layout: ``SYN/m<key>/nN/reconstruction-xR/`` and ``SYN/m<key>/nN/interpolation-xR/sSEED-fFOLD/``, where SYN is
`synthetic.folder` or ``OUT/synthetic``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dinodiff.evaluate.classify.images import ImageSet, load_synthetic, source_options
from dinodiff.evaluate.classify.settings import ClassifySettings
from dinodiff.evaluate.classify.subsets import read_subset, subset_path
from dinodiff.generate import GenerateSettings, generate_dataset
from dinodiff.runs import model_identity, resolve_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticModel:
    """The model every synthetic set of a grid is made with, and the key naming its sets and cells."""

    given: str  # synthetic.model as given
    folder: str  # the model folder used
    chosen: str  # how it was chosen (a run's best/model, its newest checkpoint, ...)
    sha256: str  # over the folder's weight and config files
    key: str  # 12 hex digits of (identity, generation settings)


def synthetic_model(settings: ClassifySettings) -> SyntheticModel:
    """Select and identify `synthetic.model` (hashing its weights once) and log which model is used."""
    syn = settings.synthetic
    choice = resolve_model(str(syn.model))
    if not choice.path.exists():
        raise FileNotFoundError(f"synthetic.model={syn.model}: no such folder (a hub id cannot be hashed; download the "
                                "model and give its folder).")
    chosen, identity = choice.how, model_identity(choice.path)
    made_with = {"model": identity.key, "steps": syn.num_inference_steps, "guidance": syn.guidance_scale,
                 "scheduler": syn.scheduler, "seed": syn.seed}
    key = hashlib.sha256(json.dumps(made_with, sort_keys=True).encode()).hexdigest()[:12]
    logger.info("synthetic model: %s (%s; sha256 %s); its sets and cells are keyed m%s", identity.path, chosen,
                identity.sha256[:16], key)
    return SyntheticModel(str(syn.model), identity.path, chosen, identity.sha256, key)


def set_folder(settings: ClassifySettings, key: str, regime: int, strategy: str, ratio: int, seed: int,
               fold: int) -> Path:
    """Where the set a cell trains on lives (interpolation: one per repetition seed and fold)."""
    root = Path(settings.synthetic.folder) if settings.synthetic.folder else Path(settings.out) / "synthetic"
    folder = root / f"m{key}" / f"n{regime}" / f"{strategy}-x{ratio}"
    return folder / f"s{seed}-f{fold}" if strategy == "interpolation" else folder


def _wanted(settings: ClassifySettings, strategy: str, ratio: int, ids: list[str]) -> GenerateSettings:
    syn = settings.synthetic
    return GenerateSettings(strategy=strategy, ratio=ratio, seed=syn.seed, num_inference_steps=syn.num_inference_steps,
                            guidance_scale=syn.guidance_scale, scheduler=syn.scheduler,
                            source_options={**source_options(settings.data), "ids": sorted(ids)})


def complete(folder: Path, wanted: GenerateSettings) -> bool:
    """`folder` holds a finished set made with exactly `wanted` (from the same sources)."""
    path = folder / "provenance.json"
    if not path.is_file():
        return False
    record, want = json.loads(path.read_text()), json.loads(json.dumps(asdict(wanted), default=str))
    have = record.get("settings") or {}
    # a set made before GenerateSettings gained a field matches when this grid leaves that field at its default
    defaults = json.loads(json.dumps(asdict(GenerateSettings()), default=str))
    return bool(record.get("complete")) and all(have.get(k, defaults.get(k)) == v for k, v in want.items())


def _ensure(settings: ClassifySettings, model: SyntheticModel, folder: Path, wanted: GenerateSettings) -> bool:
    """Generate `folder` unless complete (generate resumes a partial set); decode it once. True when generated."""
    made = not complete(folder, wanted)
    if made:
        logger.info("generating %s x%d from %d sources into %s", wanted.strategy, wanted.ratio,
                    len(wanted.source_options["ids"]), folder)
        generate_dataset(model.folder, settings.data.source, folder, wanted, batch_size=settings.synthetic.batch_size,
                         preview_rows=0, progress=False)
    load_synthetic(folder, settings.classifier.image_size)  # decode once, before the cells run
    return made


def make_synthetic(settings: ClassifySettings, real: ImageSet, model: SyntheticModel) -> int:
    """Every synthetic set the grid needs (see the module doc); returns how many were generated now."""
    made, syn = 0, settings.synthetic
    for n in settings.regimes:
        for ratio in syn.ratios:
            if "reconstruction" in syn.strategies:
                subset = read_subset(subset_path(Path(settings.out) / "subsets", n, settings.seeds[0]))
                folder = set_folder(settings, model.key, n, "reconstruction", ratio, 0, 0)
                made += _ensure(settings, model, folder,
                                _wanted(settings, "reconstruction", ratio, [real.ids[r] for r in subset.rows]))
            if "interpolation" not in syn.strategies:
                continue
            for seed in settings.seeds:
                subset = read_subset(subset_path(Path(settings.out) / "subsets", n, seed))
                for fold in range(settings.folds):
                    train, _ = subset.split(fold)
                    folder = set_folder(settings, model.key, n, "interpolation", ratio, seed, fold)
                    made += _ensure(settings, model, folder,
                                    _wanted(settings, "interpolation", ratio, [real.ids[r] for r in train]))
    return made


def training_rows(syn: ImageSet, strategy: str, ratio: int, train_ids: set[str]) -> np.ndarray:
    """Rows of `syn` a fold trains on: images made from its training sources only, exactly ratio x |train|."""
    assert syn.source_a is not None and syn.source_b is not None
    made_from = [{a, b} for a, b in zip(syn.source_a, syn.source_b)]
    rows = np.array([i for i, sources in enumerate(made_from) if sources <= train_ids], dtype=np.int64)
    if strategy == "interpolation" and len(rows) != len(made_from):
        raise RuntimeError("an interpolation set holds images made from sources outside its fold's training images; "
                           "delete it and rerun")
    if len(rows) != ratio * len(train_ids):
        raise RuntimeError(f"{strategy} x{ratio}: {len(rows)} synthetic images for {len(train_ids)} training images, "
                           f"not {ratio * len(train_ids)} (a source could not be read by generate?)")
    return rows
