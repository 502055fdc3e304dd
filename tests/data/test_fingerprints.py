"""Content fingerprints: the same picture is found through re-encoding, resizing and renaming; different pictures
are not; and a diffusion model folder names the image sets it trained on."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinodiff.data.fingerprints import SAME_IMAGE, find_in_prepared, fingerprint, fingerprints
from dinodiff.data.image_sets import image_records
from dinodiff.data.phantoms import write_phantoms
from dinodiff.models.training_images import find_overlap, model_training_sources
from dinodiff.prepare import prepare


def _cxrs(shared_data: Path, n: int) -> list[Path]:
    return sorted((shared_data / "lungs-shenzhen" / "CXR_png").glob("*.png"))[:n]


@pytest.fixture(scope="module")
def prepared_cxrs(shared_data, tmp_path_factory) -> Path:
    """4 Shenzhen CXRs re-encoded as JPEG under new names, prepared at 128 px (train split only)."""
    root = tmp_path_factory.mktemp("fp")
    (root / "jpeg").mkdir()
    for i, path in enumerate(_cxrs(shared_data, 4)):
        Image.open(path).convert("L").save(root / "jpeg" / f"renamed_{i}.jpg", quality=70)
    prepare([root / "jpeg"], root / "prepared", size=128, progress=False)
    return root / "prepared"


def _prepared_image(prepared: Path, index: int) -> np.ndarray:
    return list(image_records(prepared, size=0, kind="shards"))[index].decode()


def test_the_same_picture_matches_across_size_and_format_and_others_do_not(prepared_cxrs):
    images = [_prepared_image(prepared_cxrs, i) for i in range(4)]
    small = np.asarray(Image.fromarray(images[0]).resize((64, 64), Image.Resampling.LANCZOS))
    assert float(fingerprint(images[0]) @ fingerprint(small)) >= SAME_IMAGE
    prints = fingerprints(images)
    sims = prints @ prints.T
    assert np.allclose(np.diag(sims), 1.0, atol=1e-5)
    assert sims[~np.eye(4, dtype=bool)].max() < SAME_IMAGE  # four different patients
    assert not fingerprint(np.full((32, 32), 128, np.uint8)).any()  # a flat image: no structure, no match


def test_different_phantoms_never_match_although_they_share_their_layout(tmp_path):
    write_phantoms(tmp_path / "ph", 40, size=64, seed=0)
    images = [np.asarray(Image.open(p).convert("L")) for p in sorted((tmp_path / "ph").glob("CXR_png/*.png"))]
    prints = fingerprints(images)
    sims = prints @ prints.T
    assert len(images) == 40 and sims[~np.eye(len(images), dtype=bool)].max() < SAME_IMAGE


def test_find_in_prepared_names_the_picture_or_the_source_file(shared_data, prepared_cxrs, tmp_path):
    originals = _cxrs(shared_data, 6)  # 4 of them were prepared (as renamed JPEGs); 2 were not
    queries = [np.asarray(Image.open(p).convert("L").resize((64, 64))) for p in originals]
    found, count = find_in_prepared(fingerprints(queries), [str(p) for p in originals], prepared_cxrs, None)
    assert count == 4
    assert [f is not None for f in found] == [True] * 4 + [False] * 2
    assert all(f.startswith("same picture as renamed_") for f in found[:4])
    # a flat image whose source file was prepared is found by its path alone
    source = next(r.path for r in image_records(prepared_cxrs, size=0, kind="shards"))
    flat, _ = find_in_prepared(fingerprints([np.zeros((8, 8), np.uint8)]), [source], prepared_cxrs, None)
    assert flat[0] is not None and flat[0].startswith("same source file as renamed_")


def _model_in_run(run: Path, data: dict, encoder: str = "random:transformers-vit") -> Path:
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(json.dumps({"data": data}))  # YAML is a superset of JSON
    model = run / "checkpoints" / "checkpoint-10" / "model"
    (model / "image_encoder").mkdir(parents=True)
    (model / "model_config.yaml").write_text(json.dumps({"encoder": {"name_or_path": encoder}}))
    return model


def test_model_training_sources_follow_the_run_config_and_the_encoder_record(prepared_cxrs, tmp_path):
    model = _model_in_run(tmp_path / "run", {"shards": str(prepared_cxrs), "cache": None})
    sources, unknown = model_training_sources(model)
    assert [(s.shards, s.split) for s in sources] == [(str(prepared_cxrs.resolve()), "train")] and unknown == []
    # a domain encoder without a record, and a folder outside any run: both unknown, and said so
    lone = _model_in_run(tmp_path / "elsewhere" / "x", {}, encoder="runs/enc/encoder")
    (lone.parents[2] / "config.yaml").unlink()
    sources, unknown = model_training_sources(lone)
    assert sources == [] and len(unknown) == 2 and "UNet" in unknown[0] and "training_images.json" in unknown[1]
    # the encoder's record names its own training set
    record = {"kind": "dinodiff-encoder-training-images", "ids": ["a"], "paths": [None], "subjects": [None],
              "shards": str(prepared_cxrs), "split": None}
    (lone / "image_encoder" / "training_images.json").write_text(json.dumps(record))
    sources, _ = model_training_sources(lone)
    assert [(s.split, s.what) for s in sources] == [(None, "encoder (training_images.json)")]


def test_find_overlap_reads_each_training_set_once_and_says_what_it_checked(shared_data, prepared_cxrs, tmp_path):
    model = _model_in_run(tmp_path / "run", {"shards": str(prepared_cxrs)})
    originals = _cxrs(shared_data, 6)
    images = [np.asarray(Image.open(p).convert("L").resize((48, 48))) for p in originals]
    overlap = find_overlap(images, [None] * 6, [model, model])  # two checkpoints of one run
    assert sorted(overlap.seen) == [0, 1, 2, 3] and len(overlap.sources) == 1
    assert overlap.statement(6).startswith("4 of 6 evaluation images are training images of the model")


def test_cached_fingerprints_give_the_same_answer_without_decoding_and_follow_a_rewritten_shard(
        shared_data, prepared_cxrs, tmp_path, monkeypatch):
    import os

    import dinodiff.data.fingerprints as fp_module

    originals = _cxrs(shared_data, 6)
    queries = fingerprints(np.asarray(Image.open(p).convert("L").resize((64, 64))) for p in originals)
    first = find_in_prepared(queries, [None] * 6, prepared_cxrs, None, tmp_path / "cache")
    assert first[1] == 4 and (tmp_path / "cache").is_dir()

    def no_decoding(*args, **kwargs):
        raise AssertionError("the images were decoded again")

    monkeypatch.setattr(fp_module, "image_records", no_decoding)
    again = find_in_prepared(queries, [None] * 6, prepared_cxrs, None, tmp_path / "cache")
    assert [f is not None for f in again[0]] == [f is not None for f in first[0]] and again[1] == 4
    assert [f.split(" (")[0] for f in again[0][:4]] == [f.split(" (")[0] for f in first[0][:4]]
    shard = next((prepared_cxrs / "shards").glob("*.tar"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # the shard was rewritten
    with pytest.raises(AssertionError, match="decoded again"):
        find_in_prepared(queries, [None] * 6, prepared_cxrs, None, tmp_path / "cache")


def _rejects(prepared: Path) -> dict[str, tuple[str, str]]:
    with open(prepared / "rejects.csv", newline="") as f:
        return {Path(row[0]).name: (row[1], row[2]) for row in list(csv.reader(f))[1:]}


def test_prepare_exclude_keeps_an_evaluation_set_out_by_picture_and_by_file_and_resumes(shared_data, tmp_path):
    originals = _cxrs(shared_data, 5)
    evaluation, train = tmp_path / "evaluation", tmp_path / "train"
    evaluation.mkdir()
    train.mkdir()
    for i in (0, 4):  # the evaluation set: two of the originals
        (evaluation / f"e{i}.png").symlink_to(originals[i])
    for i in range(4):  # the training candidates: four originals, renamed, re-encoded and resized
        Image.open(originals[i]).convert("L").resize((300, 300)).save(train / f"t{i}.jpg", quality=75)
    (train / "linked.png").symlink_to(originals[4])  # the evaluation image's own file
    manifest = prepare([train], tmp_path / "prep", size=128, exclude=[str(evaluation)], progress=False)
    assert manifest["counts"]["written"] == 3 and manifest["counts"]["reject_reasons"] == {"excluded": 2}
    rejects = _rejects(tmp_path / "prep")
    assert rejects["t0.jpg"][1].startswith("the same picture as evaluation/")
    assert rejects[originals[4].name][1].startswith("the same file as evaluation/")  # the link is resolved
    assert manifest["parameters"]["exclude"] == [str(evaluation.resolve())]
    shard = next((tmp_path / "prep" / "shards").glob("*.tar"))
    stamp = shard.stat().st_mtime_ns
    prepare([train], tmp_path / "prep", size=128, exclude=[str(evaluation)], progress=False)
    assert shard.stat().st_mtime_ns == stamp  # the same exclusion: the finished shard is kept
    assert prepare([train], tmp_path / "prep", size=128, progress=False)["counts"]["written"] == 5  # redone
    with pytest.raises(FileNotFoundError, match="exclude: .*nowhere"):
        prepare([train], tmp_path / "prep2", size=128, exclude=[str(tmp_path / "nowhere")], progress=False)
