"""The RUN/ layout: checkpoint folders (atomic, newest complete one, keep-last-K), best/, and resolving a
run, checkpoint or model folder to the model folder a stage loads (`resolve_model`: newest checkpoint;
`selected_model`: best/ first), and a model folder's identity (`model_identity`: path + weight hash).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from dinodiff.config import save_config
from dinodiff.files import atomic_folder, write_json_atomic

logger = logging.getLogger(__name__)

# What the trainer calls at a checkpoint when train.eval_every > 0: (its model folder, the step) -> named scores, the
# first of which decides RUN/best/ (the FID hook of `dinodiff.evaluate.fid.sweep.make_fid_hook` is one).
EvalHook = Callable[[Path, int], dict]

_NAME = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"


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


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_resume(run_dir: Path, resume: str) -> Optional[Path]:
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
    state = read_json(found / "trainer" / "state.json")
    if state["num_processes"] != accelerator.num_processes:
        logger.warning("checkpoint was written by %d processes, resuming with %d: the data stream differs "
                       "from an uninterrupted run.", state["num_processes"], accelerator.num_processes)
    accelerator.load_state(str(found))
    restore_own(found, state)
    logger.info("resumed from %s at step %d", found, int(state["step"]))
    return int(state["step"])


def start_run(accelerator: Any, run_dir: Path, config: Any, wait: Callable[[], None] | None = None) -> None:
    """On the main process: create RUN/, remove what a killed checkpoint save left and write RUN/config.yaml
    (`config`, a DictConfig or a dict); then `wait` (default: every process) for it."""
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(run_dir)
        save_config(config, run_dir / "config.yaml")
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


def promote_to_best(run_dir: Path, model_folder: Path, record: dict) -> Path:
    """Replace RUN/best/ with a copy of `model_folder` (as model/) and `record` (as best.json), atomically."""
    best = Path(run_dir) / "best"
    with atomic_folder(best) as tmp:
        shutil.copytree(model_folder, tmp / "model")
        write_json_atomic(tmp / "best.json", record)
    return best


def read_best(run_dir: str | Path) -> Optional[dict]:
    """RUN/best/best.json (the record promote_to_best wrote); None when the run has no best model yet."""
    path = Path(run_dir) / "best" / "best.json"
    return read_json(path) if path.is_file() else None


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def resolve_model(model: str | Path) -> str:
    """A run folder -> its newest checkpoint's model/; a checkpoint folder -> its model/; anything else as given."""
    path = Path(model)
    if (path / "checkpoints").is_dir() and not (path / "model_index.json").is_file():
        found = newest_model(path)
        if found is None:
            raise FileNotFoundError(f"{path} is a run folder without a complete checkpoint yet.")
        logger.info("using the newest checkpoint of %s: %s", path, found.parent)
        return str(found)
    if (path / "model").is_dir() and (path / "trainer").is_dir():
        return str(path / "model")
    return str(model)


def selected_model(path: str | Path) -> tuple[Path, str]:
    """(model folder, how it was chosen) for a run, a checkpoint, RUN/best or a model folder.

    A run folder gives its selected model ``RUN/best/model`` when it has one (the checkpoint the sweep or
    training chose), else its newest complete checkpoint's model/. Unlike `resolve_model`, best/ comes first.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path} (give a model folder, a checkpoint or a run folder).")
    if (path / "model_index.json").is_file():
        return path, "model folder"
    best = path / "best" / "model"
    if (best / "model_index.json").is_file():
        record = read_best(path) or {}
        split = (record.get("scores") or {}).get("split")
        if split == "test":
            logger.warning("%s/best was selected on the TEST split: numbers reported on that split are biased; "
                           "select on 'val' (`dinodiff prepare --val-fraction`, then `dinodiff sweep`).", path)
        chosen = f" (step {record['step']}, by {record.get('metric', '?')} on the {split!r} split)" if split else ""
        return best, f"the run's selected best/model{chosen}"
    if (path / "checkpoints").is_dir():
        found = newest_model(path)
        if found is None:
            raise FileNotFoundError(f"{path} is a run folder without best/model or a complete checkpoint yet.")
        return found, f"the run's newest checkpoint ({found.parent.name}; the run has no best/model)"
    if (path / "model" / "model_index.json").is_file():
        return path / "model", f"the model/ of {path.name}"
    return path, "model folder"


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


def newest_model(run_dir: str | Path) -> Optional[Path]:
    """The model/ folder of the run's newest complete checkpoint; None when it has none."""
    found = latest_checkpoint(Path(run_dir))
    return None if found is None else found / "model"


def model_folders(path: str | Path) -> list[Path]:
    """The folders that may hold the model `path` names, to try in this order: a training run's newest checkpoint's
    model/, the folder itself, then its model/ (a checkpoint's, RUN/best/'s, a train-embeddings run's)."""
    path = Path(path)
    newest = newest_model(path) if (path / "checkpoints").is_dir() else None
    return ([newest] if newest is not None else []) + [path, path / "model"]


def checkpoint_models(path: str | Path) -> list[Path]:
    """Every model `path` names, oldest first: a run folder -> each complete checkpoint's model/; a checkpoint
    (or RUN/best/) -> its model/; any other folder (a model or pipeline folder) -> itself."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path} (give a model folder, a checkpoint or a run folder).")
    if (path / "checkpoints").is_dir():
        found = [checkpoint / "model" for _, checkpoint in list_checkpoints(path)]
        if not found:
            raise FileNotFoundError(f"{path} is a run folder without complete checkpoints yet.")
        return found
    if (path / "model").is_dir() and not (path / "unet").is_dir():
        return [path / "model"]
    return [path]
