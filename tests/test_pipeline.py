"""DiNODiffusionPipeline: save/load round trips, guidance rules, schedulers, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from dinodiff.pipeline import DiNODiffusionPipeline


def _tiny_components(seed: int = 0):
    from dinodiff.config import load_training_settings
    from dinodiff.models.factory import build_components

    cfg = load_training_settings("tiny")
    torch.manual_seed(seed)
    return cfg, build_components(cfg.model)


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model saved as a training checkpoint's model folder (cond_dropout 0.1)."""
    from dinodiff.pipeline import save_model_folder

    folder = tmp_path_factory.mktemp("tiny-model") / "model"
    with pytest.MonkeyPatch.context() as mp:  # session fixtures run before conftest's per-test environment
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("DINODIFF_CACHE", str(tmp_path_factory.getbasetemp() / "dinodiff-cache"))
        cfg, parts = _tiny_components()
        save_model_folder(folder, unet=parts.unet, projection=parts.projection, autoencoder=parts.autoencoder,
                          noise_scheduler=parts.noise_scheduler, model_cfg=cfg.model, encoder=parts.encoder,
                          cond_dropout=0.1)
    return folder


def _load(folder: Path) -> DiNODiffusionPipeline:
    pipe = DiNODiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(7))


def _run(pipe: DiNODiffusionPipeline, seed: int = 0, **kwargs) -> torch.Tensor:
    kwargs = {"images": _images(), "num_inference_steps": 4, "output_type": "pt", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_save_load_round_trip_gives_identical_images_for_the_same_seed(tiny_model_folder, tmp_path):
    index = json.loads((tiny_model_folder / "model_index.json").read_text())
    assert index["_class_name"] == "DiNODiffusionPipeline" and index["cond_dropout"] == 0.1
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    first = _load(tiny_model_folder)
    first.save_pretrained(tmp_path / "again")
    second = _load(tmp_path / "again")
    a, b = _run(first, num_images_per_condition=2), _run(second, num_images_per_condition=2)
    assert a.shape == (4, 1, 32, 32) and torch.equal(a, b)
    assert not torch.allclose(a, _run(second, seed=1, num_images_per_condition=2), atol=1e-2)
    assert second.config.cond_dropout == 0.1 and second.resolution == 32


def test_precomputed_c_glb_gives_the_same_images_as_source_images(tiny_model_folder):
    pipe = _load(tiny_model_folder)
    c_glb = pipe.encode_images(_images())
    assert c_glb.shape == (2, pipe.image_encoder.num_tokens, pipe.image_encoder.hidden_size)
    assert torch.equal(_run(pipe), _run(pipe, images=None, c_glb=c_glb))
    with pytest.raises(ValueError, match="exactly one"):
        pipe(images=_images(), c_glb=c_glb)


def test_a_model_folder_loads_as_training_components_and_a_folder_without_model_index_is_refused(tiny_model_folder,
                                                                                                tmp_path):
    from dinodiff.pipeline import load_model_folder

    parts = load_model_folder(tiny_model_folder)
    assert isinstance(parts.noise_scheduler, DDPMScheduler) and parts.latent_shape == (16, 8, 8)
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_model_folder(tmp_path)


def test_guidance_is_refused_without_condition_dropout(tiny_model_folder):
    pipe = _load(tiny_model_folder)
    plain = DiNODiffusionPipeline(unet=pipe.unet, vae=pipe.vae, scheduler=pipe.scheduler,
                                  image_encoder=pipe.image_encoder, projection=pipe.projection)
    with pytest.raises(ValueError, match="cond_dropout"):
        plain(images=_images(), guidance_scale=3.0)
    assert not torch.allclose(_run(pipe, guidance_scale=3.0), _run(pipe), atol=1e-3)


def test_guidance_scale_zero_is_the_all_zero_null_condition(tiny_model_folder):
    """With w = 0 the guided prediction is the unconditional one: c_GLB = 0, the training null condition."""
    pipe = _load(tiny_model_folder)
    c_glb = pipe.encode_images(_images())
    unguided_null = _run(pipe, images=None, c_glb=torch.zeros_like(c_glb))
    guided_zero = _run(pipe, images=None, c_glb=c_glb, guidance_scale=0.0)
    torch.testing.assert_close(guided_zero, unguided_null, atol=1e-5, rtol=0)
    assert not torch.allclose(_run(pipe, images=None, c_glb=c_glb), unguided_null, atol=1e-3)


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                                             DDPMScheduler])
def test_any_scheduler_can_be_swapped_in_and_is_saved(tiny_model_folder, tmp_path, scheduler_class):
    pipe = _load(tiny_model_folder)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    first = _run(pipe, num_inference_steps=3)
    assert torch.isfinite(first).all() and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, _run(pipe, num_inference_steps=3))  # the scheduler's own state is reset per call
    pipe.save_pretrained(tmp_path / "saved")
    assert isinstance(_load(tmp_path / "saved").scheduler, scheduler_class)
    assert pipe.scheduler.config.prediction_type == "epsilon"  # the training schedule travels with it


