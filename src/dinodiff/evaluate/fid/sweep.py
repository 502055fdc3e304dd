"""Score every checkpoint of a run by FID (the paper's Figure 3) and keep the best one.

Each checkpoint's model folder reconstructs the same fixed source images (fresh noise, the same seeds for
every checkpoint) and the samples are scored against the same real set, whose features are extracted
once and cached. Rows go to ``RUN/fid.csv`` (restartable: scored checkpoints are skipped), the curve to
``RUN/fid.png`` with the best checkpoint marked, and the best model to ``RUN/best/`` (the trainer's layout).
The trainer calls the same code every `train.eval_every` steps through :func:`make_fid_hook`, on every process:
each reconstructs its share of the source chunks (`spread.Spread`) and the main one scores them.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from dinodiff import runs
from dinodiff.config import FidSettings, TrainingSettings
from dinodiff.data.shards import available_splits
from dinodiff.devices import resolve_device
from dinodiff.evaluate.fid.features import FeatureExtractor, build_extractor
from dinodiff.evaluate.fid.images import list_images, load_images, select
from dinodiff.evaluate.fid.spread import Spread
from dinodiff.evaluate.fid.stage import cached_features, extract_features, scores
from dinodiff.files import atomic_path
from dinodiff.pipeline.sample import generate_reconstructions
from dinodiff.pipeline.sample import load_pipeline as load_generation_pipeline
from dinodiff.results import Results, write_results
from dinodiff.runs import EvalHook

logger = logging.getLogger(__name__)

FIELDS = ["step", "fid", "kid_mean", "kid_std", "extractor", "tap", "n_real", "n_fake", "per_source",
          "sample_steps", "seed", "split", "checkpoint", "seconds"]
# A row is reused, plotted and compared only with rows scored under the same settings.
SETTING_FIELDS = ["extractor", "tap", "n_real", "n_fake", "per_source", "sample_steps", "seed", "split"]
SELECTION_SPLITS = ("val", "train")  # what checkpoints are selected on by default, in order of preference
SOURCE_CHUNK = 64  # sources reconstructed per call: bounds memory whatever the number of sources


def real_set_of_run(run_dir: Path) -> str:
    """The run's training data (`data.shards` in its config.yaml); see selection_split for which of its splits."""
    config = Path(run_dir) / "config.yaml"
    shards = OmegaConf.load(config).data.shards if config.is_file() else None
    if not shards:
        raise FileNotFoundError(f"No real image set given and none found in {config}; pass the real images "
                                "(e.g. `--real prepared/`) or set eval.real.")
    return str(shards)


def selection_split(images: str | Path, requested: str | None) -> str | None:
    """The split of `images` that checkpoints are scored on: the one named, else 'val', else 'train'.

    Never 'test' unless it is named (then with a warning): classify and fid report on the test split, and a
    checkpoint chosen on it would bias them. None for images that are not a prepared folder (used as given).
    A named split the folder lacks is an error, never a silent fall-back to every shard.
    """
    splits = available_splits(images) if Path(images).is_dir() else []
    if not splits:
        return requested
    if requested:
        if requested not in splits:
            raise FileNotFoundError(f"{images} has no {requested!r} split (it has {', '.join(splits)}); choose one "
                                    "of those, or leave the split unset.")
        if requested == "test":
            logger.warning("selecting checkpoints on the TEST split of %s: numbers later reported on it (fid, "
                           "classify) are then biased; prepare with --val-fraction and select on 'val'.", images)
        return requested
    chosen = next((s for s in SELECTION_SPLITS if s in splits), None)
    if chosen is None:
        raise FileNotFoundError(f"{images} has only {', '.join(splits)} shards; name the split to select on.")
    if chosen == "train":
        logger.warning("%s has no 'val' split: checkpoints are selected on training images (never on the test "
                       "split); `dinodiff prepare --val-fraction 0.1` gives a held-out validation split.", images)
    return chosen


