"""`dinodiff report`: one self-contained HTML page (+ a Markdown summary) from the files the stages write.

The report imports no stage code: it reads results files only, so it runs wherever the outputs were copied.
It searches a run folder or a work folder recursively and builds a section for each kind of result found:

- a training run (``config.yaml`` + ``metrics.csv``/``checkpoints/``): config, loss curve, ``samples/*.png``,
  and ``fid.csv`` from ``dinodiff sweep`` (FID/FD by checkpoint, best checkpoint marked);
- a generated dataset (``provenance.json`` + ``preview.png``): reconstruction grids, interpolation strips;
- ``dinodiff fid --out X.json`` results;
- ``results.json`` files (below), including the ``dinodiff segment`` output (Table 2, Figure 5 overlays).

Sections without results are listed with the command that makes them.

**The results.json convention** (what a stage writes for the report; unknown keys are ignored)::

    {
      "kind": "classify",                    # required: the section it feeds ("encoder-probe", "classify",
                                             #   "segment", "audit", or any new name: shown generically)
      "title": "Classification (Table 1)",   # optional heading
      "provenance": {"checkpoint": ..., "extractor": ..., "tap": ..., "seeds": [...], "data": ...,
                     "command": "dinodiff classify ..."},   # anything: shown as the numbers' provenance
      "headline": {"AUC (real only)": 0.81},  # optional: a few numbers shown as tiles at the top
      "note": "How the numbers were made.",    # optional: shown under the heading
      "warnings": ["Reference too small."],    # optional: what limits the numbers, shown as warnings
      "tables": {"Table 1": [{"arm": ..., "auc": ...}, ...]   # a list of row dicts,
                 "per seed": "tables/seeds.md"},             #   Markdown text, or a .md/.csv file path
      "figures": {"Figure 4": "figure4.png"},  # PNG/JPEG paths, relative to the results.json folder
      "table": [{...}, ...]                    # optional single table (the encoder probe's)
    }

A new stage that writes this file needs no report code.
"""

from dinodiff.report.build import ReportError, build_report

__all__ = ["ReportError", "build_report"]
