"""`dinodiff probe-encoder`: how much an encoder's global tokens (c_GLB) know, on labelled images it never saw.

For each encoder (a folder, hub id, or `random:<family>`), on the same images:
- **which images**: by default only those that no probed encoder trained on (encoder/probe_data.py: the
  `training_images.json` each `pretrain-encoder` folder records); encoders without a record are labelled
  unknown, and `transductive=True` probes every image, labelled transductive;
- **labels**: k-NN and linear-probe ROC AUC of each binary label (positive vs negative; missing and
  uncertain left out), stratified k-fold cross-validation with scikit-learn, grouped by subject when subjects
  repeat; mean and SD over folds (encoder/probe_metrics.py);
- **view invariance**: augmented-view retrieval, the top-1 accuracy of finding the other view of the same
  image among all 2N views (cosine similarity of mean-centred features), with views from a *held-out*
  augmentation family that pretraining never applies (encoder/views.py): the reported invariance measure.
  The same retrieval with the pretraining augmentation (encoder/augment.py) is kept as the *pretext*
  measure: it scores the encoder on its own training objective.
Features are the flattened c_GLB (the tokens that condition the diffusion model), computed in eval mode.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dinodiff.encoder.augment import PRETRAINING_FAMILY, global_views
from dinodiff.encoder.probe_data import (
    ProbeImages,
    ProbeSelection,
    load_probe_images,
    select_probe_images,
)
from dinodiff.encoder.probe_metrics import grouped, knn_auc, linear_auc, retrieval_top1
from dinodiff.encoder.probe_table import (
    TABLE_NAME,
    VIEW_NOTE,
    markdown_table,
    table_rows,
)
from dinodiff.encoder.settings import ProbeSettings
from dinodiff.encoder.views import heldout_views
from dinodiff.files import write_bytes_atomic
from dinodiff.models.encoders import GlobalTokenEncoder, load_encoder
from dinodiff.models.factory import RANDOM_PREFIX, resolve_encoder_path
from dinodiff.models.training_images import TrainingImages
from dinodiff.results import Results, write_results

logger = logging.getLogger(__name__)

__all__ = ["ProbeSettings", "embed", "knn_auc", "linear_auc", "markdown_table", "probe_encoders", "probe_one",
           "retrieval_top1"]


@torch.no_grad()
def embed(encoder: GlobalTokenEncoder, images: torch.Tensor, batch_size: int = 64, tokens: str = "all") -> np.ndarray:
    """uint8 or [0, 1] float images (N, 1, S, S) -> flattened c_GLB features (N, tokens x dim), or CLS only."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        c_glb = encoder(x)
        out.append((c_glb[:, 0] if tokens == "cls" else c_glb.flatten(1)).cpu())
    return torch.cat(out).numpy()


Views = dict[str, tuple[torch.Tensor, torch.Tensor]]


def make_views(images: torch.Tensor, settings: ProbeSettings) -> Views:
    """Two views of each image (seeds `seed` and `seed + 1`), the same for every encoder: 'heldout' from the
    held-out family (the reported invariance), 'pretext' from the pretraining global-crop augmentation."""
    size = images.shape[-1]
    return {"heldout": (heldout_views(images, settings.heldout_views, settings.seed),
                        heldout_views(images, settings.heldout_views, settings.seed + 1)),
            "pretext": (global_views(images, settings.augment, size, settings.seed),
                        global_views(images, settings.augment, size, settings.seed + 1))}


def probe_one(encoder: GlobalTokenEncoder, data: ProbeImages, views: Views, settings: ProbeSettings) -> dict:
    """Label AUCs (k-NN, linear) per label, held-out and pretext view retrieval top-1, for one encoder."""
    feats = embed(encoder, data.images, settings.batch_size, settings.tokens)
    groups = data.groups()
    labels = {}
    for name in _label_names(data, settings):
        known = ~np.isnan(data.labels[name])
        x, y, g = feats[known], data.labels[name][known], groups[known]
        knn = knn_auc(x, y, settings.k, settings.folds, settings.seed, g)
        lin = linear_auc(x, y, settings.C, settings.folds, settings.seed, g)
        labels[name] = {"positives": int(y.sum()), "negatives": int((y == 0).sum()),
                        "knn_auc": knn[0], "knn_auc_sd": knn[1], "linear_auc": lin[0], "linear_auc_sd": lin[1]}
    top1 = {kind: retrieval_top1(*(embed(encoder, v, settings.batch_size, settings.tokens) for v in pair))
            for kind, pair in views.items()}
    return {"labels": labels, "view_top1": top1["heldout"], "pretext_view_top1": top1["pretext"],
            "view_count": 2 * len(views["heldout"][0]), "feature_dim": feats.shape[1]}


