"""The demo in its smallest form (`dinodiff demo --quick`): every stage's outputs, the learning checks, the report.

One quick demo run (module fixture) serves every test; a second tiny run covers `--data` on real images."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from dinodiff.demo import quick_settings, run_demo
from dinodiff.report.build import external_references

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "demo-output"
    outcomes = run_demo(quick_settings(str(out)))
    return out, outcomes


def _results(out: Path) -> dict:
    return json.loads((out / "checks" / "results.json").read_text())


def _row(out: Path, text: str) -> dict:
    return next(r for r in _results(out)["tables"]["learning checks"] if text in r["check"])


def test_every_stage_runs_and_its_images_decode(demo):
    out, outcomes = demo
    assert [o.status for o in outcomes.values()] == ["ran"] * len(outcomes)
    for name, outcome in outcomes.items():
        for path in outcome.outputs.values():
            assert Path(path).exists(), (name, path)
    images = [out / "checks" / n for n in ("samples.png", "reconstructions.png", "interpolation.png")]
    images += [out / "generated" / s / "preview.png" for s in ("reconstruction", "interpolation")]
    images += sorted((out / "segment" / "overlays").glob("*.png"))[:1] + [out / "classify" / "figure4.png"]
    for path in images:
        with Image.open(path) as im:
            im.load()
            assert min(im.size) >= 32, path


def test_classification_table_has_the_baseline_the_synthetic_arms_and_the_control(demo):
    out, _ = demo
    rows = _results(out)["tables"]["classification (macro AUC, held-out test split)"]
    arms = {r["arm"]: r for r in rows}
    assert "real only" in arms and "control for augmentation 1:1 (real x2)" in arms
    for experiment in ("augmentation", "full-synthetic"):
        for strategy in ("reconstruction", "interpolation"):
            assert f"{experiment} {strategy} 1:1" in arms
    assert arms["augmentation reconstruction 1:1"]["matched control"] == "control for augmentation 1:1 (real x2)"
    assert arms["full-synthetic interpolation 1:1"]["matched control"].startswith("real only")  # real x1
    assert "[" in arms["augmentation interpolation 1:1"]["AUC - real only [95% CI]"]
    assert all(0.0 <= r["AUC mean"] <= 1.0 for r in rows)


def test_real_only_classifier_learns_the_phantom_labels(demo):
    row = _row(demo[0], "classification")
    assert row["trained"] >= 0.6, row


def test_segmentation_table_shows_diffseg_beside_every_baseline(demo):
    rows = _results(demo[0])["tables"]["segmentation (Dice, both lungs)"]
    assert {"diffseg", "prior", "otsu", "superpixels", "position"} <= {r["key"] for r in rows}
    assert all(0.0 <= r["Dice mean"] <= 1.0 for r in rows)


def test_trained_samples_are_far_nearer_the_held_out_phantoms_than_the_untrained_models(demo):
    for space in ("(8x8 pixels)", "(demo encoder CLS)"):
        row = _row(demo[0], f"FD to held-out {space}")
        assert row["trained"] < 0.5 * row["untrained (step 0)"], row


def test_reconstructions_rank_their_own_source_above_chance(demo):
    ret = _results(demo[0])["data"]["retrieval"]
    assert ret["n"] >= 16 and ret["chance_mean_rank"] == (ret["n"] - 1) / 2
    assert ret["top1"] >= 3 * ret["chance_top1"], ret  # measured 0.16 vs chance 0.03 (32 sources)
    assert ret["top5"] >= 1.5 * ret["chance_top5"], ret
    assert ret["mean_rank"] <= 0.8 * ret["chance_mean_rank"], ret


def test_interpolation_strips_move_from_a_to_b(demo):
    dist = _results(demo[0])["data"]["interpolation"]
    assert dist["to_b"][-1] < dist["to_b"][0] - 0.005, dist  # measured 0.089 -> 0.077
    lean = [a - b for a, b in zip(dist["to_a"], dist["to_b"])]  # > 0: nearer B than A
    assert lean[-1] > lean[0] + 0.01, dist  # measured 0.008 -> 0.024


def test_report_stands_alone_and_shows_every_result(demo):
    out, _ = demo
    page = (out / "report.html").read_text()
    assert external_references(page) == []
    for title in ("what the model learned", "Classification", "segmentation"):
        assert title.lower() in page.lower(), title
    assert page.count("data:image/png;base64,") >= 6
    assert (out / "report.md").is_file()


def test_rerun_skips_every_stage_already_done(demo):
    out, _ = demo
    outcomes = run_demo(quick_settings(str(out)))
    assert {n: o.status for n, o in outcomes.items() if n != "report"} == {
        n: "done earlier" for n in outcomes if n != "report"}


def test_demo_on_a_folder_of_real_images_with_masks(tmp_path, shared_data):
    settings = replace(quick_settings(str(tmp_path / "real"), str(shared_data / "lungs-covid")), encoder_steps=4,
                       train_steps=30, eval_images=8, interpolation_pairs=2, segment_limit=4, classify_epochs=2)
    outcomes = run_demo(settings)
    assert outcomes["segment"].status == "ran"
    assert (tmp_path / "real" / "segment" / "table.md").is_file()
    assert outcomes["classify"].status == "ran" or outcomes["classify"].status.startswith("skipped: ")
    assert (tmp_path / "real" / "report.html").is_file()
