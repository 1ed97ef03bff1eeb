"""Attention calibration away from sinks that do not help ("ACT").

"Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language
Models without Training through Attention Calibration" (Yu et al., ICML 2024,
arXiv:2406.15765).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from attnlab.core.errors import AttnInputError

from .base import Edit, Heads, HeadSpec, applied, first_keys


class SinkCalibration(Edit):
    """ACT: in the chosen heads, shrink the attention to hidden sinks and give it to the rest.

    Per head, a key j is a sink when the attention it receives, averaged over the
    query rows, exceeds ``alpha`` / N (``alpha`` times the uniform share). The
    initial token is kept as it is (``keep_first``): the paper finds that sink
    useful and calibrates the others. In every row, each sink's weight is
    multiplied by ``beta`` and the mass taken away, (1 − β)·Σ_sinks aᵢⱼ, is given
    to the non-sink keys in proportion to their weights, so rows still sum to 1.
    The paper picks the heads to calibrate on a small calibration set; pass them
    as ``heads`` (default: every head).
    """

    needs_probs = True
    has_probs = True

    def __init__(
        self,
        heads: HeadSpec = None,
        *,
        alpha: float = 5.0,
        beta: float = 0.4,
        keep_first: bool = True,
    ) -> None:
        if not alpha > 0:
            raise AttnInputError(f"alpha: expected a number > 0, got {alpha!r}")
        if not 0 <= beta <= 1:
            raise AttnInputError(f"beta: expected a number in [0, 1], got {beta!r}")
        self.heads = Heads(heads)
        self.alpha, self.beta, self.keep_first = float(alpha), float(beta), bool(keep_first)
        self._sinks: torch.Tensor | None = None  # [B, Hq, 1, Nk] bool
        self.found: dict[int, torch.Tensor] = {}  # layer -> sink positions per head, last run

    def prepare(self, layer, q, k, *, causal, mask, scale):
        from attnlab.models.capture import attention_blocks, default_block

        sel = self.heads.selector(layer, q.shape[1])
        if sel is None:
            self._sinks = None
            return
        b, hq, nq, _ = q.shape
        nk = k.shape[2]
        colsum = torch.zeros(b, hq, nk, device=q.device)
        block = default_block(b, hq, nk)
        for _, _, kend, p, _ in attention_blocks(
            q, k, causal=causal, mask=mask, scale=scale, block=block
        ):
            colsum[..., :kend] += p.sum(dim=2)
        sinks = colsum / nq > self.alpha / nk
        if self.keep_first:
            first = first_keys(mask, b, q.device)
            sinks[torch.arange(b, device=q.device), :, first] = False
        sinks &= sel.to(q.device).view(1, -1, 1)
        self.found[layer] = sinks.detach().cpu()
        self._sinks = sinks.unsqueeze(2)

    def probs(self, layer, p, row0):
        if self._sinks is None:
            return p
        s = self._sinks[..., : p.shape[-1]]
        sink_mass = (p * s).sum(-1, keepdim=True)
        rest = p.masked_fill(s, 0.0)
        rest_mass = rest.sum(-1, keepdim=True)
        moved = (1.0 - self.beta) * sink_mass
        share = torch.where(rest_mass > 0, moved / rest_mass.clamp_min(1e-30), 0.0)
        calibrated = torch.where(s, p * self.beta, p + rest * share)
        # rows that see only sinks have nowhere to move the mass: unchanged
        return torch.where(rest_mass > 0, calibrated, p)


@contextlib.contextmanager
def calibrate_sinks(
    model: torch.nn.Module,
    heads: HeadSpec = None,
    *,
    alpha: float = 5.0,
    beta: float = 0.4,
    keep_first: bool = True,
) -> Iterator[SinkCalibration]:
    """Apply ACT to ``heads`` (default: all) inside the block; ``edit.found`` lists the sinks."""
    with applied(
        model, SinkCalibration(heads, alpha=alpha, beta=beta, keep_first=keep_first)
    ) as edit:
        yield edit
