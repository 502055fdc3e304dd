"""The report as one self-contained HTML page (inline CSS, figures as data: URIs) and as Markdown."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dinodiff.report.blocks import (
    Code,
    Figure,
    Markdown,
    Missing,
    Section,
    Table,
    data_uri,
)
from dinodiff.results import markdown_table

CSS = """
:root{--ink:#1d2433;--muted:#5b6478;--line:#e3e7ef;--bg:#f5f7fb;--card:#fff;--accent:#2f6fdf;--warn:#b4570a}
*{box-sizing:border-box}body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--ink);background:var(--bg)}header{background:linear-gradient(120deg,#1f3b73,#2f6fdf);color:#fff;
padding:28px 40px}header h1{margin:0 0 4px;font-size:26px}header p{margin:0;opacity:.85}
main{max-width:1280px;margin:0 auto;padding:24px 32px 60px}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:12px;margin:0 0 22px}
.tile{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px}
.tile b{display:block;font-size:22px;color:var(--accent)}.tile span{color:var(--muted);font-size:12.5px}
nav{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:10px 16px;margin-bottom:22px}
nav a{display:inline-block;margin:3px 10px 3px 0;color:var(--accent);text-decoration:none}
nav .off{color:var(--muted);margin-right:10px}
section{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:18px 24px;margin:0 0 22px}
section h2{margin:0 0 4px;font-size:20px}.src{color:var(--muted);font-size:12px;word-break:break-all}
h3{font-size:15px;margin:16px 0 6px}.figs{display:flex;flex-wrap:wrap;gap:18px}
figure{margin:0;flex:1 1 420px;max-width:100%}figure img{max-width:100%;height:auto;border:1px solid var(--line);
border-radius:6px;background:#fff}img.px{image-rendering:pixelated;min-width:min(100%,520px)}
figcaption{color:var(--muted);font-size:12.5px}table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border-bottom:1px solid var(--line);padding:4px 10px;text-align:left;vertical-align:top}
th{background:#eef2fa}tr:hover td{background:#f8faff}.scroll{overflow-x:auto}
pre{background:#0f172a;color:#e2e8f0;padding:12px;border-radius:8px;overflow:auto;font-size:12px;max-height:420px}
details{margin-top:8px}summary{cursor:pointer;color:var(--muted)}.note{color:var(--warn)}.info{color:var(--muted);margin:6px 0}
.missing li{margin:6px 0}code{background:#eef2fa;padding:1px 5px;border-radius:4px;font-size:12.5px}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _slug(text: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, i = base, 2
    while slug in used:
        slug, i = f"{base}-{i}", i + 1
    used.add(slug)
    return slug


def _table_html(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def markdown_html(text: str) -> str:
    """Markdown tables and headings as HTML; raw HTML is escaped and images become text, so nothing loads."""
    import markdown

    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"[image: \1]", text.replace("<", "&lt;"))
    text = re.sub(r"^(#{1,4}) ", lambda m: "#" * min(len(m.group(1)) + 2, 6) + " ", text, flags=re.M)
    rendered = markdown.markdown(text, extensions=["tables"])
    return re.sub(r'<a href="(?!#)[^"]*">', "<a>", rendered)


def _block_html(block: Any) -> str:
    if isinstance(block, Table):
        return (f"<h3>{_e(block.title)}</h3>" if block.title else "") + _table_html(block.header, block.rows)
    if isinstance(block, Markdown):
        return f'<div class="scroll">{markdown_html(block.text)}</div>'
    if isinstance(block, Code):
        return f"<details><summary>{_e(block.title)}</summary><pre>{_e(block.text)}</pre></details>"
    raise TypeError(f"unknown block {type(block).__name__}")


def _figures_html(figures: Sequence[Figure]) -> str:
    items = []
    for f in figures:
        cls = ' class="px"' if f.pixelated else ""
        caption = " ".join(x for x in (f"<b>{_e(f.title)}</b>", _e(f.caption)) if x)
        items.append(f'<figure><img{cls} alt="{_e(f.title)}" src="{data_uri(f.data)}"><figcaption>{caption}'
                     "</figcaption></figure>")
    return f'<div class="figs">{"".join(items)}</div>'


def section_html(section: Section, anchor: str) -> str:
    parts = [f'<section id="{anchor}"><h2>{_e(section.title)}</h2><div class="src">{_e(section.source)}</div>']
    if section.note:
        parts.append(f'<p class="info">{_e(section.note)}</p>')
    if section.warning:
        parts.append(f'<p class="note">{_e(section.warning)}</p>')
    run: list[Figure] = []  # consecutive figures share a row
    for block in [*section.blocks, None]:
        if isinstance(block, Figure):
            run.append(block)
            continue
        if run:
            parts.append(_figures_html(run))
            run = []
        if block is not None:
            parts.append(_block_html(block))
    if section.provenance:
        parts.append("<details><summary>Provenance</summary>"
                     + _table_html(["", ""], list(section.provenance.items())) + "</details>")
    return "".join(parts) + "</section>"


def render_html(title: str, subtitle: str, sections: Sequence[Section], missing: Sequence[Missing],
                problems: Sequence[str]) -> str:
    used: set[str] = set()
    anchors = [_slug(s.title, used) for s in sections]
    tiles = "".join(f'<div class="tile"><b>{_e(v)}</b><span>{_e(k)}</span></div>'
                    for s in sections for k, v in s.headline.items())
    nav = "".join(f'<a href="#{a}">{_e(s.title)}</a>' for s, a in zip(sections, anchors))
    nav += "".join(f'<span class="off">{_e(m.title)} (missing)</span>' for m in missing)
    body = [f'<div class="tiles">{tiles}</div>' if tiles else "", f"<nav>{nav}</nav>"]
    body += [section_html(s, a) for s, a in zip(sections, anchors)]
    if missing:
        items = "".join(f"<li><b>{_e(m.title)}</b>: no results found; make them with <code>{_e(m.command)}</code></li>"
                        for m in missing)
        body.append(f'<section id="missing"><h2>Missing sections</h2><ul class="missing">{items}</ul></section>')
    if problems:
        items = "".join(f"<li>{_e(p)}</li>" for p in problems)
        body.append(f'<section id="problems"><h2>Files that could not be read</h2><ul>{items}</ul></section>')
    rows = [[s.title, k, v] for s in sections for k, v in s.provenance.items()]
    body.append('<section id="provenance"><h2>Provenance of every number</h2>'
                '<p class="src">Where each section\'s numbers come from: results files, checkpoints, features, '
                "seeds, data and commands, as the stages recorded them.</p>"
                + _table_html(["section", "item", "value"], rows) + "</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{_e(title)}</h1><p>{_e(subtitle)}</p></header><main>{''.join(body)}</main></body></html>\n")


# ----------------------------------------------------------------------------------- markdown
def _link(path: Path | None, md_dir: Path) -> str:
    if path is None:
        return "in the HTML report"
    try:
        return f"`{Path(path).resolve().relative_to(md_dir.resolve())}`"
    except ValueError:
        return f"`{path}`"


def section_markdown(section: Section, md_dir: Path) -> str:
    parts = [f"## {section.title}", f"Source: {_link(section.source, md_dir)}"]
    parts += [f"_{text}_" for text in (section.note, section.warning) if text]
    for block in section.blocks:
        if isinstance(block, Figure):
            parts.append(f"- Figure: {block.title} ({_link(block.source, md_dir)})")
        elif isinstance(block, Table):
            parts.append((f"**{block.title}**\n\n" if block.title else "") + markdown_table(block.header, block.rows))
        elif isinstance(block, Markdown):
            parts.append(re.sub(r"^(#{1,4}) ", lambda m: "#" * min(len(m.group(1)) + 2, 6) + " ", block.text,
                                flags=re.M).strip())
        elif isinstance(block, Code):
            parts.append(f"<details><summary>{block.title}</summary>\n\n```yaml\n{block.text.strip()}\n```\n</details>")
    if section.provenance:
        parts.append("<details><summary>Provenance</summary>\n\n"
                     + markdown_table(["", ""], list(section.provenance.items())) + "\n</details>")
    return "\n\n".join(parts)


def render_markdown(title: str, subtitle: str, sections: Sequence[Section], missing: Sequence[Missing],
                    problems: Sequence[str], md_dir: Path) -> str:
    parts = [f"# {title}", subtitle]
    headline = [[k, v, s.title] for s in sections for k, v in s.headline.items()]
    if headline:
        parts.append("## At a glance\n\n" + markdown_table(["", "value", "section"], headline))
    parts += [section_markdown(s, md_dir) for s in sections]
    if missing:
        parts.append("## Missing sections\n\n" + "\n".join(f"- **{m.title}**: `{m.command}`" for m in missing))
    if problems:
        parts.append("## Files that could not be read\n\n" + "\n".join(f"- {p}" for p in problems))
    return "\n\n".join(parts) + "\n"
