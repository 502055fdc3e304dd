"""`dinodiff report`: one self-contained HTML page (+ a Markdown summary) from the files the stages write.

The report imports no stage code: it reads files only, so it runs wherever the outputs were copied. It searches
a run folder or a work folder recursively and builds a section for each result found:

- a training run (``config.yaml`` + ``metrics.csv``/``checkpoints/``): config, loss curve (its axis names the
  loss: MSE on the run's prediction target, or the DINO loss of an encoder run), ``samples/*.png``;
- a generated dataset (``provenance.json`` + ``preview.png``): reconstruction grids, interpolation strips;
- every evaluation's **results record** (`dinodiff.results`: ``results.json``, or the ``--out`` file of
  ``dinodiff fid``): the sweep's FID by checkpoint, fid, classify, segment, audit, the encoder probe, the demo's
  checks, or any new kind, all shown by the same code from the record's ``title``, ``headline``, ``tables``,
  ``figures``, ``provenance``, ``note`` and ``warnings`` (never from the stage's own ``data``).

Sections without results are listed with the command that makes them; a file that is not a record is listed as
unreadable with its fix. A new evaluation that writes a record (`dinodiff.results.write_results`) needs no
report code.
"""

from dinodiff.report.build import ReportError, build_report

__all__ = ["ReportError", "build_report"]
