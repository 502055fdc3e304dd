"""Figure-5-style overlays of the segment stage: per method and dataset, the best and worst report-split images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinodiff.evaluate.segment.metrics import hungarian_scores
from dinodiff.files import atomic_path


def pick(records: Sequence[dict], dataset: str, n: int) -> list[int]:
    """Indices of the n best then the n worst records of ``dataset`` (by Hungarian both-lung Dice)."""
    idx = [i for i, r in enumerate(records) if r["dataset"] == dataset]
    idx.sort(key=lambda i: -records[i]["hungarian"]["both"])
    best, worst = idx[:n], [i for i in idx[::-1][:n] if i not in idx[:n]]
    return best + worst[::-1]


def _draw_row(axes: Any, case: Any, rec: dict, lab: np.ndarray, kind: str) -> None:
    match = hungarian_scores(lab, case.lungs)["segments"]
    for ax in axes:
        ax.imshow(case.image, cmap="gray", vmin=0, vmax=255)
        ax.set_axis_off()
    for name, colour in (("left", "tab:red"), ("right", "tab:blue")):
        if name in case.lungs:
            for ax in (axes[0], axes[2]):
                ax.contour(case.lungs[name], levels=[0.5], colors=colour, linewidths=1)
    axes[1].imshow(lab % 20, cmap="tab20", alpha=0.55, vmin=0, vmax=19, interpolation="nearest")
    fill = np.zeros((*lab.shape, 4))
    for name, rgba in (("left", (1, 0.2, 0.2, 0.45)), ("right", (0.2, 0.4, 1, 0.45))):
        if name in match:
            fill[lab == match[name]] = rgba
    axes[2].imshow(fill, interpolation="nearest")
    axes[0].set_title(f"{kind}: {case.id[:22]}", fontsize=7)
    axes[1].set_title(f"{rec['n_segments']} segments", fontsize=7)
    axes[2].set_title(f"Dice {100 * rec['hungarian']['both']:.1f}", fontsize=7)


def write_overlays(out: Path, name: str, label: str, cases: Sequence[Any], records: Sequence[dict], n: int,
                   compute: Callable[[list], list[tuple[np.ndarray, dict]]]) -> dict[str, str]:
    """OUT/overlays/<name>-<dataset>.png per dataset: image + ground truth, all segments, matched lungs.

    ``records`` and ``cases`` are aligned (the report split); ``compute`` re-runs the method on chosen cases.
    """
    import matplotlib  # as the other stages' figures: the backend is chosen only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        chosen = pick(records, dataset, n)
        labels = [lab for lab, _ in compute([cases[i] for i in chosen])]
        fig, axes = plt.subplots(len(chosen), 3, figsize=(6.0, 2.1 * len(chosen)), squeeze=False)
        for row, (i, lab) in enumerate(zip(chosen, labels)):
            _draw_row(axes[row], cases[i], records[i], lab, "best" if row < min(n, len(chosen)) else "worst")
        fig.suptitle(f"{dataset} (report split): ground truth | {label} segments | matched lungs", fontsize=8)
        fig.tight_layout()
        path = out / "overlays" / f"{name}-{dataset}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=80, format="png")
        plt.close(fig)
        paths[f"{name}-{dataset}"] = str(path)
    return paths
