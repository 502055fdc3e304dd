"""The report's building blocks (sections of figures and tables) and its figures (matplotlib, PNG bytes)."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 3_000_000  # larger images are downscaled before embedding
MAX_IMAGE_SIDE = 2400


@dataclass
class Figure:
    title: str
    data: bytes  # PNG or JPEG
    caption: str = ""
    source: Path | None = None  # the file it came from (None: drawn by the report)
    pixelated: bool = False  # small images (sample grids) are scaled up without blurring


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class Markdown:
    """Markdown text written by a stage (e.g. `dinodiff segment`'s table.md)."""

    title: str
    text: str
    source: Path | None = None


@dataclass
class Code:
    title: str
    text: str
    source: Path | None = None


@dataclass
class Section:
    key: str  # a kind: config, training, fid, samples, reconstruction, interpolation, segment, ...
    title: str
    source: Path  # the folder or file it was built from
    blocks: list[Any] = field(default_factory=list)
    provenance: dict[str, str] = field(default_factory=dict)
    headline: dict[str, str] = field(default_factory=dict)
    note: str = ""  # information
    warning: str = ""  # something the reader should fix (a file named but absent, ...)


@dataclass
class Missing:
    key: str
    title: str
    command: str


def fmt(value: Any) -> str:
    """A cell: floats to 4 significant digits, lists/dicts compactly, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    return str(value)


def rows_table(title: str, rows: Sequence[Any]) -> Table:
    """A table from row dicts (columns in first-seen order); other rows become a single column."""
    header: list[str] = []
    for row in rows:
        for key in row if isinstance(row, dict) else ["value"]:
            if key not in header:
                header.append(str(key))
    body = [[fmt(row.get(k)) if isinstance(row, dict) else fmt(row) for k in header] for row in rows]
    return Table(title, header, body)


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """{'a.b': 'value'} for nested dicts (provenance tables)."""
    if not isinstance(data, dict):
        return {prefix or "value": fmt(data)}
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) and value else {name: fmt(value)})
    return out


# ----------------------------------------------------------------------------------- images
def image_mime(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    return None


def data_uri(data: bytes) -> str:
    mime = image_mime(data)
    if mime is None:
        raise ValueError("not a PNG or JPEG image")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_figure(path: Path, title: str, caption: str = "", grid: bool = False) -> Figure | None:
    """A figure from an image file (downscaled when large), or None when the file is not a readable image.

    `grid`: a grid of small images (samples, previews), scaled up without blurring."""
    from PIL import Image

    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            if len(data) > MAX_IMAGE_BYTES or max(size) > MAX_IMAGE_SIDE or image_mime(data) is None:
                image.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
                buffer = io.BytesIO()
                image.convert("RGB" if image.mode not in ("L", "RGB", "RGBA") else image.mode).save(buffer, "PNG")
                data = buffer.getvalue()
    except (OSError, ValueError, SyntaxError) as err:
        logger.warning("%s is not a readable image (%s); left out of the report", path, err)
        return None
    return Figure(title, data, caption, source=path, pixelated=grid and max(size) <= 1600)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    return buffer.getvalue()


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average (shorter windows at the ends), so the smoothed curve does not lag the loss."""
    half = window // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def loss_figure(steps: Sequence[int], loss: Sequence[float], lr: Sequence[float] | None,
                checkpoints: Sequence[int], best: int | None, quantity: str = "loss", run: str = "") -> bytes:
    """Training loss (raw and smoothed) by step, checkpoints ticked, the best checkpoint marked; lr beside it.
    `quantity` names the loss on the axis (e.g. "MSE(v, prediction)", "DINO loss"), `run` the run in the title."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if lr else 1, figsize=(10 if lr else 6.5, 3.6), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2, 1] if lr else [1]})
    ax = axes[0][0]
    window = max(3, len(loss) // 25) | 1
    if len(loss) >= 30:
        ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
        ax.plot(steps, moving_average(loss, window), color="tab:blue", linewidth=2,
                label=f"moving average ({window} logs)")
    else:
        ax.plot(steps, loss, "o-", color="tab:blue", linewidth=2, markersize=3, label="loss")
    for i, step in enumerate(checkpoints):
        ax.axvline(step, color="grey", alpha=0.25, linewidth=1, label="checkpoint" if i == 0 else None)
    if best is not None:
        ax.axvline(best, color="tab:red", linestyle="--", linewidth=1.5, label=f"best checkpoint (step {best})")
    if min(loss) > 0:
        ax.set_yscale("log")
    ax.set(xlabel="training step", ylabel=quantity, title=f"{quantity}: {run}" if run else quantity)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if lr:
        axes[0][1].plot(steps, lr, color="tab:green")
        axes[0][1].set(xlabel="training step", ylabel="learning rate", title=f"Learning rate: {run}" if run else
                       "Learning rate")
        axes[0][1].grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)
