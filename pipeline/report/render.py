"""Render report blocks to Markdown (charts linked as files) and to one offline HTML page.

Every data-derived string is escaped: answers and questions come from a model and from
users, so they may hold Markdown, HTML or script, and control characters (NUL, escape
sequences, bidi overrides), which are shown as visible escapes such as ``\\x00``. The HTML
page inlines the SVG charts, has no external resources, and its Content-Security-Policy
forbids scripts and network loads.
Non-goals: deciding what the report says (see `content.py`).
"""

from __future__ import annotations

import html
import re
import unicodedata

from pipeline.report.content import Block

MAX_CELL = 240
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~])")  # what can start markup mid-line
_SVG_PROLOGUE = re.compile(r"^\s*(<\?xml[^>]*\?>\s*)?(<!DOCTYPE[^>]*>\s*)?", re.IGNORECASE)
_NUMERIC = re.compile(r"^[-+$\d.,% x–]*$|^unknown$")
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td { max-width: 360px; overflow-wrap: anywhere; }
td.short { white-space: nowrap; overflow-wrap: normal; }
.note { background: #fff4e5; border-left: 4px solid #f0a020; padding: 6px 10px; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; }
"""


_BIDI = {0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def _escape_char(ch: str) -> str:
    code = ord(ch)
    hidden = unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") or code in _BIDI
    if not hidden:
        return ch
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str) -> str:
    """One line of text with control and bidi characters shown as escapes (NUL -> \\x00)."""
    return "".join(_escape_char(ch) for ch in " ".join(str(text).split()))


def _clip(text: str) -> str:
    text = visible(text)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def md_escape(text: str, *, clip: bool = True) -> str:
    """Plain text made inert in Markdown (one line, specials backslash-escaped); table cells
    are clipped to MAX_CELL characters, prose is not."""
    return _MD_SPECIAL.sub(r"\\\1", _clip(text) if clip else visible(text))


def _md_table(block: Block) -> str:
    lines = ["| " + " | ".join(md_escape(h) for h in block.header) + " |"]
    lines.append("|" + "---|" * len(block.header))
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in block.rows]
    return "\n".join(lines)


def to_markdown(blocks: list[Block]) -> str:
    """The report as Markdown; chart blocks link `<name>` beside report.md."""
    parts = []
    for b in blocks:
        if b.kind == "h1":
            parts.append("# " + md_escape(b.text))
        elif b.kind == "h2":
            parts.append("## " + md_escape(b.text))
        elif b.kind == "table":
            parts.append(_md_table(b))
        elif b.kind == "chart":
            parts.append(f"![{b.text}]({b.text})")
        elif b.kind == "note":
            parts.append("> " + md_escape(b.text, clip=False))
        else:
            parts.append(md_escape(b.text, clip=False))
    return "\n\n".join(parts) + "\n"


def _html_cell(text: str) -> str:
    shown = visible(text)  # escapes (\\x00) widen the cell: decide on what is shown
    css = ' class="short"' if len(shown) <= 16 or _NUMERIC.match(shown) else ""
    return f"<td{css}>{html.escape(_clip(text))}</td>"


def _html_table(block: Block) -> str:
    head = "".join(f"<th>{html.escape(visible(h))}</th>" for h in block.header)
    body = "".join("<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in block.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def inline_svg(svg: str) -> str:
    """An SVG document reduced to its <svg> element, for inlining in HTML."""
    return _SVG_PROLOGUE.sub("", svg, count=1)


def to_html(blocks: list[Block], charts: dict[str, str]) -> str:
    """The report as one self-contained HTML page with the charts inlined as SVG."""
    title = next((b.text for b in blocks if b.kind == "h1"), "Cost report")
    parts = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            parts.append(f"<{b.kind}>{html.escape(visible(b.text))}</{b.kind}>")
        elif b.kind == "table":
            parts.append(_html_table(b))
        elif b.kind == "chart":
            label = html.escape(b.text)
            parts.append(f'<figure aria-label="{label}">{inline_svg(charts[b.text])}</figure>')
        else:
            css = ' class="note"' if b.kind == "note" else ""
            parts.append(f"<p{css}>{html.escape(visible(b.text))}</p>")
    head = (
        f'<meta charset="utf-8"><meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{html.escape(visible(title))}</title><style>{STYLE}</style>"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head>{head}</head><body>\n'
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
