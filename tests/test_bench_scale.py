"""benchmarks/bench_scale.py runs every stage (the hooks too) at two sizes and reports time, memory and exponents.

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
    monkeypatch.setenv("BENCH_SCALE_AUDIT_SYNTHETIC", "200")
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT / "src"))
    report = bench_scale.main(["--sizes", "1000,4000", "--once", "--work", str(tmp_path),
                               "--plot", str(tmp_path / "scale.png")])
    rows = {(r["stage"], r["n"]): r for r in report["rows"]}
    assert set(rows) == {(stage, n) for stage in bench_scale.ALL_STAGES for n in (1000, 4000)}
    assert set(bench_scale.ALL_STAGES) == {*bench_scale.STAGES, "audit", "classify-id-filter", "embedding-metrics"}
    assert all(r["cpu_seconds"] > 0 and r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0 for r in rows.values())
    assert all(r["working_rss_mb"] == pytest.approx(r["peak_rss_mb"] - r["baseline_rss_mb"]) for r in rows.values())
    # the embeddings are set-up: counted in the baseline (N x 2 x 1536 float32), not in the timed stage's working
    # memory. The baseline is a high-water mark (ru_maxrss), so at these sizes it may still be the imports' peak.
    assert rows[("embedding-metrics", 4000)]["baseline_rss_mb"] >= rows[("embedding-metrics", 1000)]["baseline_rss_mb"]
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
    # the hooks ran the real stages on this size's prepared images
    audit = json.loads((data / "audit" / "results.json").read_text())["provenance"]
    assert audit["train"]["images"] == train and audit["holdout"]["images"] == 200  # capped: fixed queries
    assert [s["images"] for s in audit["synthetic"]] == [200]
    assert audit["calibration_queries"]["train->train"].startswith(f"{bench_scale.AUDIT_QUERIES} of {train} ")
    assert audit["settings"]["spaces"] == ["pixels", "c_glb"]
    assert json.loads((data / "classify" / "found.json").read_text()) == {
        "ids": bench_scale.CLASSIFY_REGIME, "found": bench_scale.CLASSIFY_REGIME, "cached": 4000}
    assert json.loads((data / "classify" / "cache" / "real-32.json").read_text())["count"] == 4000
    assert (data / "classify" / "cache" / "real-32.u8").stat().st_size == 4000 * 32 * 32
    metrics = json.loads((data / "embedding-metrics.json").read_text())
    assert (metrics["n_train"], metrics["train_views"], metrics["n_sampled"]) == (4000, 2, 1000)
    assert metrics["train_nn_queries"] == 2000 and metrics["pr_rows"] == [4000, 1000]
    assert all(math.isfinite(metrics[k]) for k in ("precision", "recall", "fd", "nn_median"))
    printed = capsys.readouterr().out
    assert "not wired" not in printed and "| embedding-metrics | 1000, 4000 |" in printed
    assert (tmp_path / "scale.png").stat().st_size > 0
