"""Running attnlab inside a transformers model through its ``AttentionInterface``.

Every attnlab mechanism is registered with transformers as ``"attnlab:<name>"``
(attention function and mask function), so a model can be loaded with
``attn_implementation="attnlab:<name>"`` or switched for a while with
:func:`use`. The same hook carries the streaming capture
(:func:`attnlab.models.capture`) and the interventions
(:mod:`attnlab.interventions`); they compose: a per-model :class:`HookState`
holds the mechanism, the active edits and the capture, and each context
manager undoes exactly its own part on exit.

The attention function translates transformers' call (query [B, Hq, N, D] after
rotary, key/value [B, Hkv, Nk, D] not repeated, the model's bool mask or None,
``scaling``) into attnlab's contract: grouped-query heads pass natively, the
model's mask (causal + padding, built by transformers' ``sdpa_mask``) is passed
as ``mask`` and ``causal`` is the module's ``is_causal``. attnlab's causal
alignment is bottom-right, so the decode steps of ``generate()`` with a KV cache
are causal too.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from attnlab.core.errors import AttnInputError
from attnlab.core.mechanism import Mechanism
from attnlab.core.registry import get, mechanism_class, names

PREFIX = "attnlab:"
_LOCK = threading.Lock()
_REGISTERED: set[str] = set()
_DEFAULTS: dict[str, Mechanism] = {}


@dataclass
class HookState:
    """What the attnlab attention function does for one model while hooks are active."""

    config: Any  # the model config object (identity key; kept alive here)
    original: str | None  # the attn_implementation to restore at the end
    depth: int = 0
    mechanism: Mechanism | None = None
    edits: list[Any] = field(default_factory=list)
    capture: Any = None

    @property
    def key(self) -> str:
        return PREFIX + (self.mechanism.spec.name if self.mechanism is not None else "softmax")


_STATES: dict[int, HookState] = {}


def _mask_function():
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask


def register_attention(name: str) -> str:
    """Register ``attnlab:<name>`` with transformers' attention and mask interfaces."""
    mechanism_class(name)  # raises AttnInputError naming the known mechanisms
    key = PREFIX + name
    with _LOCK:
        if key in _REGISTERED:
            return key
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(key, attnlab_attention)
        # the bool (or None, when `is_causal` suffices) mask that SDPA gets
        AttentionMaskInterface.register(key, _mask_function())
        _REGISTERED.add(key)
    return key


def register_all() -> list[str]:
    """Register every mechanism of the registry; returns the keys."""
    return [register_attention(n) for n in names()]


def _default_mechanism(name: str) -> Mechanism:
    with _LOCK:
        if name not in _DEFAULTS:
            _DEFAULTS[name] = get(name)
        return _DEFAULTS[name]


def _as_bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None or mask.dtype == torch.bool:
        return mask
    # an additive float mask: 0 where allowed, a large negative number elsewhere
    return mask > torch.finfo(mask.dtype).min / 2


def attnlab_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls for ``attn_implementation="attnlab:*"``.

    Returns ``(output [B, N, Hq, Dv], None)`` as transformers expects.
    """
    if dropout and module.training:
        raise AttnInputError(
            "dropout: attnlab mechanisms run without attention dropout; call model.eval()"
        )
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise AttnInputError("softcap, position_bias: not supported by attnlab's attention hook")
    state = _STATES.get(id(module.config))
    if state is not None:
        mechanism = state.mechanism
    else:
        impl = module.config._attn_implementation or ""
        mechanism = _default_mechanism(
            impl[len(PREFIX) :] if impl.startswith(PREFIX) else "softmax"
        )
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    mask = _as_bool_mask(attention_mask)
    nq, nk = query.shape[2], key.shape[2]
    if causal and mask is None and 1 < nq < nk:
        # transformers' prefill of an empty static cache: the keys past Nq are
        # unused slots, aligned top-left
        key, value = key[:, :, :nq], value[:, :, :nq]
    if causal and nq == 1 and mask is None:
        causal = False  # one new token sees the whole cache
    layer = getattr(module, "layer_idx", None)
    if state is not None and (state.capture is not None or any(e.needs_probs for e in state.edits)):
        from .capture import explicit_attention

        out = explicit_attention(
            state, layer, query, key, value, causal=causal, mask=mask, scale=scaling
        )
    else:
        if mechanism is None:
            mechanism = _default_mechanism("softmax")
        try:
            out = mechanism(query, key, value, causal=causal, mask=mask, scale=scaling)
        except AttnInputError as exc:
            if nq < key.shape[2] and not mechanism.spec.cross:
                raise AttnInputError(
                    f"{exc}; a KV cache gives fewer queries than keys: generate with "
                    "use_cache=False for this mechanism"
                ) from exc
            raise
        if state is not None:
            for edit in state.edits:
                out = edit.output(layer, out, query, key, value)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def hooked(model: torch.nn.Module) -> Iterator[HookState]:
    """Make ``model`` call attnlab's attention function while inside; yields its HookState.

    Nested and composed uses share one state; the model's own implementation is
    restored when the outermost one exits.
    """
    config = model.config
    with _LOCK:
        state = _STATES.get(id(config))
        if state is None:
            state = HookState(config=config, original=config._attn_implementation)
            _STATES[id(config)] = state
        state.depth += 1
    try:
        _apply_key(model, state)
        yield state
    finally:
        with _LOCK:
            state.depth -= 1
            last = state.depth == 0
            if last:
                del _STATES[id(config)]
        if last:
            _set_implementation(model, state.original)
        else:
            _apply_key(model, state)


def _set_implementation(model: torch.nn.Module, key: str | None) -> None:
    if hasattr(model, "set_attn_implementation") and key is not None:
        model.set_attn_implementation(key)
    else:
        model.config._attn_implementation = key


def _apply_key(model: torch.nn.Module, state: HookState) -> None:
    key = state.key
    register_attention(key[len(PREFIX) :])
    if model.config._attn_implementation != key:
        _set_implementation(model, key)


@contextlib.contextmanager
def use(model: torch.nn.Module, name: str, **config: Any) -> Iterator[Mechanism]:
    """Run ``model``'s attention with the attnlab mechanism ``name`` inside the block.

        with attnlab.use(model, "window", window=128):
            logits = model(**inputs).logits

    The mechanism is built once with ``config`` and shared by all layers; the
    model's own attention implementation comes back on exit.
    """
    mechanism = name if isinstance(name, Mechanism) else get(name, **config)
    with hooked(model) as state:
        previous = state.mechanism
        state.mechanism = mechanism
        _apply_key(model, state)
        try:
            yield mechanism
        finally:
            state.mechanism = previous
            _apply_key(model, state)
