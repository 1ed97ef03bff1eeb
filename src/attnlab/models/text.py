"""Text inputs: the public-domain English text shipped with attnlab, or a user's UTF-8
file, tokenised to a length, reading no more of the file than that length needs."""

from __future__ import annotations

import codecs
from importlib import resources
from pathlib import Path

import torch

from attnlab.core.errors import AttnInputError

SHIPPED = "pride_and_prejudice.txt"
# bytes read at a time from a user's file, and the first read per token asked for
_BLOCK = 1 << 16
_BYTES_PER_TOKEN = 8


def shipped_text() -> str:
    """Chapters 1-3 of Jane Austen's *Pride and Prejudice* (1813, public domain), ~4.4k tokens."""
    return resources.files("attnlab.data").joinpath(SHIPPED).read_text(encoding="utf-8")


def _opened(path: Path):
    """``path`` opened for binary reading, or AttnInputError saying why it cannot be."""
    if not path.exists():
        raise AttnInputError(f"text: no such file {path}")
    if path.is_dir():
        raise AttnInputError(f"text: expected a UTF-8 text file, got the folder {path}")
    try:
        return path.open("rb")
    except OSError as exc:
        raise AttnInputError(f"text: cannot read {path} ({exc.strerror})") from exc


def read_prefix(path: str | Path, max_bytes: int | None = None) -> tuple[str, bool]:
    """The text of the first ``max_bytes`` bytes of ``path`` (all of it when None; a
    character cut at the end is left out) and whether that is the whole file.

    Raises AttnInputError for a missing file, a folder, a binary file (a NUL byte) or
    bytes that are not UTF-8, naming the offset of the first bad byte.
    """
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    parts: list[str] = []
    offset = 0
    with _opened(path) as f:
        while max_bytes is None or offset < max_bytes:
            want = _BLOCK if max_bytes is None else min(_BLOCK, max_bytes - offset)
            chunk = f.read(want)
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise AttnInputError(
                    f"text: expected a UTF-8 text file, got binary data in {path} "
                    f"(a NUL byte at offset {offset + nul})"
                )
            try:
                parts.append(decoder.decode(chunk, final=not chunk))
            except UnicodeDecodeError as exc:
                # exc.object: the bytes held back from the last read, then this chunk
                at = offset + len(chunk) - len(exc.object) + exc.start
                raise AttnInputError(
                    f"text: expected UTF-8, got byte 0x{exc.object[exc.start]:02x} at offset "
                    f"{at} of {path}; convert it, e.g. `iconv -f latin1 -t utf-8 {path}`"
                ) from exc
            if not chunk:
                return "".join(parts), True
            offset += len(chunk)
        whole = not f.read(1)
    return "".join(parts), whole


def check_text_file(path: str | Path) -> Path:
    """``path`` if it is a readable UTF-8 text file with something other than whitespace
    in it; else AttnInputError saying what it is. Reads up to the first non-blank
    character (a few KiB for any real text)."""
    path = Path(path)
    size = _BLOCK
    while True:
        text, whole = read_prefix(path, size)
        if text.strip():
            return path
        if whole:
            what = "empty" if not text else "only whitespace"
            raise AttnInputError(f"text: {path} is {what}; give a file with some text in it")
        size *= 4


def read_text(path: str | Path | None) -> str:
    """The whole text of ``path`` (checked as by :func:`read_prefix`), or the shipped text
    when ``path`` is None."""
    if path is None:
        return shipped_text()
    text, _ = read_prefix(check_text_file(path))
    return text


def text_ids(
    tokenizer, tokens: int | None = None, text: str | None = None
) -> tuple[torch.Tensor, int]:
    """Token ids [1, N] of ``text`` (default: the shipped text) and how many copies were joined.

    With ``tokens``, the text is cut to that many tokens; a text shorter than
    that is repeated (separated by a blank line) until it is long enough, and
    the number of copies says so. The copies are joined once, in time linear in
    ``tokens``.
    """
    if tokens is not None and (
        not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 2
    ):
        raise AttnInputError(f"tokens: expected an int >= 2, got {tokens!r}")
    text = shipped_text() if text is None else text
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if not ids:
        raise AttnInputError("text: tokenises to nothing")
    copies = 1
    if tokens is not None and len(ids) < tokens:
        sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        repeat = sep + tokenizer(text, add_special_tokens=False)["input_ids"]
        more = -(-(tokens - len(ids)) // len(repeat))
        ids = ids + repeat * more
        copies += more
    if tokens is not None:
        ids = ids[:tokens]
    return torch.tensor([ids], dtype=torch.long), copies


def file_text(tokenizer, tokens: int, path: str | Path | None = None) -> str:
    """The text of the file ``path`` (default: the shipped text), cut to the shortest
    prefix that holds more than ``tokens`` tokens (or the whole file when it holds fewer),
    reading no more of the file than that: a 30 MB file costs what its first pages cost."""
    if path is None:
        return shipped_text()
    path = check_text_file(path)
    size = max(_BLOCK, _BYTES_PER_TOKEN * tokens)
    while True:
        text, whole = read_prefix(path, size)
        # the last token may be a word cut by the read; one to spare leaves it out
        if whole or len(tokenizer(text, add_special_tokens=False)["input_ids"]) > tokens:
            return text
        size *= 4


def file_ids(tokenizer, tokens: int, path: str | Path | None = None) -> tuple[torch.Tensor, int]:
    """As :func:`text_ids` of the file ``path`` (default: the shipped text), reading only
    as much of the file as ``tokens`` tokens need (:func:`file_text`)."""
    return text_ids(tokenizer, tokens, file_text(tokenizer, tokens, path))
