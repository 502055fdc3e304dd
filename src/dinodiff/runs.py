"""The RUN/ layout: checkpoint folders (atomic, newest complete one, keep-last-K) and resume; RUN/best/ and the one
best-checkpoint policy (`keep_best`); the one rule for the model a run, checkpoint or folder names
(`resolve_model`: best/ first, then the newest checkpoint); and a model folder's identity (`model_identity`).

Layout of ``RUN/checkpoints/checkpoint-STEP/``: accelerate's state (model, optimizer, lr scheduler,
RNG), ``trainer/`` (step, EMA weights, per-rank noise-generator states) and ``model/`` (an
inference-ready model folder). A checkpoint is written under a hidden temporary name and renamed
when complete, so a killed run never leaves a half-written ``checkpoint-STEP``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinodiff.config import save_config
from dinodiff.files import atomic_folder, write_json_atomic

logger = logging.getLogger(__name__)

# What the trainer calls at a checkpoint when train.eval_every > 0: (its model folder, the step) -> named scores, the
# first of which decides RUN/best/ (the FID hook of `dinodiff.evaluate.fid.sweep.make_fid_hook` is one).
EvalHook = Callable[[Path, int], dict]

_NAME = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"
CONFIG_FILE = "config.yaml"  # a run's resolved settings, written by start_run


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = _NAME.match(path.name)
            if match and (path / "trainer" / "state.json").is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """'auto'/'latest' -> newest checkpoint (None when there is none; 'latest' then fails), 'none' -> None, else a path."""
    if resume in ("none", "", None):
        return None
    if resume in ("auto", "latest"):
        found = latest_checkpoint(run_dir)
        if found is None and resume == "latest":
            raise FileNotFoundError(f"--resume latest: no complete checkpoint under {checkpoint_dir(run_dir)}.")
        return found
    path = Path(resume)
    if not (path / "trainer" / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete dinodiff checkpoint (no trainer/state.json).")
    return path


def resume_checkpoint(accelerator: Any, run_dir: Path, resume: str, restore_own: Callable[[Path, dict], None]) -> int:
    """Resume from the checkpoint `resume` names (see resolve_resume) and return its step, or 0 for a fresh start.

    Restores accelerate's state (models, optimizer, RNG), then calls ``restore_own(checkpoint, state)``, state being
    its trainer/state.json, for what is the caller's own (EMA, teacher, lr schedule) in ``checkpoint/trainer/``.
    """
    found = resolve_resume(run_dir, resume)
    if found is None:
        return 0
    state = json.loads((found / "trainer" / "state.json").read_text())
    if state["num_processes"] != accelerator.num_processes:
        logger.warning("checkpoint was written by %d processes, resuming with %d: the data stream differs "
                       "from an uninterrupted run.", state["num_processes"], accelerator.num_processes)
    accelerator.load_state(str(found))
    restore_own(found, state)
    logger.info("resumed from %s at step %d", found, int(state["step"]))
    return int(state["step"])


def start_run(accelerator: Any, run_dir: Path, config: Any, wait: Callable[[], None] | None = None) -> None:
    """On the main process: create RUN/, remove what a killed checkpoint save left and write RUN/config.yaml
    (`config`, a settings dataclass or a dict); then `wait` (default: every process) for it."""
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(run_dir)
        save_config(config, run_dir / CONFIG_FILE)
    (wait or accelerator.wait_for_everyone)()


def save_checkpoint(accelerator: Any, run_dir: Path, step: int, keep_last: int, write_own: Callable[[Path], None],
                    state: dict | None = None, wait: Callable[[], None] | None = None) -> Path:
    """Write ``RUN/checkpoints/checkpoint-STEP`` from every process and return it.

    accelerate's state first (models, optimizer, RNG), then ``write_own(staging)`` on every process (each writes
    its own part under ``staging/trainer/``, which exists), then on the main process ``trainer/state.json``
    (step, process count and ``state``) last, since its presence marks the checkpoint complete, the rename into
    place and pruning to `keep_last`. `wait` is the barrier between these steps (default: every process).
    """
    wait = wait or accelerator.wait_for_everyone
    accelerator.wait_for_everyone()
    staging = _staging_path(run_dir, step)
    if accelerator.is_main_process:
        staging_dir(run_dir, step)
    wait()
    accelerator.save_state(str(staging))
    (staging / "trainer").mkdir(exist_ok=True)
    write_own(staging)
    wait()
    final = staging.parent / f"checkpoint-{step}"
    if accelerator.is_main_process:
        write_json_atomic(staging / "trainer" / "state.json",
                          {"step": step, "num_processes": accelerator.num_processes, **(state or {})})
        final = commit(staging, step)
        prune(run_dir, keep_last, protect=[final])
        logger.info("saved %s", final)
    wait()
    return final


def _staging_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"{TMP_PREFIX}{step}"


def staging_dir(run_dir: Path, step: int) -> Path:
    """A fresh temporary folder for checkpoint `step` (left-overs of a killed save are removed)."""
    tmp = _staging_path(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(staging: Path, step: int) -> Path:
    final = staging.parent / f"checkpoint-{step}"
    if final.exists():  # re-saving a step (e.g. after a resume at the very end): replace it whole
        shutil.rmtree(final)
    staging.rename(final)
    return final


def prune(run_dir: Path, keep_last: int, protect: Iterable[Path] = ()) -> None:
    """Delete all but the newest `keep_last` checkpoints (and any stale temporary folders)."""
    protect = {Path(p).resolve() for p in protect}
    found = list_checkpoints(run_dir)
    for _, path in found[: max(0, len(found) - keep_last)]:
        if path.resolve() not in protect:
            shutil.rmtree(path, ignore_errors=True)


def remove_stale_staging(run_dir: Path) -> None:
    root = checkpoint_dir(run_dir)
    if root.is_dir():
        for path in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


class MetricsLog:
    """Append-only ``metrics.csv``; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = Path(path), fields

    def truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        with self.path.open(newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= step]
        self._write(rows, mode="w")

    def append(self, row: dict) -> None:
        self._write([row], mode="a")

    def _write(self, rows: list[dict], mode: str) -> None:
        new = mode == "w" or not self.path.is_file() or self.path.stat().st_size == 0
        with self.path.open(mode, newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows(rows)


# ------------------------------------------------------------------------------------------- best/
def keep_best(run_dir: str | Path, model_folder: str | Path, record: dict) -> bool:
    """The one best-checkpoint policy: RUN/best/ holds the checkpoint with the lowest value of its metric, the
    earlier step on a tie; a record of another metric (another feature space, split or sample size: FIDs are not
    comparable across them) is replaced. `record`: step, metric, value, scores. Returns whether best/ changed.
    """
    current = read_best(run_dir)
    if current is not None and current.get("metric") == record["metric"] and (
            (current["value"], current["step"]) <= (record["value"], record["step"])):
        return False
    if not Path(model_folder).is_dir():
        logger.warning("best checkpoint (step %s) is gone (pruned?): %s; RUN/best/ left as it is.", record["step"],
                       model_folder)
        return False
    best = Path(run_dir) / "best"
    with atomic_folder(best) as tmp:
        shutil.copytree(model_folder, tmp / "model")
        write_json_atomic(tmp / "best.json", record)
    return True


def read_best(run_dir: str | Path) -> dict | None:
    """RUN/best/best.json (the record keep_best wrote); None when the run has no best model yet."""
    path = Path(run_dir) / "best" / "best.json"
    return json.loads(path.read_text()) if path.is_file() else None


# ------------------------------------------------------------------------------- resolving a model
MODEL_MARKER = "model_index.json"  # what a pipeline model folder holds
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the Hugging Face hub spells a repository


@dataclass(frozen=True)
class ModelChoice:
    """The model a path names: where it is (a folder, or a hub id as given) and how it was chosen."""

    location: str
    how: str

    @property
    def path(self) -> Path:
        return Path(self.location)


def resolve_model(path: str | Path, marker: str = MODEL_MARKER) -> ModelChoice:
    """The one rule for the model a path names, by the folder holding `marker` (a pipeline's model_index.json by
    default; an embedding model's or an encoder's file for those):

    the folder itself; a run's selected ``best/model`` (see keep_best), else its newest complete checkpoint's
    ``model/``; a checkpoint's (or RUN/best's) ``model/``. A path that is not on disk is a hub id, returned as given.
    """
    path = Path(path)
    if not path.exists():
        if HUB_ID.match(str(path)):
            return ModelChoice(str(path), "a hub id (not on this disk)")
        raise FileNotFoundError(f"model not found: {path} (give a model folder, a checkpoint, a run folder or a "
                                "hub id such as owner/name).")
    newest = latest_checkpoint(path)
    candidates = [(path, "the folder given"), (path / "best" / "model", _best_how(path)),
                  *([(newest / "model", f"the run's newest checkpoint ({newest.name}; no best/ holds this model)")]
                    if newest is not None else []),
                  (path / "model", f"the model/ of {path.name}")]
    if marker == MODEL_MARKER and not (path / marker).is_file() and (path / "unet" / "config.json").is_file():
        return ModelChoice(str(path), "a diffusers components folder (unet/ without model_index.json)")
    for folder, how in candidates:
        if (folder / marker).is_file():
            if "TEST split" in how:
                logger.warning("%s/best was selected on the TEST split: numbers reported on that split are biased; "
                               "select on 'val' (`dinodiff prepare --val-fraction`, then `dinodiff sweep`).", path)
            logger.info("model of %s: %s (%s)", path, folder, how)
            return ModelChoice(str(folder), how)
    kind = "run without a complete checkpoint yet" if (path / "checkpoints").is_dir() else "folder"
    raise FileNotFoundError(f"{path} is a {kind}: no {marker} in it, its best/model, newest checkpoint or model/ "
                            "(give a model folder, a checkpoint or a run folder).")


def _best_how(run_dir: Path) -> str:
    record = read_best(run_dir)
    if not record:
        return "the run's selected best/model"
    split = (record.get("scores") or {}).get("split")
    on = f" on the {'TEST' if split == 'test' else repr(split)} split" if split else ""
    return f"the run's selected best/model (step {record.get('step')}, lowest {record.get('metric')}{on})"


def run_models(path: str | Path) -> list[Path]:
    """Every model a path names, oldest first: a run -> each complete checkpoint's model/; anything else -> the
    one `resolve_model` gives (for grids over a run's checkpoints)."""
    path = Path(path)
    if (path / "checkpoints").is_dir() and not (path / MODEL_MARKER).is_file():
        found = [checkpoint / "model" for _, checkpoint in list_checkpoints(path)]
        if not found:
            raise FileNotFoundError(f"{path} is a run folder without complete checkpoints yet.")
        return found
    return [resolve_model(path).path]


def run_config(model_folder: str | Path) -> Path | None:
    """The config.yaml of the run a model folder lies in (RUN/checkpoints/checkpoint-N/model, RUN/best/model, or
    the model folder of a checkpoint being written), or None for a folder outside a run."""
    folder = Path(model_folder).resolve()
    for parent in list(folder.parents)[:3]:
        if (parent / CONFIG_FILE).is_file():
            return parent / CONFIG_FILE
    return None


def checkpoint_step(path: str | Path) -> int | None:
    """The training step of a checkpoint a path lies in (``.../checkpoint-STEP/...``), else None."""
    for part in reversed(Path(path).parts):
        match = _NAME.match(part)
        if match:
            return int(match.group(1))
    return None


# --------------------------------------------------------------------------------- model identity
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".onnx")
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")  # component configs change what the weights compute


@dataclass(frozen=True)
class ModelIdentity:
    """What a model folder is: its resolved path and a sha256 over its weight (and config) files."""

    path: str
    sha256: str
    files: int

    @property
    def key(self) -> str:
        """A short name for everything made with this model (synthetic sets, cells): 12 hex digits."""
        return hashlib.sha256(f"{self.path}\n{self.sha256}".encode()).hexdigest()[:12]


_IDENTITIES: dict[tuple, ModelIdentity] = {}


def model_identity(folder: str | Path) -> ModelIdentity:
    """Identity of a model folder: resolved path + sha256 over its weight and config files (relative path and
    bytes of each, in sorted order). Computed once per process for unchanged files (keyed by size and mtime)."""
    root = Path(folder).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES + CONFIG_SUFFIXES)
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise FileNotFoundError(f"{root} holds no weight files ({', '.join(WEIGHT_SUFFIXES)}): not a model folder.")
    signature = (str(root), *((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if signature not in _IDENTITIES:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        _IDENTITIES[signature] = ModelIdentity(str(root), digest.hexdigest(), len(files))
    return _IDENTITIES[signature]
