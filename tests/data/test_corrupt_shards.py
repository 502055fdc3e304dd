"""A prepared shard cut short (a full disk, an interrupted copy) is named with its fix, never a traceback
(issue 10, item 11).

Policy: training and caching skip a damaged shard, log it and count it (`data.on_corrupt=skip`, the
default) or stop (`data.on_corrupt=stop`); generation and scoring always stop, naming the shard. A rerun
of `prepare` checks every shard against the size and sha256 in its sidecar and redoes a damaged chunk.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from typer.testing import CliRunner

import dinodiff.prepare as prep
from dinodiff.cli import app
from dinodiff.data.loader import build_train_dataset, build_train_loader
from dinodiff.data.phantoms import write_phantoms
from dinodiff.data.shards import CorruptShard, file_digest, list_shards, read_samples, shard_path, sidecar_path
from dinodiff.evaluate.fid.images import iter_images, list_images

runner = CliRunner()
DAMAGED = "train-000001.tar"


def _keys(tar: str | Path) -> set[str]:
    return {s["__key__"] for s in read_samples([tar])}


@pytest.fixture(scope="module")
def damaged(prepared_phantoms, tmp_path_factory) -> Path:
    """A copy of the prepared phantoms whose second train shard is cut to 60% of its length."""
    out = tmp_path_factory.mktemp("damaged") / "prepared"
    shutil.copytree(prepared_phantoms, out)
    tar = out / "shards" / DAMAGED
    tar.write_bytes(tar.read_bytes()[: int(tar.stat().st_size * 0.6)])
    return out


@pytest.fixture
def no_sidecar(damaged, tmp_path) -> Path:
    """The damaged set without the damaged shard's sidecar: only reading the tar can find the damage."""
    out = tmp_path / "prepared"
    shutil.copytree(damaged, out)
    sidecar_path(out / "shards" / DAMAGED).unlink()
    return out


def _one_line_naming_the_shard(text: str, fix: str = "dinodiff prepare") -> None:
    assert "Traceback" not in text
    assert DAMAGED in text and fix in text and "corrupt shard" in text


# --------------------------------------------------------------------------------------- prepare
def test_prepare_records_each_shards_size_and_sha256_in_its_sidecar(prepared_phantoms):
    for tar in list_shards(prepared_phantoms):
        meta = json.loads(sidecar_path(tar).read_text())
        assert (meta["bytes"], meta["sha256"]) == file_digest(tar)


