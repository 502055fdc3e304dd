"""FID/KID maths against torchmetrics and scipy, the extractors on random weights loaded through the
libraries' own paths, image sets, the real-set cache and the `dinodiff fid` command."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

import dinodiff.evaluate.fid.stage as fid_mod
from dinodiff.evaluate.fid.features import (
    MissingWeights,
    build_extractor,
    center_crop_resize,
    save_random_inception_weights,
    save_random_xrv_weights,
    xrv_weights_file,
)
from dinodiff.evaluate.fid.images import fingerprint, list_images, select
from dinodiff.config import FidSettings
from dinodiff.results import read_results
from dinodiff.evaluate.fid.stage import (
    cached_features,
    fid,
    fid_from_features,
    frechet_distance,
    gaussian_stats,
    kid_from_features,
)


def _features(seed: int, n: int = 400, d: int = 48, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(1000).normal(size=(d, d)) / np.sqrt(d)  # correlated features, like real ones
    return (rng.normal(size=(n, d)) @ mixing) * scale + shift


class _Identity(torch.nn.Module):
    """A torchmetrics 'feature extractor' that passes our feature matrices through unchanged."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# ------------------------------------------------------------------------------------------ maths
@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (0.3, 0.8), (2.0, 1.5)])
def test_fid_agrees_with_torchmetrics_and_scipy_on_identical_features(shift: float, scale: float) -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _features(0), _features(1, n=350, shift=shift, scale=scale)
    ours = fid_from_features(real, fake)

    metric = FrechetInceptionDistance(feature=_Identity(real.shape[1]))
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    theirs = float(metric.compute())

    mu1, s1 = gaussian_stats(real)
    mu2, s2 = gaussian_stats(fake)
    root = linalg.sqrtm(s1 @ s2).real  # the classic pytorch-fid formula
    direct = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))

    assert ours > 0
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert ours == pytest.approx(direct, rel=1e-4)


def test_fid_of_a_feature_set_against_itself_is_zero() -> None:
    real = _features(0)
    assert abs(fid_from_features(real, real)) < 1e-6
    # a different sample of the same distribution is close, a shifted one is far
    assert fid_from_features(real, _features(5)) < 0.2 * fid_from_features(real, _features(5, shift=0.5))


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians() -> None:
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()  # = 5 + 4 + 1 + 0
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu1, np.diag(v1), mu2[:2], np.diag(v2[:2]))


def test_fid_is_finite_when_fewer_images_than_feature_dimensions() -> None:
    real, fake = _features(0, n=20, d=64), _features(1, n=20, d=64, shift=1.0)
    value = fid_from_features(real, fake)
    assert np.isfinite(value) and value > 0
    assert abs(fid_from_features(real, real)) < 1e-6


def test_kid_agrees_with_torchmetrics_when_one_subset_holds_every_image() -> None:
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _features(0, n=200), _features(1, n=200, shift=0.2)
    metric = KernelInceptionDistance(feature=_Identity(real.shape[1]), subsets=1, subset_size=200)
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    theirs = float(metric.compute()[0])
    ours, std = kid_from_features(real, fake, subsets=1, subset_size=200)
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert std == 0.0
    same, _ = kid_from_features(real, _features(7, n=200), subsets=20, subset_size=100)
    assert abs(same) < 0.1 * ours


# ------------------------------------------------------------------------------------- extractors
@pytest.fixture()
def xrv_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """xrv's own cache dir pointed at a temp folder holding a random DenseNet-121 under the real file name."""
    import torchxrayvision as xrv

    folder = tmp_path / "xrv-cache"
    monkeypatch.setattr(xrv.utils, "get_cache_dir", lambda: str(folder) + "/")
    save_random_xrv_weights(folder)
    return folder


