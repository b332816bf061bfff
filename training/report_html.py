"""The run report's HTML: the building blocks of a section (tables, paragraphs, figures) and the page around the
sections (style, navigation, content security policy).

Every string that comes from the run passes through `escape` here, once: `table`, `para`, `section` and `image`
escape the text they are given, so callers hand them raw text (class names are users' folder names). The only
markup not escaped is ours: a `Cell`'s computed style, section ids, image data URIs and the sections' own HTML.
Everything is inline (CSS in a <style> element, no script), so the page reads the same offline, inside the
Kubeflow UI's sandboxed iframe, or mailed to a colleague.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SECTION_IDS", "Cell", "escape", "image", "num", "page", "para", "section", "table"]

SECTION_IDS = (
    "summary",
    "split-audit",
    "rounds",
    "global-vs-micro",
    "confusion-matrix",
    "resource-plan",
    "timings",
    "configuration",
)
"""The `id` of each section of the page, in order (links in the page's navigation point at them)."""


def escape(text: object) -> str:
    return html.escape(str(text), quote=True)


@dataclass(frozen=True)
class Cell:
    """A table cell: its text (escaped when written), right-aligned when `num`."""

    text: str
    num: bool = False
    style: str = ""
    """Inline style we compute (never user text)."""


def num(text: str, style: str = "") -> Cell:
    """A right-aligned (numeric) cell."""
    return Cell(text, num=True, style=style)


def table(header: Sequence[str], rows: Sequence[Sequence[str | Cell]], caption: str = "") -> str:
    def cell(c: str | Cell, tag: str) -> str:
        c = c if isinstance(c, Cell) else Cell(c)
        attrs = (' class="num"' if c.num else "") + (f' style="{c.style}"' if c.style else "")
        return f"<{tag}{attrs}>{escape(c.text)}</{tag}>"

    head = "".join(cell(h, "th") for h in header)
    body = "".join("<tr>" + "".join(cell(c, "td") for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{escape(caption)}</caption>" if caption else ""
    return f'<div class="scroll"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def section(sid: str, title: str, *parts: str) -> str:
    """A section of the page: `sid` is one of SECTION_IDS; `parts` are HTML built here."""
    return f'<section id="{sid}"><h2>{escape(title)}</h2>{"".join(parts)}</section>'


def para(text: str, cls: str = "") -> str:
    attrs = f' class="{cls}"' if cls else ""
    return f"<p{attrs}>{escape(text)}</p>"


def image(uri: str, alt: str) -> str:
    """A figure showing `uri` (a data: URI from report_plots.py)."""
    return f'<figure><img src="{uri}" alt="{escape(alt)}"></figure>'


# ------------------------------------------------------------------------------------------------------ page

_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif;
       color: #1d2530; background: #f6f8fa; margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 16px 24px 40px; }
header h1 { font-size: 22px; margin: 8px 0 2px; }
header .sub { color: #57606a; margin: 0 0 8px; }
nav { display: flex; flex-wrap: wrap; gap: 6px 14px; font-size: 13px; margin-bottom: 8px; }
nav a { color: #0b5cad; text-decoration: none; }
section { background: #fff; border: 1px solid #d8dee4; border-radius: 8px; padding: 12px 18px 16px;
          margin: 14px 0; }
h2 { font-size: 17px; margin: 2px 0 10px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; }
.card { border: 1px solid #d8dee4; border-radius: 6px; padding: 8px 10px; background: #fbfcfd; }
.card .k { color: #57606a; font-size: 12px; }
.card .v { font-size: 19px; font-weight: 600; font-variant-numeric: tabular-nums; }
figure { margin: 8px 0; }
img { max-width: 100%; height: auto; display: block; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 12.5px; margin: 6px 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d8dee4; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eef2f6; font-weight: 600; }
td.num, th.num { text-align: right; white-space: nowrap; }
tbody tr:nth-child(even) td:not([style]) { background: #f9fafb; }
p { margin: 6px 0; }
.note { color: #57606a; font-size: 13px; }
.warn { color: #7a4a00; background: #fff8e5; border-left: 3px solid #d4a72c; padding: 6px 10px; font-size: 13px; }
footer { color: #8c959f; font-size: 12px; text-align: center; }
"""

# No network, no script: the page can only show what it carries.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_NAV = {
    "summary": "Summary",
    "split-audit": "Split audit",
    "rounds": "Rounds",
    "global-vs-micro": "Global vs micro-models",
    "confusion-matrix": "Confusion matrix",
    "resource-plan": "Resource plan",
    "timings": "Timings",
    "configuration": "Configuration",
}


def page(headline: str, sections: Sequence[str]) -> str:
    """The whole page: `headline` (raw text) as title and subtitle, the sections (HTML) in SECTION_IDS order."""
    nav = "".join(f'<a href="#{sid}">{escape(_NAV[sid])}</a>' for sid in SECTION_IDS)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>microfed report: {escape(headline)}</title><style>{_CSS}</style></head>\n<body><main>"
        f'<header><h1>microfed run report</h1><p class="sub">{escape(headline)}</p><nav>{nav}</nav></header>\n'
        + "\n".join(sections)
        + "\n<footer>microfed: federated-style training on Kubeflow Pipelines</footer></main></body></html>\n"
    )
