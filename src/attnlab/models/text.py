"""Text inputs: the public-domain English text shipped with attnlab, tokenised to a length."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from attnlab.core.errors import AttnInputError

SHIPPED = "pride_and_prejudice.txt"


def shipped_text() -> str:
    """Chapters 1-3 of Jane Austen's *Pride and Prejudice* (1813, public domain), ~4.4k tokens."""
    return resources.files("attnlab.data").joinpath(SHIPPED).read_text(encoding="utf-8")


def read_text(path: str | Path | None) -> str:
    """The text of ``path``, or the shipped text when ``path`` is None."""
    if path is None:
        return shipped_text()
    path = Path(path)
    if not path.is_file():
        raise AttnInputError(f"text: no such file {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise AttnInputError(f"text: {path} is empty")
    return text


def text_ids(
    tokenizer, tokens: int | None = None, text: str | None = None
) -> tuple[torch.Tensor, int]:
    """Token ids [1, N] of ``text`` (default: the shipped text) and how many copies were joined.

    With ``tokens``, the text is cut to that many tokens; a text shorter than
    that is repeated (separated by a blank line) until it is long enough, and
    the number of copies says so.
    """
    if tokens is not None and (not isinstance(tokens, int) or tokens < 2):
        raise AttnInputError(f"tokens: expected an int >= 2, got {tokens!r}")
    text = shipped_text() if text is None else text
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if not ids:
        raise AttnInputError("text: tokenises to nothing")
    copies = 1
    if tokens is not None:
        sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        body = tokenizer(text, add_special_tokens=False)["input_ids"]
        while len(ids) < tokens:
            ids = ids + sep + body
            copies += 1
        ids = ids[:tokens]
    return torch.tensor([ids], dtype=torch.long), copies