def test_xrv_extractor_loads_weights_from_xrv_cache_dir_and_taps_features2(xrv_cache: Path) -> None:
    import torchxrayvision as xrv

    net = build_extractor("xrv")  # no folder given: xrv.utils.get_cache_dir() decides, as in production
    assert net.describe()["extractor"] == "xrv-densenet121-res224-all" and net.tap == "features2"
    # the file name xrv downloads to, so a real download drops in with no change
    assert Path(net.weights) == xrv_cache / ("nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-"
                                             "rot45-tr15-sc15-seed0-best.pt")
    saved = torch.load(net.weights, weights_only=False).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in net.model.state_dict().items() if k in saved)

    images = torch.rand(2, 1, 224, 224)
    features = net(images)
    assert features.shape == (2, 1024) and features.dtype == torch.float32
    # XRV normalisation: [0, 1] -> [-1024, 1024], then the DenseNet's features2 tap
    reference = xrv.models.DenseNet(weights="densenet121-res224-all").features2((images * 2 - 1) * 1024)
    torch.testing.assert_close(features, reference, rtol=1e-4, atol=1e-3)
    # non-square inputs are centre-cropped then resized to 224 before the tap
    wide = torch.rand(1, 1, 100, 160)
    torch.testing.assert_close(net(wide), net(center_crop_resize(wide[0], 224)[None]))


def test_missing_xrv_weights_error_names_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(MissingWeights) as err:
        build_extractor("xrv", weights=str(tmp_path / "empty"))
    assert str(xrv_weights_file(cache_dir=tmp_path / "empty")) in str(err.value)
    assert "wget https://" in str(err.value)


def test_inception_extractor_loads_torchvision_weights_from_torch_home(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = save_random_inception_weights()  # torchvision's own location under $TORCH_HOME
    assert path == tmp_path / "torch" / "hub" / "checkpoints" / "inception_v3_google-0cc3c7bd.pth"
    net = build_extractor("inception")
    assert (net.name, net.tap, net.dim, net.input_size) == ("inception-v3-torchvision", "avgpool", 2048, 299)
    out = net(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 2048) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])


def test_dinov2_extractor_returns_the_cls_token_of_the_encoder() -> None:
    from dinodiff.models.factory import resolve_encoder_path

    net = build_extractor("dinov2", weights="random:transformers-dinov2")
    assert (net.tap, net.dim) == ("cls", 64)
    images = torch.rand(3, 1, net.input_size, net.input_size)
    tokens = net.encoder.model(pixel_values=net.encoder.preprocess(images)).last_hidden_state
    torch.testing.assert_close(net(images), tokens[:, 0])
    assert net.weights == "random:transformers-dinov2"
    assert Path(resolve_encoder_path("random:transformers-dinov2"), "config.json").is_file()
    with pytest.raises(ValueError, match="Unknown feature extractor"):
        build_extractor("clip")


# ------------------------------------------------------------------------------------- image sets
def test_image_sets_from_folders_shards_and_synthetic_datasets(shared_data: Path, prepared_phantoms: Path,
                                                               tmp_path: Path) -> None:
    folder = list_images(shared_data / "lungs-shenzhen" / "unmasked")
    assert len(folder) == 7 and all(r.key is None for r in folder)
    with_masks = list_images(shared_data / "lungs-shenzhen")  # CXR_png/ + masks/ + unmasked/: masks are skipped
    assert len(with_masks) == 10 + 7 and not any("masks" in r.path for r in with_masks)
    shards = list_images(prepared_phantoms)  # the test split of a prepared folder
    assert shards and all(r.key and "test-" in Path(r.path).name for r in shards)
    assert len(list_images(prepared_phantoms, split="train")) > len(shards)
    synthetic = tmp_path / "synthetic"
    (synthetic / "images").mkdir(parents=True)
    for ref in folder[:3]:
        shutil.copy(ref.path, synthetic / "images")
    shutil.copy(folder[3].path, synthetic / "not-a-sample.png")  # only images/ counts in a synthetic dataset
    assert len(list_images(synthetic)) == 3
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "missing")


