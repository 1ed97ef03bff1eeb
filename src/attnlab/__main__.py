"""``python -m attnlab``: the ``attnlab`` command."""

from attnlab.cli import app

app(prog_name="attnlab")
