"""Run by test_distributed.py under `accelerate launch --num_processes 2`.

Usage: ddp_probe.py SHARDS RUN_DIR EVAL_SLEEP_S [override ...]

Trains the tiny preset with the given overrides and an evaluation hook that sleeps EVAL_SLEEP_S seconds on
the main process (a stand-in for a long FID evaluation), and writes each rank's micro-batch sample keys to
RUN_DIR/keys-rank{R}.json (one list of keys per micro-batch, in order).
"""

import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_config  # noqa: E402

from dinodiff.train.trainer import Trainer  # noqa: E402

shards, run_dir, sleep_s, overrides = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
scores = itertools.count(10, -1)  # each evaluation scores better than the one before


def slow_hook(model_folder: Path, step: int) -> dict:
    time.sleep(sleep_s)
    return {"fid": float(next(scores))}


trainer = Trainer(tiny_config(run_dir, shards, *overrides), eval_hook=slow_hook)
keys: list[list[str]] = []
make_batches = trainer.data.batches


def recording_batches(**kwargs):
    for batch in make_batches(**kwargs):
        keys.append(list(batch["key"]))
        yield batch


trainer.data.batches = recording_batches
trainer.run()
(run_dir / f"keys-rank{trainer.accelerator.process_index}.json").write_text(json.dumps(keys))