class CheckpointScorer:
    """Scores model folders: reconstructions of fixed sources vs a fixed real set (set up on first use)."""

    def __init__(self, run_dir: str | Path, settings: FidSettings):
        self.run_dir, self.settings = Path(run_dir), settings
        self.real = settings.real or real_set_of_run(self.run_dir)
        self.sources = settings.sources or self.real
        self.split = selection_split(self.real, settings.split)
        self.source_split = selection_split(self.sources, settings.split)
        self.per_source, self.seed = settings.per_source, settings.seed
        self.batch_size = settings.batch_size
        self.device = resolve_device(settings.device)
        cache_dir = Path(settings.cache_dir) if settings.cache_dir else self.run_dir / "fid-cache"
        self.cache_dir = cache_dir if settings.cache else None
        self._net: FeatureExtractor | None = None
        self._real_refs: list | None = None
        self._real_features: np.ndarray | None = None
        self._source_refs: list | None = None

    @property
    def net(self) -> FeatureExtractor:
        if self._net is None:
            self._net = build_extractor(self.settings.extractor, self.settings.weights, self.device)
        return self._net

    def real_refs(self) -> list:
        if self._real_refs is None:
            self._real_refs = select(list_images(self.real, self.split), self.settings.num_real, self.seed)
        return self._real_refs

    def real_features(self) -> np.ndarray:
        if self._real_features is None:
            self._real_features = cached_features(self.net, self.real_refs(), self.cache_dir, self.batch_size)
        return self._real_features

    def source_refs(self) -> list:
        """The fixed sources: the same seeded subset for every checkpoint (decoded chunk by chunk when used)."""
        if self._source_refs is None:
            self._source_refs = select(list_images(self.sources, self.source_split), self.settings.num_sources,
                                       self.seed)
        return self._source_refs

    def chunk_features(self, pipe, chunks: list[int]) -> dict[int, np.ndarray]:
        """Features of the reconstructions of the given source chunks (SOURCE_CHUNK sources each)."""
        refs, out = self.source_refs(), {}
        for index in chunks:
            sources = load_images(refs[index * SOURCE_CHUNK:(index + 1) * SOURCE_CHUNK], pipe.resolution)
            # One seed per chunk (not per call): every checkpoint sees the same noise for the same source.
            images = reconstruct(pipe, sources, per_source=self.per_source, seed=self.seed * 1_000_003 + index,
                                 steps=self.settings.sample_steps, batch_size=self.batch_size)
            out[index] = extract_features(self.net, images, self.batch_size)
        return out

    def row_settings(self, n_fake: int) -> dict:
        """The SETTING_FIELDS of a fid.csv row."""
        return {"extractor": self.net.name, "tap": self.net.tap, "n_real": len(self.real_refs()), "n_fake": n_fake,
                "per_source": self.per_source, "sample_steps": self.settings.sample_steps, "seed": self.seed,
                "split": self.split or "-"}

    def expected_settings(self) -> dict:
        return self.row_settings(len(self.source_refs()) * self.per_source)

    def score(self, model_folder: str | Path, step: int, spread: Spread | None = None) -> dict | None:
        """Generate from `model_folder`, extract features chunk by chunk, and return one fid.csv row.

        With `spread` over several processes, each makes its share of the chunks and only the main process
        (which alone extracts the real set) returns the row; the others return None.
        """
        start, spread = time.time(), spread or Spread()
        real = self.real_features() if spread.is_main else None
        pipe = load_pipeline(model_folder, self.device)
        chunks = -(-len(self.source_refs()) // SOURCE_CHUNK)
        mine = self.chunk_features(pipe, spread.share(chunks))
        del pipe
        shares = spread.gather(mine)
        if shares is None:
            return None
        merged = {index: feats for share in shares for index, feats in share.items()}
        fake_features = np.concatenate([merged[i] for i in range(chunks)])
        kid = {"kid_subsets": self.settings.kid_subsets, "kid_subset_size": self.settings.kid_subset_size}
        row = {"step": step, **scores(real, fake_features, seed=self.seed, **kid), **self.row_settings(len(fake_features)),
               "checkpoint": str(model_folder), "seconds": round(time.time() - start, 1)}
        logger.info("step %d: FID %.4f (%s:%s, %d real vs %d generated, %d process%s)", step, row["fid"],
                    row["extractor"], row["tap"], row["n_real"], row["n_fake"], spread.world,
                    "es" if spread.world > 1 else "")
        return row


# ----------------------------------------------------------------------------------- generation
def load_pipeline(model_folder: str | Path, device: torch.device, scheduler: str = "dpm"):
    """The checkpoint's DiNODiffusionPipeline with `dinodiff generate`'s default sampler, so the sweep scores what
    generation makes."""
    pipe = load_generation_pipeline(model_folder, scheduler, device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reconstruct(pipe, sources: torch.Tensor, *, per_source: int, seed: int, steps: int,
                batch_size: int) -> torch.Tensor:
    """`per_source` reconstructions of each source (the paper's strategy), (N * per_source, 1, H, W) in [0, 1]."""
    return generate_reconstructions(pipe, sources, per_source=per_source, seed=seed, batch_size=batch_size,
                                    num_inference_steps=steps)


# ------------------------------------------------------------------------------- fid.csv, plot, best
def read_rows(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write fid.csv sorted by step, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: int(r["step"])))


def same_settings(row: dict, settings: dict) -> bool:
    return all(str(row.get(k)) == str(settings.get(k)) for k in SETTING_FIELDS)


def upsert(rows: list[dict], row: dict) -> list[dict]:
    """`rows` with `row` replacing any row of the same step and settings."""
    kept = [r for r in rows if not (int(r["step"]) == int(row["step"]) and same_settings(r, row))]
    return kept + [row]


def best_row(rows: list[dict]) -> dict | None:
    """The row with the lowest finite FID (earliest step on ties)."""
    finite = [r for r in rows if math.isfinite(float(r["fid"]))]
    return min(finite, key=lambda r: (float(r["fid"]), int(r["step"]))) if finite else None


def plot_fid(rows: list[dict], path: Path) -> Path:
    """FID against training step, the best checkpoint starred (the paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: int(r["step"]))
    steps, values = [int(r["step"]) for r in rows], [float(r["fid"]) for r in rows]
    best = best_row(rows)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(steps, values, "o-", color="tab:blue", label="checkpoint")
    if best is not None:
        ax.plot([int(best["step"])], [float(best["fid"])], "*", color="tab:red", markersize=16,
                label=f"best: step {best['step']}, FID {float(best['fid']):.3f}")
    first = rows[0]
    ax.set(xlabel="training step", ylabel=f"FID ({first['extractor']}:{first['tap']})",
           title=f"FID vs step: {first['n_real']} real vs {first['n_fake']} reconstructions")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def record(run_dir: Path, row: dict) -> tuple[list[dict], Path]:
    """Add `row` to RUN/fid.csv, redraw RUN/fid.png from the rows with its settings and write RUN/results.json."""
    path = Path(run_dir) / "fid.csv"
    rows = upsert(read_rows(path), row)
    write_rows(path, rows)
    current = [r for r in rows if same_settings(r, row)]
    figure = plot_fid(current, Path(run_dir) / "fid.png")
    write_results(run_dir, sweep_results(Path(run_dir), current))
    return current, figure


def sweep_results(run_dir: Path, rows: list[dict]) -> Results:
    """The sweep's results record: FID by checkpoint for one setting (fid.csv keeps every setting), best starred."""
    best = best_row(rows)
    table = [{"step": int(r["step"]), "FID/FD": f"{float(r['fid']):.4g}" + (" ★" if r is best else ""),
              "KID": f"{float(r['kid_mean']):.4g} ± {float(r['kid_std']):.2g}", "checkpoint": r.get("checkpoint", "")}
             for r in sorted(rows, key=lambda r: int(r["step"]))]
    setting = metric_name(best) if best else ""
    return Results(
        kind="fid", title=f"Image quality by checkpoint: {run_dir.name}",
        provenance={"run": str(run_dir), "fid.csv": str(run_dir / "fid.csv"), "metric": setting,
                    **{k: best.get(k, "") for k in ("extractor", "tap", "split", "n_real", "n_fake", "per_source",
                                                     "sample_steps", "seed") if best}},
        tables={f"FID by checkpoint: {setting}": table}, figures={f"FID by checkpoint: {run_dir.name}": "fid.png"},
        headline={f"best FID ({best['extractor']}:{best['tap']}, {best.get('split') or '-'}) of {run_dir.name}":
                  f"{float(best['fid']):.4g} @ step {best['step']}"} if best else {},
        note="★: the checkpoint RUN/best/ holds for this setting (lowest FID, the earlier step on a tie). FIDs of "
             "other feature spaces, splits or sample sizes are kept in fid.csv and are not comparable with these.")


def metric_name(row: dict) -> str:
    """What a FID is comparable with: the same features, split and sizes (RUN/best/ compares only these)."""
    return (f"fid {row['extractor']}:{row['tap']} on {row.get('split') or '-'} ({row['n_real']} real vs "
            f"{row['n_fake']} generated, {row['per_source']} per source, {row['sample_steps']} steps, seed {row['seed']})")


def best_scores(row: dict) -> dict:
    """A fid.csv row as the scores best.json (and the training hook) record; the first is the FID."""
    return {"fid": float(row["fid"]), "kid_mean": float(row["kid_mean"]), "kid_std": float(row["kid_std"]),
            "extractor": f"{row['extractor']}:{row['tap']}", "n_real": int(row["n_real"]),
            "n_fake": int(row["n_fake"]), "split": row.get("split") or "-", "metric": metric_name(row)}


def promote_best(run_dir: Path, best: dict) -> Path | None:
    """Offer the best row's checkpoint to RUN/best/ under the one policy (runs.keep_best); RUN/best/ when it holds
    that checkpoint now, None when it could not (the checkpoint was pruned)."""
    scores = best_scores(best)
    runs.keep_best(run_dir, best["checkpoint"], {"step": int(best["step"]), "metric": scores["metric"],
                                                 "value": scores["fid"], "scores": scores})
    current = runs.read_best(run_dir) or {}
    held = current.get("metric") == scores["metric"] and int(current.get("step", -1)) == int(best["step"])
    return Path(run_dir) / "best" if held else None


# ------------------------------------------------------------------------------------ entry points
def sweep(run_dir: str | Path, settings: FidSettings = FidSettings(), *, force: bool = False,
          update_best: bool = True) -> dict:
    """Score every complete checkpoint of `run_dir` (skipping ones already in fid.csv with the same settings).

    Returns {"rows", "best", "csv", "plot", "best_dir"}.
    """
    run_dir = Path(run_dir)
    checkpoints = runs.list_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"No complete checkpoints under {runs.checkpoint_dir(run_dir)}; train first "
                                "(`dinodiff train ...`) or point at a run folder.")
    scorer = CheckpointScorer(run_dir, settings)
    expected = scorer.expected_settings()
    done = {int(r["step"]) for r in read_rows(run_dir / "fid.csv") if same_settings(r, expected)}
    current: list[dict] = [r for r in read_rows(run_dir / "fid.csv") if same_settings(r, expected)]
    plot = run_dir / "fid.png"
    for step, path in checkpoints:
        if step in done and not force:
            logger.info("checkpoint %d already scored; skipping (force=True re-scores).", step)
            continue
        current, plot = record(run_dir, scorer.score(path / "model", step))
    if current and not plot.is_file():
        plot_fid(current, plot)
    best = best_row(current)
    best_dir = promote_best(run_dir, best) if (best is not None and update_best) else None
    return {"rows": current, "best": best, "csv": run_dir / "fid.csv", "plot": plot, "best_dir": best_dir}


