"""The untrained control of a trained model: the same run's UNet and projection at initialisation (step 0), the
same frozen encoder and autoencoder, written as a model folder that `dinodiff segment` evaluates with the same grid.

    python benchmarks/make_untrained_twin.py RUN/checkpoints/checkpoint-1000 --out TWIN

TWIN is laid out as a run (``TWIN/config.yaml``, ``TWIN/checkpoints/checkpoint-0/model``), with the trained run's
config.yaml, so that `segment`'s training-image check reads the same training sets. Run it from the folder the run
was trained from (its config.yaml may name the encoder by a relative path): the UNet is then the one the trainer
built at step 0, weight for weight. What a zero-shot method scores
with TWIN is what the architecture, the encoder's condition and the image give without any diffusion training:
the part of a trained model's score that its training earned is the difference.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from accelerate.utils import set_seed

from dinodiff import runs
from dinodiff.config import load_training_settings
from dinodiff.models.factory import build_components
from dinodiff.pipeline import load_model_folder
from dinodiff.pipeline.diffusion import save_model_folder


def make_twin(model: Path, out: Path) -> Path:
    """Write ``out/checkpoints/checkpoint-0/model``: ``model``'s run at initialisation (its config's seed)."""
    folder = runs.resolve_model(model).path
    config = runs.run_config(folder)
    if config is None:
        raise SystemExit(f"{folder} is not inside a run (no config.yaml above it): the twin needs the run's settings "
                         "to rebuild its UNet at initialisation.")
    settings = load_training_settings(config)
    parts = load_model_folder(folder)
    # as the trainer starts (train/trainer.py): every generator seeded, then every component built in its order, so
    # that the UNet and projection draw the same numbers the run's did
    set_seed(int(settings.train.seed))
    fresh = build_components(settings.model)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config, out / runs.CONFIG_FILE)
    target = out / "checkpoints" / "checkpoint-0" / "model"
    return save_model_folder(target, unet=fresh.unet, projection=fresh.projection, autoencoder=parts.autoencoder,
                             noise_scheduler=parts.noise_scheduler, model_cfg=settings.model, encoder=parts.encoder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a trained model folder, checkpoint or run")
    parser.add_argument("--out", type=Path, required=True, help="folder for the untrained twin (laid out as a run)")
    args = parser.parse_args()
    print(make_twin(args.model, args.out))


if __name__ == "__main__":
    main()
