"""Analyses: streaming probes of attention, and the registry they enter by a decorator.

During a captured forward pass (:func:`attnlab.models.capture`), each layer's
attention call computes its probabilities one block of query rows at a time
and hands every block to each active :class:`Analysis`; the block is then
dropped. No layer's full N x N matrix is kept and no list of all layers' maps
is built, so memory stays flat in the number of layers and linear in N (times
the block height). An :class:`Analysis` is an
:class:`~attnlab.models.probes.AttentionProbe`, the protocol the capture hook
knows.

An analysis that ``attnlab analyze`` can name registers itself with
:func:`register_analysis`, the way mechanisms do with ``@attnlab.register``;
:func:`registry` lists them in registration order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, TypeVar

import torch

from attnlab.core.errors import AttnInputError
from attnlab.models.probes import CaptureInfo

__all__ = ["Analysis", "CaptureInfo", "default_analyses", "register_analysis", "registry"]


class Analysis(ABC):
    """A per-(layer, head) measurement reduced block by block from attention probabilities.

    Subclasses set ``name`` and implement ``update`` and ``finish``; the docstring
    of each says what is measured, after which paper. Registered analyses also
    say how ``attnlab analyze`` runs them: ``default`` (in the default set) and
    ``own_run`` (True: it does not ride on the one capture of the input text but
    needs the model run separately, on its own input or by its own experiment).
    """

    name: ClassVar[str]
    needs_hidden_states: ClassVar[bool] = False
    # True: ``update`` also takes ``logits=`` (None where no scores exist, e.g. maps)
    uses_logits: ClassVar[bool] = False
    default: ClassVar[bool] = False
    own_run: ClassVar[bool] = False

    def begin(self, info: CaptureInfo) -> None:
        """Called once before the forward pass."""
        self.info = info

    @abstractmethod
    def update(self, layer: int, probs: torch.Tensor, rows: slice) -> None:
        """Take one block of attention probabilities.

        ``probs``: float32 [B, Hq, len(rows), K], the attention weights of query
        rows ``rows`` (absolute positions) over keys ``0..K-1`` in layer
        ``layer``, masked and normalized (each row sums to 1, or is all zero if
        it sees nothing). K <= Nk: in a causal layer the keys past K get zero
        weight from every row of the block and are left out; otherwise K = Nk.
        The tensor is only valid during the call: copy what you keep, and
        write nothing into it.

        An analysis with ``uses_logits = True`` is called as
        ``update(layer, probs, rows, logits=...)``: ``logits`` (same shape, read
        only) are the scaled scores whose softmax ``probs`` is, with float32's
        lowest finite value where a key is hidden or masked, or None when the
        capture has none (maps analyzed offline, weights changed by an edit).
        """

    @abstractmethod
    def finish(self) -> list[dict[str, Any]]:
        """Tidy rows, one per (layer, head[, position]): keys ``analysis``, ``layer``,
        ``head``, ``metric``, ``value`` plus any analysis-specific fields."""


_REGISTRY: dict[str, type] = {}
Registered = TypeVar("Registered", bound=type)


def register_analysis(cls: Registered) -> Registered:
    """Class decorator: make ``cls`` (with a unique ``name``) one of :func:`registry`'s analyses.

    ``cls`` is an :class:`Analysis`, or an experiment class with the same
    ``name``, ``default`` and ``own_run`` attributes and a docstring.
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise AttnInputError(f"name: an analysis class needs a string name, got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise AttnInputError(
            f"name: the analysis name {name!r} is taken by {_REGISTRY[name].__qualname__}"
        )
    for flag in ("default", "own_run"):
        if not isinstance(getattr(cls, flag, None), bool):
            raise AttnInputError(f"{flag}: analysis {name!r} must set a bool {flag}")
    _REGISTRY[name] = cls
    return cls


def registry() -> dict[str, type]:
    """The registered analyses, ``{name: class}``, in registration order.

    ``cls.default``: in ``attnlab analyze``'s default set; ``cls.own_run``: runs
    the model separately (not on the one capture of the input text);
    ``cls.__doc__``: what it measures, after which paper.
    """
    return dict(_REGISTRY)


def default_analyses() -> list[str]:
    """The names of the analyses ``attnlab analyze`` runs when none are named."""
    return [name for name, cls in _REGISTRY.items() if cls.default]
