"""The privacy audit: calibration statistics on known inputs, planted copies flagged, unrelated real images not."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinodiff.data.shards import encode_png, shard_path, write_shard
from dinodiff.data.sources import iter_sources
from dinodiff.evaluate.audit import AuditSettings, audit
from dinodiff.evaluate.audit import stats

SIZE = 64


# ----------------------------------------------------------------------------------- statistics on known inputs
def test_train_self_dcr_skips_itself_and_its_own_patient():
    train = np.array([[0.0], [1.0], [3.0], [6.0]])
    d, index = stats.train_self_dcr(train)
    assert d.tolist() == [1.0, 1.0, 2.0, 3.0] and index.tolist() == [1, 0, 1, 2]
    d, index = stats.train_self_dcr(train, ["a", "a", "b", "b"])
    assert d.tolist() == [3.0, 2.0, 2.0, 5.0] and index.tolist() == [2, 2, 1, 1]


def test_dcr_quantiles_thresholds_and_fractions_on_known_values():
    d, index = stats.dcr(np.array([[0.5], [10.0]]), np.array([[0.0], [1.0], [3.0], [6.0]]))
    assert d.tolist() == [0.5, 4.0] and index.tolist() == [0, 3]
    reference = np.arange(1.0, 101.0)  # 1 .. 100
    cal = stats.calibration(reference)
    assert cal["p5"] == pytest.approx(np.quantile(reference, 0.05)) == pytest.approx(5.95)
    assert cal["copy_threshold"] == pytest.approx(stats.COPY_FACTOR * 5.95)
    assert stats.fraction_below(np.array([1.0, 2.0, 5.0, 6.0]), cal["p5"]) == 0.75
    summary = stats.distribution(reference)
    assert summary["min"] == 1.0 and summary["median"] == 50.5 and summary["n"] == 100


def test_memorisation_compares_each_source_with_its_real_neighbour():
    own = np.array([0.5, 2.0, 3.0, 0.1])  # variations of sources 0, 0, 1, 1
    result = stats.memorisation(own, np.array([0, 0, 1, 1]), np.array([1.0, 0.05]))
    assert result["memorised_fraction"] == 0.5  # source 0: 0.5 < 1.0; source 1: 0.1 > 0.05
    assert result["ratios"].tolist() == pytest.approx([0.5, 2.0])


# ------------------------------------------------------------------------------------- on real chest X-rays
def _augment(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Light edits of a copy: a shift of up to 3 px (5%), a resize down and back with a small zoom, or JPEG."""
    pil = Image.fromarray(image)
    if kind == "shift":
        dx, dy = rng.integers(-3, 4, size=2)
        return np.asarray(pil.transform(pil.size, Image.Transform.AFFINE, (1, 0, int(dx), 0, 1, int(dy)),
                                        fillcolor=int(np.median(image))))
    if kind == "resize":  # down to 40 px and back, with a 3% zoom
        m = 1
        small = pil.crop((m, m, SIZE - m, SIZE - m)).resize((40, 40), Image.Resampling.BILINEAR)
        return np.asarray(small.resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=60)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))


def _synthetic_folder(folder: Path, images: list[np.ndarray], strategy: str) -> Path:
    rows = ["path,strategy,source_a,source_b,r,seed"]
    for i, image in enumerate(images):
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "images" / f"{i:07d}.png").write_bytes(encode_png(image))
        rows.append(f"images/{i:07d}.png,{strategy},,,,0")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    (folder / "provenance.json").write_text(json.dumps({"settings": {"strategy": strategy, "ratio": 1}}))
    return folder


@pytest.fixture(scope="module")
def cxr_sets(shared_data, tmp_path_factory) -> dict:
    """cxr-covid at 64 px: 150 training images (as prepared shards), 60 held out, 60 unrelated, 36 planted copies."""
    root = tmp_path_factory.mktemp("audit")
    items = list(iter_sources(shared_data / "cxr-covid", size=SIZE))
    # cxr-covid publishes one patient's series twice (eurorad 16660_*_1 = radiopaedia covid-19-rapidly-progressive-
    # ards-*): real near-duplicates (pixel DCR 0.12, against >= 10 for every other pair), so that patient stays in
    # train, as a patient-level split would keep it
    same_patient = [s for s in items if "16660" in s.id or "rapidly-progressive" in s.id]
    others = [s for s in items if s not in same_patient]
    train, holdout, unrelated = same_patient + others[:142], others[142:202], others[202:262]
    write_shard(shard_path(root / "prep", "train", 0), [{"__key__": s.id, "png": encode_png(s.image),
                                                          "json": {"split": "train"}} for s in train])
    write_shard(shard_path(root / "prep", "test", 0), [{"__key__": s.id, "png": encode_png(s.image),
                                                         "json": {"split": "test"}} for s in holdout])
    rng = np.random.default_rng(0)
    planted = [_augment(s.image, kind, rng) for kind in ("shift", "resize", "jpeg") for s in train[12:24]]
    return {"prep": root / "prep", "planted": _synthetic_folder(root / "planted", planted, "planted"),
            "unrelated": _synthetic_folder(root / "unrelated", [s.image for s in unrelated], "unrelated"),
            "root": root}


@pytest.fixture(scope="module")
def audit_results(cxr_sets) -> dict:
    settings = AuditSettings(train=str(cxr_sets["prep"]), size=SIZE, spaces=["pixels", "xrv"], pairs=4)
    return audit([cxr_sets["planted"], cxr_sets["unrelated"]], cxr_sets["root"] / "out", settings)


def _row(results: dict, dataset: str) -> dict:
    return next(r for r in results["tables"]["dcr"] if r["dataset"] == dataset and r["space"] == "pixels")


def test_audit_flags_every_planted_copy_even_shifted_resized_or_jpeg(audit_results):
    row = _row(audit_results, "planted")
    assert row["dcr_n"] == 36
    assert row["flagged_copies"] == 1.0, row
    assert row["below_reference_p5"] == 1.0


def test_audit_flags_no_unrelated_real_image(audit_results):
    row = _row(audit_results, "unrelated")
    assert row["flagged_copies"] == 0.0, row
    # unrelated real images look like held-out ones: about 5% fall under the held-out 5th percentile, not more
    assert row["below_reference_p5"] < 0.15, row


def test_audit_writes_results_json_markdown_and_figures(audit_results, cxr_sets):
    out = cxr_sets["root"] / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved["kind"] == "audit" and saved["title"] and saved["provenance"]["holdout"]["images"] == 60
    assert {"dcr", "dcr_reconstruction", "calibration", "memorisation", "spaces"} <= set(saved["tables"])
    status = {r["space"]: r["status"] for r in saved["tables"]["spaces"]}
    assert status["pixels"] == "available" and status["xrv"].startswith("unavailable")
    references = {r["reference"] for r in saved["tables"]["calibration"]}
    assert references == {"train->train", "holdout->train"}
    for name in saved["figures"].values():
        assert Image.open(out / name).size[0] > 100
    assert "| planted |" in (out / "audit.md").read_text()
