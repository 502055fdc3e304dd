"""`dinodiff report`: sections from the results files found, missing ones with their commands, a page that
stands alone (every image a data: URI), and the Markdown summary."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image
from typer.testing import CliRunner

from dinodiff.cli import app
from dinodiff.evaluate.fid.stage import fid_results
from dinodiff.evaluate.fid.sweep import sweep_results
from dinodiff.report import ReportError, build_report
from dinodiff.report.build import external_references
from dinodiff.results import Results, markdown_table, write_results
from dinodiff.train.trainer import train

CONFIG = """model:
  resolution: 32
  encoder: {name_or_path: random:transformers-vit}
  unet: {preset: tiny}
data:
  shards: /data/prepared
train:
  run_dir: RUN
  seed: 1234
  max_steps: 20
optim:
  lr: 0.001
"""


def _png(path: Path, size: tuple[int, int], value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)).save(path)
    return path


def make_workdir(root: Path) -> Path:
    """A work folder as the stages leave it: a run (+ fid.csv), two generated sets, segment, classify and probe
    results; no audit."""
    run = root / "run"
    (run / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-20").mkdir(parents=True)
    (run / "config.yaml").write_text(CONFIG)
    rows = ["step,loss,lr,grad_norm,images_per_s,images_seen,elapsed_s"]
    rows += [f"{s},{1.0 / s:.6f},0.001,1.0,8.0,{4 * s},{0.5 * s}" for s in range(1, 21)]
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    (run / "best").mkdir()
    (run / "best" / "best.json").write_text(json.dumps({"step": 10, "metric": "fid", "value": 5.0}))
    fid_rows = [{"step": step, "fid": fid, "kid_mean": 0.01, "kid_std": 0.001, "extractor": "xrv", "tap": "features2",
                 "split": "val", "n_real": 64, "n_fake": 64, "per_source": 1, "sample_steps": 25, "seed": 7,
                 "checkpoint": f"{run}/checkpoints/checkpoint-{step}/model"} for step, fid in ((10, 5.0), (20, 7.5))]
    _png(run / "fid.png", (120, 80), 9)
    write_results(run, sweep_results(run, fid_rows))  # what `dinodiff sweep` and the training hook write
    _png(run / "samples" / "step-0000010.png", (136, 68), 1)
    _png(run / "samples" / "step-0000020.png", (136, 68), 2)
    for strategy in ("reconstruction", "interpolation"):
        folder = root / "generated" / strategy
        _png(folder / "preview.png", (272, 136), 3)
        _png(folder / "images" / "000000.png", (32, 32), 4)
        (folder / "provenance.json").write_text(json.dumps({
            "model": f"{run}/checkpoints/checkpoint-20/model", "checkpoint_step": 20, "source": "/data/prepared",
            "scheduler": "DPMSolverMultistepScheduler", "num_inference_steps": 10, "images": 48, "complete": True,
            "settings": {"strategy": strategy, "seed": 99, "ratio": 3}, "code_version": {"git_commit": "abc123"}}))
    seg = root / "segment"
    _png(seg / "overlays" / "phantoms.png", (300, 200), 5)
    (seg / "table.md").write_text("# Zero-shot lung segmentation (DiffSeg)\n\n## Table 2: both lungs\n\n"
                                  "| | DiffSeg | Mean-mask prior |\n|---|---|---|\n| combined | 61.0 ± 2.0 | 88.0 ± 1.0 |\n")
    write_results(seg, Results(  # written elsewhere, then moved: absolute paths that moved
        kind="segment", title="Zero-shot lung segmentation",
        provenance={"settings": {"threshold_mode": "relative", "resolution": 64}, "images": {"phantoms": 16}},
        headline={"Dice, DiNO-Diffusion (DiffSeg)": "61.0 %", "Dice, mean-mask prior": "88.0 %"},
        tables={"Table 2": "/old/place/segment/table.md"},
        figures={"phantoms": "/old/place/segment/overlays/phantoms.png"}, data={"cells": [{"model": "m"}]}))
    cls = root / "classify"
    _png(cls / "figure4.png", (400, 300), 6)
    (cls / "table1.md").write_text("| arm | AUC |\n|---|---|\n| real only | 0.71 |\n| real + 1:10 | 0.78 |\n")
    (cls / "results.json").write_text(json.dumps({
        "kind": "classify", "title": "Classification (Table 1, Figure 4)",
        "provenance": {"checkpoint": "best/model", "seeds": [0, 1, 2], "command": "dinodiff classify --out classify"},
        "headline": {"AUC real + 1:10": 0.78}, "tables": {"Table 1": "table1.md"},
        "figures": {"Figure 4": "figure4.png"}, "data": {"something_new": {"nested": True}}}))
    probe = root / "probe"
    probe.mkdir()
    (probe / "results.json").write_text(json.dumps({
        "kind": "encoder-probe", "provenance": {"encoder": "encoder/", "data": "/data/labelled"},
        "tables": {"probe": [{"encoder": "pretrained", "knn_auc": 0.912, "linear_auc": 0.93},
                             {"encoder": "random", "knn_auc": 0.55, "linear_auc": 0.57, "extra": "x"}]}}))
    return root


def _images(page: str) -> list[str]:
    return re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)


def test_markdown_table_keeps_every_cell_in_its_column():
    text = markdown_table(["method", "Dice"], [["a | b", 0.5], ["two\nlines", "-"]])
    assert text.splitlines() == ["| method | Dice |", "|---|---|", "| a \\| b | 0.5 |", "| two lines | - |"]


def test_report_builds_the_sections_found_and_lists_missing_ones_with_their_commands(tmp_path):
    summary = build_report(make_workdir(tmp_path / "work"))
    keys = summary["keys"]
    for key in ("config", "training", "fid", "samples", "reconstruction", "interpolation", "encoder-probe",
                "classify", "segment"):
        assert key in keys, key
    assert keys.index("config") < keys.index("training") < keys.index("segment")  # the data flow's order
    assert [t for t, _ in summary["missing"]] == ["Privacy audit"]
    assert "dinodiff audit" in summary["missing"][0][1]
    assert summary["problems"] == []
    page = summary["html"].read_text()
    assert "Missing sections" in page and "dinodiff audit SYNTHETIC" in page
    assert "61.0 ± 2.0" in page and "88.0 ± 1.0" in page  # Table 2 from the moved segment folder
    assert "0.912" in page and "0.71" in page  # probe table, classify Markdown table
    assert "5 @ step 10" in page  # best FD and its checkpoint
    assert "1234" in page and "abc123" in page and "dinodiff classify --out classify" in page  # provenance


def test_every_image_is_an_embedded_data_uri_matching_its_source(tmp_path):
    summary = build_report(make_workdir(tmp_path / "work"), tmp_path / "out" / "page.html")
    page = summary["html"].read_text()
    sources = _images(page)
    # loss + fid curves, 2 sample grids, 2 previews, 1 overlay, Figure 4
    assert len(sources) == 8
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    sizes = {Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).size for s in sources}
    assert {(136, 68), (272, 136), (300, 200), (400, 300)} <= sizes
    assert external_references(page) == []
    assert "<link" not in page and "<script" not in page and "http" not in page.split("<main>")[0]


def test_markdown_summary_has_the_headline_tables_and_missing_commands(tmp_path):
    work = make_workdir(tmp_path / "work")
    md = build_report(work)["markdown"].read_text()
    assert md.startswith("# dinodiff report: work")
    assert "## At a glance" in md and "| training steps of run | 20 |" in md
    assert "| final MSE(noise, prediction) of run |" in md  # the loss says what it is and whose
    assert "| 10 | 5 ★ |" in md  # the best checkpoint marked in the fid.csv table
    assert "| pretrained | 0.912 | 0.93 | - |" in md  # unknown column 'extra' kept, missing cell as '-'
    assert "### Table 2: both lungs" in md  # the stage's Markdown headings demoted under the section
    assert "`segment/overlays/phantoms.png`" in md  # figures link to their files, relative to report.md
    assert "- **Privacy audit**: `dinodiff audit" in md
    assert "data:image" not in md


def test_a_results_json_of_a_new_kind_is_shown_without_report_code(tmp_path):
    folder = tmp_path / "work" / "new-stage"
    _png(folder / "plots" / "curve.png", (50, 40), 7)
    (folder / "results.json").write_text(json.dumps({
        "kind": "my-new-stage", "title": "My new stage", "provenance": {"seed": 3, "command": "dinodiff new"},
        "tables": {"scores": [{"a": 1.23456789, "b": "x"}], "inline": "| p | q |\n|---|---|\n| 1 | 2 |"},
        "figures": {"curve": "plots/curve.png", "gone": "plots/gone.png"}}))
    summary = build_report(tmp_path / "work")
    assert summary["sections"] == ["My new stage"]
    page = summary["html"].read_text()
    assert "1.235" in page and "<td>2</td>" in page and "dinodiff new" in page
    assert len(_images(page)) == 1
    assert "Named but not found: plots/gone.png" in page
    assert len(summary["missing"]) == 10  # every known section, each with its command


def test_a_results_json_note_and_warnings_are_shown(tmp_path):
    folder = tmp_path / "work" / "audit"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "kind": "audit", "note": "95% intervals: exact Clopper-Pearson.",
        "warnings": ["holdout->train (pixels) has only 29 distances, too few to calibrate."],
        "headline": {"flagged copies, syn (pixels)": "0/32 = 0.0% [0.0, 10.9]"},
        "tables": {"dcr": [{"dataset": "syn", "flagged_copies (95% CI)": "0/32 = 0.0% [0.0, 10.9]"}]}}))
    summary = build_report(tmp_path / "work")
    page, md = summary["html"].read_text(), summary["markdown"].read_text()
    for text in ("exact Clopper-Pearson", "only 29 distances, too few to calibrate", "0/32 = 0.0% [0.0, 10.9]"):
        assert text in page and text in md


def test_unreadable_results_are_listed_and_the_rest_still_reported(tmp_path):
    work = make_workdir(tmp_path / "work")
    (work / "audit").mkdir()
    (work / "audit" / "results.json").write_text("{not json")
    (work / "run" / "results.json").write_text(json.dumps({"fid": 5.0}))  # not a record: no kind
    summary = build_report(work)
    assert any("audit/results.json" in p and "not readable JSON" in p for p in summary["problems"])
    assert any("run/results.json" in p and "not a results record" in p for p in summary["problems"])
    assert {"config", "training", "samples", "segment"} <= set(summary["keys"]) and "fid" not in summary["keys"]
    assert "Files that could not be read" in summary["html"].read_text()


def test_a_folder_without_results_is_a_clean_cli_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="No results found"):
        build_report(tmp_path / "empty")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 2
    assert "No results found" in result.output and "Traceback" not in result.output


def test_external_reference_guard_catches_what_a_browser_would_fetch():
    page = ('<html><head><style>body{background:url("x.png")}</style><link rel="stylesheet" href="a.css"></head>'
            '<body><img src="data:image/png;base64,AA"><a href="#top">top</a><img src="http://example.com/a.png">'
            "<p>src=&quot;http://not-a-tag&quot;</p></body></html>")
    found = external_references(page)
    assert "x.png" in found and "a.css" in found and "<link>" in found and "http://example.com/a.png" in found
    assert not any("not-a-tag" in f for f in found) and "#top" not in found


def test_report_cli_on_a_real_tiny_training_run(tmp_path, prepared_phantoms):
    run = tmp_path / "run"
    train(tiny_config(run, prepared_phantoms, "train.max_steps=4", "train.checkpoint_every=2", "train.sample_every=2"))
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "report.html")])
    assert result.exit_code == 0, result.output
    assert "ok       Training: run" in result.output and "missing  Image quality" in result.output
    page = (tmp_path / "report.html").read_text()
    assert "random:transformers-vit" in page  # the run's own config.yaml
    images = _images(page)
    assert len(images) == 3 and all(s.startswith("data:image/png") for s in images)  # loss curve + 2 sample grids
    md = (tmp_path / "report.md").read_text()
    assert "| training steps of run | 4 |" in md and "`run/samples/step-0000004.png`" in md


def test_results_written_before_the_record_are_named_with_the_fix_not_sniffed(tmp_path):
    folder = tmp_path / "work" / "classify"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({  # `dinodiff classify`'s layout before the results record
        "evaluation": "classify", "summary": [{"regime": 50}], "files": {"table_markdown": "table.md"}}))
    with pytest.raises(ReportError):
        build_report(tmp_path / "work")  # nothing else to show
    (folder / "other" / "results.json").parent.mkdir()
    write_results(folder / "other", Results(kind="classify", title="Classification", tables={"t": [{"a": 1}]}))
    summary = build_report(tmp_path / "work")
    assert summary["keys"] == ["classify"]
    assert any("classify/results.json" in p and "rerun the stage" in p for p in summary["problems"])


def test_a_classify_grid_shows_as_one_section_without_its_per_fold_synthetic_sets(tmp_path):
    folder = tmp_path / "work" / "classify"
    _png(folder / "figure4.png", (80, 60), 8)
    (folder / "table.md").write_text("| arm | n = 50 |\n|---|---|\n| real only | 0.61 ± 0.02 |\n")
    (folder / "grid.json").write_text("{}")
    for fold in range(3):  # what `dinodiff classify` generates: one interpolation set per fold, its own input
        (folder / "synthetic" / "m0123" / "n50" / "interpolation-x1" / f"s0-f{fold}").mkdir(parents=True)
        (folder / "synthetic" / "m0123" / "n50" / "interpolation-x1" / f"s0-f{fold}" / "provenance.json").write_text(
            json.dumps({"complete": True, "images": 40, "settings": {"strategy": "interpolation"}}))
    (folder / "results.json").write_text(json.dumps({
        "kind": "classify", "provenance": {"synthetic model": "run/best/model", "synthetic model chosen": "best"},
        "tables": {"Table 1 and differences (table.md)": "table.md"}, "figures": {"Figure 4": "figure4.png"}}))
    summary = build_report(tmp_path / "work")
    assert summary["keys"] == ["classify"]  # the grid's synthetic sets are not sections of their own
    page = summary["html"].read_text()
    assert "0.61 ± 0.02" in page and "run/best/model" in page and len(_images(page)) == 1


def test_the_report_package_imports_no_evaluation_code():
    import subprocess
    import sys

    code = ("import sys, dinodiff.report, dinodiff.report.sections; "
            "print([m for m in sys.modules if m.startswith('dinodiff.evaluate') or m == 'dinodiff.train'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_dinodiff_fid_result_file_is_shown_with_its_features(tmp_path):
    result = {"fid": 12.3456, "kid_mean": 0.0123, "kid_std": 0.001, "n_real": 30, "n_fake": 48, "extractor": "xrv",
              "tap": "features2", "weights": "densenet121-res224-all", "real": "prepared", "fake": "generated/rec",
              "seed": 0}
    write_results(tmp_path / "work" / "fid.json", fid_results(result, "test"))  # `dinodiff fid --out fid.json`
    (tmp_path / "work" / "dinodiff_encoder.json").write_text(json.dumps({"kind": "dino", "step": 200}))  # not a record
    summary = build_report(tmp_path / "work")
    assert summary["keys"] == ["fid"] and summary["problems"] == []
    md = summary["markdown"].read_text()
    assert "| FID (xrv:features2) of rec | 12.35 |" in md and "| prepared | generated/rec | 12.35 |" in md
    assert "30 / 48" in md and "densenet121-res224-all" in md
