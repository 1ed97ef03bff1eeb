"""What attnlab's attention hook talks to: probes that read attention, edits that change it.

The hook (:mod:`attnlab.models.swap`) and the capture driver
(:func:`attnlab.models.capture`) sit below the layers that measure and edit
attention, so they know those only through two protocols defined here:

- an :class:`AttentionProbe` receives a layer's exact softmax probabilities one
  block of query rows at a time (the streaming analyses of
  :mod:`attnlab.analysis` are probes);
- an :class:`AttentionEdit` changes a layer's attention, through its output or
  its probabilities (the interventions of :mod:`attnlab.interventions` are
  edits).

:class:`CaptureInfo` is what a probe may know about the run it measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch


@dataclass
class CaptureInfo:
    """What a probe may know about the run it measures.

    ``hidden_states`` (the residual stream before each layer, then the final
    one) is filled in after the forward pass, before the probes' ``finish``.
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


@runtime_checkable
class AttentionProbe(Protocol):
    """Reads a layer's attention probabilities block by block during a captured pass.

    ``begin(info)`` is called once before the forward pass;
    ``update(layer, probs, rows)`` with each block (float32 [B, Hq, len(rows), K],
    rows sum to 1 or are zero; with ``uses_logits`` also ``logits=``, the scaled
    scores or None); ``finish()`` returns tidy rows (dicts with ``analysis``,
    ``layer``, ``head``, ``metric``, ``value``). ``needs_hidden_states`` asks
    the capture to keep the residual stream for ``finish``.
    """

    name: ClassVar[str]
    needs_hidden_states: ClassVar[bool]
    uses_logits: ClassVar[bool]

    def begin(self, info: CaptureInfo) -> None: ...

    def update(self, layer: int, probs: torch.Tensor, rows: slice) -> None: ...

    def finish(self) -> list[dict[str, Any]]: ...


@runtime_checkable
class AttentionEdit(Protocol):
    """Changes a layer's attention inside the hook.

    ``output(layer, out, q, k, v)`` edits the attention output [B, Hq, Nq, Dv]
    (before the output projection); ``probs(layer, p, row0)`` edits a block of
    exact softmax probabilities [B, Hq, rows, kend] whose first row is at
    absolute position ``row0``; ``prepare`` sees the layer's q, k once before
    its blocks. ``needs_probs``: the edit has only a probability form, so the
    hook computes exact softmax explicitly; ``has_probs``: it has one, used
    whenever probabilities are computed. ``check(n_layers, n_heads)`` rejects
    layer or head indices the model does not have, before anything runs.
    """

    needs_probs: ClassVar[bool]
    has_probs: ClassVar[bool]

    def check(self, n_layers: int, n_heads: int) -> None: ...

    def prepare(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        causal: bool,
        mask: torch.Tensor | None,
        scale: float,
    ) -> None: ...

    def probs(self, layer: int, p: torch.Tensor, row0: int) -> torch.Tensor: ...

    def output(
        self, layer: int, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor: ...
