"""In-context linear regression (He, Pan, Chen & Yang, arXiv:2503.12734)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnlab.core.errors import AttnInputError

from .base import Batch, Task, check_int, generator, register_task


@register_task
class LinearRegression(Task):
    """In-context linear regression, in the token layout of arXiv:2503.12734 (§2).

    Each example draws a weight ``w ~ N(0, I/dim)`` and covariates ``x ~ N(0, I)``
    in ``R^dim``, with ``y = w·x + noise·ε``. The first ``pairs`` positions carry
    ``[x_i, y_i]`` (width dim + 1); the last ``queries`` positions carry
    ``[x_q, 0]``, and the target at each of them is its ``y_q``: the model must
    fit ``w`` from the pairs it has seen. Inputs are vectors, so the model uses
    an input projection in place of an embedding (``TinyLM(input_dim=...)``).

    The loss is the mean squared error at the queries; the metric is
    ``R² = 1 - Σ(ŷ - y)² / Σ y²``: 1 for exact predictions, 0 for predicting
    zero (the mean of y), negative for worse.
    """

    name = "in-context-regression"
    title = "In-context linear regression"
    paper = "arXiv:2503.12734"
    kind = "vectors"
    metric_name = "r2"
    settings: ClassVar[dict] = {"tiny": {"dim": 2, "pairs": 8, "queries": 4}}

    @dataclass
    class Config:
        dim: int = 4
        pairs: int = 16
        queries: int = 8
        noise: float = 0.0

        def __post_init__(self):
            check_int("dim", self.dim)
            check_int("pairs", self.pairs)
            check_int("queries", self.queries)
            if not self.noise >= 0:
                raise AttnInputError(f"noise: expected a standard deviation >= 0, got {self.noise}")

    @property
    def seq_len(self) -> int:
        return self.config.pairs + self.config.queries

    @property
    def input_dim(self) -> int:
        return self.config.dim + 1

    @property
    def output_dim(self) -> int:
        return 1

    def generate(self, n: int, seed: int) -> Batch:
        c, gen = self.config, generator(seed)
        check_int("n", n)
        w = torch.randn(n, c.dim, generator=gen) / c.dim**0.5
        x = torch.randn(n, self.seq_len, c.dim, generator=gen)
        y = (x * w[:, None]).sum(-1) + c.noise * torch.randn(n, self.seq_len, generator=gen)
        shown = y.clone()
        shown[:, c.pairs :] = 0.0
        inputs = torch.cat([x, shown[..., None]], dim=-1)
        scored = torch.zeros(n, self.seq_len, dtype=torch.bool)
        scored[:, c.pairs :] = True
        targets = torch.where(scored, y, torch.zeros_like(y))[..., None]
        return Batch(inputs, targets, scored)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean squared error at the query positions."""
        return F.mse_loss(outputs[batch.scored].float(), batch.targets[batch.scored])

    def metric(self, outputs: torch.Tensor, batch: Batch) -> float:
        """R² at the query positions, against predicting zero."""
        if outputs.shape != batch.targets.shape:
            raise AttnInputError(
                f"outputs: expected {tuple(batch.targets.shape)}, got {tuple(outputs.shape)}"
            )
        pred, y = outputs[batch.scored].double(), batch.targets[batch.scored].double()
        return (1.0 - ((pred - y) ** 2).sum() / (y**2).sum()).item()

    def chance(self) -> float:
        """Predicting zero, the prior mean of y, scores 0."""
        return 0.0
