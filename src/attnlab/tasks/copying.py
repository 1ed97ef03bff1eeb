"""Copying tasks: selective copying (Mamba) and induction on repeated random tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core.errors import AttnInputError

from .base import IGNORE, Batch, Task, check_int, distinct, generator, register_task

BLANK, MARKER = 0, 1


@register_task
class SelectiveCopy(Task):
    """Selective copying (Gu & Dao, Mamba, arXiv:2312.00752, §3.1): ``tokens`` data
    tokens (from ``2 .. vocab - 1``) sit at random positions of a region of ``region``
    blanks (token 0); then come ``tokens`` markers (token 1), and the target at the j-th
    marker is the j-th data token in order. Where the data lie varies with the example,
    so a fixed convolution cannot copy them: the model must select by content."""

    name = "selective-copy"
    title = "Selective copying (data tokens among blanks, copied in order)"
    paper = "arXiv:2312.00752"
    settings: ClassVar[dict] = {"tiny": {"vocab": 12, "region": 16, "tokens": 4}}

    @dataclass
    class Config:
        vocab: int = 16
        region: int = 32
        tokens: int = 8

        def __post_init__(self):
            check_int("vocab", self.vocab, 3)
            check_int("region", self.region)
            check_int("tokens", self.tokens)
            if self.tokens > self.region:
                raise AttnInputError(
                    f"tokens: expected at most region={self.region} data tokens, got {self.tokens}"
                )

    @property
    def vocab(self) -> int:
        return self.config.vocab

    @property
    def seq_len(self) -> int:
        return self.config.region + self.config.tokens

    def generate(self, n: int, seed: int) -> Batch:
        c, gen = self.config, generator(seed)
        check_int("n", n)
        data = torch.randint(2, c.vocab, (n, c.tokens), generator=gen)
        where = distinct(n, c.tokens, 0, c.region, gen).sort(dim=1).values
        inputs = torch.full((n, self.seq_len), BLANK, dtype=torch.long)
        inputs.scatter_(1, where, data)
        inputs[:, c.region :] = MARKER
        targets = torch.full_like(inputs, IGNORE)
        targets[:, c.region :] = data
        return Batch(inputs, targets, targets != IGNORE)


@register_task
class Induction(Task):
    """Induction on repeated random tokens (Olsson et al., arXiv:2209.11895): a run of
    ``seq_len / 2`` distinct random tokens, then the same run again. In the second copy
    each next token follows from finding the current token in the first copy and reading
    its successor, which an induction head does; targets are those next tokens (positions
    ``seq_len/2 .. seq_len - 2``)."""

    name = "induction"
    title = "Induction (a random run of tokens, repeated)"
    paper = "arXiv:2209.11895"
    settings: ClassVar[dict] = {"tiny": {"vocab": 32, "seq_len": 24}}

    @dataclass
    class Config:
        vocab: int = 64
        seq_len: int = 64

        def __post_init__(self):
            check_int("seq_len", self.seq_len, 4)
            if self.seq_len % 2:
                raise AttnInputError(f"seq_len: expected an even length, got {self.seq_len}")
            if self.vocab < self.seq_len // 2:
                raise AttnInputError(
                    f"vocab: expected at least seq_len/2={self.seq_len // 2} tokens, so the run "
                    f"has distinct tokens, got {self.vocab}"
                )

    @property
    def vocab(self) -> int:
        return self.config.vocab

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    def generate(self, n: int, seed: int) -> Batch:
        c, gen = self.config, generator(seed)
        check_int("n", n)
        half = c.seq_len // 2
        run = distinct(n, half, 0, c.vocab, gen)
        inputs = torch.cat([run, run], dim=1)
        targets = torch.full_like(inputs, IGNORE)
        targets[:, half:-1] = inputs[:, half + 1 :]
        return Batch(inputs, targets, targets != IGNORE)
