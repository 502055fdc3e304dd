"""The encoder probe: AUCs agree with scikit-learn, view retrieval on known embeddings, the CLI end to end; the
probe leaves out the images its encoders trained on, labels transductive and unknown numbers, and measures
invariance with augmentations pretraining never used."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from dinodiff.cli import app
from dinodiff.data.image_sets import iter_sources
from dinodiff.data.phantoms import write_phantoms
from dinodiff.encoder.augment import PRETRAINING_FAMILY
from dinodiff.encoder.pretrain import EncoderPretrainer
from dinodiff.encoder.probe import ProbeSettings, knn_auc, linear_auc, make_views, retrieval_top1
from dinodiff.encoder.probe_data import ProbeImages, seen_mask
from dinodiff.encoder.probe_table import TABLE_NAME
from dinodiff.encoder.settings import HELDOUT_FAMILY, HeldOutViewSettings, load_encoder_settings
from dinodiff.encoder.views import heldout_views
from dinodiff.models.random_init import save_random_encoder
from dinodiff.models.training_images import TrainingImages, read_training_images
from dinodiff.prepare import prepare
from dinodiff.report import build_report

TINY_ENCODER = ["backbone.image_size=16", "backbone.patch_size=8", "backbone.hidden_size=32", "backbone.num_layers=1",
                "backbone.num_heads=2", "backbone.num_registers=2", "head.hidden_dim=32", "head.bottleneck_dim=16",
                "head.output_dim=64", "augment.local_size=8", "augment.local_crops=1", "data.load_size=32",
                "data.num_workers=0", "run.batch_size=8", "run.max_steps=2", "run.checkpoint_every=2",
                "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path]:
    """60 phantoms prepared at 32 px with half of them in the test split, and a tiny encoder pretrained (2 steps)
    on the train split: (prepared folder, run folder)."""
    root = tmp_path_factory.mktemp("probe-heldout")
    source = write_phantoms(root / "raw", 60, size=64, seed=1, progress=False)
    prepare([source], root / "prepared", size=32, shard_size=16, workers=1, test_fraction=0.5, seed=0, progress=False)
    settings = load_encoder_settings("cpu-encoder", [f"data.shards={root / 'prepared'}", f"run.run_dir={root / 'run'}",
                                                     "data.split=train", *TINY_ENCODER])
    EncoderPretrainer(settings).run()
    return root / "prepared", root / "run"


def _probe(args: list[str]):
    return CliRunner().invoke(app, ["probe-encoder", *args, "--size", "32", "--folds", "2", "--min-count", "3",
                                    "--k", "3"])


def _split_ids(prepared: Path, split: str) -> set[str]:
    return {s.id for s in iter_sources(prepared, size=8, split=split)}


def _known_problem(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 3 == 0).astype(int)
    x = rng.normal(size=(n, 8))
    x[:, 0] += 1.2 * y  # one informative dimension among noise
    return x, y


def test_linear_probe_auc_matches_a_hand_written_scikit_learn_loop():
    x, y = _known_problem()
    mean, sd = linear_auc(x, y, C=0.1, folds=5, seed=3)
    scores = []
    for train, test in StratifiedKFold(5, shuffle=True, random_state=3).split(x, y):
        scaler = StandardScaler().fit(x[train])
        model = LogisticRegression(C=0.1, max_iter=5000).fit(scaler.transform(x[train]), y[train])
        scores.append(roc_auc_score(y[test], model.predict_proba(scaler.transform(x[test]))[:, 1]))
    assert abs(mean - np.mean(scores)) < 1e-12 and abs(sd - np.std(scores)) < 1e-12
    assert 0.7 < mean < 1.0


def test_knn_auc_is_perfect_on_separated_classes_and_chance_on_noise():
    x, y = _known_problem()
    separated = x.copy()
    separated[:, 0] += 50 * y
    assert knn_auc(separated, y, k=5)[0] == 1.0
    noise = np.random.default_rng(1).normal(size=x.shape)
    assert 0.3 < knn_auc(noise, y, k=5)[0] < 0.7


def test_view_retrieval_finds_pairs_only_when_views_agree():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 16))
    assert retrieval_top1(a, a + 0.01 * rng.normal(size=a.shape)) == 1.0
    assert retrieval_top1(a, rng.normal(size=a.shape)) < 0.1
    # A large shared offset (as in random ViTs, whose CLS barely depends on the image) is removed by centring.
    assert retrieval_top1(a + 100, a + 100 + 0.01 * rng.normal(size=a.shape)) == 1.0


def test_probe_encoder_cli_writes_a_table_for_each_encoder(tmp_path, prepared_phantoms):
    from dinodiff.models.random_init import save_random_encoder

    enc = save_random_encoder(tmp_path / "enc", "transformers-dinov2", hidden_size=32, num_layers=1, patch_size=8,
                              image_size=32, num_registers=2)
    out = tmp_path / "probe"
    result = CliRunner().invoke(app, ["probe-encoder", str(enc), "random:transformers-vit", "--data",
                                      str(prepared_phantoms), "--out", str(out), "--size", "32", "--folds", "2",
                                      "--min-count", "3", "--k", "3"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())
    results = record["data"]
    assert list(results["encoders"]) == [str(enc), "random:transformers-vit"]
    for res in results["encoders"].values():
        assert res["labels"], "the phantoms' labels were not probed"
        assert 0.0 <= res["view_top1"] <= 1.0 and res["view_count"] == 2 * results["num_images"]
        assert all(0.0 <= r["knn_auc"] <= 1.0 and 0.0 <= r["linear_auc"] <= 1.0 for r in res["labels"].values())
    assert (out / "table.md").read_text().count("|") > 10 and "k-NN AUC" in result.output
    # The report reads it by the results.json convention: one table row per encoder and label.
    assert record["kind"] == "encoder-probe"
    assert len(record["tables"][TABLE_NAME]) == sum(len(res["labels"]) for res in results["encoders"].values())
    page = build_report(out, tmp_path / "report.html")
    assert "Encoder probe" in page["sections"][0] and "k-NN AUC" in Path(page["html"]).read_text()


def test_probe_encoder_reports_an_unknown_label_in_one_line(tmp_path, prepared_phantoms):
    result = CliRunner().invoke(app, ["probe-encoder", "random:transformers-vit", "--data", str(prepared_phantoms),
                                      "--labels", "NoSuchLabel", "--size", "32"])
    assert result.exit_code == 2
    assert "NoSuchLabel" in result.output and "Traceback" not in result.output


def test_probe_leaves_out_the_images_its_encoders_trained_on_and_probes_the_rest_paired(tmp_path, pretrained):
    prepared, run = pretrained
    out = tmp_path / "probe"
    encoders = [str(run / "encoder"), str(run / "encoder-init"), "random:transformers-vit"]
    result = _probe([*encoders, "--data", str(prepared), "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())
    results = record["data"]
    trained_on = set(read_training_images(run / "encoder").ids)
    probed = set(results["probe_images"]["ids"])
    assert trained_on == _split_ids(prepared, "train")
    assert probed == _split_ids(prepared, "test") and not probed & trained_on  # the test split, by default
    assert results["num_images"] == len(probed) and results["probe_images"]["left_out"] == len(trained_on)
    for name in encoders:  # every encoder, the random baselines too, on the same held-out images
        res = results["encoders"][name]
        assert res["protocol"] == "held-out" and res["view_count"] == 2 * len(probed), name
        assert res["labels"] and res["probe_images_seen_in_pretraining"] == 0
    statement = results["probe_images"]["statement"]
    assert statement.startswith(f"probe images: {len(probed)}, none seen in pretraining")
    table = (out / "table.md").read_text()
    assert statement in table and statement in result.output and "TRANSDUCTIVE" not in table
    assert {row["images"] for row in record["tables"][TABLE_NAME]} == {"held-out"}
    assert "pretext" in results["views"]["pretext"]["measure"] and "pretext top-1" in table


def test_transductive_probe_when_asked_labels_the_numbers_transductive(tmp_path, pretrained):
    prepared, run = pretrained
    out = tmp_path / "probe"
    result = _probe([str(run / "encoder"), "random:transformers-vit", "--data", str(prepared), "--out", str(out),
                     "--transductive"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())
    results = record["data"]
    everything = _split_ids(prepared, "train") | _split_ids(prepared, "test")
    assert set(results["probe_images"]["ids"]) == everything and results["probe_images"]["transductive"]
    trained = results["encoders"][str(run / "encoder")]
    assert trained["protocol"] == "transductive"
    assert trained["probe_images_seen_in_pretraining"] == len(_split_ids(prepared, "train"))
    assert results["encoders"]["random:transformers-vit"]["protocol"] == "held-out"  # saw nothing
    assert "TRANSDUCTIVE" in results["probe_images"]["statement"]
    assert f"| {run / 'encoder'} | TRANSDUCTIVE (trained on " in (out / "table.md").read_text()
    assert "TRANSDUCTIVE" in result.output


def test_an_encoder_without_a_training_record_is_labelled_unknown(tmp_path, pretrained):
    prepared, run = pretrained
    hub_like = save_random_encoder(tmp_path / "hub", "transformers-dinov2", hidden_size=32, num_layers=1,
                                   patch_size=8, image_size=16, num_registers=2)
    out = tmp_path / "probe"
    result = _probe([str(run / "encoder"), str(hub_like), "--data", str(prepared), "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())
    results = record["data"]
    assert results["encoders"][str(hub_like)]["protocol"] == "unknown"
    assert results["encoders"][str(run / "encoder")]["protocol"] == "held-out"
    assert set(results["probe_images"]["ids"]) == _split_ids(prepared, "test")  # the recorded encoder's rule holds
    assert f"unknown whether {hub_like} saw them" in results["probe_images"]["statement"]
    assert f"| {hub_like} | unknown (no training record) |" in (out / "table.md").read_text()


def test_probe_of_only_seen_images_refuses_and_names_the_fix(pretrained):
    prepared, run = pretrained
    train_shards = sorted((prepared / "shards").glob("train-*.tar"))
    data = [arg for shard in train_shards for arg in ("--data", str(shard))]
    result = _probe([str(run / "encoder"), *data])
    assert result.exit_code == 2
    assert "were seen in pretraining" in result.output and "--transductive" in result.output
    assert "Traceback" not in result.output


def test_an_image_counts_as_seen_by_its_id_its_source_file_or_its_subject():
    record = TrainingImages(ids=("a", "b", "c"), paths=("/x/a.png", "/x/b.png", None), subjects=(None, "p1", None))
    data = ProbeImages(ids=["a", "other__b", "z", "y", "q"], images=torch.zeros(5, 1, 4, 4, dtype=torch.uint8),
                       labels={}, paths=["/elsewhere/a.png", "/x/b.png", "/x/z.png", None, None],
                       subjects=[None, None, "p1", "p2", None])
    # a by id, other__b by its source file (another prepare run prefixed its id), z by its patient p1
    assert seen_mask(data, record).tolist() == [True, True, True, False, False]


def test_heldout_views_share_no_augmentation_with_pretraining_and_keep_the_whole_image():
    assert set(HELDOUT_FAMILY).isdisjoint(PRETRAINING_FAMILY)
    smooth = torch.nn.functional.interpolate(torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(0)),
                                             size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)
    images = (smooth * 255).round().to(torch.uint8)
    identity = HeldOutViewSettings(shear=0.0, zoom_out=(1.0, 1.0), downsample=(1.0, 1.0), noise_std=(0.0, 0.0),
                                   jpeg_quality=(100, 100))
    assert float((heldout_views(images, identity, seed=0) - images.float() / 255).abs().max()) < 3 / 255
    views = make_views(images, ProbeSettings())
    a, b = views["heldout"]
    assert torch.equal(a, make_views(images, ProbeSettings())["heldout"][0]) and not torch.equal(a, b)
    assert not torch.allclose(a, views["pretext"][0])
    # zoom out never crops: the whole image, shrunk to 54 of 64 px, inside a black border
    zoom = HeldOutViewSettings(shear=0.0, zoom_out=(0.85, 0.85), downsample=(1.0, 1.0), noise_std=(0.0, 0.0),
                               jpeg_quality=(100, 100))
    view = heldout_views(images, zoom, seed=0)
    shrunk = torch.nn.functional.interpolate(images.float() / 255, size=(54, 54), mode="bilinear", antialias=True)
    assert float(view[..., :4, :].abs().max()) < 3 / 255 and float(view[..., -4:].abs().max()) < 3 / 255
    assert float((view[..., 5:59, 5:59] - shrunk).abs().mean()) < 0.02
    # the rest of the family changes the image's detail, not its field of view or its intensities
    detail = HeldOutViewSettings(shear=0.0, zoom_out=(1.0, 1.0))
    assert float((heldout_views(images, detail, seed=0) - images.float() / 255).abs().mean()) < 0.03


def test_cv_folds_keep_a_subjects_images_together():
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(60, 8)), 2, axis=0)  # two identical images of each of 60 patients
    y = np.repeat(rng.integers(0, 2, 60), 2)  # a label unrelated to the features
    groups = np.repeat(np.arange(60), 2)
    assert knn_auc(x, y, k=3, folds=5, groups=None)[0] > 0.9  # each image finds its twin: a leak
    assert knn_auc(x, y, k=3, folds=5, groups=groups)[0] < 0.75
    assert linear_auc(x, y, folds=5, groups=groups)[0] < 0.75
