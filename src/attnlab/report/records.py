"""The one envelope of every JSON file attnlab writes, and its rows as CSV.

A record says what produced it before what it holds::

    {"schema": 1, "attnlab": "0.1.0", "torch": "2.13.0", "transformers": "4.57.1",
     "native": {...}, "threads": 2, "date": "2026-12-08T01:02:03+00:00",
     "command": "attnlab bench speed --n 1k", ...fields..., "rows": [...]}

``native`` is :func:`attnlab.core.native.describe` (whether the compiled kernels were
built, switched on, and which instruction set runs). ``command`` is the command line
that is running (set by the ``attnlab`` command with :func:`command_line`), else this
process's ``sys.argv``. Every bench and ``attnlab analyze`` write through
:func:`envelope`; ``--csv`` writes the same rows through :func:`write_csv`.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import dataclasses
import datetime
import json
import shlex
import sys
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import attnlab
from attnlab.core import native

# bump when a field of the envelope changes meaning or goes away
SCHEMA = 1

_COMMAND: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "attnlab_command", default=None
)


@contextlib.contextmanager
def command_line(argv: Iterable[str]) -> Iterator[None]:
    """Within this block, records name ``argv`` (quoted as a shell would) as their command."""
    token = _COMMAND.set(shlex.join(argv))
    try:
        yield
    finally:
        _COMMAND.reset(token)


def current_command() -> str:
    """The command line that is running (see :func:`command_line`), else ``sys.argv``."""
    return _COMMAND.get() or shlex.join(sys.argv)


def native_state() -> dict[str, Any]:
    """What :func:`attnlab.core.native.describe` says about the compiled kernels; where
    that function is missing, whether the library was built and is switched on."""
    describe = getattr(native, "describe", None)
    if describe is not None:
        return describe()
    try:
        built = native.library() is not None
    except OSError:
        built = False
    return {"built": built, "enabled": built and native.enabled()}


def native_summary() -> str:
    """One line saying whether the compiled kernels run (:func:`native.summary` where it
    exists)."""
    summary = getattr(native, "summary", None)
    if summary is not None:
        return summary()
    state = native_state()
    if state["enabled"]:
        return "compiled kernels: on"
    if state["built"]:
        return "compiled kernels: built but switched off (ATTNLAB_NATIVE=0); PyTorch paths run"
    return "compiled kernels: not built (run `make native`); PyTorch paths run"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def as_rows(items: Iterable[Any]) -> list[dict[str, Any]]:
    """Dataclass records (or dicts) as JSON-ready dicts."""
    return [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r) for r in items]


_ENVELOPE = (
    "schema",
    "attnlab",
    "torch",
    "transformers",
    "native",
    "threads",
    "date",
    "command",
    "rows",
)


def envelope(rows: Iterable[Any], **fields: Any) -> dict[str, Any]:
    """``rows`` (dataclasses or dicts) inside the envelope: schema, versions, the kernels'
    state, threads, date and command line, then ``fields`` (what the rows are of), then
    ``rows``."""
    clash = set(fields) & set(_ENVELOPE)
    if clash:
        raise ValueError(f"fields: {', '.join(sorted(clash))} belong to the envelope")
    return {
        "schema": SCHEMA,
        "attnlab": attnlab.__version__,
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "native": native_state(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": current_command(),
        **fields,
        "rows": as_rows(rows),
    }


def write_json(path: str | Path, rows: Iterable[Any], **fields: Any) -> Path:
    """Write :func:`envelope` of ``rows`` and ``fields`` to ``path`` (folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(envelope(rows, **fields), indent=2))
    return path


def write_csv(path: str | Path, rows: Iterable[Any]) -> Path:
    """Write ``rows`` as CSV: one column per key, in order of first appearance; lists and
    dicts in a cell as JSON, None as an empty cell."""
    table = as_rows(rows)
    columns: dict[str, None] = {}
    for row in table:
        columns.update(dict.fromkeys(row))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in table:
            writer.writerow({k: _cell(v) for k, v in row.items()})
    return path


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    return value