@pytest.mark.parametrize("damage", ["truncate", "flip-a-byte"])
def test_prepare_rerun_redoes_only_the_damaged_chunk_and_restores_its_bytes(tmp_path, monkeypatch, damage):
    raw = write_phantoms(tmp_path / "raw", 9, size=48, seed=1, progress=False)
    out = tmp_path / "prepared"
    prep.prepare([raw], out, size=32, min_size=16, shard_size=3, workers=1, progress=False)
    before = {p: Path(p).read_bytes() for p in list_shards(out)}
    tar = shard_path(out, "train", 1)
    data = bytearray(tar.read_bytes())
    if damage == "truncate":
        tar.write_bytes(bytes(data[: len(data) // 2]))
    else:  # same size, different content: only the hash tells
        data[len(data) // 2] ^= 0xFF
        tar.write_bytes(bytes(data))
    calls = []
    original = prep.process_record
    monkeypatch.setattr(prep, "process_record", lambda rec: calls.append(rec.id) or original(rec))
    prep.prepare([raw], out, size=32, min_size=16, shard_size=3, workers=1, progress=False)
    assert len(calls) == 3  # one chunk of shard_size records, the damaged one
    assert {p: Path(p).read_bytes() for p in list_shards(out)} == before


# -------------------------------------------------------------------------------------- training
def test_training_stream_skips_a_truncated_shard_and_logs_its_name_and_fix(damaged, caplog):
    bad = str(damaged / "shards" / DAMAGED)
    with caplog.at_level(logging.WARNING):
        stream = build_train_dataset(damaged, size=64, augment=False, shuffle_buffer=0, seed=0)
        keys = {s["key"] for s in itertools.islice(iter(stream), 30)}
    good = set().union(*(_keys(t) for t in list_shards(damaged, "train") if t != bad))
    assert keys and keys <= good
    warnings = " ".join(r.getMessage() for r in caplog.records)
    _one_line_naming_the_shard(warnings)
    assert "1 of 3 shards skipped" in warnings


def test_a_damaged_shard_found_while_streaming_is_left_and_named(no_sidecar, caplog):
    with caplog.at_level(logging.WARNING):
        stream = build_train_dataset(no_sidecar, size=64, augment=False, shuffle_buffer=0, seed=0)
        samples = list(itertools.islice(iter(stream), 40))
    assert len(samples) == 40
    _one_line_naming_the_shard(" ".join(r.getMessage() for r in caplog.records))


def test_stop_policy_in_a_dataloader_worker_raises_one_clean_line(no_sidecar):
    loader = build_train_loader(no_sidecar, batch_size=4, num_workers=1, size=64, augment=False, shuffle_buffer=0,
                                on_corrupt="stop", resampled=False, split_by_node=False)
    with pytest.raises(CorruptShard) as err:
        list(loader)
    _one_line_naming_the_shard(str(err.value))
    assert "\n" not in str(err.value)


def test_trainer_data_follows_data_on_corrupt(damaged, tmp_path):
    from dinodiff.config import with_overrides
    from dinodiff.models.factory import build_components
    from dinodiff.train.data import TrainData

    cfg = tiny_config(tmp_path / "run", damaged, "model.resolution=64")
    parts = build_components(cfg.model)
    batch = next(TrainData(cfg, parts).batches(segment=0))
    assert not set(batch["key"]) & _keys_of_damaged_prefix(damaged)
    stop = TrainData(with_overrides(cfg, ["data.on_corrupt=stop"]), parts)
    with pytest.raises(CorruptShard, match=DAMAGED):
        next(stop.batches(segment=0))


def _keys_of_damaged_prefix(damaged: Path) -> set[str]:
    """Keys of the damaged shard that can still be read (those before the cut)."""
    keys = set()
    try:
        for s in read_samples([damaged / "shards" / DAMAGED]):
            keys.add(s["__key__"])
    except CorruptShard:
        pass
    return keys


def test_train_cli_with_stop_policy_names_the_shard_and_the_fix(damaged, tmp_path):
    result = runner.invoke(app, ["train", "--config", "tiny", f"data.shards={damaged}", "data.on_corrupt=stop",
                                 f"train.run_dir={tmp_path / 'run'}", "model.resolution=64"])
    assert result.exit_code == 2, result.output
    _one_line_naming_the_shard(result.output)


# --------------------------------------------------------------------------------------- caching
def test_cache_skips_a_damaged_shard_and_records_it(damaged, tmp_path):
    out = tmp_path / "cache"
    result = runner.invoke(app, ["cache", "--config", "tiny", "--out", str(out), "--views", "1",
                                 f"data.shards={damaged}", "model.resolution=64"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "cache.json").read_text())
    assert info["skipped_shards"] == [str(damaged / "shards" / DAMAGED)]
    good = [t for t in list_shards(damaged, "train") if not t.endswith(DAMAGED)]
    assert info["count"] == sum(len(_keys(t)) for t in good)


def test_cache_cli_with_stop_policy_names_the_shard(damaged, tmp_path):
    result = runner.invoke(app, ["cache", "--config", "tiny", "--out", str(tmp_path / "cache"), "--views", "1",
                                 f"data.shards={damaged}", "model.resolution=64", "data.on_corrupt=stop"])
    assert result.exit_code == 2, result.output
    _one_line_naming_the_shard(result.output)


# ---------------------------------------------------------------------------- generating, scoring
def test_generate_cli_from_a_damaged_source_shard_names_it(damaged, tmp_path):
    from dinodiff.models.factory import build_components
    from dinodiff.pipeline import save_model_folder

    cfg = tiny_config(tmp_path / "run", damaged, "model.resolution=64")
    parts = build_components(cfg.model)
    model = save_model_folder(tmp_path / "model", unet=parts.unet, projection=parts.projection,
                              autoencoder=parts.autoencoder, noise_scheduler=parts.noise_scheduler,
                              model_cfg=cfg.model, encoder=parts.encoder, cond_dropout=0.0)
    result = runner.invoke(app, ["generate", str(model), "--source", str(damaged), "--out", str(tmp_path / "syn"),
                                 "--steps", "1", "--no-progress", "--preview-rows", "0"])
    assert result.exit_code == 2, result.output
    _one_line_naming_the_shard(result.output)


@pytest.mark.parametrize("sidecar", [True, False])
def test_scoring_a_damaged_shard_stops_with_its_name(damaged, no_sidecar, sidecar):
    source = damaged if sidecar else no_sidecar
    with pytest.raises(CorruptShard) as err:
        refs = list_images(source, split="train")
        torch.stack(list(iter_images(refs, 32)))
    _one_line_naming_the_shard(str(err.value))


def test_fid_cli_on_a_damaged_shard_names_it(damaged, tmp_path):
    from dinodiff.evaluate.fid.features import save_random_xrv_weights

    save_random_xrv_weights(tmp_path / "xrv")
    result = runner.invoke(app, ["fid", str(damaged), str(damaged), "--weights", str(tmp_path / "xrv"),
                                 "--split", "train", "--no-cache", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    _one_line_naming_the_shard(result.output)
