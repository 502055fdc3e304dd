"""Dataset adapters on the real folders and on small fake MIMIC-CXR / JSRT trees."""

from __future__ import annotations

import csv
import gzip
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinodiff.data.datasets import MIMIC_LABELS, detect_kind, discover, is_image_file, make_id
from dinodiff.data.phantoms import write_phantoms
from dinodiff.data.readers import read_jsrt_raw

KEY = re.compile(r"^[A-Za-z0-9_-]+$")  # what a WebDataset key may be made of here


def _png(path: Path, size: int = 96) -> Path:
    """A small noise image (usable by `prepare`: not blank, not below min_size 64)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    Image.fromarray(rng.integers(30, 220, (size, size), dtype=np.uint8)).save(path, format="PNG")
    return path


def test_folder_adapter_on_real_images_gives_300_unique_stable_keys(shared_data):
    recs = discover(shared_data / "cxr-covid" / "images")
    assert len(recs) == 300
    ids = [r.id for r in recs]
    assert len(set(ids)) == 300 and ids == sorted(ids)
    assert all(KEY.match(i) for i in ids)
    assert [r.id for r in discover(shared_data / "cxr-covid" / "images")] == ids  # stable
    assert "000001" in ids  # readable: the file name without extension


def test_folder_passes_non_images_on_and_skips_hidden(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "a.jpg")  # same stem as a.png: ids must still differ
    _png(tmp_path / "sub dir" / "b.c.png")
    _png(tmp_path / ".hidden" / "x.png")
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "notes.txt").write_text("not an image")
    dcm = tmp_path / "1.2.840.5"
    dcm.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    recs = discover(tmp_path, kind="folder")
    names = sorted(r.path.name for r in recs)
    assert names == sorted(["a.png", "a.jpg", "b.c.png", "notes.txt", "1.2.840.5"])
    assert len({r.id for r in recs}) == len(recs) and all(KEY.match(r.id) for r in recs)
    assert is_image_file(dcm) and not is_image_file(tmp_path / "notes.txt")


@pytest.mark.parametrize("rel", ["a/b.png", "a__b.png", "a/b c.png", "x.y.z.jpg", "1.2.840.113619.2", "é.png"])
def test_make_id_is_a_valid_key(rel):
    assert KEY.match(make_id(rel))


def test_make_id_keeps_distinct_paths_distinct():
    rels = ["a/b.png", "a__b.png", "a_b.png", "a/b c.png", "a/b_c.png", "1.2.3.4", "1.2.3.5", "x" * 300 + ".png"]
    ids = [make_id(r) for r in rels]
    assert len(set(ids)) == len(rels)
    assert make_id("p10/p1/s2/abc-def.jpg") == "p10__p1__s2__abc-def"
    assert max(len(i) for i in ids) <= 120


def test_csv_adapter_reads_labels_views_from_real_metadata(shared_data):
    src = shared_data / "cxr-covid"
    recs = discover(src / "metadata.csv", root=src / "images", label_columns=["finding"])
    assert len(recs) == 300 and all(r.path.exists() for r in recs)
    covid = Counter(r.labels["COVID-19"] for r in recs)
    assert covid[1.0] == 170  # 161 "COVID-19" + 9 "COVID-19, ARDS"
    assert Counter(r.view for r in recs) == {"PA": 170, "AP Supine": 93, "AP": 37}
    both = [r for r in recs if r.labels["COVID-19"] == 1.0 and r.labels["ARDS"] == 1.0]
    assert len(both) == 9


def test_csv_adapter_without_root_says_what_to_do(shared_data):
    with pytest.raises(ValueError, match="root="):
        discover(shared_data / "cxr-covid" / "metadata.csv")


def test_csv_adapter_detects_binary_label_columns_and_split(tmp_path):
    for n in ("x1", "x2", "x3"):
        _png(tmp_path / "img" / f"{n}.png")
    (tmp_path / "labels.csv").write_text(
        "path,Cardiomegaly,Edema,age,split\n"
        "img/x1.png,1,0,63,train\nimg/x2.png,0,,70,test\nimg/x3.png,-1,1,55,train\n")
    recs = discover(tmp_path / "labels.csv")
    assert [r.labels for r in recs] == [
        {"Cardiomegaly": 1.0, "Edema": 0.0}, {"Cardiomegaly": 0.0, "Edema": None},
        {"Cardiomegaly": -1.0, "Edema": 1.0}]
    assert [r.split for r in recs] == ["train", "test", "train"] and all(r.split_fixed for r in recs)


def test_montgomery_layout_on_lungs_covid_finds_both_lung_masks(shared_data):
    src = shared_data / "lungs-covid"
    assert detect_kind(src) == "montgomery"
    recs = discover(src)
    assert len(recs) == 100 and len({r.id for r in recs}) == 100
    assert sum("left" in r.masks for r in recs) == 99 and sum("right" in r.masks for r in recs) == 99
    for r in recs:
        for m in r.masks.values():
            assert m.exists() and m.stem == r.path.stem
    assert sum(len(r.masks) == 2 for r in recs) == 98


def test_shenzhen_layout_finds_lung_masks_and_tb_label(shared_data):
    src = shared_data / "lungs-shenzhen"
    assert detect_kind(src) == "shenzhen"
    recs = discover(src)
    assert len(recs) == 10  # unmasked/ is not part of the layout
    assert all(r.masks["lungs"].name == f"{r.path.stem}_mask.png" for r in recs)
    assert all(r.labels == {"Tuberculosis": 0.0} for r in recs)


def make_fake_mimic(root: Path) -> None:
    """Tiny MIMIC-CXR-JPG tree: subjects in p10, p15 and p19; PA, AP, LATERAL views; one missing file."""
    meta = [  # dicom_id, subject, study, view, on_disk
        ("d1", "10000001", "50000001", "PA", True), ("d2", "10000001", "50000001", "LATERAL", True),
        ("d3", "15000002", "50000002", "AP", True), ("d4", "19000003", "50000003", "PA", True),
        ("d5", "19000003", "50000004", "LL", True), ("d6", "12000004", "50000005", "PA", False),
    ]
    with gzip.open(root / "mimic-cxr-2.0.0-metadata.csv.gz", "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition"])
        for d, s, st, v, on_disk in meta:
            w.writerow([d, s, st, "CHEST (PA AND LAT)", v])
            if on_disk:
                _png(root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{st}" / f"{d}.jpg")
    with gzip.open(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject_id", "study_id", *MIMIC_LABELS, "No Finding", "Support Devices"])
        w.writerow(["10000001", "50000001", "1.0", "", "-1.0", "0.0", "", "", "", "", "1.0"])
        w.writerow(["15000002", "50000002", "", "1.0", "", "", "1.0", "", "", "", ""])
        w.writerow(["19000003", "50000003", "", "", "", "", "", "", "1.0", "", ""])


def test_mimic_keeps_frontal_views_splits_p19_and_reads_labels(tmp_path):
    make_fake_mimic(tmp_path)
    assert detect_kind(tmp_path) == "mimic-cxr"
    recs = {r.path.stem: r for r in discover(tmp_path)}
    assert sorted(recs) == ["d1", "d3", "d4"]  # no lateral/LL, missing d6 skipped
    assert {k: r.split for k, r in recs.items()} == {"d1": "train", "d3": "train", "d4": "test"}
    assert {k: r.view for k, r in recs.items()} == {"d1": "PA", "d3": "AP", "d4": "PA"}
    assert set(recs["d1"].labels) == set(MIMIC_LABELS)
    assert recs["d1"].labels["Atelectasis"] == 1.0 and recs["d1"].labels["Consolidation"] == -1.0
    assert recs["d1"].labels["Cardiomegaly"] is None and recs["d1"].labels["Edema"] == 0.0
    assert recs["d3"].labels["Pleural Effusion"] == 1.0 and recs["d4"].labels["Pneumothorax"] == 1.0
    assert recs["d1"].id == "p10__p10000001__s50000001__d1" and all(KEY.match(r.id) for r in recs.values())
    assert len(discover(tmp_path, require_files=False)) == 4  # the missing d6 kept -> a reject later


def make_fake_jsrt(root: Path, cases=("JPCLN001", "JPCNN002")) -> None:
    """JSRT raw .IMG files (2048^2 big-endian, inverted) + SCR 1024^2 GIF lung masks in fold1/fold2."""
    (root / "All247images").mkdir(parents=True)
    yy, xx = np.mgrid[:2048, :2048]
    for i, case in enumerate(cases):
        lungs = ((xx - 700) ** 2 / 300**2 + (yy - 1000) ** 2 / 600**2 < 1) | (
            (xx - 1350) ** 2 / 300**2 + (yy - 1000) ** 2 / 600**2 < 1)
        noise = np.random.default_rng(i).normal(0, 300, lungs.shape)  # texture, so nothing looks like padding
        bright = np.clip(np.where(lungs, 800, 3000) + noise, 0, 4095).astype(np.uint16)  # lungs dark, body bright
        (4095 - bright).astype(">u2").tofile(root / "All247images" / f"{case}.IMG")  # stored inverted
        fold = root / "scratch" / f"fold{i + 1}" / "masks"
        for side, cx in (("left lung", 1350), ("right lung", 700)):
            m = ((xx - cx) ** 2 / 300**2 + (yy - 1000) ** 2 / 600**2 < 1)[::2, ::2]
            (fold / side).mkdir(parents=True, exist_ok=True)
            Image.fromarray(m.astype(np.uint8) * 255).save(fold / side / f"{case}.gif")
        (fold / "heart").mkdir(exist_ok=True)


def test_jsrt_scr_layout_is_detected_with_half_size_masks(tmp_path):
    make_fake_jsrt(tmp_path)
    assert detect_kind(tmp_path) == "jsrt"
    recs = discover(tmp_path)
    assert [r.id for r in recs] == ["JPCLN001", "JPCNN002"]
    assert [r.labels["Nodule"] for r in recs] == [1.0, 0.0]
    assert all(set(r.masks) == {"left", "right"} and r.masks["left"].suffix == ".gif" for r in recs)
    img = read_jsrt_raw(recs[0].path)
    assert img.shape == (2048, 2048) and img[900:1100, 600:800].mean() < 1000 < img[:100, :100].mean()


def test_labels_csv_at_a_layout_root_reaches_the_records(tmp_path):
    root = write_phantoms(tmp_path / "phantoms", 4, size=96, progress=False)
    recs = discover(root)
    assert len(recs) == 4 and all(set(r.masks) == {"left", "right"} for r in recs)
    assert all(set(r.labels) == {"Cardiomegaly", "Pleural Effusion", "Consolidation"} for r in recs)
    with open(root / "labels.csv", newline="") as f:
        want = {Path(row["path"]).stem: float(row["Cardiomegaly"]) for row in csv.DictReader(f)}
    assert {r.id: r.labels["Cardiomegaly"] for r in recs} == want
    flat = discover(root / "CXR_png", kind="folder")  # no labels.csv there: no labels
    assert all(r.labels == {} for r in flat)


def test_auto_detection_and_unknown_kind(shared_data, tmp_path):
    assert detect_kind(shared_data / "cxr-covid" / "images") == "folder"
    assert detect_kind(shared_data / "cxr-covid" / "metadata.csv") == "csv"
    with pytest.raises(ValueError, match="unknown dataset kind"):
        discover(tmp_path, kind="nope")
    with pytest.raises(FileNotFoundError):
        discover(tmp_path / "missing")


def test_folder_records_hold_real_paths_and_a_linked_file_its_target(tmp_path):
    import numpy as np
    from PIL import Image

    from dinodiff.data.datasets import discover_folder

    target = tmp_path / "elsewhere" / "real.png"
    target.parent.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(target)
    (tmp_path / "real-root").mkdir()
    (tmp_path / "link-root").symlink_to(tmp_path / "real-root")
    (tmp_path / "real-root" / "sub").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "real-root" / "sub" / "a.png")
    (tmp_path / "real-root" / "b.png").symlink_to(target)
    records = {r.id: r.path for r in discover_folder(tmp_path / "link-root")}
    assert records == {"b": target.resolve(), "sub__a": (tmp_path / "real-root" / "sub" / "a.png").resolve()}
