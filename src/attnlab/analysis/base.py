"""The streaming protocol between the capture hook (``attnlab.models``) and analyses.

During a captured forward pass, each layer's attention call computes its
probabilities one block of query rows at a time and hands every block to each
active :class:`Analysis`; the block is then dropped. No layer's full N x N
matrix is kept and no list of all layers' maps is built, so memory stays flat
in the number of layers and linear in N (times the block height).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class CaptureInfo:
    """What an analysis may know about the run it measures.

    ``hidden_states`` (the residual stream before each layer, then the final
    one) is filled in after the forward pass, before :meth:`Analysis.finish`.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    seq_len: int
    input_ids: torch.Tensor  # [B, N]
    tokens: list[str]  # the tokens of the first sequence, as text
    causal: bool = True
    hidden_states: tuple[torch.Tensor, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Analysis(ABC):
    """A per-(layer, head) measurement reduced block by block from attention probabilities.

    Subclasses set ``name`` and implement ``update`` and ``finish``; the docstring
    of each says what is measured, after which paper.
    """

    name: ClassVar[str]
    needs_hidden_states: ClassVar[bool] = False
    # True: ``update`` also takes ``logits=`` (None where no scores exist, e.g. maps)
    uses_logits: ClassVar[bool] = False

    def begin(self, info: CaptureInfo) -> None:
        """Called once before the forward pass."""
        self.info = info

    @abstractmethod
    def update(self, layer: int, probs: torch.Tensor, rows: slice) -> None:
        """Take one block of attention probabilities.

        ``probs``: float32 [B, Hq, len(rows), K], the attention weights of query
        rows ``rows`` (absolute positions) over keys ``0..K-1`` in layer
        ``layer``, masked and normalised (each row sums to 1, or is all zero if
        it sees nothing). K <= Nk: in a causal layer the keys past K get zero
        weight from every row of the block and are left out; otherwise K = Nk.
        The tensor is only valid during the call: copy what you keep, and
        write nothing into it.

        An analysis with ``uses_logits = True`` is called as
        ``update(layer, probs, rows, logits=...)``: ``logits`` (same shape, read
        only) are the scaled scores whose softmax ``probs`` is, with float32's
        lowest finite value where a key is hidden or masked, or None when the
        capture has none (maps analysed offline, weights changed by an edit).
        """

    @abstractmethod
    def finish(self) -> list[dict[str, Any]]:
        """Tidy rows, one per (layer, head[, position]): keys ``analysis``, ``layer``,
        ``head``, ``metric``, ``value`` plus any analysis-specific fields."""
