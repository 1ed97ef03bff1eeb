"""The analyses ``attnlab analyze`` knows, read in this one place (by the command line's
``--analyses`` and by ``bench capture --probe analyze``), so that where the list lives
can change here alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple


class Catalog(NamedTuple):
    """Names ``--analyses`` accepts, those run by default, those that run on the input
    text, and the streaming analysis class of each name that has one."""

    known: tuple[str, ...]
    default: tuple[str, ...]
    on_text: tuple[str, ...]
    streaming: dict[str, Callable[[], Any]]


def catalog() -> Catalog:
    """The analyses of ``attnlab analyze`` (from :mod:`attnlab.report.analyze` and
    :data:`attnlab.analysis.STREAMING`)."""
    from attnlab.analysis import STREAMING
    from attnlab.report.analyze import ALL, DEFAULT, ON_TEXT

    return Catalog(tuple(ALL), tuple(DEFAULT), tuple(ON_TEXT), dict(STREAMING))
