"""benchmarks/bench_scale.py runs every stage at two sizes and reports time, memory and growth exponents.

Speed is never asserted here (BENCHMARKS.md records the measured exponents); this proves the benchmark runs the
real stages on the real outputs of the previous ones, so its figures can be trusted.
"""

from __future__ import annotations

import csv
import json
import math
import sys

import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_scale  # noqa: E402


@pytest.mark.slow
def test_bench_scale_runs_each_stage_at_1k_and_4k_and_fits_exponents(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_SCALE_VIEWS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT / "src"))
    report = bench_scale.main(["--sizes", "1000,4000", "--once", "--work", str(tmp_path),
                               "--plot", str(tmp_path / "scale.png")])
    rows = {(r["stage"], r["n"]): r for r in report["rows"]}
    assert set(rows) == {(stage, n) for stage in bench_scale.STAGES for n in (1000, 4000)}
    assert all(r["cpu_seconds"] > 0 and r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0 for r in rows.values())
    for stage, fit in report["exponents"].items():
        assert fit["sizes"] == [1000, 4000] and math.isfinite(fit["time_fit"]) and math.isfinite(fit["rss_last_two"])
    data = tmp_path / "n4000"
    manifest = json.loads((data / "prepared" / "manifest.json").read_text())
    train = manifest["splits"]["train"]["written"]
    assert manifest["counts"]["written"] == 4000 and 0 < train < 4000
    assert json.loads((data / "cache" / "cache.json").read_text())["count"] == train
    with open(data / "generated" / "labels.csv", newline="") as handle:
        labels = list(csv.DictReader(handle))
    assert len(labels) == train and labels[-1]["path"] == f"images/000/{train - 1:07d}.png"
    printed = capsys.readouterr().out
    assert "| audit | not wired" in printed and (tmp_path / "scale.png").stat().st_size > 0
