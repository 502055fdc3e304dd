"""Global-token encoders: tiny random models of each real architecture, saved and loaded through load_encoder."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path

import pytest
import torch

from dinodiff.models.encoders import GlobalTokenEncoder, load_encoder, parse_tokens
from dinodiff.models.random_init import save_random_encoder

IMAGE_SIZE = 64
# The random models are saved with these (non-ImageNet) values, see random_init.py.
MEAN = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
STD = torch.tensor([0.25, 0.2, 0.3]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    return {
        "vit": save_random_encoder(root / "vit", "transformers-vit", image_size=IMAGE_SIZE),
        "dinov2_reg": save_random_encoder(root / "dinov2_reg", "transformers-dinov2", num_registers=4),
        "dinov2": save_random_encoder(root / "dinov2", "transformers-dinov2", num_registers=0),
        "timm": save_random_encoder(root / "timm", "timm", num_registers=4),
    }


def _images(batch: int = 2, channels: int = 3, size: int = IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_vit_tokens_are_cls_and_pooler_of_the_model_outputs(saved):
    from transformers import ViTModel

    enc = load_encoder(str(saved["vit"]))
    assert (enc.family, enc.tokens, enc.num_tokens, enc.hidden_size) == ("transformers-vit", ("cls", "pooler"), 2, 64)
    x = _images()
    c_glb = enc(x)
    assert c_glb.shape == (2, 2, 64)
    reference = ViTModel.from_pretrained(saved["vit"]).eval()  # independent load, normalisation done by hand
    with torch.no_grad():
        out = reference(pixel_values=(x - MEAN) / STD)
    torch.testing.assert_close(c_glb[:, 0], out.last_hidden_state[:, 0])
    torch.testing.assert_close(c_glb[:, 1], out.pooler_output)


def test_dinov2_with_registers_tokens_are_cls_then_registers(saved):
    from transformers import Dinov2WithRegistersModel

    enc = load_encoder(str(saved["dinov2_reg"]))
    assert (enc.family, enc.tokens, enc.num_tokens) == ("transformers-dinov2", ("cls", "registers"), 5)
    x = _images()
    reference = Dinov2WithRegistersModel.from_pretrained(saved["dinov2_reg"]).eval()
    with torch.no_grad():
        hidden = reference(pixel_values=(x - MEAN) / STD).last_hidden_state
    torch.testing.assert_close(enc(x), hidden[:, :5])
    # token order follows the request
    reordered = load_encoder(str(saved["dinov2_reg"]), tokens="registers+cls")(x)
    torch.testing.assert_close(reordered, torch.cat([hidden[:, 1:5], hidden[:, :1]], dim=1))


def test_dinov2_without_registers_like_rad_dino_gives_cls_only(saved):
    enc = load_encoder(str(saved["dinov2"]))
    assert enc.tokens == ("cls",) and enc(_images()).shape == (2, 1, 64)
    with pytest.raises(ValueError, match="no \\['registers'\\].*it has \\{'cls': 1, 'patch_mean': 1\\}"):
        load_encoder(str(saved["dinov2"]), tokens="cls+registers")


def test_timm_tokens_are_the_prefix_of_forward_features(saved):
    import timm

    enc = load_encoder(str(saved["timm"]))  # auto-detected from timm's config.json 'architecture' key
    assert (enc.family, enc.tokens, enc.num_tokens, enc.image_size) == ("timm", ("cls", "registers"), 5, IMAGE_SIZE)
    x = _images()
    reference = timm.create_model(f"local-dir:{saved['timm']}", pretrained=True).eval()
    assert reference.num_prefix_tokens == 5
    with torch.no_grad():
        expected = reference.forward_features((x - MEAN) / STD)[:, :5]
    torch.testing.assert_close(enc(x), expected)
    torch.testing.assert_close(load_encoder(str(saved["timm"]), tokens="cls")(x), expected[:, :1])


@pytest.mark.parametrize("name", ["vit", "dinov2_reg", "timm"])
def test_grey_input_equals_replicated_rgb_and_no_patch_tokens_leak(saved, name):
    enc = load_encoder(str(saved[name]))
    grey = _images(channels=1, size=80)  # also exercises the resize to image_size
    c_grey, c_rgb = enc(grey), enc(grey.repeat(1, 3, 1, 1))
    torch.testing.assert_close(c_grey, c_rgb)
    n_patches = (IMAGE_SIZE // 8) ** 2
    assert c_grey.shape[1] == enc.num_tokens <= 5 < n_patches


@pytest.mark.parametrize("name", ["vit", "timm"])
def test_encoder_is_frozen_and_stays_in_eval(saved, name):
    enc = load_encoder(str(saved[name]))
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    x = _images().requires_grad_(True)
    assert not enc(x).requires_grad
    # deterministic (dropout off): two calls agree exactly
    assert torch.equal(enc(x), enc(x))


def test_vit_without_pooler_weights_refuses_the_random_pooler(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)  # fmt: skip
    ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    enc = load_encoder(str(tmp_path))
    assert enc.tokens == ("cls",)  # the pooler would be re-initialised at random on every load
    with pytest.raises(ValueError, match="no \\['pooler'\\]"):
        load_encoder(str(tmp_path), tokens="cls+pooler")


def test_image_size_override_interpolates_position_embeddings(saved):
    for name in ("vit", "dinov2_reg", "timm"):
        enc = load_encoder(str(saved[name]), image_size=96)
        assert enc.image_size == 96
        assert enc(_images(size=96)).shape == (2, enc.num_tokens, 64)


def test_to_config_reloads_the_same_encoder(saved):
    enc = load_encoder(str(saved["timm"]), tokens=["registers"], library="timm")
    again = load_encoder(**enc.to_config())
    assert isinstance(again, GlobalTokenEncoder) and again.tokens == ("registers",)
    torch.testing.assert_close(enc(_images()), again(_images()))


def test_token_names_are_validated():
    assert parse_tokens("CLS+pooler") == ("cls", "pooler")
    assert parse_tokens("cls,registers") == ("cls", "registers")
    assert parse_tokens(None) is None
    with pytest.raises(ValueError, match="patch"):
        parse_tokens("cls+patch")
    with pytest.raises(ValueError, match="repeated"):
        parse_tokens(["cls", "cls"])


def test_wrong_library_and_unsupported_model_are_clear_errors(saved, tmp_path):
    from transformers import BertConfig, BertModel

    with pytest.raises(ValueError, match="library"):
        load_encoder(str(saved["vit"]), library="keras")
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'bert' model; supported"):
        load_encoder(str(tmp_path))


@pytest.mark.parametrize("name", ["vit", "dinov2_reg", "timm"])
def test_save_pretrained_round_trip_keeps_tokens_size_and_normalisation(saved, name, tmp_path):
    enc = load_encoder(str(saved[name]), tokens="cls", image_size=96)
    enc.save_pretrained(tmp_path / "encoder")
    again = GlobalTokenEncoder.from_pretrained(tmp_path / "encoder")
    assert (again.family, again.tokens, again.image_size) == (enc.family, ("cls",), 96)
    torch.testing.assert_close(again.mean, enc.mean)
    torch.testing.assert_close(again(_images(size=96)), enc(_images(size=96)))


def test_library_auto_detection_and_timm_ids():
    from dinodiff.models.encoders import _timm_model_name, is_timm_source

    assert is_timm_source("timm/vit_base_patch14_reg4_dinov2") and is_timm_source("hf-hub:timm/x")
    assert not is_timm_source("facebook/dino-vitb16") and not is_timm_source("microsoft/rad-dino")
    assert _timm_model_name("timm/vit_base_patch14_reg4_dinov2") == "hf-hub:timm/vit_base_patch14_reg4_dinov2"


def test_components_save_and_load_inside_a_diffusion_pipeline(saved, tmp_path):
    from diffusers import DiffusionPipeline

    from dinodiff.models.autoencoders import load_autoencoder
    from dinodiff.models.projection import ConditionProjection

    class Pipe(DiffusionPipeline):
        def __init__(self, encoder, autoencoder, projection):
            super().__init__()
            self.register_modules(encoder=encoder, autoencoder=autoencoder, projection=projection)

    encoder = load_encoder(str(saved["timm"]), tokens="registers")
    pipe = Pipe(encoder, load_autoencoder("unshuffle", scaling_factor=0.5), ConditionProjection(64, 64))
    pipe.save_pretrained(tmp_path / "pipe")
    again = Pipe.from_pretrained(tmp_path / "pipe")
    assert again.encoder.tokens == ("registers",) and again.autoencoder.scaling_factor == 0.5
    assert again.projection.is_identity
    torch.testing.assert_close(again.encoder(_images()), encoder(_images()))
