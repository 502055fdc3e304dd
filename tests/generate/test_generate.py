"""Generation: lerp/slerp, the pairing rules, per-item seeds, the dataset writer, resume, 2 processes on CPU."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from test_pipeline import _load, tiny_model_folder  # noqa: F401 - the shared tiny model fixture

from dinodiff.data.datasets import make_id
from dinodiff.generate.plan import GenerateSettings, plan_items
from dinodiff.sampling import item_seed
from dinodiff.pipeline.sample import generate_reconstructions
from dinodiff.generate.stage import generate_dataset
from dinodiff.interpolate import lerp, plan_interpolations, slerp

# 8 sources, labels A B C: pairs sharing a positive label are exactly the ones listed in ELIGIBLE.
TABLE = np.array([[1, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 0, 0]], bool)
ELIGIBLE = {(a, b) for a, b in combinations(range(8), 2) if (TABLE[a] & TABLE[b]).any()}


def _pair(a: int, b: int) -> tuple[int, int]:
    return (min(a, b), max(a, b))


def test_lerp_and_slerp_match_their_formulas():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(lerp(a, b, 0.25), torch.tensor([[0.75, 0.25]]))
    torch.testing.assert_close(slerp(a, b, 0.5), torch.tensor([[2**-0.5, 2**-0.5]]))
    torch.testing.assert_close(slerp(a, b, torch.tensor([0.0, 1.0]))[:, 0], torch.tensor([1.0, 0.0]))
    tokens = torch.randn(4, 3, 16)
    other = tokens * 2.0  # parallel vectors: slerp falls back to lerp
    torch.testing.assert_close(slerp(tokens, other, 0.3), lerp(tokens, other, 0.3))
    unit = torch.nn.functional.normalize(torch.randn(5, 2, 16), dim=-1)
    unit2 = torch.nn.functional.normalize(torch.randn(5, 2, 16), dim=-1)
    assert torch.allclose(slerp(unit, unit2, 0.4).norm(dim=-1), torch.ones(5, 2), atol=1e-5)  # stays on the sphere


def _mix(item) -> tuple[tuple[int, int], float]:
    """An interpolation as the mix it makes: (unordered pair, weight on the higher index)."""
    return _pair(item.a, item.b), (item.r if item.b > item.a else 1.0 - item.r)


def _anchor(item) -> int:
    return item.a if item.r <= 0.5 else item.b


def test_every_source_anchors_as_many_interpolations_and_repeats_a_pair_only_when_its_new_pairs_run_out():
    plan = plan_interpolations(TABLE, 7 * 3, seed=3)
    assert {_pair(p.a, p.b) for p in plan} <= ELIGIBLE  # every pair shares a label
    assert 7 not in {i for p in plan for i in (p.a, p.b)}  # source 7: the only one with no label, no partner
    assert np.bincount([_anchor(p) for p in plan], minlength=8).tolist() == [3] * 7 + [0]
    assert len({_mix(p) for p in plan}) == len(plan)  # never the same mix twice
    used: set[tuple[int, int]] = set()
    for p in plan:
        anchor, pair = _anchor(p), _pair(p.a, p.b)
        if pair in used:  # a repeat: the anchor had used every pair it could make
            assert {q for q in ELIGIBLE if anchor in q} <= used, (p, used)
        used.add(pair)
        assert 0.0 <= p.r <= 1.0
    assert plan == plan_interpolations(TABLE, 7 * 3, seed=3)  # deterministic in the seed


def test_sources_with_no_label_pair_with_each_other_and_every_label_keeps_its_share():
    # 2 labels and 3 sources positive for none: the paper's rule alone never interpolates those three.
    table = np.array([[1, 0], [1, 0], [1, 1], [0, 1], [0, 1], [0, 0], [0, 0], [0, 0]], bool)
    plan = plan_interpolations(table, 4 * len(table), seed=0)
    unlabelled = {5, 6, 7}
    for p in plan:
        assert ({p.a, p.b} <= unlabelled) or not ({p.a, p.b} & unlabelled), p  # none with none, never mixed
    anchors = np.bincount([_anchor(p) for p in plan], minlength=len(table))
    assert anchors.tolist() == [4] * len(table)  # each source gives the labels of 4 images
    labels = table[[_anchor(p) for p in plan]]
    np.testing.assert_allclose(labels.mean(axis=0), table.mean(axis=0))  # label prevalence as in the sources
    assert (~labels.any(axis=1)).mean() == pytest.approx(3 / 8)  # and the "no label" share too


def test_r_values_list_and_running_out_of_distinct_interpolations():
    # with r in {0.25, 0.75} an anchor can make one mix per partner: 2 mixes per eligible pair in all
    plan = plan_interpolations(TABLE, 2 * len(ELIGIBLE), seed=0, r_values=[0.25, 0.75])
    assert {p.r for p in plan} == {0.25, 0.75}
    assert len({_mix(p) for p in plan}) == len(plan)
    with pytest.raises(ValueError, match="only"):
        plan_interpolations(TABLE, 2 * len(ELIGIBLE) + 1, seed=0, r_values=[0.25, 0.75])
    with pytest.raises(ValueError, match="shares a positive label"):
        plan_interpolations(np.array([[1, 0], [0, 1], [0, 0]], bool), 3)  # no two sources share a class
    unlabelled = plan_interpolations(np.zeros((4, 2), bool), 3)  # four unlabelled sources pair with each other
    assert len({_pair(p.a, p.b) for p in unlabelled}) == 3
    anyway = plan_interpolations(np.array([[1, 0], [0, 1], [0, 0]], bool), 3, shared_label=False)
    assert sorted(_anchor(p) for p in anyway) == [0, 1, 2]  # any pair: each source anchors one


def test_interpolated_labels_come_from_the_source_nearer_in_r():
    settings = GenerateSettings(strategy="interpolation", ratio=2, r_values=[0.2, 0.5, 0.8], seed=1)
    items = plan_items(settings, TABLE)
    assert len(items) == 2 * len(TABLE) and [it.index for it in items] == list(range(len(items)))
    for it in items:
        assert it.label_source == (it.a if it.r <= 0.5 else it.b)
        assert it.seed == item_seed(1, it.index)
    assert {it.r for it in items} == {0.2, 0.5, 0.8}
    recon = plan_items(GenerateSettings(ratio=2), TABLE)
    assert [(it.a, it.label_source, it.b) for it in recon[:4]] == [(0, 0, None), (0, 0, None),
                                                                   (1, 1, None), (1, 1, None)]
    assert len({it.seed for it in recon}) == len(recon)


@pytest.mark.parametrize("sampler", ["dpm", "ddpm"])  # DDPM also draws fresh noise at every step
def test_reconstructions_are_the_same_whatever_the_batch_size(tiny_model_folder, sampler):
    from dinodiff.sampling import inference_scheduler

    pipe = _load(tiny_model_folder)
    pipe.scheduler = inference_scheduler(pipe.scheduler, sampler)
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    one = generate_reconstructions(pipe, images, 2, seed=5, batch_size=1, num_inference_steps=3)
    four = generate_reconstructions(pipe, images, 2, seed=5, batch_size=4, num_inference_steps=3)
    assert one.shape == (6, 1, 32, 32)
    torch.testing.assert_close(one, four, atol=1e-5, rtol=0)  # batched kernels round differently, nothing more
    other = generate_reconstructions(pipe, images, 2, seed=6, batch_size=4, num_inference_steps=3)
    assert (one - other).abs().amax(dim=(1, 2, 3)).min() > 0.1  # another seed: every image differs


@pytest.fixture(scope="module")
def labelled_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 phantoms with a labels.csv (path + Cardiomegaly, Pleural Effusion, Consolidation)."""
    from dinodiff.data.phantoms import write_phantoms

    return write_phantoms(tmp_path_factory.mktemp("csv") / "raw", 10, size=64, seed=0, progress=False) / "labels.csv"