def make_fid_hook(run_dir: str | Path, settings: FidSettings, timeout_s: float = 6 * 3600) -> EvalHook:
    """A train.py EvalHook: (model folder, step) -> best_scores (fid first, then kid, extractor, sizes, split and
    the comparable `metric` name); also updates RUN/fid.csv and RUN/fid.png.

    It runs on every process of a distributed run (`hook.all_ranks`): each reconstructs its share of the sources,
    the main process scores them and returns the scores (the others return {}); `timeout_s` bounds how long the
    others wait for it. The trainer keeps RUN/best/ itself from the returned "fid" (its first value).
    """
    scorer, spread = CheckpointScorer(run_dir, settings), Spread(timeout_s)

    def hook(model_folder: Path, step: int) -> dict:
        # Building extractors draws from the global RNG (random init before loading); keep training's stream intact.
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            row = scorer.score(model_folder, step, spread)
        if row is None:
            return {}
        record(Path(run_dir), row)
        return best_scores(row)

    hook.all_ranks = True  # type: ignore[attr-defined]
    return hook


def hook_from_config(cfg: TrainingSettings) -> EvalHook:
    """make_fid_hook from a run config's `eval` section (used when train.eval_every > 0)."""
    e = cfg.eval
    real = e.real or cfg.data.shards
    if not real:
        raise ValueError("train.eval_every > 0 needs real images for FID: set eval.real=<prepared folder or shards> "
                         "(data.shards is empty when training from a cache).")
    if cfg.train.eval_every % cfg.train.checkpoint_every:
        logger.warning("train.eval_every=%d is not a multiple of train.checkpoint_every=%d: FID runs only at "
                       "checkpoints that fall on a multiple of eval_every.", cfg.train.eval_every,
                       cfg.train.checkpoint_every)
    return make_fid_hook(cfg.train.run_dir, dataclasses.replace(e, real=str(real)),
                         timeout_s=cfg.train.eval_timeout_s)
