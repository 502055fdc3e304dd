"""Generation at scale: nested image folders, sources memory-mapped in chunks, the plan as arrays, the PNG writer."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from test_pipeline import tiny_model_folder  # noqa: F401 - the shared tiny model fixture

import dinodiff.generate.sources as sources_mod
from dinodiff.data.shards import decode_png
from dinodiff.data.image_sets import SourceImage, label_names, positive_matrix
from dinodiff.generate.outputs import preview_items
from dinodiff.generate.plan import GenerateSettings, image_path, item_conditions, plan_arrays, plan_items
from dinodiff.pipeline.sample import load_pipeline, resolve_precision, sample_batches
from dinodiff.generate.sources import SourceTable, write_sources
from dinodiff.generate.writer import ImageWriter


def test_image_paths_nest_ten_thousand_per_folder(tmp_path):
    assert image_path(tmp_path, 1234).relative_to(tmp_path).as_posix() == "images/000/0001234.png"
    assert image_path(tmp_path, 9_999).parent == image_path(tmp_path, 0).parent
    assert image_path(tmp_path, 10_000).relative_to(tmp_path).as_posix() == "images/001/0010000.png"
    assert image_path(tmp_path, 1_234_567).relative_to(tmp_path).as_posix() == "images/123/1234567.png"


def _sources(n: int) -> list[SourceImage]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        labels = {"A": float(rng.integers(0, 2)), "B": [1.0, 0.0, -1.0, None][i % 4]}
        if i % 5 == 0:
            labels.pop("A")
        out.append(SourceImage(f"s{i:04d}", labels, np.full((4, 4), i % 256, np.uint8)))
    return out


def test_sources_are_encoded_in_chunks_and_read_back_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(sources_mod, "CHUNK", 8)  # 21 sources -> chunks of 8, 8, 5
    items = _sources(21)
    calls = []

    def encode(batch):
        calls.append(len(batch))
        return torch.stack([torch.full((2, 3), float(int(s.id[1:]))) for s in batch])

    assert write_sources(tmp_path / "src", iter(items), encode, encode_batch=3) == 21
    assert max(calls) == 3  # streamed a few at a time, never all at once
    assert sorted(p.name for p in (tmp_path / "src").glob("c_glb-*.npy")) == [f"c_glb-00000{k}.npy" for k in range(3)]
    table = SourceTable(tmp_path / "src")
    assert len(table) == 21 and table.ids == [s.id for s in items] and table.names == label_names(items)
    assert np.array_equal(table.positive(), positive_matrix(items, table.names))
    assert [table.label_row(i) for i in range(21)] == [{k: v for k, v in s.labels.items() if v is not None}
                                                        for s in items]
    torch.testing.assert_close(table.c_glb([20, 0, 9]), torch.tensor([20.0, 0.0, 9.0])[:, None, None].expand(3, 2, 3))
    assert isinstance(table.labels, np.memmap)
    with pytest.raises(FileNotFoundError):
        write_sources(tmp_path / "empty", iter([]), encode, encode_batch=3)


def test_the_plan_as_arrays_gives_the_same_items_and_conditions_as_a_list():
    positive = np.array([[1, 0], [1, 1], [0, 1], [1, 0], [0, 1]], bool)
    for settings in (GenerateSettings(ratio=3, seed=4), GenerateSettings(strategy="interpolation", ratio=2, seed=1)):
        plan = plan_arrays(settings, positive)
        items = plan_items(settings, positive)
        assert len(plan) == len(items) == 5 * settings.ratio and plan.items(3, 7) == items[3:7]
        c_glb = torch.randn(5, 2, 4)
        torch.testing.assert_close(item_conditions(items, c_glb), item_conditions(items, lambda ix: c_glb[list(ix)]))
    recon = plan_arrays(GenerateSettings(ratio=3), positive)
    assert [it.index for it in preview_items(recon, rows=2)] == [0, 1, 2, 3, 4, 5]


def test_the_writer_writes_in_the_background_keeps_existing_files_and_raises_failures(tmp_path):
    image = np.arange(64, dtype=np.uint8).reshape(8, 8)
    existing = tmp_path / "images" / "000" / "0000001.png"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"kept")
    with ImageWriter(workers=2, max_pending=2) as writer:
        for i in range(6):
            writer.submit(tmp_path / "images" / f"{i // 3:03d}" / f"{i:07d}.png", image)
    assert existing.read_bytes() == b"kept"
    assert np.array_equal(decode_png((tmp_path / "images" / "001" / "0000005.png").read_bytes()), image)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        with ImageWriter() as writer:
            writer.submit(blocker / "sub" / "a.png", image)  # its parent is a file: the write fails
    assert threading.active_count() < 20


def test_precision_is_bf16_on_cuda_and_fp32_on_a_cpu(monkeypatch):
    assert resolve_precision("auto", "cpu") is torch.float32
    assert resolve_precision("fp16", "cpu") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") is torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", "cpu")


def test_a_bf16_pipeline_keeps_the_encoder_in_fp32_and_draws_close_to_fp32(tiny_model_folder):
    pipes = {p: load_pipeline(tiny_model_folder, "dpm", "cpu", p) for p in ("fp32", "bf16")}
    half = pipes["bf16"]
    assert half.unet.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in half.vae.parameters())  # the unshuffle stand-in has none
    assert next(half.image_encoder.parameters()).dtype == torch.float32  # c_GLB as in training
    sources = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    c_glb = pipes["fp32"].encode_images(sources)
    torch.testing.assert_close(half.encode_images(sources), c_glb)
    out = {p: next(sample_batches(pipe, c_glb, [11, 12], batch_size=2, num_inference_steps=3))
           for p, pipe in pipes.items()}
    assert out["bf16"].dtype == torch.float32 and torch.isfinite(out["bf16"]).all()
    assert (out["bf16"] - out["fp32"]).abs().mean() < 0.02  # the same images up to bf16 rounding
