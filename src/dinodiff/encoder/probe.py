"""`dinodiff probe-encoder`: how much an encoder's global tokens (c_GLB) know, on labelled images.

For each encoder (a folder, hub id, or `random:<family>`), on the same images:
- **labels**: k-NN and linear-probe ROC AUC of each binary label (positive vs negative; missing and
  uncertain left out), stratified k-fold cross-validation with scikit-learn; mean and SD over folds;
- **view invariance**: augmented-view retrieval, the top-1 accuracy of finding the other view of the same
  image among all 2N views (cosine similarity of mean-centred features), views drawn with the pretraining
  global-crop augmentation (encoder/augment.py), identically for every encoder.
Features are the flattened c_GLB (the tokens that condition the diffusion model), computed in eval mode.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dinodiff.data.sources import iter_sources
from dinodiff.encoder.augment import global_views
from dinodiff.encoder.settings import AugmentSettings
from dinodiff.files import write_bytes_atomic, write_json_atomic
from dinodiff.models.encoders import GlobalTokenEncoder, load_encoder
from dinodiff.models.factory import resolve_encoder_path

logger = logging.getLogger(__name__)


@dataclass
class ProbeSettings:
    size: int = 128  # side at which images are read (each encoder resizes to its own input)
    labels: list[str] | None = None  # None = every label with >= min_count positives and negatives
    label_columns: list[str] | None = None  # CSV sources: columns holding labels (e.g. ['finding'])
    min_count: int = 10
    folds: int = 5
    k: int = 10  # neighbours of the k-NN probe (cosine, distance-weighted)
    C: float = 0.1  # inverse L2 strength of the logistic-regression probe (standardised features)
    views: int = 0  # images used for view retrieval (0 = all)
    tokens: str = "all"  # all = the flattened c_GLB; cls = its first token only
    seed: int = 0
    batch_size: int = 64
    augment: AugmentSettings = field(default_factory=AugmentSettings)


@dataclass
class ProbeImages:
    ids: list[str]
    images: torch.Tensor  # uint8 (N, 1, S, S)
    labels: dict[str, np.ndarray]  # name -> (N,) float: 1 / 0 / nan (missing or uncertain)


def load_probe_images(sources: list[str | Path], size: int, label_columns: list[str] | None = None) -> ProbeImages:
    """Images and labels of prepared shards, labelled CSVs or dataset folders (see dinodiff.data.sources).

    label_columns: for a CSV, the columns to read labels from (a text column such as `finding` becomes one
    0/1 label per value); None = the CSV's 0/1 columns."""
    items = []
    for src in sources:
        options = {"label_columns": label_columns} if label_columns and str(src).endswith(".csv") else {}
        items.extend(iter_sources(src, size=size, **options))
    if not items:
        raise FileNotFoundError(f"No images in {[str(s) for s in sources]}; give prepared shards or a labelled CSV.")
    names = sorted({n for it in items for n in it.labels})
    labels = {n: np.array([_binary(it.labels.get(n)) for it in items], dtype=float) for n in names}
    images = torch.from_numpy(np.stack([it.image for it in items]))[:, None]
    return ProbeImages([it.id for it in items], images, labels)


def _binary(value: float | None) -> float:
    return float(value) if value in (0.0, 1.0) else float("nan")


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


def knn_auc(features: np.ndarray, y: np.ndarray, k: int = 10, folds: int = 5, seed: int = 0) -> tuple[float, float]:
    """Cross-validated ROC AUC (mean, SD over folds) of a cosine, distance-weighted k-NN on standardised features."""
    model = make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance"))
    return _cv_auc(model, features, y, folds, seed)


def linear_auc(features: np.ndarray, y: np.ndarray, C: float = 0.1, folds: int = 5, seed: int = 0) -> tuple[float, float]:
    """Cross-validated ROC AUC (mean, SD over folds) of L2 logistic regression on standardised features."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))
    return _cv_auc(model, features, y, folds, seed)


def _cv_auc(model, features: np.ndarray, y: np.ndarray, folds: int, seed: int) -> tuple[float, float]:
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(model, features, y.astype(int), cv=cv, scoring="roc_auc")
    return float(scores.mean()), float(scores.std())


def retrieval_top1(view_a: np.ndarray, view_b: np.ndarray) -> float:
    """Fraction of the 2N views whose nearest other view (cosine, features centred on the 2N mean) is their pair."""
    feats = np.concatenate([view_a, view_b]).astype(np.float64)
    feats = feats - feats.mean(axis=0, keepdims=True)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True).clip(1e-12)
    sim = feats @ feats.T
    np.fill_diagonal(sim, -np.inf)
    n = len(view_a)
    partner = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
    return float((sim.argmax(axis=1) == partner).mean())


def make_views(images: torch.Tensor, settings: ProbeSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmented global views of each image (seeds `seed` and `seed + 1`): the same for every encoder."""
    size = images.shape[-1]
    return (global_views(images, settings.augment, size, settings.seed),
            global_views(images, settings.augment, size, settings.seed + 1))


