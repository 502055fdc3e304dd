"""The `dinodiff` command, the composition root: one sub-command per stage, each a thin layer over a Python function.

prepare -> cache -> train -> generate -> evaluate (fid | classify | segment) -> report

The commands live by data flow in stages.py, evaluate.py, encoder.py and demo.py and are registered here, in the
order `dinodiff --help` lists them. They parse options, build settings and hooks, configure logging and turn domain
errors into one clean line and an exit code (common.py); each imports its stage inside its body, for start-up time.
"""

from __future__ import annotations

from dinodiff.cli import demo, encoder, evaluate, stages
from dinodiff.cli.common import app

app.command()(stages.prepare)
app.command()(stages.phantoms)
app.command(context_settings={"allow_extra_args": False})(stages.cache)
app.command()(stages.train)
app.command()(stages.generate)
app.command()(evaluate.fid)
app.command()(evaluate.sweep)
app.command()(evaluate.segment)
app.command()(evaluate.report)
app.command()(evaluate.classify)
app.command("pretrain-encoder")(encoder.pretrain_encoder)
app.command("probe-encoder")(encoder.probe_encoder)
app.command("train-embeddings")(encoder.train_embeddings_command)
app.command()(evaluate.audit)
app.command()(demo.demo)

__all__ = ["app", "main"]


def main() -> None:  # `python -m dinodiff.cli` (see __main__.py), also what `accelerate launch -m` calls
    app()
