"""Run by test_train.py under `accelerate launch --num_processes 2`: train, then hash each rank's weights."""

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_config  # noqa: E402

from dinodiff.train.trainer import Trainer  # noqa: E402

shards, run_dir = sys.argv[1], Path(sys.argv[2])
trainer = Trainer(tiny_config(run_dir, Path(shards), "train.max_steps=4", "train.checkpoint_every=2",
                              "train.sample_every=100"))
trainer.run()
model = trainer.accelerator.unwrap_model(trainer.model)
digest = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    digest.update(name.encode())
    digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
rank = trainer.accelerator.process_index
(run_dir / f"weights-rank{rank}.sha256").write_text(digest.hexdigest())
