"""Run by test_sweep.py under `accelerate launch --num_processes 2`: the training FID hook spread over 2 processes.

Usage: ddp_fid.py RUN_DIR MODEL_FOLDER OUT_JSON. One source per chunk (SOURCE_CHUNK = 1), so the 3 sources are 3
chunks: rank 0 makes chunks 0 and 2, rank 1 chunk 1. Each rank writes the chunks it made and what the hook returned.
"""

import json
import sys
from pathlib import Path

from accelerate import PartialState

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS / "evaluate" / "fid")]
import dinodiff.evaluate.fid.sweep as sweep_mod  # noqa: E402
from test_sweep import SETTINGS  # noqa: E402

run_dir, model, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
state = PartialState(cpu=True)
sweep_mod.SOURCE_CHUNK = 1
made = []
original = sweep_mod.CheckpointScorer.chunk_features


def recording(self, pipe, chunks):
    made.extend(chunks)
    return original(self, pipe, chunks)


sweep_mod.CheckpointScorer.chunk_features = recording
hook = sweep_mod.make_fid_hook(run_dir, SETTINGS, timeout_s=120)
scores = hook(model, 2)
Path(f"{out}.rank{state.process_index}").write_text(json.dumps({"chunks": made, "scores": scores}))
