"""`prepare` end to end on real images: rejects, manifest, masks, resume, determinism."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_datasets import make_fake_jsrt, make_fake_mimic

import dinodiff.prepare as prep
from dinodiff.data.preprocess import CropInfo, preprocess_image, preprocess_mask
from dinodiff.data.readers import load_image, read_grey
from dinodiff.data.shards import list_shards, read_samples
from dinodiff.prepare import NothingUsable, prepare

N_REAL = 6


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def mixed(shared_data, tmp_path_factory) -> Path:
    """N_REAL real cxr-covid images (symlinks) + a zero-byte file, a truncated PNG and a text file."""
    src = tmp_path_factory.mktemp("mixed")
    real = sorted((shared_data / "cxr-covid" / "images").iterdir())
    for p in real[:N_REAL]:
        (src / p.name).symlink_to(p)
    (src / "empty.png").write_bytes(b"")
    png = next(p for p in real if p.suffix == ".png")
    (src / "truncated.png").write_bytes(png.read_bytes()[:3000])
    (src / "readme.txt").write_text("not an image\n")
    return src


@pytest.fixture(scope="module")
def reference(mixed, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "prepared"
    prepare([mixed], out, size=128, shard_size=3, workers=1, progress=False)
    return out


def test_mixed_folder_gives_readable_shards_rejects_and_consistent_manifest(reference, mixed):
    m = json.loads((reference / "manifest.json").read_text())
    c = m["counts"]
    assert (c["found"], c["written"], c["rejected"]) == (N_REAL + 3, N_REAL, 3)
    assert c["reject_reasons"] == {"zero-byte file": 1, "truncated image": 1, "not an image": 1}
    with open(reference / "rejects.csv", newline="") as f:
        rows = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(f)}
    assert rows == {"empty.png": "zero-byte file", "truncated.png": "truncated image", "readme.txt": "not an image"}
    samples = list(read_samples(list_shards(reference, "train")))
    assert len(samples) == N_REAL == sum(s["samples"] for s in m["shards"])
    # 9 inputs / shard_size 3 = 3 chunks whatever gets rejected; the last one (empty, readme,
    # truncated) has no usable image, so only its sidecar exists
    assert len(list((reference / "shards").glob("*.meta.json"))) == 3 and len(list_shards(reference)) == 2
    for s in samples:
        assert s["image"].shape == (128, 128) and s["image"].dtype == np.uint8
        j = s["json"]
        assert j["id"] == s["__key__"] and Path(j["path"]).exists() and j["split"] == "train"
        assert set(j) >= {"original_size", "content_box", "crop_box", "size", "view", "labels", "masks", "dataset"}
    assert m["splits"]["train"] == {"found": 9, "written": 6, "rejected": 3, "shards": 2}
    assert sum(m["intensity"]["histogram"]) == N_REAL * 128 * 128 and 0 < m["intensity"]["mean"] < 255


def test_shard_images_equal_preprocess_image_of_the_source(reference):
    for s in read_samples(reference):
        img, _ = load_image(s["json"]["path"])
        want, info = preprocess_image(img, size=128)
        np.testing.assert_array_equal(s["image"], want)
        assert info.to_json()["crop_box"] == s["json"]["crop_box"]


def test_two_runs_into_two_dirs_are_byte_identical_whatever_the_worker_count(reference, mixed, tmp_path):
    prepare([mixed], tmp_path / "b", size=128, shard_size=3, workers=2, progress=False)
    assert _files(tmp_path / "b") == _files(reference)


def test_resume_after_deleting_a_shard_redoes_only_that_chunk(reference, mixed, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare([mixed], out, size=128, shard_size=3, workers=1, progress=False)
    (out / "shards" / "train-000001.tar").unlink()
    seen = []
    real = prep.process_record
    monkeypatch.setattr(prep, "process_record", lambda r: seen.append(r.id) or real(r))
    prepare([mixed], out, size=128, shard_size=3, workers=1, progress=False)
    assert len(seen) == 3  # one chunk of three inputs
    assert _files(out) == _files(reference)
    seen.clear()
    prepare([mixed], out, size=128, shard_size=3, workers=1, progress=False)
    assert seen == []  # complete: nothing redone


def test_sigkilled_run_leaves_no_partial_tar_and_resume_matches_uninterrupted(shared_data, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted((shared_data / "cxr-covid" / "images").iterdir())[:24]:
        (src / p.name).symlink_to(p)
    out, ref = tmp_path / "killed", tmp_path / "ref"
    code = (f"from dinodiff.prepare import prepare; "
            f"prepare([{str(src)!r}], {str(out)!r}, size=512, shard_size=1, workers=1)")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((out / "shards").glob("*.meta.json"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    tars = list((out / "shards").glob("*.tar"))
    assert 0 < len(tars) < 24, "the run should have been killed part-way"
    for t in tars:  # every visible .tar is complete: it reads to the end
        with tarfile.open(t) as tar:
            assert len(tar.getmembers()) == 2
    prepare([src], out, size=512, shard_size=1, workers=1, progress=False)
    prepare([src], ref, size=512, shard_size=1, workers=2, progress=False)
    assert _files(out) == _files(ref)
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]


def test_folder_of_junk_raises_nothing_usable_with_reasons(tmp_path):
    src = tmp_path / "junk"
    src.mkdir()
    for i in range(3):
        (src / f"n{i}.txt").write_text("hello")
    (src / "z.png").write_bytes(b"")
    with pytest.raises(NothingUsable, match=r"4 files, all rejected: 3 'not an image', 1 'zero-byte file'"):
        prepare([src], tmp_path / "out", workers=1, progress=False)
    assert len((tmp_path / "out" / "rejects.csv").read_text().splitlines()) == 5
    (tmp_path / "empty").mkdir()
    with pytest.raises(NothingUsable, match="no files found"):
        prepare([tmp_path / "empty"], tmp_path / "out2", progress=False)


def test_lung_masks_stay_aligned_through_prepare(shared_data, tmp_path):
    src, lungs = tmp_path / "montgomery", shared_data / "lungs-covid"
    stems = sorted(p.stem for p in (lungs / "ManualMask" / "leftMask").iterdir())[:3]
    for sub in ("CXR_png", "ManualMask/leftMask", "ManualMask/rightMask"):
        (src / sub).mkdir(parents=True)
        for s in stems:
            (src / sub / f"{s}.png").symlink_to(lungs / sub / f"{s}.png")
    m = prepare([src], tmp_path / "out", size=128, workers=1, progress=False)
    assert m["masks"] == {"left": 3, "right": 3}
    for s in read_samples(tmp_path / "out"):
        info = CropInfo.from_json(s["json"])
        assert set(s["masks"]) == {"left", "right"} and s["json"]["masks"] == ["left", "right"]
        for side, got in s["masks"].items():
            mask, _ = read_grey(lungs / "ManualMask" / f"{side}Mask" / f"{Path(s['json']['path']).name}")
            np.testing.assert_array_equal(got, preprocess_mask(mask, info))
            assert 0.02 < (got == 255).mean() < 0.5


def test_jsrt_raw_images_with_half_size_scr_masks(tmp_path):
    make_fake_jsrt(tmp_path / "jsrt")
    m = prepare([tmp_path / "jsrt"], tmp_path / "out", size=128, workers=1, progress=False)
    assert m["counts"]["written"] == 2 and m["labels"]["Nodule"]["positive"] == 1
    for s in read_samples(tmp_path / "out"):
        assert s["json"]["original_size"] == [2048, 2048]
        lungs = (s["masks"]["left"] == 255) | (s["masks"]["right"] == 255)
        assert 0.1 < lungs.mean() < 0.6
        # the (dark) lungs of the image sit exactly under the masks
        assert s["image"][lungs].mean() < 80 and s["image"][~lungs].mean() > 150


def test_mimic_split_and_hash_split(tmp_path, mixed):
    (tmp_path / "mimic").mkdir()
    make_fake_mimic(tmp_path / "mimic")
    m = prepare([tmp_path / "mimic"], tmp_path / "out", size=64, workers=1, progress=False, test_fraction=0.9)
    assert {k: v["written"] for k, v in m["splits"].items()} == {"test": 1, "train": 2}  # p19, not the hash
    assert m["labels"]["Atelectasis"]["positive"] == 1 and m["labels"]["Consolidation"]["uncertain"] == 1
    assert [Path(p).name for p in list_shards(tmp_path / "out", "test")] == ["test-000000.tar"]
    a = prepare([mixed], tmp_path / "h1", size=64, workers=1, progress=False, test_fraction=0.5)
    b = prepare([mixed], tmp_path / "h2", size=64, workers=1, progress=False, test_fraction=0.5)
    assert a["splits"] == b["splits"] and set(a["splits"]) == {"train", "test"}
    assert sum(v["found"] for v in a["splits"].values()) == N_REAL + 3


def test_several_sources_get_prefixed_unique_ids(shared_data, mixed, tmp_path):
    m = prepare([mixed, shared_data / "lungs-shenzhen"], tmp_path / "out", size=64, workers=2, progress=False)
    assert m["counts"]["written"] == N_REAL + 10 and m["masks"] == {"lungs": 10}
    keys = [s["__key__"] for s in read_samples(tmp_path / "out")]
    assert len(set(keys)) == len(keys) and any(k.startswith("lungs-shenzhen__CHNCXR") for k in keys)
    assert os.path.exists(tmp_path / "out" / "rejects.csv")


def test_output_inside_the_source_is_not_read_back_on_rerun(shared_data, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted((shared_data / "cxr-covid" / "images").iterdir())[:3]:
        (src / p.name).symlink_to(p)
    first = prepare([src], src / "prepared", size=64, workers=1, progress=False)
    again = prepare([src], src / "prepared", size=64, workers=1, progress=False)
    assert first == again and again["counts"] == {"found": 3, "written": 3, "rejected": 0, "reject_reasons": {}}
    assert again["parameters"]["kinds"] == {str(src.resolve()): "folder"}


def test_bad_parameters_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="intensity"):
        prepare([tmp_path], tmp_path / "out", intensity="gamma", progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        prepare([tmp_path], tmp_path / "out", shard_size=0, progress=False)


def test_all_300_real_cxrs_become_square_border_free_images(shared_data, tmp_path):
    manifest = prepare([shared_data / "cxr-covid" / "images"], tmp_path / "out", size=64, shard_size=100,
                       workers=2, progress=False)
    assert manifest["counts"]["written"] == 300 and manifest["counts"]["rejected"] == 0
    framed = 0
    for sample in read_samples(tmp_path / "out"):
        image = sample["image"]
        assert image.shape == (64, 64) and image.dtype == np.uint8
        # A leftover frame shows as an outermost row/column that is almost all black or all white.
        edges = [image[0], image[-1], image[:, 0], image[:, -1]]
        framed += any(((e < 8).mean() > 0.95) or ((e > 247).mean() > 0.95) for e in edges)
    assert framed <= 6, f"{framed} of 300 images still have a constant black/white edge"
    with Image.open(tmp_path / "out" / "preview.png") as sheet:
        assert sheet.size == (8 * 130, 8 * 130)


def test_records_in_flight_to_the_worker_pool_are_bounded():
    import threading

    from dinodiff.prepare import _Window

    window = _Window(3)
    feed = window.feed(iter(range(10)))
    assert [next(feed) for _ in range(3)] == [0, 1, 2]
    got = []
    fourth = threading.Thread(target=lambda: got.append(next(feed)))
    fourth.start()
    fourth.join(0.3)
    assert fourth.is_alive() and not got  # the pool's feeder waits until the consumer takes a result
    window.taken()
    fourth.join(5)
    assert got == [3]
    window.stop()  # a feeder waiting at shutdown is released and ends
    assert list(feed) == []


def _reference_order(sources: list[Path], shard_size: int, test_fraction: float, seed: int) -> list[list[tuple]]:
    """The records of every shard as the in-memory adapters give them (discover, dedupe_ids, sorted by id; what
    `prepare` held before its discovery was spooled to disk): (id, split, labels, subject) per record."""
    from dinodiff.data.datasets import dedupe_ids, discover

    records = []
    for src in sources:
        recs = discover(src)
        for r in recs:
            r.id = f"{src.stem}__{r.id}" if len(sources) > 1 else r.id
        records += recs
    records = dedupe_ids(records, [str(r.path) for r in records])
    by_split: dict[str, list] = {}
    for r in records:
        r.split = prep._split_of(r, test_fraction, seed)
        by_split.setdefault(r.split, []).append((r.id, r.split, r.labels, r.subject))
    return [recs[i:i + shard_size] for _, recs in sorted(by_split.items()) for i in range(0, len(recs), shard_size)]


def test_spooled_discovery_gives_the_in_memory_order_ids_and_labels(tmp_path):
    """Ids that collide within a folder (a.png, a.jpg, a.PNG) and across sources, a labels.csv with subjects and a
    row repeated for one path (the later wins), a labels.csv row for no file: the shards hold the records, ids,
    labels, subjects and splits of the in-memory adapters, shard by shard and in the same order."""
    from dinodiff.data.phantoms import make_phantom

    one, two = tmp_path / "one", tmp_path / "two"
    rows = [["path", "Effusion", "patient"]]
    for i in range(14):
        rel = f"{'sub/' if i % 3 else ''}a{i % 5}.{'png' if i % 2 else 'jpg'}"
        (one / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_phantom(i, size=32).image).save(one / rel)
        rows.append([rel, str(i % 2), f"P{i % 4}"])
    Image.fromarray(make_phantom(20, size=32).image).save(one / "a1.PNG")
    rows += [[rows[1][0], "1", "P9"], ["missing.png", "1", "P8"]]
    (one / "labels.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
    two.mkdir()
    for i in range(6):
        Image.fromarray(make_phantom(30 + i, size=32).image).save(two / f"a{i}.png")
    for sources in ([one], [one, two]):
        out = tmp_path / f"out-{len(sources)}"
        m = prepare(sources, out, size=32, min_size=8, shard_size=4, workers=1, test_fraction=0.4,
                    progress=False)
        expected = _reference_order(sources, 4, 0.4, 0)
        assert any("-" in r[0] for shard in expected for r in shard)  # colliding ids were renamed
        assert [s["samples"] for s in m["shards"]] == [len(shard) for shard in expected]
        got = [[(s["__key__"], s["json"]["split"], s["json"]["labels"], s["json"]["subject"])
                for s in read_samples(out / s["path"])] for s in m["shards"]]
        assert got == expected
        assert not (out / ".records.tmp").exists()  # the spool is removed
