"""The embedding generator (RCG-style diffusion over c_GLB): fits, samples new points, conditions, resumes."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pipeline import tiny_model_folder  # noqa: F401 - the shared tiny model fixture

from dinodiff.data.cached import CacheError
from dinodiff.data.shards import write_shard
from dinodiff.embeddings import (
    EmbeddingTrainSettings,
    embedding_report,
    frechet_distance,
    load_embedding_model,
    precision_recall,
    read_cached_embeddings,
    sample_embeddings,
    train_embeddings,
)
from dinodiff.embeddings.data import CachedEmbeddings, split_holdout
from dinodiff.embeddings.evaluation import eval_rows, evaluate_against_cache
from dinodiff.embeddings.metrics import (
    COPY_FACTOR,
    _moments,
    coverage,
    knn_radii,
    nearest,
    nearest_training,
    own_distances,
    subsample,
)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_fake_cache(folder: Path, c_glb: np.ndarray, labels: list[dict] | None = None,
                     subjects: list[str] | None = None) -> Path:
    """A cache folder in `dinodiff cache`'s layout: c_glb (M, K, S, N) as float16 views (+ each image's subject)."""
    labels = labels or [{} for _ in range(len(c_glb))]
    metas = [{"labels": lab, **({"subject": subjects[i]} if subjects else {})} for i, lab in enumerate(labels)]
    samples = [{"__key__": f"img{i:05d}", "c_glb.npy": _npy(c.astype(np.float16)), "json": meta}
               for i, (c, meta) in enumerate(zip(c_glb, metas))]
    write_shard(folder / "shards" / "train-000000.tar", samples)
    (folder / "cache.json").write_text(json.dumps({"views": c_glb.shape[1], "count": len(c_glb)}))
    return folder


def correlated_gaussian(n: int, seed: int = 0) -> np.ndarray:
    """(n, 1, 2, 4) c_GLB from a Gaussian with a non-trivial mean and full covariance."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(123).normal(size=(8, 8)) * 0.6 + np.eye(8)
    z = rng.normal(size=(n, 8)) @ mix.T + np.linspace(-2, 3, 8)
    return z.reshape(n, 1, 2, 4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny MLPs: one thread is fastest on the shared 2-core machine (no oversubscription). Module scope, so it
    is in force before the module-scoped model fixture trains."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _settings(cache: Path, out: Path, **kw) -> EmbeddingTrainSettings:
    base = dict(cache=str(cache), out=str(out), max_steps=300, batch_size=128, lr=2e-3, width=128, depth=2,
                checkpoint_every=1000, log_every=50, eval_steps=20)
    base.update(kw)
    return EmbeddingTrainSettings(**base)


@pytest.fixture(scope="module")
def gaussian_model(tmp_path_factory) -> tuple[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("emb")
    data = correlated_gaussian(64)
    cache = write_fake_cache(root / "cache", data)
    return train_embeddings(_settings(cache, root / "run", max_steps=600), progress=False), data


def test_overfit_tiny_set_reproduces_its_mean_and_covariance(gaussian_model):
    folder, data = gaussian_model
    train = torch.from_numpy(data.reshape(len(data), -1)).float()
    sampled = sample_embeddings(folder, 2000, seed=1, steps=30).reshape(2000, -1)
    scale = train.std(0)
    mean_error = ((sampled.mean(0) - train.mean(0)) / scale).abs().max()
    cov_t, cov_s = torch.cov(train.T), torch.cov(sampled.T)
    cov_error = torch.linalg.norm(cov_s - cov_t) / torch.linalg.norm(cov_t)
    assert mean_error < 0.3, mean_error
    assert cov_error < 0.3, cov_error
    # and far closer than an untrained (N(mean, diag std)) guess would be
    diag_error = torch.linalg.norm(torch.diag(torch.diag(cov_t)) - cov_t) / torch.linalg.norm(cov_t)
    assert cov_error < 0.5 * diag_error


def test_sampled_embeddings_are_new_not_copies_of_the_training_set(tmp_path):
    data = correlated_gaussian(1500, seed=3)
    cache = write_fake_cache(tmp_path / "cache", data)
    folder = train_embeddings(_settings(cache, tmp_path / "run", max_steps=250), progress=False)
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    # stated threshold: a copy is nearer a training point than COPY_FACTOR x the 5th percentile of the training
    # points' own nearest-neighbour distances; fewer than 2% of samples may be that close
    assert COPY_FACTOR == 0.5
    assert report["copy_fraction"] < 0.02, report
    assert report["nn_median"] > 0.5 * report["train_nn_median"], report
    assert report["precision"] > 0.7 and report["recall"] > 0.7, report
    model = load_embedding_model(folder)
    assert model.denoiser.token_shape == (2, 4)


def test_label_conditioning_with_guidance_moves_samples_to_the_labels_cluster(tmp_path):
    rng = np.random.default_rng(0)
    positive = rng.random(400) < 0.5
    data = rng.normal(size=(400, 2, 1, 4)) * 0.5 + np.where(positive, 2.0, -2.0)[:, None, None, None]
    labels = [{"Effusion": 1.0 if p else 0.0} for p in positive]
    cache = write_fake_cache(tmp_path / "cache", data, labels)
    folder = train_embeddings(_settings(cache, tmp_path / "run", max_steps=300, label_dropout=0.2), progress=False)
    assert load_embedding_model(folder).label_names == ["Effusion"]
    pos = sample_embeddings(folder, 200, labels=[{"Effusion": 1.0}] * 200, guidance=2.0, seed=0, steps=20)
    neg = sample_embeddings(folder, 200, labels=torch.zeros(200, 1), guidance=2.0, seed=0, steps=20)
    assert pos.mean() > 1.5 and neg.mean() < -1.5
    assert torch.equal(pos, sample_embeddings(folder, 200, labels=[{"Effusion": 1.0}] * 200, guidance=2.0, seed=0,
                                              steps=20))  # same seed, same draw


def test_resumed_training_matches_uninterrupted(tmp_path):
    cache = write_fake_cache(tmp_path / "cache", correlated_gaussian(32))
    whole = train_embeddings(_settings(cache, tmp_path / "a", max_steps=20, checkpoint_every=10), progress=False)
    train_embeddings(_settings(cache, tmp_path / "b", max_steps=10, checkpoint_every=10), progress=False)
    resumed = train_embeddings(_settings(cache, tmp_path / "b", max_steps=20, checkpoint_every=10), progress=False)
    a, b = load_embedding_model(whole).denoiser.state_dict(), load_embedding_model(resumed).denoiser.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    run = load_embedding_model(tmp_path / "b").denoiser.state_dict()  # a run folder (with checkpoints/) -> its model/
    assert all(torch.equal(run[k], b[k]) for k in b)
    rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["10", "20"]


def test_missing_cache_names_the_file_and_the_command(tmp_path):
    with pytest.raises(CacheError, match=r"cache.json not found: run `dinodiff cache"):
        read_cached_embeddings(tmp_path)


def test_metrics_agree_with_their_definitions():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.normal(size=(400, 3))).float()
    shifted = a + torch.tensor([1.0, 0.0, 0.0])
    assert frechet_distance(a, shifted) == pytest.approx(1.0, abs=1e-3)  # same covariance: ||mu1 - mu2||^2
    assert precision_recall(a, a) == (1.0, 1.0)
    far = a + 100.0
    assert precision_recall(a, far) == (0.0, 0.0)
    report = embedding_report(a[:50], a)
    assert report["copy_fraction"] == 1.0 and report["nn_min"] == 0.0


def _brute_force_knn(query: torch.Tensor, reference: torch.Tensor, k: int, exclude_self: bool = False):
    d = torch.cdist(query.double(), reference.double())
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    return d.topk(k, dim=1, largest=False)


def test_chunked_float32_neighbours_radii_and_coverage_equal_brute_force_in_bounded_blocks(monkeypatch):
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.normal(size=(300, 16)) * 3 + 5).float()
    fake = torch.from_numpy(rng.normal(size=(250, 16)) * 3 + 5.5).float()
    want_d, want_i = _brute_force_knn(fake, real, 3)
    radii = _brute_force_knn(real, real, 3, exclude_self=True)[0][:, -1]
    fake_radii = _brute_force_knn(fake, fake, 3, exclude_self=True)[0][:, -1]
    inside = (torch.cdist(fake.double(), real.double()) <= radii[None]).any(1).double().mean().item()
    recall = (torch.cdist(real.double(), fake.double()) <= fake_radii[None]).any(1).double().mean().item()
    blocks = []
    cdist = torch.cdist
    monkeypatch.setattr(torch, "cdist", lambda x, y, *a, **kw: blocks.append((len(x), len(y))) or cdist(x, y, *a, **kw))
    for chunk in (7, 64, 10_000):
        blocks.clear()
        d, i = nearest(fake, real, k=3, chunk=chunk)
        assert torch.equal(i, want_i) and torch.allclose(d.double(), want_d, rtol=1e-5, atol=1e-5)
        assert torch.allclose(knn_radii(real, 3, chunk).double(), radii, rtol=1e-5, atol=1e-5)
        assert coverage(fake, real, radii.float(), chunk) == pytest.approx(inside, abs=1e-12)
        assert precision_recall(real, fake, 3, chunk) == pytest.approx((inside, recall), abs=1e-12)
        assert max(max(b) for b in blocks) <= chunk  # memory: one chunk x chunk block of distances at a time
    assert len(blocks) > 1


