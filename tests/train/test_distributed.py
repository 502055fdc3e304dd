"""Training under DDP (2 CPU processes over gloo): the lr schedule, slow evaluations, what each rank reads.

One 2-process run (module fixture) serves three tests: it uses gradient accumulation, a cosine schedule with
warm-up, a process-group timeout of a few seconds and an evaluation hook that sleeps longer than that timeout
at its first call, mid-run; each rank records the sample keys of its micro-batches.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, tiny_config

from dinodiff.runs import read_best
from dinodiff.train.trainer import train

DIST_TIMEOUT_S = 10  # the training collectives' timeout in the 2-process run
EVAL_SLEEP_S = 15  # the first evaluation (at step 5) takes longer than that
RUN = ["train.max_steps=8", "train.grad_accum=2", "train.checkpoint_every=5", "train.sample_every=100",
       "optim.lr_schedule=cosine", "optim.warmup_steps=4"]


def _launch_two_processes(script: Path, *args: str, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)


def _lr_column(run: Path) -> list[tuple[int, str]]:
    with (run / "metrics.csv").open() as handle:
        return [(int(row["step"]), row["lr"]) for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, prepared_phantoms) -> tuple[Path, subprocess.CompletedProcess]:
    from dinodiff.models.factory import resolve_encoder_path

    resolve_encoder_path("random:transformers-vit")  # made once here, not raced by the two ranks
    run = tmp_path_factory.mktemp("ddp") / "run"
    proc = _launch_two_processes(REPO_ROOT / "tests" / "scripts" / "ddp_probe.py", str(prepared_phantoms), str(run),
                                 str(EVAL_SLEEP_S), *RUN, "train.eval_every=5", f"train.dist_timeout_s={DIST_TIMEOUT_S}",
                                 port=29547)
    return run, proc


def _finished(ddp_run) -> Path:
    run, proc = ddp_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run


def test_lr_schedule_counts_optimizer_steps_under_ddp_and_accumulation(ddp_run, tmp_path, prepared_phantoms):
    run = _finished(ddp_run)
    single = tmp_path / "single"
    train(tiny_config(single, prepared_phantoms, *RUN))
    expected = _lr_column(single)
    assert [step for step, _ in expected] == list(range(1, 9))
    assert expected[3][1] == "1.000e-03" and expected[2][1] != expected[3][1]  # warm-up ends at step 4, not before
    assert _lr_column(run) == expected


def test_evaluation_slower_than_the_collective_timeout_keeps_the_run_alive(ddp_run):
    run = _finished(ddp_run)
    assert EVAL_SLEEP_S > DIST_TIMEOUT_S
    best = read_best(run)
    assert best["step"] == 5 and best["value"] == 10.0
    assert (run / "best" / "model" / "model_index.json").is_file()
    assert (run / "checkpoints" / "checkpoint-8").is_dir()  # training went on after the evaluation


def test_ranks_never_share_a_sample_in_a_step(ddp_run):
    run = _finished(ddp_run)
    keys = [json.loads((run / f"keys-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert len(keys[0]) == len(keys[1]) >= 16  # 8 steps x 2 micro-batches
    for micro, (a, b) in enumerate(zip(*keys)):
        assert len(a) == len(b) == 4
        assert not set(a) & set(b), (micro, a, b)
    # each rank reads its own shards (3 train shards: rank 0 gets two, rank 1 one)
    assert not {k for batch in keys[0] for k in batch} & {k for batch in keys[1] for k in batch}


# --------------------------------------------------------------------------------------- cache loader
def _fake_cache(folder: Path, shards: int, per_shard: int) -> Path:
    """A cache folder whose sample i has c_glb filled with i (one view), so batches tell which samples they hold."""
    (folder / "shards").mkdir(parents=True)
    for shard in range(shards):
        with tarfile.open(folder / "shards" / f"train-{shard:06d}.tar", "w") as tar:
            for i in range(shard * per_shard, (shard + 1) * per_shard):
                for name, array in (("moments.npy", np.zeros((1, 2, 2, 2), np.float16)),
                                    ("c_glb.npy", np.full((1, 1, 1), i, np.float32))):
                    buffer = io.BytesIO()
                    np.save(buffer, array)
                    info = tarfile.TarInfo(f"{i:06d}.{name}")
                    info.size = buffer.tell()
                    buffer.seek(0)
                    tar.addfile(info, buffer)
    return folder


def _ids_by_worker(cache: Path, seed: int, batches: int = 8) -> tuple[list[int], list[int]]:
    """Sample ids of the first `batches` batches of a 2-worker loader, split by worker (batches alternate)."""
    from dinodiff.data.cached import build_cache_loader

    loader = build_cache_loader(cache, batch_size=4, num_workers=2, seed=seed, shuffle_buffer=16)
    ids: tuple[list[int], list[int]] = ([], [])
    for n, batch in zip(range(batches), loader):
        ids[n % 2].extend(int(v) for v in batch["c_glb"].flatten())
    return ids


def test_cache_loader_shuffles_differently_per_worker_and_rank(tmp_path, monkeypatch):
    from dinodiff.train.data import _stream_seed

    one_shard = _fake_cache(tmp_path / "one", shards=1, per_shard=16)
    worker0, worker1 = _ids_by_worker(one_shard, seed=_stream_seed(0, 0, 0))
    assert len(worker0) == len(worker1) == 16 and set(worker0 + worker1) <= set(range(16))
    assert worker0 != worker1  # both workers read the one shard: only their shuffles can tell them apart
    other_rank, _ = _ids_by_worker(one_shard, seed=_stream_seed(0, 0, 1))
    assert other_rank != worker0
    # two processes: each reads its own shard, so their samples never overlap
    two_shards = _fake_cache(tmp_path / "two", shards=2, per_shard=8)
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append(set(sum(_ids_by_worker(two_shards, seed=_stream_seed(0, 0, rank)), [])))
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_rank_share_splits_shards_or_samples(monkeypatch):
    from dinodiff.data.ranks import rank_share

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert rank_share(["a", "b", "c"]) == (["b"], None)
    shards, keep = rank_share(["only"])
    assert shards == ["only"] and keep is not None
    samples = [{"__key__": f"k{i}"} for i in range(200)]
    mine = list(keep(iter(samples)))
    monkeypatch.setenv("RANK", "0")
    _, keep0 = rank_share(["only"])
    theirs = list(keep0(iter(samples)))
    assert len(mine) + len(theirs) == 200 and 70 < len(mine) < 130
    assert not {s["__key__"] for s in mine} & {s["__key__"] for s in theirs}


def test_resume_restores_the_lr_schedule_saved_or_rebuilds_it_for_older_checkpoints(tmp_path, prepared_phantoms):
    import torch

    from dinodiff.train.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path / "run", prepared_phantoms, "optim.warmup_steps=4"))
    for _ in range(3):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    saved = tmp_path / "lr_scheduler.pt"
    torch.save(trainer.lr_scheduler.state_dict(), saved)
    for path in (saved, tmp_path / "missing.pt"):  # a checkpoint with the file / one written before it existed
        fresh = Trainer(tiny_config(tmp_path / "run", prepared_phantoms, "optim.warmup_steps=4"))
        fresh._restore_lr_scheduler(path, step=3)
        assert fresh.lr_scheduler.get_last_lr() == pytest.approx([1e-3 * 3 / 4])
        fresh.optimizer.step()
        fresh.lr_scheduler.step()  # the next step goes on from there (the optimizer's lr itself comes from its state)
        assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