def probe_one(encoder: GlobalTokenEncoder, data: ProbeImages, views: tuple[torch.Tensor, torch.Tensor],
              settings: ProbeSettings) -> dict:
    """Label AUCs (k-NN, linear) per label and view retrieval top-1 for one encoder."""
    feats = embed(encoder, data.images, settings.batch_size, settings.tokens)
    labels = {}
    for name in _label_names(data, settings):
        known = ~np.isnan(data.labels[name])
        x, y = feats[known], data.labels[name][known]
        knn = knn_auc(x, y, settings.k, settings.folds, settings.seed)
        lin = linear_auc(x, y, settings.C, settings.folds, settings.seed)
        labels[name] = {"positives": int(y.sum()), "negatives": int((y == 0).sum()),
                        "knn_auc": knn[0], "knn_auc_sd": knn[1], "linear_auc": lin[0], "linear_auc_sd": lin[1]}
    top1 = retrieval_top1(embed(encoder, views[0], settings.batch_size, settings.tokens),
                          embed(encoder, views[1], settings.batch_size, settings.tokens))
    return {"labels": labels, "view_top1": top1, "view_count": 2 * len(views[0]), "feature_dim": feats.shape[1]}


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


def probe_encoders(encoders: list[str], sources: list[str | Path], out: str | Path | None,
                   settings: ProbeSettings | None = None) -> dict:
    """Probe every encoder on the same images and views; writes OUT/results.json and OUT/table.md."""
    settings = settings or ProbeSettings()
    data = load_probe_images(sources, settings.size, settings.label_columns)
    subset = data.images if not settings.views else data.images[: settings.views]
    views = make_views(subset, settings)
    results = {"kind": "encoder-probe", "title": "Encoder probe: label AUCs and view retrieval",
               "data": [str(s) for s in sources], "num_images": len(data.ids), "settings": _settings_dict(settings),
               "encoders": {}}
    for name in encoders:
        encoder = load_encoder(resolve_encoder_path(name))
        logger.info("probing %s (%s, %d px)", name, encoder.family, encoder.image_size)
        results["encoders"][name] = probe_one(encoder, data, views, settings)
    # The report's results.json convention (dinodiff.report): one row per encoder and label, and provenance.
    results["table"] = table_rows(results)
    results["provenance"] = {"data": results["data"], "encoders": list(encoders), "seeds": [settings.seed],
                             "command": "dinodiff probe-encoder " + " ".join(encoders)}
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "results.json", results)
        write_bytes_atomic(folder / "table.md", markdown_table(results).encode())
    return results


def table_rows(results: dict) -> list[dict]:
    """One row per encoder and label, for the report page."""
    rows = []
    for name, res in results["encoders"].items():
        for label, r in res["labels"].items():
            rows.append({"encoder": name, "label": f"{label} ({r['positives']}/{r['negatives']})",
                         "k-NN AUC": f"{r['knn_auc']:.3f} ± {r['knn_auc_sd']:.3f}",
                         "linear AUC": f"{r['linear_auc']:.3f} ± {r['linear_auc_sd']:.3f}",
                         "view top-1": f"{res['view_top1']:.3f} (of {res['view_count']})"})
    return rows


def markdown_table(results: dict) -> str:
    rows = ["| encoder | label (pos/neg) | k-NN AUC | linear AUC | view top-1 |", "|---|---|---|---|---|"]
    for name, res in results["encoders"].items():
        view = f"{res['view_top1']:.3f} (of {res['view_count']})"
        for label, r in res["labels"].items() or {"-": None}.items():
            if r is None:
                rows.append(f"| {name} | - | - | - | {view} |")
                continue
            rows.append(f"| {name} | {label} ({r['positives']}/{r['negatives']}) | {r['knn_auc']:.3f} ± "
                        f"{r['knn_auc_sd']:.3f} | {r['linear_auc']:.3f} ± {r['linear_auc_sd']:.3f} | {view} |")
    return "\n".join(rows) + "\n"


def _settings_dict(settings: ProbeSettings) -> dict:
    return asdict(settings)