def _label_names(data: ProbeImages, settings: ProbeSettings) -> list[str]:
    if settings.labels:
        missing = [n for n in settings.labels if n not in data.labels]
        if missing:
            raise ValueError(f"Labels {missing} not in the probe data; it has {sorted(data.labels)}.")
        return list(settings.labels)
    keep = []
    for name, y in data.labels.items():
        if np.nansum(y) >= settings.min_count and np.sum(y == 0) >= settings.min_count:
            keep.append(name)
    return keep


def _load(name: str) -> tuple[GlobalTokenEncoder, TrainingImages | None]:
    """The encoder and its training images: its record, none for `random:` encoders, None when unknown."""
    encoder = load_encoder(resolve_encoder_path(name))
    if name.startswith(RANDOM_PREFIX):
        return encoder, TrainingImages()
    return encoder, encoder.training_images


def probe_encoders(encoders: list[str], sources: list[str | Path], out: str | Path | None,
                   settings: ProbeSettings | None = None) -> Results:
    """Probe every encoder on the same images and views; writes OUT/results.json and OUT/table.md.

    The record's data holds every number: `encoders` (per encoder: protocol, labels, view retrieval), the probe
    images (`probe_images`), the cross-validation and the views' descriptions.
    """
    settings = settings or ProbeSettings()
    if len(set(encoders)) != len(encoders):
        raise ValueError(f"An encoder is named twice in {encoders}: name each once.")
    loaded = load_probe_images(sources, settings.size, settings.label_columns)
    models = {name: _load(name) for name in encoders}
    selection = select_probe_images(loaded, {n: models[n][1] for n in encoders}, settings.transductive)
    data = loaded.subset(selection.keep)
    views = make_views(data.images if not settings.views else data.images[: settings.views], settings)
    results = _header(sources, loaded, data, selection, settings)
    for name in encoders:
        encoder, record = models[name]
        logger.info("probing %s (%s, %d px)", name, encoder.family, encoder.image_size)
        protocol, seen = selection.protocol(name)
        results["encoders"][name] = {"protocol": protocol, "probe_images_seen_in_pretraining": seen,
                                     "training_record": _record_summary(record),
                                     **probe_one(encoder, data, views, settings)}
    provenance = {"data": results["data"], "encoders": list(encoders), "seeds": [settings.seed],
                  "probe images": results["probe_images"]["statement"], "cross-validation": results["cross_validation"],
                  "command": "dinodiff probe-encoder " + " ".join(encoders)
                  + (" --transductive" if settings.transductive else "")}
    record = Results(kind="encoder-probe", title="Encoder probe: label AUCs and view retrieval", provenance=provenance,
                     tables={TABLE_NAME: table_rows(results)}, note=f"{results['probe_images']['statement']}. {VIEW_NOTE}",
                     data=results)
    if out is not None:
        folder = Path(out)
        write_results(folder, record)
        write_bytes_atomic(folder / "table.md", markdown_table(results).encode())
    return record


def _header(sources: list[str | Path], loaded: ProbeImages, data: ProbeImages, selection: ProbeSelection,
            settings: ProbeSettings) -> dict:
    folds = "stratified k-fold, grouped by subject" if grouped(data.groups()) else "stratified k-fold (by image)"
    return {"data": [str(s) for s in sources], "num_images": len(data.ids),
            "probe_images": {"statement": selection.statement(), "count": len(data.ids), "loaded": len(loaded.ids),
                             "left_out": len(loaded.ids) - len(data.ids), "transductive": settings.transductive,
                             "ids": list(data.ids)},
            "cross_validation": folds,
            "views": {"heldout": {"measure": "reported invariance", **settings.heldout_views.describe()},
                      "pretext": {"measure": "pretext: the pretraining augmentation (global crop 2)",
                                  "family": list(PRETRAINING_FAMILY)}},
            "settings": asdict(settings), "encoders": {}}


def _record_summary(record: TrainingImages | None) -> dict | None:
    if record is None:
        return None
    return {"count": record.count, "shards": record.shards, "split": record.split, "step": record.step}