def _settings(**kw) -> GenerateSettings:
    return GenerateSettings(**{"num_inference_steps": 2, "source_options": {"kind": "csv"}, **kw})


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted((folder / "images").rglob("*.png"))}


def test_dataset_from_a_labelled_csv_has_images_labels_and_provenance(tiny_model_folder, labelled_csv, tmp_path):
    wrong_root = _settings(strategy="interpolation", ratio=2, source_options={"kind": "csv", "root": str(tmp_path)})
    with pytest.raises(ValueError, match="root"):
        generate_dataset(tiny_model_folder, labelled_csv, tmp_path / "syn", wrong_root, progress=False)
    settings = _settings(strategy="interpolation", ratio=2)  # the failed attempt made no image: its settings go
    out = generate_dataset(tiny_model_folder, labelled_csv, tmp_path / "syn", settings, batch_size=4, preview_rows=2,
                           progress=False)
    with (out / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 20 and len(_pngs(out)) == 20 and (out / "preview.png").is_file()
    assert [r["path"] for r in rows] == list(_pngs(out)) == [f"images/000/{i:07d}.png" for i in range(20)]
    with labelled_csv.open() as handle:
        source_labels = {make_id(row["path"]): row for row in csv.DictReader(handle)}
    names = ["Cardiomegaly", "Consolidation", "Pleural Effusion"]
    for row in rows:
        a, b, r = source_labels[row["source_a"]], source_labels[row["source_b"]], float(row["r"])
        shared = any(a[n] == b[n] == "1" for n in names)
        assert shared or all("1" not in (a[n], b[n]) for n in names)  # a shared label, or none on either side
        nearer = a if r <= 0.5 else b
        assert [row[n] for n in names] == [nearer[n] for n in names]
    assert len({(r["source_a"], r["source_b"], r["r"]) for r in rows}) == 20
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["complete"] and provenance["images"] == 20
    assert provenance["scheduler"] == "DPMSolverMultistepScheduler" and provenance["num_inference_steps"] == 2
    assert provenance["settings"]["strategy"] == "interpolation" and provenance["code_version"]["dinodiff"]


def test_rerun_finishes_what_is_missing_with_the_same_images(tiny_model_folder, labelled_csv, tmp_path):
    settings = _settings(ratio=2)
    out = generate_dataset(tiny_model_folder, labelled_csv, tmp_path / "syn", settings, batch_size=4,
                           preview_rows=0, progress=False)
    before = _pngs(out)
    kept = out / "images" / "000" / "0000000.png"
    stamp = kept.stat().st_mtime_ns
    for name in ("0000005.png", "0000006.png", "0000019.png"):
        (out / "images" / "000" / name).unlink()
    (out / "labels.csv").unlink()
    generate_dataset(tiny_model_folder, labelled_csv, out, settings, batch_size=4, preview_rows=0, progress=False)
    assert _pngs(out) == before and (out / "labels.csv").is_file()
    assert kept.stat().st_mtime_ns == stamp  # finished chunks are not redrawn
    with pytest.raises(ValueError, match="other settings"):
        generate_dataset(tiny_model_folder, labelled_csv, out, _settings(ratio=3), batch_size=4, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_make_the_same_dataset_as_one(tiny_model_folder, labelled_csv, tmp_path):
    args = ["generate", str(tiny_model_folder), "--source", str(labelled_csv), "--kind", "csv", "--ratio", "2",
            "--steps", "2", "--batch-size", "3", "--strategy", "interpolation", "--preview-rows", "0", "--no-progress"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "dinodiff.cli", *args, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), "-m", "dinodiff.cli"]
    double = subprocess.run([*launch, *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env,
                            cwd=REPO_ROOT, timeout=300)
    assert double.returncode == 0, double.stdout[-3000:] + double.stderr[-3000:]
    # 20 images in 7 chunks of 3: process 0 takes chunks 0, 2, 4, 6 (11 images), process 1 the others (9)
    assert "process 0 of 2: 11 of 20 images in 4 chunks" in double.stderr
    assert "process 1 of 2: 9 of 20 images in 3 chunks" in double.stderr
    one, two = _pngs(tmp_path / "one"), _pngs(tmp_path / "two")
    assert len(one) == 20 and one == two
    assert (tmp_path / "one" / "labels.csv").read_text() == (tmp_path / "two" / "labels.csv").read_text()