def test_copy_distance_is_the_nearest_of_all_cached_views_of_each_training_image():
    rng = np.random.default_rng(1)
    views = torch.from_numpy(rng.normal(size=(40, 3, 8))).float()  # 40 training images x 3 cached views
    sampled = torch.stack([views[5, 2], views[17, 1], torch.full((8,), 50.0)])  # copies of views other than the first
    distance, image = nearest_training(sampled, views)
    assert distance[:2].tolist() == [0.0, 0.0] and image[:2].tolist() == [5, 17]
    report = embedding_report(sampled, views)
    assert report["nn_min"] == 0.0 and report["copy_fraction"] == pytest.approx(2 / 3)
    assert report["train_views"] == 3
    # the scale a copy is judged against: the nearest view of *another* image (another subject when given)
    near_twins = views.clone()
    near_twins[:, 1:] = near_twins[:, :1] + 1e-3  # an image's own views are nearly identical
    assert float(own_distances(near_twins).min()) > 0.1
    twins = torch.cat([views[:20, :1], views[:20, :1]])  # images i and i + 20 are the same patient's
    subjects = torch.arange(40) % 20
    assert float(own_distances(twins).min()) == 0.0 and float(own_distances(twins, subjects).min()) > 0.1


def test_the_holdout_is_drawn_within_a_prepared_train_split():
    """A cache holds prepare's train split: the subjects whose hash (same rule, seed 0) put them outside the test
    fraction. The hold-out must not reuse that hash, or no fraction up to prepare's would select anyone."""
    from dinodiff.data.subjects import hash_split

    keys = [f"img{i}" for i in range(2000) if hash_split(f"img{i}", 0.2, 0) == "train"][:400]
    data = CachedEmbeddings(torch.zeros(len(keys), 1, 1, 2), keys, [{} for _ in keys])
    for fraction in (0.1, 0.2):
        held = len(split_holdout(data, fraction, seed=0).holdout)
        assert abs(held / len(keys) - fraction) < 0.05, (fraction, held)


