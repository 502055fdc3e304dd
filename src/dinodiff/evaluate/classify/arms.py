"""The arms of a classification grid (experiment, strategy, ratio), the control each synthetic arm is compared
with, and their names in tables and figures.

Controls (real images repeated, so that only the count differs): augmentation at ratio r trains on (1 + r) n
images and is compared with `control` (real repeated to (1 + r) n); full-synthetic at ratio r trains on r n and
is compared with `control-full` (real repeated to r n). A control-full cell that would repeat another cell is
not trained: at r = 1 it is the real-only cell, and at r when the grid has the control at r - 1 (real x r too)
it is that control; the comparison uses those cells and says so.
"""

from __future__ import annotations

from collections.abc import Container

Setup = tuple[str, str, int]  # experiment, strategy, ratio
REAL: Setup = ("real", "-", 0)
ORDER = {"real": 0, "control": 1, "control-full": 2, "augmentation": 3, "full-synthetic": 4}  # table rows


def same_cells_as(setup: Setup, ratios: Container[int], experiments: Container[str]) -> Setup | None:
    """The cells a control-full arm would duplicate (real x r): real only at r = 1, else the control at r - 1
    when the grid trains it; None when it must be trained itself (or for any other arm)."""
    experiment, _, ratio = setup
    if experiment != "control-full":
        return None
    if ratio == 1:
        return REAL
    return ("control", "-", ratio - 1) if ratio - 1 in ratios and "control" in experiments else None


def matched_control(setup: Setup, ratios: Container[int], experiments: Container[str]) -> Setup | None:
    """The arm whose cells are the control with the same training count as a synthetic arm; None for the others."""
    experiment, _, ratio = setup
    if experiment == "augmentation":
        return ("control", "-", ratio)
    if experiment == "full-synthetic":
        full = ("control-full", "-", ratio)
        return same_cells_as(full, ratios, experiments) or full
    return None


def arm_name(setup: Setup) -> str:
    """The label of an arm in tables and figures; a control says which arm it matches and how it is made."""
    experiment, strategy, ratio = setup
    if experiment == "real":
        return "real only"
    if experiment == "control":
        return f"control for augmentation 1:{ratio} (real x{1 + ratio})"
    if experiment == "control-full":
        return f"control for full-synthetic 1:{ratio} (real x{ratio})"
    return f"{experiment} {strategy} 1:{ratio}"


def control_name(setup: Setup, control: Setup | None) -> str | None:
    """How a synthetic arm's matched control is named; one that reuses other cells says so."""
    if control is None:
        return None
    if setup[0] == "full-synthetic" and control[0] != "control-full":
        return f"{arm_name(control)} (= control for full-synthetic 1:{setup[2]}, real x{setup[2]}: the same cells)"
    return arm_name(control)
