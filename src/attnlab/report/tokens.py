"""Token text as a person reads it: decoded, not the tokenizer's raw pieces.

Byte-level BPE vocabularies (GPT-2, Llama 3, SmolLM2) store a leading space as
``Ġ`` and a newline as ``Ċ``; SentencePiece stores the space as ``▁``. The report
shows what each token stands for in the text instead.
"""

from __future__ import annotations

from collections.abc import Sequence

# control characters drawn as visible marks (a newline would break a table cell or an axis)
_MARKS = str.maketrans({"\n": "↵", "\r": "␍", "\t": "⇥"})


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """The decoded text of each token of ``ids`` on its own, leading space included.

    ``tokenizer.convert_tokens_to_string`` on one piece at a time (so ``Ġthe`` gives
    ``" the"``); a tokenizer without it decodes each id alone. A piece that holds
    part of a multi-byte character decodes to U+FFFD, as in any per-token view.
    """
    ids = [int(i) for i in ids]
    if hasattr(tokenizer, "convert_tokens_to_string"):
        pieces = tokenizer.convert_ids_to_tokens(ids)
        return [tokenizer.convert_tokens_to_string([p]) for p in pieces]
    return [tokenizer.decode([i]) for i in ids]


def visible(text: str) -> str:
    """``text`` with newlines, carriage returns and tabs drawn as ↵ ␍ ⇥ (one line), and a
    token of spaces only drawn as ␣ per space."""
    text = str(text)
    if text and not text.strip(" "):
        return "␣" * len(text)
    return text.translate(_MARKS)


def axis_label(text: str, width: int = 12) -> str:
    """A token for a plot axis: visible control marks, outer spaces dropped, cut to ``width``."""
    shown = visible(text).strip() or "␣"
    return shown if len(shown) <= width else shown[: width - 1] + "…"