def test_subsampled_copy_scale_and_precision_recall_are_the_full_computation_on_the_subsample():
    rng = np.random.default_rng(2)
    views = torch.from_numpy(rng.normal(size=(300, 2, 8))).float()
    subjects = np.arange(300) // 3
    chosen = subsample(300, 40, seed=5)
    assert len(chosen) == 40 and np.array_equal(chosen, np.sort(chosen)) and subsample(300, 300) is None
    full = own_distances(views, subjects)
    assert torch.equal(own_distances(views, subjects, queries=40, seed=5), full[chosen])  # against every view
    assert torch.equal(own_distances(views, subjects, queries=300), full)
    real, fake = views[:, 0], views[:120, 1] + 0.3
    assert precision_recall(real, fake, max_rows=50, seed=5) == precision_recall(
        real[subsample(300, 50, 5)], fake[subsample(120, 50, 5)])
    assert precision_recall(real, fake, max_rows=300) == precision_recall(real, fake)


def test_chunked_moments_equal_numpy_and_fd_matches_its_formula():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(103, 5)) * [1, 2, 3, 4, 5] + 1e3  # far from 0: the shift keeps the sums accurate
    for chunk in (7, 50, 1000):
        mean, cov = _moments(torch.from_numpy(x).float(), chunk)
        assert np.allclose(mean, x.astype(np.float32).mean(0), rtol=1e-6)
        assert np.allclose(cov, np.cov(x.astype(np.float32).astype(np.float64), rowvar=False), rtol=1e-6, atol=1e-6)


