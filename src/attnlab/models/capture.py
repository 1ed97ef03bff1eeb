"""Streaming capture: per-head statistics of a real model's attention in bounded memory.

:func:`capture` runs one forward pass with attnlab's attention function in
every layer. Each layer computes its exact softmax attention one block of query
rows at a time (:mod:`attnlab.models.explicit`): the block's probabilities
[B, Hq, rows, K] go to every probe (an
:class:`~attnlab.models.probes.AttentionProbe`, such as the analyses of
:mod:`attnlab.analysis`), then the block's output ``P @ V`` is written and the
block is dropped. In a causal layer K is the number of keys the block's last row
can see (the columns past K are zero for every row of the block and are not
materialised); otherwise K = Nk. Probes that set ``uses_logits`` also get the
block's scaled scores (``logits=``), so a measure such as the row entropy needs
no logarithm over the block. No layer's N x N map is kept and no list of layers'
maps is built: peak memory is the model plus one block (``rows x Nk`` per head,
probabilities and scores), whatever the number of layers.

The same pass can keep the post-rotary queries, keys and values of chosen
layers and heads (:func:`~attnlab.models.qk_io.save_qk` writes them as
safetensors), so benchmarks measure approximation error on real attention inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from attnlab.core.errors import AttnInputError

from .explicit import Capture
from .probes import AttentionProbe, CaptureInfo
from .results import CaptureResult, Results
from .swap import hooked


def _is_causal(model: torch.nn.Module) -> bool:
    for m in model.modules():
        if hasattr(m, "is_causal") and hasattr(m, "layer_idx"):
            return bool(m.is_causal)
    return bool(getattr(model.config, "is_decoder", False))


def _normalize_inputs(inputs: Any) -> dict[str, torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        ids = inputs if inputs.dim() == 2 else inputs.unsqueeze(0)
        return {"input_ids": ids}
    if hasattr(inputs, "keys") and "input_ids" in inputs:
        return {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}
    raise AttnInputError(
        "inputs: expected token ids [B, N] or a tokenizer's output with input_ids, "
        f"got {type(inputs).__name__}"
    )


def _keep_spec(layers: Iterable[int] | dict[int, Sequence[int] | None] | None, n_layers: int):
    if layers is None:
        return {}
    spec = dict(layers) if isinstance(layers, dict) else {int(i): None for i in layers}
    for layer in spec:
        if not 0 <= layer < n_layers:
            raise AttnInputError(f"keep_qk: layer {layer} out of range 0..{n_layers - 1}")
    return spec


def capture(
    model: torch.nn.Module,
    inputs: Any,
    analyses: Sequence[AttentionProbe] = (),
    *,
    block: int | None = None,
    tokenizer: Any = None,
    keep_qk: Iterable[int] | dict[int, Sequence[int] | None] | None = None,
    progress: bool | None = None,
) -> CaptureResult:
    """Run ``model`` once on ``inputs`` and reduce each layer's attention with ``analyses``.

    ``inputs``: token ids [B, N] or a tokenizer's output (its ``attention_mask``
    is honoured). ``analyses``: probes (:class:`attnlab.analysis.Analysis`
    objects or anything with the :class:`~attnlab.models.probes.AttentionProbe`
    methods). ``block``: query rows per block (default: about 15M floats per
    block). ``keep_qk``: layers (or ``{layer: [query heads]}``) whose post-rotary
    q, k, v to keep; k and v are those of each head's key/value group.
    ``progress``: a bar over layers (default: on from 2048 tokens).

    Returns tidy rows from every probe's ``finish()``, the :class:`CaptureInfo`
    and the kept tensors.
    """
    if block is not None and (not isinstance(block, int) or block < 1):
        raise AttnInputError(f"block: expected a positive int, got {block!r}")
    batch = _normalize_inputs(inputs)
    ids = batch["input_ids"]
    config = model.config
    n_layers = int(config.num_hidden_layers)
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    if tokenizer is not None:
        tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    else:
        tokens = [str(t) for t in ids[0].tolist()]
    info = CaptureInfo(
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        seq_len=int(ids.shape[1]),
        input_ids=ids,
        tokens=tokens,
        causal=_is_causal(model),
    )
    probes = list(analyses)
    for probe in probes:
        probe.begin(info)
    hidden = any(probe.needs_hidden_states for probe in probes)
    show = ids.shape[1] >= 2048 if progress is None else progress
    cap = Capture(probes=probes, block=block, keep=_keep_spec(keep_qk, n_layers))
    base = getattr(model, "base_model", model)
    with contextlib.ExitStack() as stack:
        if show:
            from tqdm.auto import tqdm

            cap.progress = stack.enter_context(
                tqdm(total=n_layers, desc=f"capture {ids.shape[1]} tokens", unit="layer")
            )
        state = stack.enter_context(hooked(model))
        previous, state.capture = state.capture, cap
        try:
            with torch.no_grad():
                out = base(**batch, use_cache=False, output_hidden_states=hidden)
        finally:
            state.capture = previous
    if hidden:
        info.hidden_states = tuple(out.hidden_states)
    del out
    rows = Results()
    for probe in probes:
        rows.extend(probe.finish())
    return CaptureResult(rows=rows, info=info, qkv=cap.kept)
