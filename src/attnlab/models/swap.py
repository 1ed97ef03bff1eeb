"""Running attnlab inside a transformers model through its ``AttentionInterface``.

Every attnlab mechanism is registered with transformers as ``"attnlab:<name>"``
(attention function and mask function), so a model can be loaded with
``attn_implementation="attnlab:<name>"`` (after ``import attnlab``, see
:mod:`attnlab.models.registration`) or switched for a while with :func:`use`.
The same hook carries the streaming capture (:func:`attnlab.models.capture`,
through :class:`~attnlab.models.probes.AttentionProbe` objects) and the edits
(:func:`edited`, through :class:`~attnlab.models.probes.AttentionEdit`
objects); they compose: a per-model :class:`HookState` holds the active edits
and the capture, each context manager undoes exactly its own part on exit.

The mechanism chosen by :func:`use` belongs to the calling context (a
``contextvars`` variable): two threads may each ``use`` a different mechanism on
the same model at the same time, and each runs its own. A thread that chose
none runs the model's own attnlab mechanism (from ``attn_implementation``) or
exact softmax. At each call the mechanism is put in the calling module's mode,
so ``model.eval()`` reaches it.

The attention function translates transformers' call (query [B, Hq, N, D] after
rotary, key/value [B, Hkv, Nk, D] not repeated, the model's bool mask or None,
``scaling``) into attnlab's contract: grouped-query heads pass natively, the
model's mask (causal + padding, built by transformers' ``sdpa_mask``) is passed
as ``mask`` and ``causal`` is the module's ``is_causal``. attnlab's causal
alignment is bottom-right, so the decode steps of ``generate()`` with a KV cache
are causal too. With ``output_attentions=True`` an exact mechanism's weights are
computed block by block and returned; other mechanisms have none and say so.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from attnlab.core.errors import AttnInputError
from attnlab.core.mechanism import Mechanism
from attnlab.core.registry import get, mechanism_class, names

from .explicit import Capture, explicit_attention
from .probes import AttentionEdit

PREFIX = "attnlab:"
_LOCK = threading.Lock()
_REGISTERED: set[str] = set()
_DEFAULTS: dict[str, Mechanism] = {}
# the mechanism each model (keyed by id of its config) runs in the current context (None:
# none chosen); never mutated in place: each `use` sets a new dict and resets it on exit
_CHOSEN: contextvars.ContextVar[dict[int, Mechanism] | None] = contextvars.ContextVar(
    "attnlab_chosen_mechanisms", default=None
)


@dataclass
class HookState:
    """The hooks active on one model (shared by every thread that runs it)."""

    config: Any  # the model config object (identity key; kept alive here)
    original: str | None  # the attn_implementation to restore at the end
    depth: int = 0
    edits: list[AttentionEdit] = field(default_factory=list)
    capture: Capture | None = None


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


def _mechanism_for(config: Any) -> Mechanism:
    """The mechanism this context runs for the model of ``config``: its :func:`use` choice,
    else the model's own ``attnlab:<name>`` implementation, else exact softmax."""
    chosen = (_CHOSEN.get() or {}).get(id(config))
    if chosen is not None:
        return chosen
    state = _STATES.get(id(config))
    impl = (state.original if state is not None else config._attn_implementation) or ""
    return _default_mechanism(impl[len(PREFIX) :] if impl.startswith(PREFIX) else "softmax")


def _as_bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None or mask.dtype == torch.bool:
        return mask
    # an additive float mask: 0 where allowed, a large negative number elsewhere
    return mask > torch.finfo(mask.dtype).min / 2