def test_embedding_report_compares_linearly_many_pairs_in_the_training_set_size(monkeypatch):
    """The issue-22 bar as arithmetic, not speed: the distances computed grow linearly with the training set
    (the copy scale and precision/recall are subsampled), not as M^2."""
    pairs = []
    cdist = torch.cdist
    monkeypatch.setattr(torch, "cdist", lambda x, y, *a, **kw: pairs.append(len(x) * len(y)) or cdist(x, y, *a, **kw))
    counts = {}
    for m in (600, 1200):
        rng = np.random.default_rng(m)
        views, sampled = torch.from_numpy(rng.normal(size=(m, 2, 6))).float(), torch.randn(50, 6)
        pairs.clear()
        report = embedding_report(sampled, views, chunk=256, calibration_queries=100, max_rows=200)
        counts[m] = sum(pairs)
        assert report["n_train"] == m and report["train_nn_queries"] == 100 and report["pr_rows"] == [200, 50]
    assert counts[1200] <= 2.05 * counts[600]


def test_holdout_takes_whole_subjects_and_is_seeded():
    subjects = [f"p{i // 3}" for i in range(90)]  # 30 patients x 3 images
    data = CachedEmbeddings(torch.zeros(90, 1, 1, 2), [f"k{i}" for i in range(90)], [{}] * 90, subjects)
    split = split_holdout(data, 0.3, seed=4)
    held = {subjects[i] for i in split.holdout}
    assert split.by == "subject" and 0 < len(held) < 30
    assert not held & {subjects[i] for i in split.train}  # no patient on both sides
    assert sorted([*split.train, *split.holdout]) == list(range(90))
    assert np.array_equal(split_holdout(data, 0.3, seed=4).holdout, split.holdout)
    assert not np.array_equal(split_holdout(data, 0.3, seed=5).holdout, split.holdout)
    assert len(split_holdout(data, 0.0, seed=4).holdout) == 0
    with pytest.raises(ValueError, match="holdout-fraction 0"):
        split_holdout(CachedEmbeddings(torch.zeros(2, 1, 1, 2), ["a", "b"], [{}, {}]), 0.01, seed=0)


