"""The GPU evidence script (issue 16) runs end to end in its CPU dry run, so it cannot rot between GPU loans.

`make gpu-bundle`'s script builds a small bundle (no wheels, the first images of each real set), then
`benchmarks/gpu/evidence.sh` runs every section at toy sizes on the CPU, as it would on the device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("train_throughput", "trainer_steps", "sampling", "diffseg", "segment_recipe", "real_data",
            "generate_precision")  # the dry run runs the opt-in segment_recipe too


@pytest.fixture(scope="module")
def evidence(tmp_path_factory, shared_data) -> Path:
    tmp = tmp_path_factory.mktemp("gpu-evidence")
    env = {**os.environ, "PYTHON": sys.executable, "SHARED_DATA": str(shared_data), "GPU_BUNDLE": str(tmp / "bundle"),
           "BUNDLE_WHEELS": "0", "BUNDLE_LIMIT": "10"}
    subprocess.run(["bash", str(REPO / "benchmarks/gpu/bundle.sh")], env=env, check=True, capture_output=True)
    # every section, the opt-in segment_recipe too; on a loaded CPU each section process needs up to a minute to
    # start, so the dry run gets more than the GPU run's 500 s
    env.update(OUT=str(tmp / "out"), DEVICE="cpu", EVIDENCE_PYTHON=sys.executable, EVIDENCE_BUDGET_S="900",
               EVIDENCE_TIMEOUT_S="915")
    proc = subprocess.run(["bash", str(REPO / "benchmarks/gpu/evidence.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp


@pytest.mark.slow
def test_bundle_holds_prepared_cxrs_lung_sets_and_taef2(evidence):
    bundle = evidence / "bundle"
    manifest = json.loads((bundle / "data/cxr-covid/manifest.json").read_text())
    assert manifest["counts"]["written"] == 10
    # the training CXRs keep out the evaluation images (prepare --exclude with both lung sets)
    assert sorted(Path(p).name for p in manifest["parameters"]["exclude"]) == ["lungs-covid", "lungs-shenzhen"]
    for name in ("lungs-covid", "lungs-shenzhen"):
        images = sorted((bundle / "data" / name / "CXR_png").glob("*.png"))
        assert len(images) == 10
    assert len(list((bundle / "data/lungs-covid/ManualMask/leftMask").glob("*.png"))) == 10
    assert (bundle / "weights/taef2/taef2_encoder.pth").is_file()


@pytest.mark.slow
def test_dry_run_writes_every_section_in_at_most_eight_files(evidence):
    out = evidence / "out"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert all((out / f).is_file() for f in files)  # flat: no folders come back from the device
    results = json.loads((out / "results.json").read_text())
    assert set(SECTIONS) <= set(results["sections"])
    assert {name: s["status"] for name, s in results["sections"].items()} == {name: "ok" for name in SECTIONS}
    assert results["meta"]["dry_run"] is True
    for name in ("summary.md", "evidence.log", "training.png", "evaluation.png"):
        assert (out / name).stat().st_size > 0, name


@pytest.mark.slow
def test_dry_run_measures_throughput_rows_and_real_data_figures(evidence):
    results = json.loads((evidence / "out/results.json").read_text())["sections"]
    rows = results["train_throughput"]["rows"]
    assert {(r["gradient_checkpointing"], r["batch"]) for r in rows} == {(False, 1), (False, 2), (True, 1), (True, 2)}
    assert all(r["images_per_s"] > 0 for r in rows)
    assert results["train_throughput"]["flops_per_image_fwd_bwd"] > 0
    assert [r["scheduler"] for r in results["sampling"]["rows"]] == ["DPMSolverMultistepScheduler", "PNDMScheduler"]
    assert results["diffseg"]["s_per_image"] > 0
    trainer = results["trainer_steps"]["rows"]
    measured = {(r.get("kind"), r["batch"]) for r in trainer if r.get("images_per_s", 0) > 0}
    assert {("trainer", 1), ("trainer", 2), ("bare UNet (sections.train_step)", 1)} <= measured
    assert any(r.get("gradient_checkpointing") and r.get("images_per_s", 0) > 0 for r in trainer)
    precision = results["generate_precision"]
    assert [r["precision"] for r in precision["rows"]] == ["fp32", "bf16"]
    assert 0 <= precision["bf16_vs_fp32"]["mean_abs_diff_u8"] < 255
    real = results["real_data"]
    assert real["train"]["steps"] >= real["train"]["probe_steps"] > 0
    recon = real["eval"]["reconstruction"]
    assert 0.0 <= recon["retrieval_rate"] <= 1.0 and recon["chance"] == pytest.approx(1 / recon["n_sources"], abs=1e-4)
    assert "Otsu" in real["eval"]["segment"]["table_md"]


@pytest.mark.slow
def test_dry_run_trains_the_segmentation_recipe_and_reports_both_methods_beside_the_baselines(evidence):
    recipe = json.loads((evidence / "out/results.json").read_text())["sections"]["segment_recipe"]
    assert recipe["preset"] == "gpu-seg256.yaml" and recipe["train"]["steps"] >= recipe["train"]["probe_steps"] > 0
    seg = recipe["segment"]
    zero_shot = {"diffseg", "diffseg+cc", "ncut-inputs", "ncut-inputs+cc", "ncut-superpixels", "ncut-superpixels+cc"}
    assert zero_shot | {"prior", "otsu", "position", "superpixels", "whole"} == set(seg["dice"])
    assert seg["leader"] in zero_shot  # best on the tuning split
    assert "evaluation images are training images of the model" in seg["training_images"]
    assert seg["splits"]["tune"] > 0 and seg["splits"]["report"] > 0
    assert "report split" in seg["table_md"] and "DiNO-Diffusion (Ncut on attention inputs)" in seg["table_md"]
    assert "DiNO-Diffusion (Ncut over superpixels)" in seg["table_md"]
    summary = (evidence / "out/summary.md").read_text()
    assert "(g) segmentation recipe (issue 23): ok" in summary


@pytest.mark.slow
def test_model_tar_unpacks_to_an_fp16_pipeline_folder(evidence, tmp_path):
    from safetensors.torch import load_file

    out = evidence / "out"
    parts = sorted(out.glob("model-fp16.tar*"))
    data = b"".join(p.read_bytes() for p in parts)  # the documented join: cat model-fp16.tar.part* > model-fp16.tar
    (tmp_path / "model.tar").write_bytes(data)
    with tarfile.open(tmp_path / "model.tar") as tar:
        tar.extractall(tmp_path, filter="data")
    folder = tmp_path / "model-fp16"
    assert (folder / "model_index.json").is_file()
    weights = load_file(next((folder / "unet").glob("*.safetensors")))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {__import__("torch").float16}
    from dinodiff.pipeline import DiNODiffusionPipeline

    pipe = DiNODiffusionPipeline.from_pretrained(folder)
    assert pipe.unet.config.sample_size == 8  # the dry run's 64 px through TAEF2 (/8)


@pytest.mark.slow
def test_segment_recipe_alone_returns_its_model_and_one_overlay_within_eight_files(evidence, tmp_path):
    """Run alone (as on the GPU, where it is opt-in), (g) returns its model as seg-model-fp16.tar before segment
    starts, and the leader's overlay; (d)'s files are absent, so the 8-file limit holds."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DEVICE": "cpu", "EVIDENCE_PYTHON": sys.executable,
           "GPU_BUNDLE": str(evidence / "bundle"), "EVIDENCE_SECTIONS": "segment_recipe"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks/gpu/evidence.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "training.png" not in files, files
    recipe = json.loads((out / "results.json").read_text())["sections"]["segment_recipe"]
    assert recipe["status"] == "ok" and recipe["model_tar"]["files"] == ["seg-model-fp16.tar"]
    with tarfile.open(out / "seg-model-fp16.tar") as tar:
        assert "seg-model-fp16/model_index.json" in tar.getnames()
    assert recipe["segment"]["overlay"] in files and recipe["segment"]["overlay"].startswith("seg-overlay-")
