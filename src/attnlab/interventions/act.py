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
from attnlab.core.softmax_blocks import NEG, attention_blocks, default_block

from .base import Edit, Heads, HeadSpec, applied, finite_number, first_keys


class SinkCalibration(Edit):
    """ACT: in the chosen heads, shrink the attention to hidden sinks and give it to the rest.

    What Yu et al. compute (the paper's full text could not be read here; this
    follows the authors' released code, GATECH-EIC/ACT ``models/*_modelling_aug.py``
    and ``scripts/*.sh``, which agrees with the paper's abstract and summaries):

    - Sink criterion, per head and input: key ``j`` is a sink when the mean
      attention it receives from the queries that can see it,
      ``a_j = sum_t A_tj / |{t : t sees j}|``, exceeds a threshold: ``threshold``
      (the authors' scripts use 0.1). Secondary descriptions of the paper state the
      threshold as ``alpha / N``; pass ``alpha`` to use that form (N = number of
      keys), which overrides ``threshold``.
    - The first sink found is kept (the authors drop the first detected index; it
      is the initial token, whose sink the paper finds useful): ``keep_first`` keeps
      each sequence's first non-padding key.
    - Calibration, in every query row: each sink's weight is multiplied by ``beta``
      (the authors' 0.4) and the mass taken away, ``(1 - beta) * sum_sinks A_tj``,
      is given to the non-sink keys (the kept first token included) in proportion
      to their weights, so rows still sum to 1. Rows that see only sinks are left
      as they are (the authors' row 0).
    - The authors pick the heads to calibrate by a search on a small calibration
      set (a head is kept when calibrating it helps); pass them as ``heads``
      (default: every head).

    Where we had to choose: "queries that can see ``j``" are counted from the
    causal and padding mask of the call (the authors' ``N - j`` for one unpadded
    causal sequence).
    """

    needs_probs = True
    has_probs = True

    def __init__(
        self,
        heads: HeadSpec = None,
        *,
        threshold: float = 0.1,
        beta: float = 0.4,
        keep_first: bool = True,
        alpha: float | None = None,
    ) -> None:
        if not 0 < threshold <= 1:
            raise AttnInputError(f"threshold: expected a number in (0, 1], got {threshold!r}")
        if alpha is not None and not (finite_number("alpha", alpha) > 0):
            raise AttnInputError(f"alpha: expected a finite number > 0 or None, got {alpha!r}")
        if not 0 <= beta <= 1:
            raise AttnInputError(f"beta: expected a number in [0, 1], got {beta!r}")
        self.heads = Heads(heads)
        self.threshold, self.beta, self.keep_first = float(threshold), float(beta), bool(keep_first)
        self.alpha = None if alpha is None else float(alpha)
        self._sinks: torch.Tensor | None = None  # [B, Hq, 1, Nk] bool
        self.found: dict[int, torch.Tensor] = {}  # layer -> sink positions per head, last run

    def prepare(self, layer, q, k, *, causal, mask, scale):
        sel = self.heads.selector(layer, q.shape[1])
        if sel is None:
            self._sinks = None
            return
        b, hq, _, _ = q.shape
        nk = k.shape[2]
        colsum = torch.zeros(b, hq, nk, device=q.device)
        observers = torch.zeros(b, hq, nk, device=q.device)
        block = default_block(b, hq, nk)
        for _, _, kend, p, logits in attention_blocks(
            q, k, causal=causal, mask=mask, scale=scale, block=block
        ):
            colsum[..., :kend] += p.sum(dim=2)
            observers[..., :kend] += (logits > NEG).sum(dim=2)
        received = colsum / observers.clamp_min(1.0)
        limit = self.alpha / nk if self.alpha is not None else self.threshold
        sinks = (received > limit) & (observers > 0)
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
    threshold: float = 0.1,
    beta: float = 0.4,
    keep_first: bool = True,
    alpha: float | None = None,
) -> Iterator[SinkCalibration]:
    """Apply ACT to ``heads`` (default: all) inside the block; ``edit.found`` lists the sinks.

    ``threshold``/``alpha``, ``beta``, ``keep_first``: see :class:`SinkCalibration`.
    """
    edit = SinkCalibration(
        heads, threshold=threshold, beta=beta, keep_first=keep_first, alpha=alpha
    )
    with applied(model, edit) as applied_edit:
        yield applied_edit
