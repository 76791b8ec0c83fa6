"""A small document model rendered both as Markdown and as HTML, so the two never disagree.

The report is a list of blocks (headings, paragraphs, tables, lists, figures); figures are
links in Markdown and inline Plotly divs in HTML.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field

import plotly.graph_objects as go


@dataclass(frozen=True, slots=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True, slots=True)
class Para:
    text: str


@dataclass(frozen=True, slots=True)
class Bullets:
    items: Sequence[str]


@dataclass(frozen=True, slots=True)
class TableBlock:
    headers: Sequence[str]
    rows: Sequence[Sequence[str]]


@dataclass(frozen=True, slots=True)
class FigureBlock:
    name: str
    """File stem under ``figures/``."""
    figure: go.Figure | None = None
    png: bool = False


Block = Heading | Para | Bullets | TableBlock | FigureBlock


@dataclass(slots=True)
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Document) -> str:
    out = [f"# {doc.title}", ""]
    for b in doc.blocks:
        if isinstance(b, Heading):
            out += ["#" * (b.level + 1) + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, TableBlock):
            out.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            out.append("|" + "|".join("---" for _ in b.headers) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
        else:
            target = f"figures/{b.name}.png" if b.png else f"figures/{b.name}.html"
            out += [f"[![{b.name}]({target})](figures/{b.name}.html)" if b.png else
                    f"[{b.name}]({target})", ""]  # fmt: skip
    return "\n".join(out).rstrip() + "\n"


_STYLE = (
    "body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
    "text-align:left;vertical-align:top;font-size:0.9em}th{background:#f3f3f3}"
)


def to_html(doc: Document, *, plotlyjs: str = "figures/plotly.min.js") -> str:
    """The document as one HTML page; figures inline, plotly.js loaded from ``plotlyjs``."""
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{esc(doc.title)}</title>",
        f"<style>{_STYLE}</style>",
        f'<script src="{esc(plotlyjs)}"></script>',
        "</head><body>",
        f"<h1>{esc(doc.title)}</h1>",
    ]
    for b in doc.blocks:
        if isinstance(b, Heading):
            level = min(6, b.level + 1)
            out.append(f"<h{level}>{esc(b.text)}</h{level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{esc(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, TableBlock):
            head = "".join(f"<th>{esc(h)}</th>" for h in b.headers)
            body = "".join(
                "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in b.rows
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b.figure is not None:
            out.append(b.figure.to_html(full_html=False, include_plotlyjs=False))
        else:
            out.append(f'<p><a href="figures/{esc(b.name)}.html">{esc(b.name)}</a></p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"
