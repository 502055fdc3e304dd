"""The floors in pyproject.toml are at least the first release that has every API the code uses.

Each minimum below was found by reading the released wheels (noted per entry), and each has a probe that
fails on the installed library if the API is missing, so the table cannot drift from the code.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (the project allows 3.10)
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# package -> (first version with everything we use, what needs it)
MINIMA = {
    # 4.55.4 ignores from_pretrained(dtype=...) (models/encoders.py passes dtype=torch.float32); 4.56.0 pops it.
    # Dinov2WithRegistersModel (facebook/dinov2-with-registers-base) arrived in 4.48.
    "transformers": ("4.56", "from_pretrained(dtype=...), Dinov2WithRegistersModel"),
    # timm.create_model('local-dir:...') (encoders._timm_model_name): absent from 1.0.15, present in 1.0.16.
    "timm": ("1.0.16", "create_model('local-dir:FOLDER')"),
    # webdataset.filters._shuffle(seed=...) (data/loader.py): not in 0.2.86, in 0.2.96 (no release between);
    # the former floor 0.2.90 was never released.
    "webdataset": ("0.2.96", "filters._shuffle(seed=), utils.make_seed"),
    # Attention.norm_q/norm_k (evaluate/attention.py), AutoencoderTiny, training_utils.compute_snr: all in 0.31.
    "diffusers": ("0.31", "Attention.norm_q, AutoencoderTiny, compute_snr"),
    # InitProcessGroupKwargs, PartialState, ProjectConfiguration: long before 1.0.
    "accelerate": ("1.0", "InitProcessGroupKwargs, PartialState, ProjectConfiguration"),
    # torch.load(weights_only=True), scaled_dot_product_attention; transformers 4.56 itself wants >= 2.2.
    "torch": ("2.4", "torch.load(weights_only=True), F.scaled_dot_product_attention"),
    "pydicom": ("3.0", "pydicom.pixels (get_decoder, apply_modality_lut)"),
    "python-gdcm": ("3.0.10", "pydicom's gdcm plugin (JPEG lossless); pydicom refuses older gdcm"),
}


def _floors() -> dict[str, Version]:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    floors = {}
    for dep in deps:
        req = Requirement(dep)
        lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
        if lows:
            floors[req.name.lower()] = max(lows)
    return floors


@pytest.mark.parametrize("package", sorted(MINIMA))
def test_pyproject_floor_is_at_least_the_first_version_with_the_apis_used(package):
    floors = _floors()
    assert package in floors, f"{package} has no floor in pyproject.toml"
    minimum, needs = MINIMA[package]
    assert floors[package] >= Version(minimum), f"{package}>={floors[package]} lacks {needs} (needs >= {minimum})"


def test_installed_versions_satisfy_pyproject():
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    for dep in deps:
        req = Requirement(dep)
        if req.name.lower() in MINIMA:
            assert req.specifier.contains(version(req.name), prereleases=True), (req, version(req.name))


def test_probes_the_apis_named_in_the_table_exist_in_the_installed_libraries(tmp_path):
    import timm.models._hub as timm_hub
    import webdataset.filters
    from diffusers.models.attention_processor import Attention
    from transformers import ViTConfig, ViTModel

    assert "seed" in inspect.signature(webdataset.filters._shuffle).parameters
    assert hasattr(timm_hub, "load_model_config_from_path")  # what 'local-dir:' loads through
    assert "norm_q" in inspect.signature(Attention.__init__).parameters or hasattr(Attention(8), "norm_q")
    # transformers honours dtype= (an older one silently ignores it and loads fp32)
    ViTModel(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                       image_size=16, patch_size=8)).save_pretrained(tmp_path)
    model = ViTModel.from_pretrained(tmp_path, dtype=torch.float64)
    assert next(model.parameters()).dtype == torch.float64