def _weights_requested(kwargs: dict[str, Any]) -> bool:
    """Whether the model call asked for attention weights (``output_attentions``), as a
    keyword that reaches the attention function or through transformers' output recorder."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # older transformers pass output_attentions down as a keyword
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def attnlab_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention function transformers calls for ``attn_implementation="attnlab:*"``.

    Returns ``(output [B, N, Hq, Dv], weights)`` as transformers expects: the
    weights [B, Hq, N, Nk] when the call asked for attention weights
    (``output_attentions``) and the mechanism is exact softmax, else None.
    """
    if dropout and module.training:
        raise AttnInputError(
            "dropout: attnlab mechanisms run without attention dropout; call model.eval()"
        )
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise AttnInputError("softcap, position_bias: not supported by attnlab's attention hook")
    state = _STATES.get(id(module.config))
    mechanism = _mechanism_for(module.config)
    if mechanism.training != module.training:
        mechanism.train(module.training)
    want_weights = _weights_requested(kwargs)
    if want_weights and not mechanism.spec.exact:
        raise AttnInputError(
            f"output_attentions: the attnlab mechanism {mechanism.spec.name!r} computes no "
            "attention weights; only exact softmax mechanisms return them "
            "(attnlab list --json shows 'exact'); run without output_attentions, or read "
            "attention with attnlab.models.capture"
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
    capture = state.capture if state is not None else None
    edits = list(state.edits) if state is not None else []
    weights = None
    if want_weights or capture is not None or any(e.needs_probs for e in edits):
        out, weights = explicit_attention(
            mechanism,
            capture,
            edits,
            layer,
            query,
            key,
            value,
            causal=causal,
            mask=mask,
            scale=scaling,
            keep_weights=want_weights,
        )
    else:
        try:
            out = mechanism(query, key, value, causal=causal, mask=mask, scale=scaling)
        except AttnInputError as exc:
            if nq < key.shape[2] and not mechanism.spec.cross:
                raise AttnInputError(
                    f"{exc}; a KV cache gives fewer queries than keys: generate with "
                    "use_cache=False for this mechanism"
                ) from exc
            raise
        for edit in edits:
            out = edit.output(layer, out, query, key, value)
    return out.transpose(1, 2).contiguous(), weights


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
        first = state.depth == 1
    try:
        if first:
            original = state.original or ""
            _switch(model, original if original.startswith(PREFIX) else PREFIX + "softmax")
        yield state
    finally:
        with _LOCK:
            state.depth -= 1
            last = state.depth == 0
            if last:
                del _STATES[id(config)]
        if last:
            _set_implementation(model, state.original)


def _set_implementation(model: torch.nn.Module, key: str | None) -> None:
    if hasattr(model, "set_attn_implementation") and key is not None:
        model.set_attn_implementation(key)
    else:
        model.config._attn_implementation = key


def _switch(model: torch.nn.Module, key: str) -> None:
    """Point the model at attnlab's attention function under ``key`` (``attnlab:<name>``)."""
    register_attention(key[len(PREFIX) :])
    if model.config._attn_implementation != key:
        _set_implementation(model, key)


@contextlib.contextmanager
def use(model: torch.nn.Module, name: str | Mechanism, **config: Any) -> Iterator[Mechanism]:
    """Run ``model``'s attention with the attnlab mechanism ``name`` inside the block.

        with attnlab.use(model, "window", window=128):
            logits = model(**inputs).logits

    The mechanism is built once with ``config`` and shared by all layers; it
    follows the model's mode (train/eval) at every call. The choice belongs to
    the calling thread (context): another thread may ``use`` a different
    mechanism on the same model at the same time. The model's own attention
    implementation comes back when the last user exits.
    """
    mechanism = name if isinstance(name, Mechanism) else get(name, **config)
    mechanism.train(model.training)
    with hooked(model):
        shown = model.config._attn_implementation
        token = _CHOSEN.set({**(_CHOSEN.get() or {}), id(model.config): mechanism})
        try:
            _switch(model, PREFIX + mechanism.spec.name)
            yield mechanism
        finally:
            _CHOSEN.reset(token)
            if shown is not None and shown.startswith(PREFIX):
                _switch(model, shown)


@contextlib.contextmanager
def edited(model: torch.nn.Module, edit: AttentionEdit) -> Iterator[AttentionEdit]:
    """Put ``edit`` on ``model``'s attention hook inside the block; remove it on exit.

    The edit's layer and head indices are checked against the model's first
    (``edit.check``): an index the model does not have raises AttnInputError.
    """
    config = model.config
    edit.check(int(config.num_hidden_layers), int(config.num_attention_heads))
    with hooked(model) as state:
        state.edits.append(edit)
        try:
            yield edit
        finally:
            state.edits.remove(edit)
