"""Recall tasks: multi-query associative recall (Zoology), single-query associative
recall, and a needle in a haystack."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core.errors import AttnInputError

from .base import IGNORE, Batch, Task, check_int, distinct, generator, register_task

ZOOLOGY_VOCAB = 8192


@register_task
class MQAR(Task):
    """Multi-query associative recall, as Zoology generates it (Arora et al., arXiv:2312.04927).

    An example opens with ``num_kv_pairs`` key-value pairs ``k1 v1 k2 v2 ...``;
    keys are distinct, drawn from the key vocabulary ``1 .. vocab/2 - 1``,
    values from the value vocabulary ``vocab/2 .. vocab - 1``. The rest of the
    sequence holds every key once more as a query, at even offsets ``2·g``
    after the pairs, where the gaps ``g`` are drawn without replacement with
    probability proportional to ``g^(power_a - 1)`` (``g = 1 .. space``, a
    power law that puts most queries soon after the pairs; ``power_a = 1`` is
    uniform). The target at a query's position is its key's value (-100
    elsewhere). The other positions hold token 0, or random tokens of the
    whole vocabulary when ``random_non_queries`` (Zoology's default).

    Zoology's configurations are available by name (``setting="zoology-256"``:
    vocabulary 8192, length 256, 16 pairs; figure 2 of the paper sweeps
    lengths 64-512 at 4-64 pairs); the default is a CPU-sized one.
    """

    name = "mqar"
    title = "Multi-query associative recall (Zoology)"
    paper = "arXiv:2312.04927"
    settings: ClassVar[dict] = {
        "tiny": {"vocab": 64, "seq_len": 32, "num_kv_pairs": 4},
        "cpu": {"vocab": 256, "seq_len": 64, "num_kv_pairs": 8},
        "zoology-64": {"vocab": ZOOLOGY_VOCAB, "seq_len": 64, "num_kv_pairs": 4},
        "zoology-128": {"vocab": ZOOLOGY_VOCAB, "seq_len": 128, "num_kv_pairs": 8},
        "zoology-256": {"vocab": ZOOLOGY_VOCAB, "seq_len": 256, "num_kv_pairs": 16},
        "zoology-256-32": {"vocab": ZOOLOGY_VOCAB, "seq_len": 256, "num_kv_pairs": 32},
        "zoology-256-64": {"vocab": ZOOLOGY_VOCAB, "seq_len": 256, "num_kv_pairs": 64},
        "zoology-512": {"vocab": ZOOLOGY_VOCAB, "seq_len": 512, "num_kv_pairs": 64},
    }

    @dataclass
    class Config:
        vocab: int = 256
        seq_len: int = 64
        num_kv_pairs: int = 8
        power_a: float = 0.01
        random_non_queries: bool = True

        def __post_init__(self):
            check_int("vocab", self.vocab, 4)
            check_int("seq_len", self.seq_len, 4)
            check_int("num_kv_pairs", self.num_kv_pairs)
            if self.seq_len % 2:
                raise AttnInputError(f"seq_len: expected an even length, got {self.seq_len}")
            if self.vocab <= self.seq_len:
                raise AttnInputError(
                    f"vocab: expected more tokens than seq_len={self.seq_len} (as Zoology "
                    f"requires), got {self.vocab}"
                )
            if 4 * self.num_kv_pairs > self.seq_len:
                raise AttnInputError(
                    f"num_kv_pairs: the pairs and their queries need 4·num_kv_pairs <= "
                    f"seq_len={self.seq_len}, got {self.num_kv_pairs}"
                )
            if self.num_kv_pairs > self.vocab // 2 - 1:
                raise AttnInputError(
                    f"num_kv_pairs: expected at most {self.vocab // 2 - 1} distinct keys of the "
                    f"key vocabulary, got {self.num_kv_pairs}"
                )
            if not self.power_a > 0:
                raise AttnInputError(f"power_a: expected a positive power, got {self.power_a}")

    @property
    def vocab(self) -> int:
        return self.config.vocab

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    def gap_probabilities(self) -> torch.Tensor:
        """The power law over query gaps 1 .. space: p(g) ∝ power_a · g^(power_a - 1)."""
        c = self.config
        space = (c.seq_len - 2 * c.num_kv_pairs) // 2
        g = torch.arange(1, space + 1, dtype=torch.float64)
        p = c.power_a * g ** (c.power_a - 1)
        return p / p.sum()

    def generate(self, n: int, seed: int) -> Batch:
        c, gen = self.config, generator(seed)
        check_int("n", n)
        pairs, half = c.num_kv_pairs, c.vocab // 2
        context = 2 * pairs
        keys = distinct(n, pairs, 1, half, gen)
        values = distinct(n, pairs, half, c.vocab, gen)
        inputs = torch.zeros(n, c.seq_len, dtype=torch.long)
        inputs[:, 0:context:2] = keys
        inputs[:, 1:context:2] = values
        p = self.gap_probabilities()
        gaps = torch.multinomial(p.expand(n, -1), pairs, replacement=False, generator=gen)
        where = context + 2 * gaps
        inputs.scatter_(1, where, keys)
        targets = torch.full_like(inputs, IGNORE)
        targets.scatter_(1, where, values)
        if c.random_non_queries:
            noise = torch.randint(0, c.vocab, inputs.shape, generator=gen)
            inputs = torch.where(inputs == 0, noise, inputs)
        return Batch(inputs, targets, targets != IGNORE)


@register_task
class AssociativeRecall(Task):
    """Single-query associative recall (Ba et al., arXiv:1610.06258; the AR task of H3,
    arXiv:2212.14052): ``num_pairs`` pairs ``k1 v1 ... kn vn`` with distinct keys from
    ``0 .. vocab/2 - 1`` and values from ``vocab/2 .. vocab - 1``, then one of the keys;
    the target at that last position is its value."""

    name = "associative-recall"
    title = "Associative recall (one query after the pairs)"
    paper = "arXiv:1610.06258"
    settings: ClassVar[dict] = {"tiny": {"vocab": 32, "num_pairs": 4}}

    @dataclass
    class Config:
        vocab: int = 64
        num_pairs: int = 8

        def __post_init__(self):
            check_int("vocab", self.vocab, 4)
            check_int("num_pairs", self.num_pairs)
            if self.num_pairs > self.vocab // 2:
                raise AttnInputError(
                    f"num_pairs: expected at most vocab/2={self.vocab // 2} distinct keys, "
                    f"got {self.num_pairs}"
                )

    @property
    def vocab(self) -> int:
        return self.config.vocab

    @property
    def seq_len(self) -> int:
        return 2 * self.config.num_pairs + 1

    def generate(self, n: int, seed: int) -> Batch:
        c, gen = self.config, generator(seed)
        check_int("n", n)
        half = c.vocab // 2
        keys = distinct(n, c.num_pairs, 0, half, gen)
        values = torch.randint(half, c.vocab, (n, c.num_pairs), generator=gen)
        asked = torch.randint(0, c.num_pairs, (n, 1), generator=gen)
        inputs = torch.empty(n, self.seq_len, dtype=torch.long)
        inputs[:, 0:-1:2], inputs[:, 1:-1:2] = keys, values
        inputs[:, -1:] = keys.gather(1, asked)
        targets = torch.full_like(inputs, IGNORE)
        targets[:, -1:] = values.gather(1, asked)
        return Batch(inputs, targets, targets != IGNORE)


@register_task
class Needle(Task):
    """A needle in a haystack, small: filler tokens from ``1 .. vocab/2 - 1``, one needle
    ``[0, value]`` (value from ``vocab/2 .. vocab - 1``) at a relative depth drawn uniformly
    in [``min_depth``, ``max_depth``] (0: the start, 1: just before the question), and the
    marker 0 as the last token, whose target is the value. It is the retrieval probe of
    long-context evaluations (Kamradt's needle test; RULER, arXiv:2404.06654) at a size a
    CPU trains on; depth against a sliding window separates local from global recall."""

    name = "needle"
    title = "Needle in a haystack (one marked value, asked at the end)"
    paper = "arXiv:2404.06654"
    settings: ClassVar[dict] = {"tiny": {"vocab": 32, "seq_len": 32}}

    @dataclass
    class Config:
        vocab: int = 64
        seq_len: int = 64
        min_depth: float = 0.0
        max_depth: float = 1.0

        def __post_init__(self):
            check_int("vocab", self.vocab, 4)
            check_int("seq_len", self.seq_len, 4)
            if not 0.0 <= self.min_depth <= self.max_depth <= 1.0:
                raise AttnInputError(
                    f"min_depth, max_depth: expected 0 <= min_depth <= max_depth <= 1, "
                    f"got {self.min_depth}, {self.max_depth}"
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
        half = c.vocab // 2
        inputs = torch.randint(1, half, (n, c.seq_len), generator=gen)
        last_start = c.seq_len - 3  # the needle's two tokens end before the question
        depth = c.min_depth + (c.max_depth - c.min_depth) * torch.rand(n, generator=gen)
        start = (depth * last_start).round().long()
        value = torch.randint(half, c.vocab, (n,), generator=gen)
        rows = torch.arange(n)
        inputs[rows, start] = 0
        inputs[rows, start + 1] = value
        inputs[:, -1] = 0
        targets = torch.full_like(inputs, IGNORE)
        targets[:, -1] = value
        return Batch(inputs, targets, targets != IGNORE)