def test_seeded_subsets_are_reproducible_and_default_to_all_when_fewer() -> None:
    refs = list(range(20))
    assert select(refs, 5000) == refs
    a, b, c = select(refs, 8, seed=1), select(refs, 8, seed=1), select(refs, 8, seed=2)
    assert a == b and a != c and len(a) == 8 and a == sorted(a)


# ------------------------------------------------------------------------------- stage and cache
@pytest.fixture()
def two_sets(shared_data: Path, tmp_path: Path) -> tuple[Path, Path]:
    real, fake = tmp_path / "real", tmp_path / "fake"
    real.mkdir()
    fake.mkdir()
    for path in sorted((shared_data / "lungs-shenzhen" / "CXR_png").glob("*.png"))[:6]:
        shutil.copy(path, real)
    for path in sorted((shared_data / "lungs-shenzhen" / "unmasked").glob("*.png"))[:6]:
        shutil.copy(path, fake)
    return real, fake


def test_real_set_features_are_cached_by_extractor_and_file_list(two_sets, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real, _ = two_sets
    net = build_extractor("dinov2", weights="random:transformers-dinov2")
    calls = []
    original = fid_mod.extract_features
    monkeypatch.setattr(fid_mod, "extract_features", lambda *a, **k: calls.append(1) or original(*a, **k))
    refs = list_images(real)
    first = cached_features(net, refs, tmp_path / "cache", batch_size=4)
    again = cached_features(net, refs, tmp_path / "cache", batch_size=4)
    assert len(calls) == 1 and np.array_equal(first, again)
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1 and cached[0].name.startswith("dinov2-cls-n6-")
    with np.load(cached[0]) as data:
        mu, sigma = gaussian_stats(first)
        assert np.allclose(data["mu"], mu) and np.allclose(data["sigma"], sigma)
        assert json.loads(str(data["meta"]))["tap"] == "cls"
    cached_features(net, refs[:5], tmp_path / "cache", batch_size=4)  # another file list -> another entry
    assert len(calls) == 2 and len(list((tmp_path / "cache").glob("*.npz"))) == 2
    before = fingerprint(refs)
    Path(refs[0].path).write_bytes(Path(refs[1].path).read_bytes())  # a changed image invalidates the key
    assert fingerprint(refs) != before


def test_fid_stage_names_the_extractor_and_gives_zero_for_a_set_against_itself(two_sets, tmp_path: Path) -> None:
    real, fake = two_sets
    settings = FidSettings(extractor="dinov2", weights="random:transformers-dinov2", cache_dir=tmp_path / "c",
                           batch_size=4, kid_subsets=5)
    same = fid(real, real, settings)
    assert abs(same["fid"]) < 1e-3
    other = fid(real, fake, replace(settings, num_real=4, num_sources=4, seed=3), out=tmp_path / "res.json")
    assert other["fid"] > 1e-3 and (other["n_real"], other["n_fake"]) == (4, 4)
    assert np.isfinite(other["kid_mean"]) and other["kid_std"] >= 0
    written = read_results(tmp_path / "res.json")  # a results record: the report shows it
    assert written.kind == "fid" and written.data["extractor"] == "dinov2" and written.data["tap"] == "cls"
    assert written.tables["FID/FD"][0]["FID/FD"] == round(other["fid"], 4) and written.data["fid"] == other["fid"]


def test_fid_command_on_xrv_random_weights_self_is_zero(two_sets, xrv_cache: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dinodiff.cli import app

    real, _ = two_sets
    out = tmp_path / "xrv.json"
    result = CliRunner().invoke(app, ["fid", str(real), str(real), "--num-samples", "3", "--batch-size", "3",
                                      "--cache-dir", str(tmp_path / "c"), "--kid-subsets", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "xrv-densenet121-res224-all:features2" in result.output
    record = read_results(out).data
    assert record["tap"] == "features2" and record["dim"] == 1024 and abs(record["fid"]) < 1e-2
    missing = CliRunner().invoke(app, ["fid", str(real), str(real), "--weights", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "wget" in missing.output
