"""The encoder probe: AUCs agree with scikit-learn, view retrieval on known embeddings, the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from dinodiff.cli import app
from dinodiff.encoder.probe import knn_auc, linear_auc, retrieval_top1
from dinodiff.report import build_report


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
    results = json.loads((out / "results.json").read_text())
    assert list(results["encoders"]) == [str(enc), "random:transformers-vit"]
    for res in results["encoders"].values():
        assert res["labels"], "the phantoms' labels were not probed"
        assert 0.0 <= res["view_top1"] <= 1.0 and res["view_count"] == 2 * results["num_images"]
        assert all(0.0 <= r["knn_auc"] <= 1.0 and 0.0 <= r["linear_auc"] <= 1.0 for r in res["labels"].values())
    assert (out / "table.md").read_text().count("|") > 10 and "k-NN AUC" in result.output
    # The report reads it by the results.json convention: one table row per encoder and label.
    assert results["kind"] == "encoder-probe"
    assert len(results["table"]) == sum(len(res["labels"]) for res in results["encoders"].values())
    page = build_report(out, tmp_path / "report.html")
    assert "Encoder probe" in page["sections"][0] and "k-NN AUC" in Path(page["html"]).read_text()


def test_probe_encoder_reports_an_unknown_label_in_one_line(tmp_path, prepared_phantoms):
    result = CliRunner().invoke(app, ["probe-encoder", "random:transformers-vit", "--data", str(prepared_phantoms),
                                      "--labels", "NoSuchLabel", "--size", "32"])
    assert result.exit_code == 2
    assert "NoSuchLabel" in result.output and "Traceback" not in result.output
