"""The trainer reads no device value on the host between log steps, yet still stops on a non-finite loss in time.

On a GPU, `.item()`, `float(t)`, `if t:`, `.tolist()`, `.numpy()` and `.cpu()` of a device tensor wait for every
queued kernel. On the CPU nothing waits, so these calls are counted instead: every call made while a step runs
or between log steps is a sync the GPU would pay. Host-side bookkeeping tensors that never live on the GPU are
not counted: torch.optim's step counters (CPU tensors for the non-fused optimizers) and the DataLoader's seeds.
"""

from __future__ import annotations

import collections
import contextlib
import traceback
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from dinodiff.runs import list_checkpoints
from dinodiff.train.trainer import Trainer, TrainingDiverged

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")
HOST_ONLY = ("/torch/optim/", "/torch/utils/data/")


@contextlib.contextmanager
def count_host_reads(trainer: Trainer):
    """Record (inside a step?, trainer.step, where) for every host read of a tensor while the block runs."""
    seen: collections.Counter = collections.Counter()
    state = {"in_step": False}
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name):
        original = originals[name]

        def counted(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            if not any(part in caller.filename for part in HOST_ONLY):
                seen[(state["in_step"], trainer.step, f"{Path(caller.filename).name}:{caller.lineno} {name}")] += 1
            return original(self, *args, **kwargs)
        return counted

    step = trainer._optimizer_step

    def flagged_step(*args, **kwargs):
        state["in_step"] = True
        try:
            return step(*args, **kwargs)
        finally:
            state["in_step"] = False

    trainer._optimizer_step = flagged_step
    for name in READS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield seen
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        trainer._optimizer_step = step


def test_no_host_read_inside_steps_or_between_log_steps(tmp_path, prepared_phantoms):
    cfg = tiny_config(tmp_path / "run", prepared_phantoms, "train.max_steps=8", "train.log_every=4",
                      "train.checkpoint_every=8", "train.sample_every=8", "data.augment=false", "train.ema=true",
                      "optim.max_grad_norm=1.0")
    trainer = Trainer(cfg)
    with count_host_reads(trainer) as seen:
        trainer.run()
    inside = {where: n for (in_step, _, where), n in seen.items() if in_step}
    assert not inside, f"host reads inside optimizer steps: {inside}"
    between = {(step, where): n for (_, step, where), n in seen.items() if step not in (4, 8)}
    assert not between, f"host reads between log steps: {between}"
    assert any(step == 4 for _, step, _ in seen)  # the log step does read (once per window)


def test_a_nan_mid_window_stops_at_the_next_read_before_the_checkpoint(tmp_path, prepared_phantoms, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(run, prepared_phantoms, "train.max_steps=12", "train.log_every=5",
                                  "train.checkpoint_every=4", "train.sample_every=100"))
    real_loss, calls = trainer._loss, iter(range(1, 100))

    def nan_at_step_6(batch):
        value = real_loss(batch)
        return value * float("nan") if next(calls) == 6 else value

    monkeypatch.setattr(trainer, "_loss", nan_at_step_6)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 6 \(seen at step 8\).*checkpoint 4"):
        trainer.run()  # no log step between 6 and 8: the read before checkpoint 8 stops it
    assert [step for step, _ in list_checkpoints(run)] == [4]
