"""The one results record: what every evaluation writes as ``results.json`` and all the report reads.

A record says what was measured (``kind``, ``title``), from what (``provenance``), and shows it as ``tables`` (each
a list of row dicts, Markdown text, or a ``.md``/``.csv`` file beside it), ``figures`` (PNG/JPEG files beside it),
a few ``headline`` numbers, a ``note`` and ``warnings``. The stage's own numbers for programs (cells, summaries,
settings) go under ``data``: the report never reads them, so a stage may change them freely.

    write_results(out, Results(kind="audit", title="Privacy audit", provenance={...}, tables={"DCR": rows}))

NaN and infinities become ``null`` (JSON has neither); the file is written atomically.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dinodiff.files import write_text_atomic

RESULTS_FILE = "results.json"
Table = list[dict[str, Any]] | str  # row dicts, Markdown text, or a .md/.csv file relative to the record


class ResultsError(ValueError):
    """A results.json that is not a results record; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Results:
    """One evaluation's results record (see the module docstring)."""

    kind: str  # the section it feeds: "classify", "segment", "audit", "encoder-probe", "fid", ...
    title: str
    provenance: dict[str, Any] = field(default_factory=dict)  # what the numbers come from: data, model, seeds, ...
    tables: dict[str, Table] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)  # name -> image file, relative to the record
    headline: dict[str, Any] = field(default_factory=dict)  # a few numbers shown first, each naming its quantity
    note: str = ""  # how to read the numbers
    warnings: tuple[str, ...] = ()  # what a reader must know before trusting them
    data: dict[str, Any] = field(default_factory=dict)  # the stage's own numbers (never read by the report)

    def __post_init__(self) -> None:
        if not self.kind or not isinstance(self.kind, str):
            raise ResultsError(f"a results record needs a kind, got {self.kind!r}")
        bad = [name for name, value in self.tables.items() if not isinstance(value, (list, str))]
        if bad:
            raise ResultsError(f"tables {bad} are neither row lists, Markdown nor file names")


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (no trailing newline); a cell's ``|`` is escaped and a line break becomes a space, so any
    text keeps its column."""
    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows])


def json_safe(value: Any) -> Any:
    """Plain JSON: NaN/inf -> None, numpy scalars/arrays and tuples -> Python numbers and lists, paths -> str."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(where: str | Path, results: Results) -> Path:
    """Write `results` to ``where/results.json`` (or to `where` when it names a .json file); returns the path."""
    where = Path(where)
    path = where if where.suffix == ".json" else where / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(json_safe(asdict(results)), indent=1, allow_nan=False) + "\n")
    return path


def read_results(path: str | Path) -> Results:
    """A results.json back as a Results; ResultsError when it is not one (no kind, or keys the record lacks)."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResultsError(f"{path}: not readable JSON ({err}); rerun the stage that wrote it.") from None
    if not isinstance(payload, dict) or not payload.get("kind"):
        raise ResultsError(f"{path}: no \"kind\": not a results record (written by an older dinodiff? rerun the "
                           "stage that wrote it).")
    unknown = sorted(set(payload) - set(Results.__dataclass_fields__))
    if unknown:
        raise ResultsError(f"{path}: keys {unknown} are not part of a results record; rerun the stage that wrote it.")
    payload["warnings"] = tuple(payload.get("warnings") or ())
    payload.setdefault("title", payload["kind"])
    try:
        return Results(**payload)
    except (TypeError, ResultsError) as err:
        raise ResultsError(f"{path}: {err}; rerun the stage that wrote it.") from None
