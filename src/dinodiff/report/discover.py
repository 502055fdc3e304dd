"""Find the results files under a run or work folder (recursively), without importing any stage."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinodiff.results import RESULTS_FILE, Results, ResultsError, read_results

logger = logging.getLogger(__name__)

# Folders that hold bulk data, never results: not descended into.
SKIP_DIRS = {"images", "shards", "checkpoints", "cells", "fid-cache", "trainer", "model", "logs", "dinodiff",
             "__pycache__", "node_modules", "masks", "raw"}
# A `dinodiff classify` grid (grid.json) keeps its inputs beside its results: synthetic sets (one per regime,
# ratio and, for interpolation, fold), decoded images and subsets. Its results.json reports them; they are not
# sections of their own.
GRID_INPUT_DIRS = {"synthetic", "cache", "subsets"}
MAX_DEPTH = 8
NOT_RECORDS = {"provenance.json", "manifest.json", "cache.json", "model_index.json", "best.json", "grid.json",
               "config.json", "state.json", "training_images.json"}
MAX_JSON_BYTES = 50_000_000


@dataclass
class Found:
    """What lies under the report's root folder."""

    root: Path
    runs: list[Path] = field(default_factory=list)
    generated: list[tuple[Path, dict]] = field(default_factory=list)  # (folder, provenance.json)
    results: list[tuple[Path, Results]] = field(default_factory=list)  # every results record (dinodiff.results)
    problems: list[str] = field(default_factory=list)  # unreadable files, said on the page


def read_json(path: Path, problems: list[str]) -> dict | None:
    """A JSON object, or None (with the reason added to `problems`) when the file is unreadable."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            problems.append(f"{path}: larger than {MAX_JSON_BYTES} bytes, not read")
            return None
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problems.append(f"{path}: not readable JSON ({err}); rerun the stage that wrote it")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: a JSON {type(data).__name__}, not an object; ignored")
        return None
    return data


def is_run(names: set[str], dirs: set[str]) -> bool:
    return "config.yaml" in names and ("metrics.csv" in names or "checkpoints" in dirs)


def _visit(folder: Path, names: set[str], dirs: set[str], found: Found) -> None:
    if is_run(names, dirs):
        found.runs.append(folder)
    if "provenance.json" in names:
        data = read_json(folder / "provenance.json", found.problems)
        if data is not None:
            found.generated.append((folder, data))
    for name in sorted(n for n in names if n.endswith(".json")):
        if name in NOT_RECORDS or (name != RESULTS_FILE and (folder / name).stat().st_size > 1_000_000):
            continue  # a record under another name (`dinodiff fid --out fid.json`) is small; big JSON files are data
        if name != RESULTS_FILE and "kind" not in (read_json(folder / name, []) or {}):
            continue  # some other JSON file
        try:
            found.results.append((folder / name, read_results(folder / name)))
        except ResultsError as err:
            if name == RESULTS_FILE:  # another JSON file with a "kind" (an encoder's metadata) is not a record
                found.problems.append(str(err))


def discover(root: str | Path) -> Found:
    """Walk `root` (depth <= 8, skipping image/shard/checkpoint folders) and collect every results file."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; give a training run folder or a work folder "
                                "(e.g. demo-output/) holding stage outputs.")
    found = Found(root)
    for current, dirs, files in os.walk(root):
        folder = Path(current)
        depth = len(folder.relative_to(root).parts)
        _visit(folder, set(files), set(dirs), found)
        skip = SKIP_DIRS | (GRID_INPUT_DIRS if "grid.json" in files else set())
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith(".") and depth < MAX_DEPTH)
    logger.info("found %d run(s), %d generated set(s), %d results record(s) under %s", len(found.runs),
                len(found.generated), len(found.results), root)
    return found


def resolve_file(base: Path, value: Any) -> Path | None:
    """A file named in a results file: absolute, relative to `base`, or (moved folders) by its trailing parts."""
    if not isinstance(value, str) or not value:
        return None
    path = Path(value)
    if path.is_absolute() and path.is_file():
        return path
    parts = path.parts[1:] if path.is_absolute() else path.parts
    for i in range(len(parts)):
        candidate = base.joinpath(*parts[i:])
        if candidate.is_file():
            return candidate
    return None