def test_eval_measures_samples_against_held_out_embeddings_beside_the_real_floor(tmp_path):
    data = correlated_gaussian(240, seed=5).reshape(120, 2, 2, 4)  # 120 images x 2 cached views
    subjects = [f"p{i // 2}" for i in range(120)]
    cache = write_fake_cache(tmp_path / "cache", data, subjects=subjects)
    settings = _settings(cache, tmp_path / "run", max_steps=60, holdout_fraction=0.25)
    folder = train_embeddings(settings, progress=False)
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    model = load_embedding_model(folder)
    held_keys = model.info["holdout"]["holdout_keys"]
    held = np.array([int(k[3:]) for k in held_keys])
    train = np.setdiff1d(np.arange(120), held)
    assert report["protocol"] == "held-out" and report["holdout"]["by"] == "subject"
    assert len(held) == report["n_reference"] and 0 < len(held) < 120 and report["holdout"]["holdout_keys"] == held_keys
    assert not {subjects[i] for i in held} & {subjects[i] for i in train}
    assert model.info["num_train_images"] == len(train) == report["n_train"] == report["n_sampled"]
    # the held-out images never reached the model: its normalisation statistics are the training images' alone
    train_views = torch.from_numpy(data[train].astype(np.float16).astype(np.float32)).reshape(len(train) * 2, -1)
    assert torch.allclose(model.denoiser.mean, train_views.mean(0), atol=1e-5)
    # precision/recall/FD are those of the samples against the held-out images' first views
    normalise = model.denoiser.normalize
    reference = normalise(torch.from_numpy(data[held, 0].astype(np.float16).astype(np.float32)))
    sampled = normalise(sample_embeddings(model, len(train), seed=settings.seed + 1, steps=settings.eval_steps))
    assert (report["precision"], report["recall"]) == pytest.approx(precision_recall(reference, sampled), abs=1e-9)
    assert report["fd"] == pytest.approx(frechet_distance(reference, sampled), rel=1e-6)
    floor = report["real_floor"]  # the training embeddings against the same held-out reference, as many as samples
    firsts = normalise(torch.from_numpy(data[train, 0].astype(np.float16).astype(np.float32)))
    assert floor["n"] == len(train)
    assert (floor["precision"], floor["recall"]) == pytest.approx(precision_recall(reference, firsts), abs=1e-9)
    assert report["copy_reference"].startswith("nearest of all 2 cached views")

    # capped: a seeded subset of the training images gets the samples (and is the floor), so the copy search is
    # samples x views, linear in the training set
    cached = read_cached_embeddings(cache)
    capped = evaluate_against_cache(folder, cached, split_holdout(cached, 0.25, settings.seed), [],
                                    replace(settings, eval_samples=30))
    drawn = eval_rows(len(train), 30, settings.seed)
    assert len(drawn) == len(set(drawn)) == 30 and np.array_equal(drawn, eval_rows(len(train), 30, settings.seed))
    assert capped["n_sampled"] == capped["real_floor"]["n"] == 30 and capped["n_train"] == len(train)
    firsts = normalise(torch.from_numpy(data[train[drawn], 0].astype(np.float16).astype(np.float32)))
    assert (capped["real_floor"]["precision"], capped["real_floor"]["recall"]) == pytest.approx(
        precision_recall(reference, firsts), abs=1e-9)
    assert "of a seeded 30 of" in capped["samples"]


def test_generate_sampled_decodes_new_embeddings_with_the_sources_labels(tiny_model_folder, tmp_path):
    import csv

    from dinodiff.data.phantoms import write_phantoms
    from dinodiff.generate.plan import GenerateSettings
    from dinodiff.generate.stage import generate_dataset
    from dinodiff.pipeline import DiNODiffusionPipeline

    labels_csv = write_phantoms(tmp_path / "raw", 6, size=64, seed=0, progress=False) / "labels.csv"
    pipe = DiNODiffusionPipeline.from_pretrained(tiny_model_folder)
    s, n = pipe.encode_images(torch.rand(1, 1, 32, 32)).shape[1:]
    rng = np.random.default_rng(0)
    names = ["Cardiomegaly", "Consolidation", "Pleural Effusion"]
    labels = [{k: float(rng.random() < 0.5) for k in names} for _ in range(40)]
    cache = write_fake_cache(tmp_path / "cache", rng.normal(size=(40, 1, s, n)), labels)
    embedding = train_embeddings(_settings(cache, tmp_path / "emb", max_steps=20, width=32), progress=False)
    settings = GenerateSettings(strategy="sampled", ratio=2, num_inference_steps=2, embedding_model=str(embedding),
                                source_options={"kind": "csv"})
    out = generate_dataset(tiny_model_folder, labels_csv, tmp_path / "syn", settings, batch_size=4, progress=False)
    with (out / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    with labels_csv.open() as handle:
        sources = {Path(r["path"]).stem: r for r in csv.DictReader(handle)}
    assert len(rows) == 12 and len(list((out / "images").rglob("*.png"))) == 12  # nested images/NNN/
    for row in rows:  # conditioned on (and labelled with) the labels of the source it was planned from
        source = next(v for k, v in sources.items() if row["source_a"].endswith(k))
        assert [float(row[k]) for k in names] == [float(source[k]) for k in names]
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["settings"]["strategy"] == "sampled" and provenance["settings"]["embedding_model"]
    with pytest.raises(ValueError, match="embedding-model"):
        GenerateSettings(strategy="sampled")
