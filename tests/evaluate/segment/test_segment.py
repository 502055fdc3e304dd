"""Segmentation scoring, baselines, mask-aligned loading and the `segment` stage end to end (tiny models)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from scipy import ndimage
from typer.testing import CliRunner

from dinodiff.cli import app
from dinodiff.evaluate.segment import grid as grid_module
from dinodiff.evaluate.segment import stage as segment_module
from dinodiff.evaluate.segment.attention import capture_attention, load_attention_model
from dinodiff.evaluate.segment.data import load_cases
from dinodiff.evaluate.segment.metrics import (
    dice,
    dice_matrix,
    hungarian_scores,
    mean_mask_prior,
    otsu_segments,
    otsu_threshold,
    position_kmeans,
    score_labels,
    split_lungs,
    superpixel_segments,
    union_scores,
)
from dinodiff.evaluate.segment.settings import SegmentSettings
from dinodiff.evaluate.segment.stage import segment
from dinodiff.results import read_results
from dinodiff.runs import run_models


def _two_lungs(size: int = 20) -> dict[str, np.ndarray]:
    right, left = np.zeros((size, size), bool), np.zeros((size, size), bool)
    right[4:16, 2:8] = True  # image left = patient's right
    left[4:16, 12:18] = True
    return {"right": right, "left": left}


def test_dice_of_known_masks():
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[:2], b[1:3] = True, True  # 8 and 8 pixels, 4 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0 and dice(a, ~a) == 0.0
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_hungarian_gives_each_lung_its_own_segment_with_exact_dice():
    lungs = _two_lungs()
    labels = np.zeros((20, 20), int)
    labels[4:16, 2:8] = 1  # exactly the right lung
    labels[4:10, 12:18] = 2  # the upper half of the left lung
    labels[10:16, 12:18] = 3  # its lower half
    scores = hungarian_scores(labels, lungs)
    assert scores["right"] == 1.0
    assert scores["left"] == pytest.approx(2 * 36 / (36 + 72))
    assert scores["segments"]["right"] == 1 and scores["segments"]["left"] in (2, 3)
    assert scores["both"] == pytest.approx(2 * 108 / (108 + 144))
    one = hungarian_scores(np.zeros((20, 20), int), lungs)  # one segment for two lungs: one lung scores 0
    assert sorted([one["left"], one["right"]])[0] == 0.0


def test_hungarian_maximises_the_total_dice_where_greedy_does_not():
    right, left = np.zeros((20, 20), bool), np.zeros((20, 20), bool)
    right[0:10, 0:10] = True  # 100 px
    left[12:16, 12:17] = True  # 20 px
    labels = np.zeros((20, 20), int)
    labels[3:10, 0:10] = 1  # segment 1: 70 px of the right lung + the whole left lung
    labels[left] = 1
    labels[0:3, 0:10] = 2  # segment 2: the other 30 px of the right lung
    scores = hungarian_scores(labels, {"right": right, "left": left})
    # greedy would take the largest entry, right-1 (140/190 = 0.737), leaving the left lung 0: total 0.737
    assert scores["segments"] == {"right": 2, "left": 1}
    assert scores["right"] == pytest.approx(60 / 130) and scores["left"] == pytest.approx(40 / 110)
    assert scores["right"] + scores["left"] > 140 / 190
    rng = np.random.default_rng(0)
    for _ in range(10):  # and it is the optimum over all assignments (brute force)
        labels = rng.integers(0, 5, (20, 20))
        table = dice_matrix(labels, [right, left])
        best = max(table[0, i] + table[1, j] for i, j in itertools.permutations(range(table.shape[1]), 2))
        scores = hungarian_scores(labels, {"right": right, "left": left})
        assert scores["right"] + scores["left"] == pytest.approx(best)


def test_union_score_rewards_over_segmentation_and_reports_the_segment_count():
    lungs = _two_lungs()
    pixels = np.arange(400).reshape(20, 20)  # 400 one-pixel segments
    union = union_scores(pixels, lungs)
    assert union["both"] == 1.0 and union["n_segments"] == 400
    assert hungarian_scores(pixels, lungs)["both"] < 0.05


def test_one_segment_covering_both_lungs_scores_in_the_diagnostic_not_the_primary_score():
    lungs = _two_lungs()
    labels = (lungs["right"] | lungs["left"]).astype(int)  # lungs vs the rest, no left/right split
    score = score_labels(labels, lungs)
    assert score["single"]["both"] == 1.0 and score["n_segments"] == 2
    # one lung is matched to the background, so the matched union is the whole image (400 px)
    assert score["hungarian"]["both"] == pytest.approx(2 * 144 / (400 + 144))


def test_split_lungs_names_the_patients_sides():
    lungs = _two_lungs()
    split = split_lungs(lungs["right"] | lungs["left"])
    assert np.array_equal(split["right"], lungs["right"]) and np.array_equal(split["left"], lungs["left"])
    blob = np.zeros((10, 10), bool)
    blob[3:7, 2:8] = True  # one component: cut at the midline
    halves = split_lungs(blob)
    assert halves["right"][:, :5].sum() == 12 and halves["left"][:, 5:].sum() == 12


def test_baselines_prior_otsu_and_position_kmeans():
    lungs = _two_lungs()
    prior = mean_mask_prior({"right": lungs["right"] * 0.8, "left": lungs["left"] * 0.6})
    assert hungarian_scores(prior, lungs)["both"] == 1.0
    assert (mean_mask_prior({"right": lungs["right"] * 0.4, "left": lungs["left"] * 0.4}) == 0).all()
    image = np.full((20, 20), 200, np.uint8)
    image[lungs["right"] | lungs["left"]] = 40
    assert 40 <= otsu_threshold(image) < 200
    assert hungarian_scores(otsu_segments(image), lungs)["both"] == 1.0  # two dark blobs -> two segments
    regions = superpixel_segments(image, scale=10, sigma=0, min_size=5)  # sigma 0: no blur of the sharp edges
    assert hungarian_scores(regions, lungs)["both"] == 1.0 and regions.max() == 2  # two blobs and the background
    noisy = np.clip(image + np.random.default_rng(0).normal(0, 25, image.shape), 0, 255).astype(np.uint8)
    fine, coarse = (superpixel_segments(noisy, scale=s, min_size=1) for s in (1, 1000))
    assert fine.max() > coarse.max()  # a larger scale, larger (fewer) regions
    positions = position_kmeans((20, 20), 5)
    assert sorted(np.unique(positions).tolist()) == [0, 1, 2, 3, 4]


def test_shenzhen_and_montgomery_masks_stay_aligned_with_their_images(shared_data):
    from dinodiff.data.readers import read_grey
    from dinodiff.evaluate.segment.data import find_records

    # Shenzhen images are already 512^2: at 512 px the preprocessed mask is the raw one (a 1-px frame aside)
    records = find_records(shared_data / "lungs-shenzhen")
    native = load_cases(shared_data / "lungs-shenzhen", 512)
    assert [c.id for c in native] == [r.id for r in records]
    for record, case in zip(records, native):
        raw = read_grey(record.masks["lungs"])[0] >= 128
        assert ((case.lungs["left"] | case.lungs["right"]) == raw).mean() > 0.99
    cases = load_cases(shared_data / "lungs-shenzhen", 64) + load_cases(shared_data / "lungs-covid", 64, limit=8)
    assert len(cases) == 18 and {c.dataset for c in cases} == {"lungs-shenzhen", "lungs-covid"}
    darker = 0
    for case in cases:
        assert case.image.shape == (64, 64) and set(case.lungs) <= {"left", "right"}
        if set(case.lungs) == {"left", "right"}:  # the patient's left lung is on the image's right
            assert np.nonzero(case.lungs["left"])[1].mean() > np.nonzero(case.lungs["right"])[1].mean()
        inside = np.logical_or.reduce(list(case.lungs.values()))
        ring = ndimage.binary_dilation(inside, iterations=4) & ~inside  # ribs, mediastinum, diaphragm
        darker += case.image[inside].mean() < case.image[ring].mean()  # aerated lungs are darker
    assert darker == len(cases)  # (true for all 110 images, even the opaque ARDS ones)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from dinodiff.models.factory import build_components
    from dinodiff.pipeline import save_model_folder

    root = tmp_path_factory.mktemp("seg-model")
    cfg = tiny_config(root / "run", root / "none")
    torch.manual_seed(0)
    parts = build_components(cfg.model)
    return save_model_folder(root / "model", unet=parts.unet, projection=parts.projection,
                             autoencoder=parts.autoencoder, noise_scheduler=parts.noise_scheduler, model_cfg=cfg.model)


def test_capture_options_null_condition_and_noise_change_the_maps(tiny_model, shared_data):
    model = load_attention_model(tiny_model)
    images = torch.from_numpy(np.stack([c.image for c in load_cases(shared_data / "lungs-shenzhen", 32, limit=2)]))
    images = images.float().div(255)[:, None]
    own = capture_attention(model, images)
    assert [m.shape[-1] for m in own] == [64, 16, 64, 64]  # tiny UNet at 32 px: 8x8 down, 4x4 mid, 2 x 8x8 up
    assert all(torch.equal(a, b) for a, b in zip(own, capture_attention(model, images)))  # deterministic
    # the first self-attention runs before any cross-attention; the last one sees the condition
    null = capture_attention(model, images, condition="null")
    assert torch.equal(own[0], null[0]) and not torch.allclose(own[-1], null[-1])
    noisy = capture_attention(model, images, noise_seed=1)
    assert not torch.allclose(own[0], noisy[0])
    assert all(torch.equal(a, b) for a, b in zip(noisy, capture_attention(model, images, noise_seed=1)))


def test_segment_stage_writes_tables_overlays_and_reuses_cached_cells(tiny_model, shared_data, tmp_path,
                                                                      monkeypatch):
    data = [shared_data / "lungs-shenzhen", shared_data / "lungs-covid"]
    kwargs = dict(thresholds=[0.2, 0.5], threshold_mode="relative", grid_sizes=[4, 8], timesteps=[300],
                  limit=4, n_overlay=1, batch_size=3)
    results = segment([tiny_model], data, tmp_path, **kwargs)
    assert results["settings"]["resolution"] == 32  # the model's resolution by default
    assert results["datasets"] == {"lungs-shenzhen": 4, "lungs-covid": 4}
    assert len(list((tmp_path / "cells").rglob("*.json"))) == 4 == len(results["cells"])
    assert set(results["methods"]) == {"diffseg", "prior", "otsu", "position", "superpixels", "whole"}
    assert all(r["n_segments"] == 1 for r in results["methods"]["whole"]["per_image"])
    per_image = results["methods"]["diffseg"]["per_image"]
    position = results["methods"]["position"]["per_image"]
    assert [r["n_segments"] for r in position] == [r["n_segments"] for r in per_image]  # same k as DiffSeg
    markdown = (tmp_path / "table.md").read_text()
    for text in ("Mean-mask prior", "Position-only k-means", "Otsu", "lungs-shenzhen", "combined", "± ",
                 "Per checkpoint", "report split", "Paired differences"):
        assert text in markdown
    assert (tmp_path / "table.csv").read_text().startswith("split,dataset,method")
    overlays = [f"{m}-{d}.png" for m in ("diffseg", "superpixels") for d in ("lungs-covid", "lungs-shenzhen")]
    assert sorted(Path(p).name for p in results["overlays"].values()) == overlays
    assert all(Path(p).stat().st_size > 0 for p in results["overlays"].values())
    record = read_results(tmp_path / "results.json")  # the results record the report shows
    assert record.kind == "segment" and record.data["best"]["combined"]["cell"]["grid"] in (4, 8)
    assert sorted(record.figures.values()) == [f"overlays/{name}" for name in overlays]
    assert record.tables == {"Table 2, paired differences and per-dataset choices (table.md)": "table.md"}
    n_report = results["methods"]["diffseg"]["summary"]["combined"]["n"]
    assert list(record.headline) == [f"Dice, both lungs, report split (n={n_report}): {name}" for name in (
        "DiNO-Diffusion (DiffSeg)", "Mean-mask prior (leave-one-out)", "Position-only k-means", "Otsu",
        "Superpixels (Felzenszwalb, image only)", "Whole image (1 segment)")]
    assert all(v.endswith(" %") and "±" in v for v in record.headline.values())
    assert record.provenance["report images"] == n_report and set(record.provenance["subjects per split"]) == {
        "tune", "report"}
    chosen = record.provenance["configuration chosen on the tuning split"]
    assert "DiffSeg" in chosen["DiNO-Diffusion (DiffSeg)"]
    scale = float(chosen["Superpixels (Felzenszwalb, image only)"].removeprefix("scale="))
    assert scale in SegmentSettings().superpixel_scales and f"scale={scale:g}" in markdown

    calls = []
    real_capture = grid_module.capture_pass

    def counting(*args, **kw):
        calls.append(kw["timestep"])
        return real_capture(*args, **kw)

    monkeypatch.setattr(grid_module, "capture_pass", counting)
    again = segment([tiny_model], data, tmp_path, **{**kwargs, "n_overlay": 0})
    assert calls == []  # every cell came from the cache
    assert again["methods"]["diffseg"]["summary"] == results["methods"]["diffseg"]["summary"]
    segment([tiny_model], data, tmp_path, **{**kwargs, "timesteps": [300, 100], "n_overlay": 0})
    assert set(calls) == {100}  # only the new timestep's cells ran the UNet


def test_superpixel_control_chooses_its_scale_on_the_tuning_split_only(monkeypatch):
    from dinodiff.evaluate.segment.data import SegCase
    from dinodiff.evaluate.segment.split import REPORT, TUNE

    lungs = _two_lungs()
    cases = [SegCase(id=f"im{i}", dataset="d", image=np.full((20, 20), i, np.uint8), lungs=lungs) for i in range(6)]
    splits = {("d", c.id): TUNE if i < 3 else REPORT for i, c in enumerate(cases)}
    perfect = lungs["right"].astype(int) + 2 * lungs["left"]

    def fake(image, scale):  # scale 1: right on the tuning images only; scale 2: right on the report images only
        tuning = int(image[0, 0]) < 3
        return perfect if (scale == 1) == tuning else np.zeros_like(perfect)

    monkeypatch.setattr(segment_module, "superpixel_segments", fake)
    records, scale = segment_module.superpixel_control(cases, splits, [2.0, 1.0])
    assert scale == 1.0  # the report images, where scale 2 is perfect, never choose
    assert [r["split"] for r in records] == [TUNE] * 3 + [REPORT] * 3
    whole = hungarian_scores(np.zeros_like(perfect), lungs)["both"]  # what scale 1 scores on the report images
    assert [r["hungarian"]["both"] for r in records] == [1.0] * 3 + [whole] * 3 and whole < 1.0


def test_segment_loads_the_model_once_for_grid_and_overlays(tiny_model, shared_data, tmp_path, monkeypatch):
    loads = []
    real_load = segment_module.load_attention_model
    monkeypatch.setattr(segment_module, "load_attention_model", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    settings = SegmentSettings(thresholds=[0.3], threshold_mode="relative", grid_sizes=[4], limit=2, n_overlay=1)
    results = segment([tiny_model], [shared_data / "lungs-shenzhen"], tmp_path, settings)
    assert loads == [tiny_model] and len(results["overlays"]) == 2  # was loaded twice: grid, then overlays
    assert set(results["overlays"]) == {"diffseg-lungs-shenzhen", "superpixels-lungs-shenzhen"}
    assert results["settings"] == {"threshold_mode": "relative", "merge_iterations": 3, "condition": "image",
                                   "noise_seeds": [], "resolution": 32, "methods": ["diffseg"],
                                   "refinements": ["none"], "timesteps": [[300]], "thresholds": [0.3],
                                   "grid_sizes": [4], "taus": [0.5], "alphas": [10.0], "feature_sides": [0],
                                   "report_fraction": 0.5, "split_seed": 0, "limit": 2, "sd15": None,
                                   "superpixel_scales": [50.0, 100.0, 200.0, 400.0, 800.0, 1600.0]}


def test_run_models_expands_runs_and_checkpoints(tmp_path):
    run = tmp_path / "run"
    for step in (10, 2):
        (run / "checkpoints" / f"checkpoint-{step}" / "trainer").mkdir(parents=True)
        (run / "checkpoints" / f"checkpoint-{step}" / "trainer" / "state.json").write_text("{}")
        (run / "checkpoints" / f"checkpoint-{step}" / "model").mkdir()
        (run / "checkpoints" / f"checkpoint-{step}" / "model" / "model_index.json").write_text("{}")
    (run / "checkpoints" / "checkpoint-20" / "model").mkdir(parents=True)  # incomplete: no trainer/state.json
    checkpoint = run / "checkpoints" / "checkpoint-2"
    assert run_models(run) == [checkpoint / "model", run / "checkpoints" / "checkpoint-10" / "model"]
    assert run_models(checkpoint) == [checkpoint / "model"]
    assert run_models(checkpoint / "model") == [checkpoint / "model"]
    (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="without complete checkpoints"):
        run_models(tmp_path / "empty-run")
    with pytest.raises(FileNotFoundError, match="model not found"):
        run_models(tmp_path / "nowhere")


def test_grid_larger_than_the_attention_map_fails_with_the_fix(tiny_model, shared_data, tmp_path):
    with pytest.raises(ValueError, match=r"use --grid-size <= 8"):
        segment([tiny_model], [shared_data / "lungs-shenzhen"], tmp_path, grid_sizes=[16], limit=2, n_overlay=0)


def test_stable_diffusion_folder_runs_through_the_same_code_path(tmp_path, shared_data):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dinodiff.models.random_init import save_random_sd_components

    sd = save_random_sd_components(tmp_path / "sd", sample_size=8, cross_attention_dim=16)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "a</w>": 3, "a": 4}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=8).save_pretrained(
        sd / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=5, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=8)).save_pretrained(sd / "text_encoder")
    model = load_attention_model(sd)
    assert model.resolution == 64
    results = segment([sd], [shared_data / "lungs-shenzhen"], tmp_path / "out", sd15=sd, grid_sizes=[4],
                      thresholds=[0.3], threshold_mode="relative", limit=2, n_overlay=0)
    assert "SD 1.5 (DiffSeg)" in (tmp_path / "out" / "table.md").read_text()
    assert results["methods"]["sd15"]["per_image"] == results["methods"]["diffseg"]["per_image"]  # same model


def test_cli_segment_help_and_a_bad_data_folder(tiny_model, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["segment", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0
    for option in ("--data", "--out", "--method", "--thresholds", "--threshold-mode", "--timesteps", "--grid-sizes",
                   "--taus", "--alphas", "--feature-sides", "--condition", "--noise-seeds", "--report-fraction",
                   "--split-seed", "--resolution", "--sd15", "--overlays"):
        assert option in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["segment", str(tiny_model), "--data", str(tmp_path / "empty"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no lung masks" in result.output and "Traceback" not in result.output


def test_diffcut_beside_diffseg_with_averaged_timesteps_and_noise_reports_only_the_report_split(
        tiny_model, shared_data, tmp_path):
    data = [shared_data / "lungs-shenzhen", shared_data / "lungs-covid"]
    results = segment([tiny_model], data, tmp_path, methods=("diffseg", "diffcut"), thresholds=[0.3],
                      threshold_mode="relative", grid_sizes=[4], taus=[0.3, 0.6], alphas=[10.0],
                      feature_sides=[0, 8], timesteps=[(100, 300)], noise_seeds=[0, 1], limit=6, n_overlay=1,
                      refinements=("none", "components"))
    assert {"diffseg", "diffseg+cc", "diffcut", "diffcut+cc", "prior", "otsu", "position", "superpixels",
            "whole"} == set(results["methods"])
    cells = [c["cell"] for c in results["cells"]]
    assert sorted((c["method"], c["grid"], c["threshold"]) for c in cells
                  if c["method"] == "diffcut" and c["refine"] == "none") == [
        ("diffcut", 0, 0.3), ("diffcut", 0, 0.6), ("diffcut", 8, 0.3), ("diffcut", 8, 0.6)]
    for method in ("diffseg", "diffcut"):  # a refined map has at least the segments of the unrefined one
        plain, split = (results["methods"][m]["per_image"] for m in (method, method + "+cc"))
        if results["best_by_method"][method]["combined"]["cell"]["threshold"] == \
                results["best_by_method"][method + "+cc"]["combined"]["cell"]["threshold"]:
            assert all(b["n_segments"] >= a["n_segments"] for a, b in zip(plain, split))
    assert all(tuple(c["timesteps"]) == (100, 300) for c in cells)
    tuning, reported = set(results["splits"]["tune"]), set(results["splits"]["report"])
    assert tuning and reported and not tuning & reported
    for method in results["methods"].values():  # every reported image is a report-split image
        assert {f"{r['dataset']}/{r['id']}" for r in method["per_image"]} == reported
        assert method["summary"]["combined"]["n"] == len(reported)
    markdown = (tmp_path / "table.md").read_text()
    assert "DiNO-Diffusion (DiffCut)" in markdown and "t=100+300 noise x2" in markdown
    assert {Path(p).name for p in results["overlays"].values()} >= {"diffcut-lungs-covid.png", "diffseg-lungs-covid.png"}
    bad = dict(methods=("diffcut",), feature_sides=[3], limit=4, n_overlay=0)
    with pytest.raises(ValueError, match="no encoder self-attention map of side 3"):
        segment([tiny_model], data, tmp_path / "bad", **bad)


def test_images_the_model_trained_on_only_tune_unless_transductive(tiny_model, shared_data, tmp_path):
    import shutil

    from PIL import Image

    from dinodiff.prepare import prepare

    # the model's run trained on 3 of the Shenzhen images, re-encoded as JPEG under other names
    (tmp_path / "train").mkdir()
    trained = sorted((shared_data / "lungs-shenzhen" / "CXR_png").glob("*.png"))[:3]
    for i, path in enumerate(trained):
        Image.open(path).convert("L").save(tmp_path / "train" / f"x{i}.jpg", quality=80)
    prepare([tmp_path / "train"], tmp_path / "prepared", size=64, progress=False)
    run = tmp_path / "run"
    model = shutil.copytree(tiny_model, run / "checkpoints" / "checkpoint-5" / "model")
    (run / "config.yaml").write_text(f"data:\n  shards: {tmp_path / 'prepared'}\n")
    kwargs = dict(thresholds=[0.3], threshold_mode="relative", grid_sizes=[4], limit=6, n_overlay=0)
    results = segment([model], [shared_data / "lungs-shenzhen"], tmp_path / "out", **kwargs)
    seen = results["training_images"]
    assert [s["id"] for s in seen["seen"]] == [p.stem for p in trained]
    assert all(s["split"] == "tune" and s["why"].startswith("same picture as x") for s in seen["seen"])
    reported = {r["id"] for r in results["methods"]["diffseg"]["per_image"]}
    assert reported and not reported & {p.stem for p in trained}
    assert "3 of 10 evaluation images are training images" in (tmp_path / "out" / "table.md").read_text()
    assert "no report image is one the model trained on" in seen["statement"]
    again = segment([model], [shared_data / "lungs-shenzhen"], tmp_path / "out", transductive=True, **kwargs)
    in_report = [s for s in again["training_images"]["seen"] if s["split"] == "report"]
    assert in_report and "the report is transductive" in again["training_images"]["statement"]
    assert read_results(tmp_path / "out" / "results.json").provenance[
        "training images among the evaluation images"] == again["training_images"]["statement"]


def test_ncut_on_attention_inputs_still_cuts_where_uniform_attention_leaves_diffcut_one_segment(tiny_model,
                                                                                                 shared_data):
    from dinodiff.evaluate.segment.diffcut import diffcut
    from dinodiff.evaluate.segment.settings import SegmentSettings

    model = load_attention_model(tiny_model)
    for name, module in model.unet.named_modules():  # q = 0: every logit 0, attention exactly uniform
        if name.endswith("attn1"):
            torch.nn.init.zeros_(module.to_q.weight)
    cases = load_cases(shared_data / "lungs-shenzhen", 32, limit=2)
    images = torch.from_numpy(np.stack([c.image for c in cases])).float().div(255)[:, None]
    passes = grid_module.run_passes(model, images, [300], SegmentSettings(), ["diffcut", "ncut-inputs"],
                                    torch.float32)
    for b in range(len(cases)):
        outputs, inputs = passes.features["diffcut"][0][b], passes.features["ncut-inputs"][0][b]
        assert torch.allclose(outputs, outputs[:1].expand_as(outputs), atol=1e-5)  # the same at every position
        assert diffcut(outputs, 0.5, 10.0, (32, 32))[1] == 1
        assert diffcut(inputs, 0.5, 10.0, (32, 32))[1] > 1  # the hidden states still differ from place to place
    # DiffCut reads the encoder's layers (8x8 here); ncut-inputs every layer, the 4x4 ones of the middle too
    assert set(passes.features["diffcut"]) == {0, 8} and set(passes.features["ncut-inputs"]) == {0, 4, 8}


def test_ncut_inputs_is_its_own_clearly_named_method_in_the_tables(tiny_model, shared_data, tmp_path):
    results = segment([tiny_model], [shared_data / "lungs-covid"], tmp_path, methods=("diffseg", "ncut-inputs"),
                      thresholds=[0.3], threshold_mode="relative", grid_sizes=[4], taus=[0.5], alphas=[5.0],
                      feature_sides=[0, 8], limit=6, n_overlay=0, refinements=("none", "components"))
    assert {"ncut-inputs", "ncut-inputs+cc"} <= set(results["methods"]) and "diffcut" not in results["methods"]
    markdown = (tmp_path / "table.md").read_text()
    assert "DiNO-Diffusion (Ncut on attention inputs)" in markdown and "Ncut on attention inputs t=" in markdown


def test_ncut_over_superpixels_is_grid_searched_over_node_scales_and_named_in_the_tables(tiny_model, shared_data,
                                                                                         tmp_path):
    settings = SegmentSettings(methods=("ncut-inputs", "ncut-superpixels"), feature_sides=[8], taus=[0.5],
                               alphas=[5.0], node_scales=[20, 50], timesteps=[300])
    cells = settings.method_cells("m", (300,))
    assert sorted((c.method, c.scale) for c in cells) == [("ncut-inputs", 0.0), ("ncut-superpixels", 20.0),
                                                          ("ncut-superpixels", 50.0)]
    assert "Ncut over superpixels t=300 features=8x8 superpixels=20 tau=0.5" in settings.describe(cells[1])
    with pytest.raises(ValueError, match="--node-scales"):
        SegmentSettings(node_scales=[0])

    results = segment([tiny_model], [shared_data / "lungs-covid"], tmp_path, settings, limit=6, n_overlay=1)
    assert {"ncut-inputs", "ncut-superpixels"} <= set(results["methods"])
    assert len(list((tmp_path / "cells").rglob("ncut-superpixels_*.json"))) == 2  # one cached cell per node scale
    chosen = results["best_by_method"]["ncut-superpixels"]["combined"]["description"]
    assert "Ncut over superpixels" in chosen and "superpixels=" in chosen
    assert "DiNO-Diffusion (Ncut over superpixels)" in (tmp_path / "table.md").read_text()
    assert "ncut-superpixels-lungs-covid" in results["overlays"]
    per_image = results["methods"]["ncut-superpixels"]["per_image"]
    assert per_image and all(0.0 <= r["hungarian"]["both"] <= 1.0 for r in per_image)
