"""build_report: discover results, build the sections in the data flow's order, write report.html + report.md."""

from __future__ import annotations

import logging
import re
import shlex
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import yaml

import dinodiff
from dinodiff.files import write_bytes_atomic
from dinodiff.report.blocks import Missing, Section
from dinodiff.report.discover import discover
from dinodiff.report.render import render_html, render_markdown
from dinodiff.report.sections import (
    config_section,
    generated_section,
    results_section,
    samples_section,
    training_section,
)

logger = logging.getLogger(__name__)

# The known sections, in the page's order, with the command that makes each when it is missing.
EXPECTED: dict[str, tuple[str, str]] = {
    "config": ("Run configuration", "dinodiff train --config cpu-small data.shards=PREPARED train.run_dir=RUN"),
    "training": ("Training loss", "dinodiff train --config cpu-small data.shards=PREPARED train.run_dir=RUN"),
    "fid": ("Image quality (FID/FD by checkpoint)", "dinodiff sweep RUN --real PREPARED"),
    "samples": ("Samples during training", "dinodiff train ... train.sample_every=500 (writes RUN/samples/)"),
    "reconstruction": ("Reconstructions",
                       "dinodiff generate RUN --source PREPARED --strategy reconstruction --out generated/reconstruction"),
    "interpolation": ("Interpolation strips (Figure 2)",
                      "dinodiff generate RUN --source PREPARED --strategy interpolation --out generated/interpolation"),
    "encoder-probe": ("Encoder probe", "dinodiff probe-encoder ENCODER --data LABELLED --out probe/"),
    "classify": ("Classification: Table 1 and Figure 4", "dinodiff classify ... --out classify/ (see --help)"),
    "segment": ("Zero-shot segmentation: Table 2 and Figure 5", "dinodiff segment RUN --data MASKS --out segment/"),
    "audit": ("Privacy audit", "dinodiff audit SYNTHETIC --train PREPARED --out audit/"),
}


class ReportError(RuntimeError):
    """Nothing to report (no results files under the folder)."""


def _order(section: Section) -> tuple[int, str]:
    keys = list(EXPECTED)
    return (keys.index(section.key) if section.key in keys else len(keys), str(section.source))


def collect(root: Path) -> tuple[list[Section], list[Missing], list[str]]:
    """Every section with results under `root`, the known sections without, and unreadable files."""
    found = discover(root)
    sections: list[Section] = []

    def add(source: Path, build: Callable[[], Section | None]) -> None:
        try:
            made = build()
        except (OSError, ValueError, TypeError, KeyError, IndexError, yaml.YAMLError) as err:
            found.problems.append(f"{source}: could not be shown ({type(err).__name__}: {err}); rerun its stage")
            return
        if made is not None:
            sections.append(made)

    for run in found.runs:
        add(run / "config.yaml", lambda: config_section(run))
        add(run / "metrics.csv", lambda: training_section(run, found.problems))
        add(run / "samples", lambda: samples_section(run))
    for folder, prov in found.generated:
        add(folder, lambda: generated_section(folder, prov))
    for path, record in found.results:
        add(path, lambda: results_section(path, record))
    sections.sort(key=_order)
    present = {s.key for s in sections}
    missing = [Missing(key, title, command) for key, (title, command) in EXPECTED.items() if key not in present]
    return sections, missing, found.problems


def _command() -> str:
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    return shlex.join(argv)


def build_report(root: str | Path, out: str | Path | None = None, *, title: str | None = None) -> dict[str, Any]:
    """Write the HTML page (default ROOT/report.html) and the Markdown summary beside it (same name, .md).

    Returns {"html", "markdown", "sections": [titles], "missing": [(title, command)], "problems": [...]}.
    """
    root = Path(root)
    sections, missing, problems = collect(root)
    if not sections:
        raise ReportError(f"No results found under {root}: give a training run folder (config.yaml, metrics.csv) "
                          "or a work folder holding stage outputs (results.json, fid.csv, provenance.json).")
    html_path = Path(out) if out is not None else root / "report.html"
    md_path = html_path.with_suffix(".md")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = title or f"dinodiff report: {root.resolve().name}"
    subtitle = (f"{root.resolve()} · {len(sections)} sections, {len(missing)} missing · {stamp} · "
                f"dinodiff {dinodiff.__version__} · {_command()}")
    for section in sections:
        if "command" not in section.provenance and section.key in ("config", "training"):  # not recorded by train
            section.provenance["to rerun (resumes)"] = f"dinodiff train --config {section.source.parent / 'config.yaml'}"
    page = render_html(title, subtitle, sections, missing, problems)
    bad = external_references(page)
    if bad:  # a bug of the renderer, never of the data: the page must stand alone
        raise ReportError(f"the page would load {bad[:3]} from outside itself; please report this bug.")
    write_bytes_atomic(html_path, page.encode("utf-8"))
    write_bytes_atomic(md_path, render_markdown(title, subtitle, sections, missing, problems,
                                                md_path.parent).encode("utf-8"))
    logger.info("report: %s (%d sections, %d missing)", html_path, len(sections), len(missing))
    return {"html": html_path, "markdown": md_path, "sections": [s.title for s in sections],
            "keys": [s.key for s in sections], "missing": [(m.title, m.command) for m in missing],
            "problems": problems}


_URL_ATTRIBUTES = {"src", "href", "srcset", "poster", "data", "action", "formaction", "background", "xlink:href"}


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in_style = tag == "style"
        for name, value in attrs:
            if name in _URL_ATTRIBUTES and value is not None:
                self.found.append(value)
            elif name == "style" and value:
                self.found += re.findall(r"url\(\s*['\"]?([^'\")]*)", value)
        if tag in ("link", "script", "iframe", "object", "embed", "base"):
            self.found.append(f"<{tag}>")

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.found += re.findall(r"url\(\s*['\"]?([^'\")]*)", data) + re.findall(r"@import", data)


def external_references(page: str) -> list[str]:
    """URL attributes, CSS url()/@import and link/script/frame tags in `page` other than data: URIs and
    in-page anchors: what a browser could fetch from outside the page."""
    parser = _References()
    parser.feed(page)
    return [r for r in parser.found if not r.startswith(("data:", "#"))]
