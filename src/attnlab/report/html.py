"""One self-contained HTML page from a jinja2 template (autoescaped), PNGs inlined as base64.

The page's parts are plain records (:class:`Section`, :class:`Table`, :class:`Figure`,
:class:`Finding`); the layout lives in ``templates/report.html.j2``. Every text
given is escaped by jinja2's autoescape; the only markup that reaches the page
is the template's own. Nothing on the page is fetched: images are data URIs,
the style is inline, there is no script.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from .tokens import visible

# tables longer than this are folded into <details> (open on a click)
FOLD_ROWS = 12


@dataclass(frozen=True)
class Token:
    """A table cell that holds token text (shown in a box, whitespace kept)."""

    text: str


@dataclass
class Table:
    """A captioned table; ``folded`` None folds it when it has more than ``FOLD_ROWS`` rows."""

    caption: str
    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    folded: bool | None = None

    @property
    def fold(self) -> bool:
        return len(self.rows) > FOLD_ROWS if self.folded is None else self.folded


@dataclass
class Figure:
    """A PNG, its title (the image's alt text) and a caption that says how to read it."""

    path: Path
    caption: str
    alt: str

    @property
    def src(self) -> str:
        """The PNG as a ``data:`` URI (the page needs no file next to it)."""
        data = base64.b64encode(Path(self.path).read_bytes()).decode("ascii")
        return f"data:image/png;base64,{data}"


@dataclass
class Finding:
    """One line of the summary: what was found, the heads that show it with their scores,
    and the section that has the details."""

    title: str
    text: str
    heads: Sequence[tuple[str, float]] = ()
    anchor: str = ""


@dataclass
class Section:
    """A heading followed by paragraphs, a token strip, findings, figures and tables.

    ``wide`` lays the figures out two to a row instead of three (attention maps).
    """

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    wide: bool = False

    @property
    def anchor(self) -> str:
        return anchor(self.title)


def anchor(title: str) -> str:
    """The fragment id of a section title (lowercase words joined by ``-``)."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"


def cell(value: Any) -> str:
    """A table cell's text: floats to 4 significant digits, None empty."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("attnlab.report", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.filters["cell"] = cell
_ENV.filters["score"] = lambda value: f"{value:.3g}"
_ENV.filters["visible"] = visible
_ENV.tests["token"] = lambda value: isinstance(value, Token)


def render(
    title: str,
    sections: Sequence[Section],
    intro: Sequence[str] = (),
    facts: Sequence[tuple[str, Any]] = (),
) -> str:
    """The page as a string: ``title``, ``intro`` paragraphs, ``facts`` (label, value) of the
    run, a table of contents, then ``sections``. Every text is escaped."""
    return _ENV.get_template("report.html.j2").render(
        title=title, intro=list(intro), facts=list(facts), sections=list(sections)
    )


def write(
    path: str | Path,
    title: str,
    sections: Sequence[Section],
    intro: Sequence[str] = (),
    facts: Sequence[tuple[str, Any]] = (),
) -> Path:
    """Write :func:`render`'s page to ``path`` (UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(title, sections, intro, facts), encoding="utf-8")
    return path
