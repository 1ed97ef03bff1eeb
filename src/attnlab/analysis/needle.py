"""Needle-in-a-haystack inputs: a four-digit code hidden in the shipped text, with the question."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from importlib import resources

import torch

from attnlab.core.errors import AttnInputError

NEEDLE = "The secret code is {code}."
QUESTION = "What is the secret code? Answer with the four digits."
# the haystack must be several times the needle sentence (about 8 tokens) for finding
# the needle to be a search over distractors, and hold a few sentence boundaries to
# place it at different depths
MIN_CONTEXT_TOKENS = 64


def shipped_text() -> str:
    """The public-domain English text that ships in ``attnlab/data`` (the first ``*.txt``)."""
    folder = resources.files("attnlab") / "data"
    texts = sorted(p for p in folder.iterdir() if p.name.endswith(".txt"))
    if not texts:
        raise FileNotFoundError("attnlab/data: no *.txt text ships with this installation")
    return texts[0].read_text(encoding="utf-8")


def haystack_ids(tokenizer, text: str, tokens: int) -> list[int]:
    """The first ``tokens`` token ids of ``text`` with its whitespace collapsed.

    Only as much of the text is tokenized as it takes (a prefix, doubled until it
    holds enough tokens), so a long file costs no more than its start. Raises
    AttnInputError naming ``text`` when the whole text holds fewer tokens.
    """
    words = " ".join(text.split())
    chars = 16 * tokens
    while True:
        ids = tokenizer(words[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > tokens or chars >= len(words):
            break
        chars *= 2
    if len(ids) < tokens:
        raise AttnInputError(
            f"text: the needle's haystack needs {tokens} tokens (tokens={tokens}), but the text "
            f"holds {len(ids)}; give a longer text or fewer tokens"
        )
    return ids[:tokens]


@dataclass
class Needle:
    """One needle-in-a-haystack prompt.

    ``input_ids`` [1, N]: the prompt (chat template applied when the tokenizer has
    one, ending where the assistant's answer starts); ``code``: the four digits;
    ``positions``: token positions of the code's digits in ``input_ids``;
    ``depth``: where in the haystack the needle sentence sits (0 = start, 1 = end).
    """

    input_ids: torch.Tensor
    code: str
    positions: list[int]
    depth: float
    prompt: str

    def answered(self, text: str) -> bool:
        """Whether a generated answer contains the code (digits only, spaces ignored)."""
        return self.code in re.sub(r"\D", "", text)


def make_needle(
    tokenizer,
    *,
    context_tokens: int = 700,
    depth: float = 0.5,
    seed: int = 0,
    text: str | None = None,
) -> Needle:
    """Hide ``"The secret code is NNNN."`` at ``depth`` in ``context_tokens`` tokens of text.

    The haystack is the start of ``text`` (default: :func:`shipped_text`), cut to
    ``context_tokens`` tokens (AttnInputError if the text has fewer, or if
    ``context_tokens`` is below :data:`MIN_CONTEXT_TOKENS`); the needle goes at the
    sentence boundary nearest ``depth``; the question follows the haystack. The code is drawn from
    ``seed`` (1000..9999).
    """
    if not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise AttnInputError(f"depth: expected a number in [0, 1], got {depth!r}")
    if (
        not isinstance(context_tokens, int)
        or isinstance(context_tokens, bool)
        or context_tokens < MIN_CONTEXT_TOKENS
    ):
        raise AttnInputError(
            f"tokens: a needle-in-a-haystack prompt needs at least {MIN_CONTEXT_TOKENS} "
            f"tokens of context, got {context_tokens!r}"
        )
    code = str(random.Random(seed).randint(1000, 9999))
    ids = haystack_ids(tokenizer, text if text is not None else shipped_text(), context_tokens)
    hay = tokenizer.decode(ids)
    target = int(len(hay) * depth)
    cuts = [m.end() for m in re.finditer(r"[.!?] ", hay)] or [0]
    cut = min([0, *cuts, len(hay)], key=lambda c: abs(c - target))
    needle = NEEDLE.format(code=code)
    context = (hay[:cut] + " " + needle + " " + hay[cut:]).strip()
    user = f"{context}\n\n{QUESTION}"
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    else:
        prompt = f"{user}\nAnswer:"
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    start = prompt.index(needle) + needle.index(code)
    end = start + len(code)
    positions = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    return Needle(
        input_ids=torch.tensor([enc["input_ids"]]),
        code=code,
        positions=positions,
        depth=depth,
        prompt=prompt,
    )
