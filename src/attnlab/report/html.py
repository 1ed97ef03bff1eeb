"""One self-contained HTML page: text, tables and images inlined as base64."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:left}th{background:#f4f4f4}
img{max-width:100%;border:1px solid #eee;margin:.3em 0}
.note{color:#555;font-size:.9em}code{background:#f4f4f4;padding:0 3px}
.tok{font-family:monospace;background:#f7f2e8;padding:0 2px}
"""


@dataclass
class Section:
    """A heading followed by paragraphs, tables and images (all escaped or inlined)."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[str, list[str], list[list[Any]]]] = field(default_factory=list)
    images: list[tuple[str, Path]] = field(default_factory=list)


def esc(value: Any) -> str:
    """HTML-escaped text of any value (floats to 4 significant digits)."""
    if isinstance(value, float):
        return html.escape(f"{value:.4g}")
    return html.escape("" if value is None else str(value), quote=True)


def image_tag(path: str | Path, alt: str = "") -> str:
    """An ``<img>`` whose PNG is inlined as a base64 data URI (no file needed to view it)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def table_html(caption: str, header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in body)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<tr>{head}</tr>{rows}</table>"


def render(title: str, sections: Sequence[Section], intro: Sequence[str] = ()) -> str:
    """The page as a string. Every piece of text given is escaped; images are inlined."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    parts += [f'<p class="note">{esc(p)}</p>' for p in intro]
    for s in sections:
        parts.append(f"<h2>{esc(s.title)}</h2>")
        parts += [f"<p>{esc(p)}</p>" for p in s.paragraphs]
        parts += [table_html(*t) for t in s.tables]
        for alt, path in s.images:
            parts.append(
                f"<figure>{image_tag(path, alt)}<figcaption class='note'>{esc(alt)}"
                "</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def write(
    path: str | Path, title: str, sections: Sequence[Section], intro: Sequence[str] = ()
) -> Path:
    """Write :func:`render`'s page to ``path`` (UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(title, sections, intro), encoding="utf-8")
    return path
