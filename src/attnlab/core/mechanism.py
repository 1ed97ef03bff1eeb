"""`Mechanism`: the base class every attention mechanism derives from.

A mechanism is an ``nn.Module`` built from a ``Config`` dataclass (every option checked
by :func:`attnlab.core.config.build_config`). Calling it checks the input against the
tensor contract (:mod:`.checks`), asks the mechanism what it cannot do
(:meth:`Mechanism.unsupported`), clears padded keys and values, and only then runs
:meth:`forward` with a resolved float ``scale`` and a 4-d bool ``mask`` (or None). A
non-finite query, key or value reaches only the rows that may see it
(:func:`attnlab.core.masks.isolate_non_finite`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .checks import FLOAT_DTYPES, check_causal, check_mask, check_qkv, check_scale
from .config import build_config
from .errors import AttnInputError
from .masks import isolate_non_finite, zero_dead_keys
from .spec import Spec


class Mechanism(nn.Module):
    """One attention mechanism behind the common contract.

    Subclasses set ``spec``, may define a nested ``Config`` dataclass, and
    implement ``forward(q, k, v, *, causal, mask, scale)``. Optional parts:

    - ``unsupported(q, k, v, *, causal, mask)``: extra reasons it cannot run
      (call ``super().unsupported`` first);
    - :meth:`limit`: the Config under which an approximate mechanism equals exact
      softmax attention at sequence length ``n``;
    - :meth:`reference`: the mechanism's own definition computed densely, for
      mechanisms that are not approximations of softmax (sigmoid, linear, ...);
    - :attr:`tiny_config`: options under which tiny test inputs still cross
      block or chunk boundaries;
    - ``forms``: names of the algorithm's alternative forms (parallel, chunked,
      recurrent, ...) selected by ``Config.form``; ``backends``: names of the
      places it can run (auto, torch, flex, ...) selected by ``Config.backend``;
      the contract tests check that all forms and all backends agree;
    - ``positive_scale``: True where the mechanism takes ``sqrt(scale)`` (feature
      maps of ``q·sqrt(scale)``), so that a scale <= 0 is refused;
    - ``init_state``/``step``/``state_size`` for mechanisms with a cached or
      recurrent form (``spec.decode``).

    Config fields are checked from their annotations (:mod:`attnlab.core.config`):
    an ``int`` lies in [1, 2^31) and a ``float`` is finite unless the field declares
    other bounds with :func:`attnlab.core.config.option`; ``__post_init__`` holds the
    rules that relate several fields.

    A mechanism starts in eval mode, in which it is deterministic: identical calls give
    identical outputs and running statistics (affine's moving average of α, routing's
    centroids) stay as they are. ``.train()`` lets them move, from finite inputs only.
    """

    spec: ClassVar[Spec]
    forms: ClassVar[tuple[str, ...]] = ()
    backends: ClassVar[tuple[str, ...]] = ()
    positive_scale: ClassVar[bool] = False
    tiny_config: ClassVar[dict[str, Any]] = {}
    """Config options under which tiny test inputs (a few dozen tokens) still cross the
    mechanism's block, chunk or window boundaries; the contract tests and the fuzz suite
    build every mechanism with them."""

    @dataclass
    class Config:
        pass

    def __init__(self, **config: Any) -> None:
        super().__init__()
        fields = [f.name for f in dataclasses.fields(self.Config)]
        if "form" in config and "form" not in fields and "backend" in fields:
            raise AttnInputError(
                f"form: form is now backend (where {self.spec.name!r} runs: one of "
                f"{', '.join(self.backends)}); pass backend={config['form']!r}, got form="
                f"{config['form']!r}"
            )
        self.config = build_config(self.Config, config, mechanism=self.spec.name)
        if self.forms and getattr(self.config, "form", None) not in self.forms:
            raise AttnInputError(
                f"form: expected one of {', '.join(self.forms)}, got {self.config.form!r}"
            )
        if self.backends and getattr(self.config, "backend", None) not in self.backends:
            raise AttnInputError(
                f"backend: expected one of {', '.join(self.backends)}, got {self.config.backend!r}"
            )
        self.train(False)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        b, hq, _, nq, nk, d = check_qkv(q, k, v)
        causal = check_causal(causal)
        mask4 = check_mask(mask, b, hq, nq, nk, q.device)
        scale = check_scale(scale, d)
        if self.positive_scale and scale <= 0:
            raise AttnInputError(
                f"scale: expected a positive number ({self.spec.name!r} maps q·sqrt(scale) "
                f"and k·sqrt(scale) to features), got {scale!r}"
            )
        reasons = self.unsupported(q, k, v, causal=causal, mask=mask4)
        if reasons:
            raise AttnInputError(f"mechanism {self.spec.name!r} cannot run: " + "; ".join(reasons))
        k, v = zero_dead_keys(k, v, mask4)
        out = super().__call__(q, k, v, causal=causal, mask=mask4, scale=scale)
        if torch.isfinite(out.detach().sum()):  # the common case: nothing to isolate
            return out

        def rerun(q, k, v):
            training = self.training
            self.train(False)  # running statistics moved once, in the first pass
            try:
                return super(Mechanism, self).__call__(
                    q, k, v, causal=causal, mask=mask4, scale=scale
                )
            finally:
                self.train(training)

        return isolate_non_finite(rerun, out, q, k, v, causal=causal, mask=mask4)

    def unsupported(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        mask: torch.Tensor | None = None,
    ) -> list[str]:
        """Readable reasons why this call cannot be computed; empty when it can."""
        spec = self.spec
        reasons = []
        if causal and not spec.causal:
            reasons.append("causal: this mechanism has no causal form (pass causal=False)")
        if not causal and not spec.noncausal:
            reasons.append("causal: this mechanism is causal only (pass causal=True)")
        if q.shape[2] != k.shape[2] and not spec.cross:
            reasons.append(
                f"k: expected Nk equal to Nq={q.shape[2]} (no cross-attention form), "
                f"got Nk={k.shape[2]}"
            )
        if mask is not None and not spec.mask:
            reasons.append("mask: this mechanism takes no mask (pass mask=None)")
        dtype_name = FLOAT_DTYPES[q.dtype]
        if dtype_name not in spec.dtypes:
            reasons.append(f"q: expected a dtype among {', '.join(spec.dtypes)}, got {dtype_name}")
        if (q.requires_grad or k.requires_grad or v.requires_grad) and not spec.backward:
            reasons.append("q, k, v: this mechanism has no backward; call it without gradients")
        return reasons

    def reference(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool,
        mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor | None:
        """The mechanism's own definition, computed densely (N x N) in the inputs' dtype.

        Mechanisms that are a different model from softmax (sigmoid, linear, Based, ...)
        override it; the contract tests compare the mechanism with it in float64. The base
        returns None: the mechanism approximates softmax, and :meth:`limit` says where it
        equals it.
        """
        return None

    def limit(self, n: int) -> Any:
        """The Config under which this mechanism equals exact attention at length ``n``.

        Exact mechanisms already do: they return their own Config.
        """
        if self.spec.exact:
            return self.config
        return None

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.config).items())


class KVCacheDecode:
    """Decoding with a key-value cache, for mechanisms whose causal form is exact in Nk.

    The state holds every key and value seen so far; ``step`` appends the new
    ones and attends with the bottom-right causal alignment, so a step equals
    the last row of the parallel causal pass.
    """

    def init_state(
        self,
        batch: int,
        q_heads: int,
        kv_heads: int,
        head_dim: int,
        value_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """An empty cache: keys [B, Hkv, 0, D] and values [B, Hkv, 0, Dv]."""
        return {
            "k": torch.zeros(batch, kv_heads, 0, head_dim, dtype=dtype, device=device),
            "v": torch.zeros(batch, kv_heads, 0, value_dim, dtype=dtype, device=device),
        }

    def step(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        state: dict[str, torch.Tensor],
        *,
        scale: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Attend the new queries [B, Hq, t, D] over the cache plus the new k, v."""
        keys = torch.cat([state["k"], k], dim=2)
        values = torch.cat([state["v"], v], dim=2)
        out = self(q, keys, values, causal=True, scale=scale)
        return out, {"k": keys, "v": values}

    def state_size(self, n: int, *, q_heads: int, kv_heads: int, head_dim: int, value_dim: int):
        """Floats held per batch element after ``n`` tokens: the whole cache."""
        return n * kv_heads * (head_dim + value_dim)
