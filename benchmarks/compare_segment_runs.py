"""Paired comparison of two or more `dinodiff segment` outputs on the same report images: each output's leader (the
zero-shot method its tuning split chose) against the first output's, and against the image-only controls.

    python benchmarks/compare_segment_runs.py trained=SEG untrained=SEG-TWIN [more=SEG3 ...]

Use it for what one `segment` table cannot show: a trained model against its untrained twin
(`benchmarks/make_untrained_twin.py`), or two training runs. The outputs must have split the same images the same
way (same data, split seed and fraction); the script stops, naming the output, when they did not. Each output keeps
its own tuning-split choice, so neither side is tuned on the other's report images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dinodiff.evaluate.segment.metrics import paired_bootstrap
from dinodiff.evaluate.segment.report import METHOD_NAMES
from dinodiff.results import read_results

CONTROLS = ("otsu", "superpixels", "whole", "prior")


def load(path: Path) -> dict:
    """The segment stage's own data in its results record."""
    results = path / "results.json" if path.is_dir() else path
    if not results.is_file():
        raise SystemExit(f"{path}: no results.json (run `dinodiff segment ... --out {path}` first).")
    return read_results(results).data


def scores(results: dict, method: str) -> dict[tuple[str, str], float]:
    """Report-split Dice (both lungs, Hungarian) per image of ``method``."""
    return {(r["dataset"], r["id"]): r["hungarian"]["both"] for r in results["methods"][method]["per_image"]}


def compare(runs: dict[str, dict]) -> list[list[str]]:
    """One row per (run, other): run's leader minus the reference leader or minus a control, paired over images."""
    (ref_name, ref), *_ = runs.items()
    for name, results in runs.items():
        if results["splits"] != ref["splits"]:
            raise SystemExit(f"{name}: its tuning/report split differs from {ref_name}'s (other images, split seed "
                             "or fraction): a paired comparison needs the same report images.")
    rows = []
    ref_scores = scores(ref, ref["leader"])
    for name, results in runs.items():
        leader = results["leader"]
        ours = scores(results, leader)
        others = [(f"{ref_name}'s leader", ref_scores)] if name != ref_name else []
        others += [(METHOD_NAMES[c], scores(results, c)) for c in CONTROLS if c in results["methods"]]
        for label, theirs in others:
            keys = sorted(set(ours) & set(theirs))
            diff, lo, hi, p = paired_bootstrap([ours[k] for k in keys], [theirs[k] for k in keys])
            rows.append([name, METHOD_NAMES[leader], f"{100 * results['methods'][leader]['tuning_dice']:.1f}",
                         f"{100 * sum(ours[k] for k in keys) / len(keys):.1f}", f"minus {label}", str(len(keys)),
                         f"{100 * diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]", f"{p:.3g}" if p > 0 else "< 0.0004"])
    return rows


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outputs", nargs="+", help="NAME=SEGMENT_OUTPUT (the first is the reference)")
    args = parser.parse_args(argv)
    if len(args.outputs) < 2 or any("=" not in o for o in args.outputs):
        parser.error("give two or more NAME=SEGMENT_OUTPUT")
    runs = {name: load(Path(path)) for name, path in (o.split("=", 1) for o in args.outputs)}
    rows = compare(runs)
    head = ["output", "leader (chosen on tuning)", "tuning", "report", "difference", "images", "Dice % (95% CI)", "p"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return rows


if __name__ == "__main__":
    main()
