"""Frozen autoencoders: TAEF2 on real X-rays, unshuffle inverse, KL/tiny through diffusers loaders, persistence."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dinodiff.models.autoencoders import LatentAutoencoder, estimate_latent_stats, load_autoencoder
from dinodiff.models.random_init import save_random_sd_components
from dinodiff.models.taef2 import TAEF2


def load_xrays(shared_data: Path, n: int, size: int = 256, start: int = 0) -> torch.Tensor:
    """n real chest X-rays as grey (n, 1, size, size) in [0, 1] (centre square crop, bicubic resize)."""
    files = sorted((shared_data / "cxr-covid" / "images").iterdir())[start : start + n]
    arrays = [np.array(ImageOps.fit(Image.open(f).convert("L"), (size, size), Image.BICUBIC)) for f in files]
    return torch.from_numpy(np.stack(arrays)).float().div(255).unsqueeze(1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


@pytest.fixture(scope="module")
def taef2(shared_data: Path) -> LatentAutoencoder:
    return load_autoencoder("taef2", str(shared_data / "weights" / "taef2"))


@pytest.fixture(scope="module")
def xrays(shared_data: Path) -> torch.Tensor:
    return load_xrays(shared_data, 6)


def test_taef2_state_dicts_load_strictly_into_the_architecture(shared_data):
    model = TAEF2.from_folder(shared_data / "weights" / "taef2")  # load_state_dict(strict=True) inside
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_dec = sum(p.numel() for p in model.decoder.parameters())
    assert (n_enc, n_dec) == (1_338_528, 1_338_499)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_taef2_round_trip_of_real_xrays_reaches_30db(taef2, xrays):
    assert (taef2.latent_channels, taef2.downscale, taef2.image_channels, taef2.stochastic) == (32, 8, 3, False)
    latents = taef2.encode(xrays)
    assert latents.shape == (6, 32, 32, 32)
    recon = taef2.decode(latents)
    assert recon.shape == (6, 3, 256, 256) and recon.min() >= 0 and recon.max() <= 1
    scores = psnr(recon.mean(1, keepdim=True), xrays)
    assert scores.min() >= 30, scores  # ~36.5 dB expected
    # a broken decoder (no tanh clamp, wrong block order...) lands far below; so does a blank image
    assert psnr(torch.full_like(xrays, xrays.mean()), xrays).max() < 20


def test_grey_input_equals_replicated_rgb(taef2, xrays):
    grey = xrays[:2, :, 64:192, 64:192]
    torch.testing.assert_close(taef2.encode_moments(grey), taef2.encode_moments(grey.repeat(1, 3, 1, 1)))


def test_latent_stats_normalise_to_unit_std(taef2, shared_data):
    fit, held_out = load_xrays(shared_data, 6, 128, start=10), load_xrays(shared_data, 3, 128, start=30)
    scale, shift = estimate_latent_stats(taef2, [fit[:3], (fit[3:], "labels")], max_images=5)
    assert scale > 0 and np.isfinite(shift)
    taef2.set_latent_stats(scale, shift)
    try:
        z = taef2.encode(held_out)
        assert 0.8 < z.std().item() < 1.25 and abs(z.mean().item()) < 0.2
        torch.testing.assert_close(taef2.encode(held_out) / scale + shift, taef2.encode_moments(held_out))
    finally:
        taef2.set_latent_stats(1.0, 0.0)


def test_unshuffle_is_an_exact_inverse():
    ae = load_autoencoder("unshuffle", unshuffle_factor=4)
    assert (ae.latent_channels, ae.downscale, ae.image_channels) == (16, 4, 1)
    assert len(list(ae.parameters())) == 0
    values = torch.arange(256, dtype=torch.float32).div(255)
    x = values[torch.randperm(256 * 4, generator=torch.Generator().manual_seed(0)) % 256].view(1, 1, 32, 32)
    for stats in ((1.0, 0.0), (1.7, -0.2)):
        ae.set_latent_stats(*stats)
        z = ae.encode(x)
        assert z.shape == (1, 16, 8, 8)
        y = ae.decode(z)
        assert torch.equal((y * 255).round(), (x * 255).round())  # every 8-bit grey level comes back
        torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
    # the layout is pixel_unshuffle of the image in [-1, 1]
    ae.set_latent_stats(1.0, 0.0)
    assert torch.equal(ae.encode(x), torch.nn.functional.pixel_unshuffle(x * 2 - 1, 4))
    assert torch.equal(ae.encode(x.repeat(1, 3, 1, 1)), ae.encode(x))


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_sd_components(tmp_path_factory.mktemp("sd"), sample_size=8, latent_channels=4)


def test_kl_loads_from_a_saved_sd_folder_with_its_config_scale(sd_dir):
    from diffusers import AutoencoderKL

    ae = load_autoencoder("kl", str(sd_dir))  # finds the 'vae' subfolder
    assert (ae.kind, ae.latent_channels, ae.downscale, ae.stochastic) == ("kl", 4, 8, True)
    assert (ae.scaling_factor, ae.shift_factor) == (0.18215, 0.0)
    x = torch.rand(2, 1, 64, 64)
    moments = ae.encode_moments(x)
    reference = AutoencoderKL.from_pretrained(sd_dir / "vae").eval()
    with torch.no_grad():
        dist = reference.encode(x.repeat(1, 3, 1, 1) * 2 - 1).latent_dist
    assert moments.shape == (2, 8, 8, 8)
    torch.testing.assert_close(moments[:, :4], dist.mean)
    z1 = ae.moments_to_latents(moments, torch.Generator().manual_seed(1))
    z2 = ae.moments_to_latents(moments, torch.Generator().manual_seed(1))
    z3 = ae.moments_to_latents(moments, torch.Generator().manual_seed(2))
    assert torch.equal(z1, z2) and not torch.equal(z1, z3)  # sampled, reproducibly
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(1))
    expected = (dist.mean + dist.std * noise) * 0.18215
    torch.testing.assert_close(z1, expected)
    images = ae.decode(z1)
    assert images.shape == (2, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    override = load_autoencoder("kl", str(sd_dir / "vae"), scaling_factor=0.5, shift_factor=0.1)
    assert (override.scaling_factor, override.shift_factor) == (0.5, 0.1)


def test_tiny_loads_through_autoencoder_tiny(tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    blocks = dict(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                  num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4)  # fmt: skip
    AutoencoderTiny(**blocks).save_pretrained(tmp_path)
    ae = load_autoencoder("tiny", str(tmp_path))
    assert (ae.latent_channels, ae.downscale, ae.stochastic, ae.scaling_factor) == (4, 8, False, 1.0)
    x = torch.rand(1, 3, 32, 32)
    z = ae.encode(x)
    assert z.shape == (1, 4, 4, 4) and ae.decode(z).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("kind", ["taef2", "kl", "unshuffle"])
def test_wrapper_save_and_from_pretrained_round_trip(kind, shared_data, sd_dir, tmp_path):
    path = {"taef2": str(shared_data / "weights" / "taef2"), "kl": str(sd_dir), "unshuffle": None}[kind]
    ae = load_autoencoder(kind, path, scaling_factor=0.7, shift_factor=0.05)
    ae.save_pretrained(tmp_path / "ae")
    assert not list((tmp_path / "ae").glob("*.pth"))
    again = LatentAutoencoder.from_pretrained(tmp_path / "ae")
    assert (again.kind, again.scaling_factor, again.shift_factor) == (kind, 0.7, 0.05)
    assert (again.latent_channels, again.downscale, again.image_channels) == (
        ae.latent_channels, ae.downscale, ae.image_channels)  # fmt: skip
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.encode_moments(x), ae.encode_moments(x))
    z = ae.moments_to_latents(ae.encode_moments(x), torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.decode(z), ae.decode(z))


def test_autoencoder_is_frozen_and_errors_are_clear(taef2):
    taef2.train()
    assert not taef2.training and not any(p.requires_grad for p in taef2.parameters())
    with pytest.raises(ValueError, match="Unknown autoencoder kind 'vq'"):
        load_autoencoder("vq", "x")
    with pytest.raises(ValueError, match="needs a path"):
        load_autoencoder("kl")
    with pytest.raises(FileNotFoundError, match="taef2_encoder.pth"):
        load_autoencoder("taef2", "/nonexistent")
    with pytest.raises(ValueError, match="B, 1 or 3, H, W"):
        taef2.encode(torch.rand(1, 2, 64, 64))
