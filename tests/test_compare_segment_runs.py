"""benchmarks/compare_segment_runs.py pairs two segment outputs image by image, each with its own tuning choice, and
refuses outputs that did not split the same images the same way."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

from dinodiff.evaluate.segment.metrics import paired_bootstrap
from dinodiff.results import Results, write_results

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import compare_segment_runs  # noqa: E402


def _output(path, leader: str, dice: dict[str, list[float]], splits: dict | None = None):
    methods = {m: {"tuning_dice": 0.5, "per_image": [{"dataset": "d", "id": f"im{i}", "hungarian": {"both": v}}
                                                     for i, v in enumerate(values)]} for m, values in dice.items()}
    data = {"leader": leader, "splits": splits or {"tune": ["a"], "report": ["b"]}, "methods": methods}
    write_results(path, Results(kind="segment", title="test", data=data))
    return path


def test_leaders_are_paired_per_image_and_each_keeps_its_own_choice(tmp_path, capsys):
    rng = np.random.default_rng(0)
    otsu = rng.uniform(0.5, 0.7, 12).tolist()
    trained = [v + 0.05 for v in otsu]
    untrained = rng.uniform(0.4, 0.6, 12).tolist()
    _output(tmp_path / "a", "ncut-inputs", {"ncut-inputs": trained, "diffseg": untrained, "otsu": otsu})
    _output(tmp_path / "b", "diffseg", {"ncut-inputs": otsu, "diffseg": untrained, "otsu": otsu})
    rows = compare_segment_runs.main([f"trained={tmp_path / 'a'}", f"untrained={tmp_path / 'b'}"])
    by = {(r[0], r[4]): r for r in rows}
    assert by["trained", "minus Otsu"][6].startswith("+5.0 [+5.0, +5.0]")  # the same 5 points on every image
    order = sorted(range(12), key=lambda i: f"im{i}")  # the images' order: by (dataset, id)
    # b's own leader (diffseg) against a's (ncut-inputs), image by image
    diff, lo, hi, _ = paired_bootstrap([untrained[i] for i in order], [trained[i] for i in order])
    assert by["untrained", "minus trained's leader"][6] == f"{100 * diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    assert by["untrained", "minus trained's leader"][1] == "DiNO-Diffusion (DiffSeg)"
    assert "| untrained |" in capsys.readouterr().out

    _output(tmp_path / "c", "diffseg", {"diffseg": untrained}, splits={"tune": ["b"], "report": ["a"]})
    with pytest.raises(SystemExit, match="split differs"):
        compare_segment_runs.main([f"trained={tmp_path / 'a'}", f"other={tmp_path / 'c'}"])
    with pytest.raises(SystemExit, match="no results.json"):
        compare_segment_runs.main([f"trained={tmp_path / 'a'}", f"missing={tmp_path / 'none'}"])