def test_output_types_and_pil_inputs(tiny_model_folder):
    pipe = _load(tiny_model_folder)
    pils = [PIL.Image.fromarray((np.random.default_rng(i).random((48, 40)) * 255).astype(np.uint8)) for i in range(2)]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = pipe(images=pils, num_inference_steps=2, generator=gens, output_type="pil")
    assert [im.size for im in out.images] == [(32, 32)] * 2 and {im.mode for im in out.images} == {"L"}
    arrays = pipe(images=pils, num_inference_steps=2, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                  output_type="np").images
    assert arrays.shape == (2, 32, 32, 1)
    assert np.array_equal(np.asarray(out.images[1]), np.round(arrays[1, ..., 0] * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="one per item"):
        pipe(images=pils, generator=gens[:1] * 3, num_inference_steps=2)


def _sixteen_bit_radiograph(size: int = 32) -> np.ndarray:
    """A 12-bit-in-16 image (values 200..3900), dark left half, gradient right: far from 8-bit range."""
    arr = np.full((size, size), 200, np.uint16)
    arr[:, size // 2:] = np.linspace(1000, 3900, size // 2, dtype=np.uint16)[None, :]
    return arr


def test_sixteen_bit_inputs_are_rescaled_like_prepare_not_clipped_white(tiny_model_folder, tmp_path):
    from dinodiff.data.readers import read_grey, to_uint8

    pipe = _load(tiny_model_folder)
    arr = _sixteen_bit_radiograph()
    path = tmp_path / "sixteen.png"
    PIL.Image.fromarray(arr).save(path)  # a 16-bit grey PNG, as prepare reads it
    prepared = to_uint8(read_grey(path)[0]).astype(np.float32) / 255.0  # prepare's default (min-max) rule
    with PIL.Image.open(path) as im:
        im.load()
        from_pil = pipe.to_tensor(im)
    from_array = pipe.to_tensor(arr)
    from_list = pipe.to_tensor([arr, PIL.Image.fromarray(arr)])
    from_int_tensor = pipe.to_tensor(torch.from_numpy(arr.astype(np.int32))[None, None])
    for x in (from_pil, from_array, from_list[:1], from_list[1:], from_int_tensor):
        assert x.shape == (1, 1, 32, 32)
        assert torch.allclose(x[0, 0], torch.from_numpy(prepared), atol=1e-6)
    assert from_array.min() == 0.0 and from_array.max() == 1.0 and from_array[0, 0, :, :16].max() == 0.0
    # the encoder therefore sees the same c_GLB as for the 8-bit image prepare would have written
    eight = PIL.Image.fromarray(to_uint8(arr))
    assert torch.allclose(pipe.encode_images(arr), pipe.encode_images(eight), atol=1e-6)
    # uint8 and [0, 1] float inputs are unchanged by the rule
    assert torch.allclose(pipe.to_tensor(to_uint8(arr)), from_array, atol=1e-6)
    assert torch.allclose(pipe.to_tensor(prepared), from_array, atol=1e-6)
