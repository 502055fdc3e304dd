"""The audit's tables (row dicts for results.json, audit.md and the report), warnings and headline numbers."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dinodiff.evaluate.audit import stats
from dinodiff.evaluate.audit.data import ImageSet, strategy_and_ratio
from dinodiff.evaluate.audit.spaces import FeatureSpace

logger = logging.getLogger(__name__)

TRAIN_REFERENCE, HOLDOUT_REFERENCE = "train->train", "holdout->train"


@dataclass
class Space:
    """A feature space and its real references (name -> DCR of each reference query)."""

    space: FeatureSpace
    references: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def primary(self) -> tuple[str, np.ndarray]:
        """holdout -> train when there is a held-out set (it is how unseen real images look), else train -> train."""
        name = HOLDOUT_REFERENCE if HOLDOUT_REFERENCE in self.references else TRAIN_REFERENCE
        return name, self.references[name]


def _with_ci(prefix: str, result: dict) -> dict:
    """{prefix: fraction, prefix_k: k, prefix_ci95_low, prefix_ci95_high}."""
    return {prefix: result["fraction"], f"{prefix}_k": result["k"], f"{prefix}_ci95_low": result["ci95_low"],
            f"{prefix}_ci95_high": result["ci95_high"]}


def dataset_rows(synthetic: ImageSet, spaces: list[Space], dcr: dict[str, np.ndarray]) -> list[dict]:
    """One row per feature space for a synthetic dataset (dcr: space name -> each image's DCR)."""
    strategy, ratio = strategy_and_ratio(synthetic)
    rows = []
    for sp in spaces:
        d = dcr[sp.space.name]
        ref_name, ref = sp.primary
        cal = stats.calibration(ref)
        row = {"dataset": Path(synthetic.name).name, "strategy": strategy, "ratio": ratio, "space": sp.space.name,
               **{f"dcr_{k}": v for k, v in stats.distribution(d).items()}, "reference": ref_name,
               "reference_n": cal["n"], "reference_p5": cal["p5"], "reference_p5_ci95_low": cal["p5_ci95_low"],
               "reference_p5_ci95_high": cal["p5_ci95_high"], "reference_too_small": cal["too_small"],
               **_with_ci("below_reference_p5", stats.below(d, cal["p5"])), "copy_threshold": cal["copy_threshold"],
               **_with_ci("flagged_copies", stats.below(d, cal["copy_threshold"]))}
        row["below_reference_p5 (95% CI)"] = fraction_text(row, "below_reference_p5")
        row["flagged_copies (95% CI)"] = fraction_text(row, "flagged_copies")
        for name, values in sp.references.items():
            row[f"below_p5[{name}]"] = stats.fraction_below(d, stats.quantile(values, stats.REFERENCE_QUANTILE))
        rows.append(row)
    return rows


def calibration_rows(spaces: list[Space], queries: dict[str, str]) -> list[dict]:
    """One row per space and reference: its DCR distribution, 5th percentile with its interval, copy threshold."""
    rows = []
    for sp in spaces:
        for name, values in sp.references.items():
            cal = stats.calibration(values)
            rows.append({"space": sp.space.name, "reference": name, "queries": queries.get(name, ""),
                         **{f"dcr_{k}": v for k, v in stats.distribution(values).items()},
                         **{k: v for k, v in cal.items() if k != "n"}})
    return rows


def memorisation_row(synthetic: ImageSet, space: str, own: np.ndarray, source_of: np.ndarray,
                     neighbour: np.ndarray) -> dict:
    """Reconstruction: per source, is one of its variations nearer it than its nearest other-patient image?

    own: each variation's distance to its source; source_of: that source's row; neighbour: each source row's DCR.
    """
    used = np.unique(source_of)
    result = stats.memorisation(own, np.searchsorted(used, source_of), neighbour[used])
    strategy, ratio = strategy_and_ratio(synthetic)
    return {"dataset": Path(synthetic.name).name, "strategy": strategy, "ratio": ratio, "space": space,
            **{k: v for k, v in result.items() if k != "ratios"},
            "memorised (95% CI)": ci_text(result["memorised"], result["sources"], result["memorised_fraction"],
                                          result["memorised_ci95_low"], result["memorised_ci95_high"])}


def warnings(spaces: list[Space], train_subjects: int, train_images: int) -> list[str]:
    """Plain sentences for what limits the numbers: a reference too small to calibrate, no patient ids."""
    out = []
    for sp in spaces:
        name, values = sp.primary
        warning = stats.reference_warning(name, sp.space.name, stats.calibration(values))
        if warning:
            out.append(warning)
    if train_subjects == 0:
        out.append("The training set has no patient ids (prepared metadata `subject`): train->train compares each "
                   "image with every other image, a patient's other images included, which pulls that reference "
                   "down. Prepare with subject ids (e.g. --subject-pattern).")
    elif train_subjects < train_images:
        out.append(f"{train_images - train_subjects} of {train_images} training images have no patient id: each is "
                   "taken as its own patient.")
    return out


def ci_text(k: int, n: int, fraction: float, low: float, high: float) -> str:
    """'k/n = f% [lo, hi]': a fraction and its 95% interval, in percent (empty without data)."""
    if not n or fraction is None or math.isnan(fraction):
        return ""
    return f"{k}/{n} = {100 * fraction:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def fraction_text(row: dict, prefix: str) -> str:
    """ci_text of a dataset row's fraction `prefix` (its k, ci95_low, ci95_high columns; n = dcr_n)."""
    return ci_text(row[f"{prefix}_k"], row["dcr_n"], row[prefix], row[f"{prefix}_ci95_low"],
                   row[f"{prefix}_ci95_high"])


def headline(dcr_rows: list[dict]) -> dict[str, str]:
    """Flagged copies of each dataset in the first space, with their 95% interval."""
    if not dcr_rows:
        return {}
    first = dcr_rows[0]["space"]
    return {f"flagged copies, {r['dataset']} ({first})": fraction_text(r, "flagged_copies")
            for r in dcr_rows if r["space"] == first}
