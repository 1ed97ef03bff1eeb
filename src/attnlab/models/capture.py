"""Streaming capture: per-head statistics of a real model's attention in bounded memory.

:func:`capture` runs one forward pass with attnlab's attention function in
every layer. Each layer computes its exact softmax attention one block of query
rows at a time: the block's probabilities [B, Hq, rows, K] go to every
:class:`~attnlab.analysis.Analysis` (``update``), then the block's output
``P @ V`` is written and the block is dropped. In a causal layer K is the
number of keys the block's last row can see (the columns past K are zero for
every row of the block and are not materialised); otherwise K = Nk. Analyses
that set ``uses_logits`` also get the block's scaled scores (``logits=``), so a
measure such as the row entropy needs no logarithm over the block. No layer's
N x N map is kept and no list of layers' maps is built: peak memory is the model
plus one block (``rows x Nk`` per head, probabilities and scores), whatever the
number of layers.

The same pass can keep the post-rotary queries, keys and values of chosen
layers and heads (:func:`save_qk` writes them as safetensors), so benchmarks
measure approximation error on real attention inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnlab.analysis.base import Analysis, CaptureInfo
from attnlab.core.errors import AttnInputError

from .swap import HookState, hooked

# elements of one probability block (B * Hq * rows * Nk): about 15M floats (60 MiB).
# Each block's scores and probabilities are written into two buffers allocated once
# per layer, so the block may exceed glibc's 32 MiB mmap threshold. Measured on
# SmolLM2 at 8192 tokens (2 cores, four analyses), 128- to 256-row blocks ran about
# 10% faster than 64 rows (fewer calls into the analyses), 192 rows among the best.
BLOCK_ELEMENTS = 15 << 20


def default_block(batch: int, heads: int, nk: int) -> int:
    """Query rows per block: about :data:`BLOCK_ELEMENTS` floats of probabilities per block,
    a multiple of 64 rows (at least 64)."""
    return max(64, BLOCK_ELEMENTS // max(1, batch * heads * nk)) // 64 * 64


@dataclass
class Capture:
    """What the attention function does with each layer during a captured pass."""

    analyses: list[Analysis]
    block: int | None = None
    keep: dict[int, list[int] | None] = field(default_factory=dict)  # layer -> q heads
    kept: dict[str, torch.Tensor] = field(default_factory=dict)
    progress: Any = None


# what hidden keys score: finite, so `p * logit` is 0 (not NaN) where p == 0, and
# exp(NEG - max) underflows to exactly 0 whenever a row sees any key
NEG = torch.finfo(torch.float32).min


def _causal_hidden(rows: int, kend: int, tail: int, first_row: int, device) -> torch.Tensor:
    """Bool [rows, tail]: is key ``kend - tail + j`` after query ``first_row + i`` (absolute)."""
    q_pos = torch.arange(first_row, first_row + rows, device=device).unsqueeze(1)
    k_pos = torch.arange(kend - tail, kend, device=device).unsqueeze(0)
    return k_pos > q_pos


def attention_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None,
    scale: float,
    block: int,
) -> Iterator[tuple[int, int, int, torch.Tensor, torch.Tensor]]:
    """Exact softmax by blocks of query rows: yields ``(r0, r1, kend, probs, logits)``.

    ``probs`` is float32 [B, Hq, r1 - r0, kend]: the attention of query rows
    ``r0:r1`` over keys ``0:kend`` (keys past ``kend`` are causally hidden from
    every row of the block). ``logits`` (same shape) are the scaled scores the
    softmax was taken of, with :data:`NEG` (float32's lowest finite value) where
    a key is hidden or masked. Grouped-query heads are computed without
    repeating keys (query head h reads key/value head h // (Hq / Hkv)). Rows that
    see no key are zero. Both tensors are only valid until the next block.
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    offset = nk - nq
    qf = q.float() * scale
    # keys as [B, Hkv, D, Nk], contiguous once per call: each block's scores read a
    # prefix of its columns, a faster right-hand side than a transposed view
    kt = k.float().transpose(-1, -2).contiguous()
    # without gradients, every block's scores and probabilities are written into two
    # buffers sized for the largest block (no allocation per block); with gradients
    # each block has its own tensors (autograd may keep them, e.g. for an edit's backward)
    grad = torch.is_grad_enabled()
    size = 0 if grad else b * hq * min(block, nq) * nk
    s_buf = torch.empty(size, dtype=torch.float32, device=q.device)
    p_buf = torch.empty(size, dtype=torch.float32, device=q.device)
    triangle = None
    for r0 in range(0, nq, block):
        r1 = min(nq, r0 + block)
        rows = r1 - r0
        kend = min(nk, r1 + offset) if causal else nk
        qb = qf[:, :, r0:r1].reshape(b, hkv, g * rows, d)
        if grad:
            scores = torch.matmul(qb, kt[..., :kend])
        else:
            scores = s_buf[: b * hq * rows * kend].view(b, hkv, g * rows, kend)
            torch.matmul(qb, kt[..., :kend], out=scores)
        scores = scores.view(b, hkv, g, rows, kend)
        if causal:
            # only the last `rows` columns of a causal block hold hidden keys; where they
            # start at the block's first query they hide the same strict upper triangle
            tail = min(rows, kend)
            if tail == rows and kend - tail == r0 + offset:
                if triangle is None or triangle.shape[0] != rows:
                    triangle = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu_(1)
                hidden = triangle
            else:
                hidden = _causal_hidden(rows, kend, tail, r0 + offset, q.device)
            scores[..., kend - tail :].masked_fill_(hidden, NEG)
        if mask is not None:
            mb = mask[:, :, r0:r1, :kend] if mask.shape[-2] != 1 else mask[..., :kend]
            if mb.shape[1] == 1:
                mb = mb.unsqueeze(2)  # [B, 1, 1, rows, kend]
            else:
                mb = mb.reshape(mb.shape[0], hkv, g, mb.shape[2], kend)
            scores.masked_fill_(~mb, NEG)
        if grad:
            probs = torch.softmax(scores, dim=-1)
        else:
            probs = p_buf[: scores.numel()].view(scores.shape)
            torch.ops.aten._softmax.out(scores, -1, False, out=probs)
        probs = probs.view(b, hq, rows, kend)
        logits = scores.view(b, hq, rows, kend)
        if mask is not None:
            # a row that sees nothing has every logit at NEG (softmax made it uniform)
            dead = logits.amax(dim=-1, keepdim=True) <= NEG
            if bool(dead.any()):
                probs.masked_fill_(dead, 0.0)
        yield r0, r1, kend, probs, logits
        del scores, logits, probs


def explicit_attention(
    state: HookState,
    layer: int | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """Exact softmax attention by blocks of query rows, feeding analyses and edits.

    q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv], mask bool broadcastable
    to [B, 1|Hq, Nq, Nk] (True = may attend), causal bottom-right. Returns
    [B, Hq, Nq, Dv] in q's dtype.
    """
    mech = state.mechanism
    if mech is not None and not mech.spec.exact:
        raise AttnInputError(
            f"mechanism: capture and probability edits measure exact softmax attention; "
            f"{mech.spec.name!r} is not exact (leave attnlab.use(...) for the capture)"
        )
    if layer is None:
        raise AttnInputError("layer: the model's attention module has no layer_idx")
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d**-0.5 if scale is None else float(scale)
    offset = nk - nq
    cap = state.capture
    analyses = cap.analyses if cap is not None else []
    block = (cap.block if cap is not None else None) or default_block(b, hq, nk)
    if mask is not None and mask.dim() != 4:
        raise AttnInputError(f"attention_mask: expected a 4-d bool mask, got {tuple(mask.shape)}")
    prob_edits = [e for e in state.edits if e.needs_probs or e.has_probs]
    out_edits = [e for e in state.edits if not (e.needs_probs or e.has_probs)]
    for e in prob_edits:
        e.prepare(layer, q, k, causal=causal, mask=mask, scale=scale)
    out = torch.empty(b, hq, nq, v.shape[-1], dtype=torch.float32, device=q.device)
    vf = v.float()
    for r0, r1, kend, probs, logits in attention_blocks(
        q, k, causal=causal, mask=mask, scale=scale, block=block
    ):
        rows = r1 - r0
        for e in prob_edits:
            probs = e.probs(layer, probs, r0 + offset)
        if prob_edits:
            logits = None  # the edited weights are no longer a softmax of these scores
        if analyses:
            sl = slice(r0 + offset, r1 + offset)
            for a in analyses:
                if a.uses_logits:
                    a.update(layer, probs, sl, logits=logits)
                else:
                    a.update(layer, probs, sl)
        pv = torch.matmul(probs.reshape(b, hkv, g * rows, kend), vf[:, :, :kend])
        out[:, :, r0:r1] = pv.view(b, hq, rows, -1)
        del probs, logits, pv
    if cap is not None and layer in cap.keep:
        _keep_qkv(cap, layer, q, k, v)
    out = out.to(q.dtype)
    for e in out_edits:
        out = e.output(layer, out, q, k, v)
    if cap is not None and cap.progress is not None:
        cap.progress.update(1)
    return out


def _keep_qkv(cap: Capture, layer: int, q, k, v) -> None:
    hq, hkv = q.shape[1], k.shape[1]
    heads = cap.keep[layer]
    heads = list(range(hq)) if heads is None else list(heads)
    kv_heads = [h // (hq // hkv) for h in heads]
    cap.kept[f"layer{layer}.q"] = q[:, heads].detach().float().cpu().contiguous()
    cap.kept[f"layer{layer}.k"] = k[:, kv_heads].detach().float().cpu().contiguous()
    cap.kept[f"layer{layer}.v"] = v[:, kv_heads].detach().float().cpu().contiguous()


class Results(list):
    """Tidy rows (dicts with ``analysis, layer, head, metric, value`` and extras)."""

    def where(self, **match: Any) -> Results:
        """The rows whose fields equal every ``key=value`` given."""
        return Results(r for r in self if all(r.get(k) == v for k, v in match.items()))

    def columns(self) -> dict[str, list[Any]]:
        """Column-oriented view: ``{field: [value per row]}`` (missing fields are None)."""
        keys: list[str] = []
        for r in self:
            keys.extend(k for k in r if k not in keys)
        return {k: [r.get(k) for r in self] for k in keys}

    def grid(self, metric: str, analysis: str | None = None) -> list[list[float | None]]:
        """A layer x head grid of ``metric`` (mean over any extra index), for heatmaps."""
        rows = [r for r in self if r["metric"] == metric]
        if analysis is not None:
            rows = [r for r in rows if r["analysis"] == analysis]
        if not rows:
            return []
        n_layers = max(r["layer"] for r in rows) + 1
        n_heads = max(r["head"] for r in rows) + 1
        sums = [[0.0] * n_heads for _ in range(n_layers)]
        counts = [[0] * n_heads for _ in range(n_layers)]
        for r in rows:
            sums[r["layer"]][r["head"]] += float(r["value"])
            counts[r["layer"]][r["head"]] += 1
        return [
            [sums[i][j] / counts[i][j] if counts[i][j] else None for j in range(n_heads)]
            for i in range(n_layers)
        ]

    def format(self, limit: int = 20) -> str:
        """A plain-text table of the first ``limit`` rows."""
        cols = self.columns()
        if not cols:
            return "(no rows)"
        names = list(cols)
        cells = [[_fmt(cols[n][i]) for n in names] for i in range(min(limit, len(self)))]
        widths = [max([len(n)] + [len(c[j]) for c in cells]) for j, n in enumerate(names)]
        lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
        if len(self) > limit:
            lines.append(f"... {len(self) - limit} more rows")
        return "\n".join(lines)


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


@dataclass
class CaptureResult:
    """What :func:`capture` returns: tidy rows, the run's info and any kept q/k/v."""

    rows: Results
    info: CaptureInfo
    qkv: dict[str, torch.Tensor]

    def save_qk(self, path: str | Path, **metadata: str) -> Path:
        """Write the kept queries/keys/values (``layer{L}.q|k|v``) as safetensors."""
        return save_qk(self.qkv, path, **metadata)


def _is_causal(model: torch.nn.Module) -> bool:
    for m in model.modules():
        if hasattr(m, "is_causal") and hasattr(m, "layer_idx"):
            return bool(m.is_causal)
    return bool(getattr(model.config, "is_decoder", False))


def _normalise_inputs(inputs: Any) -> dict[str, torch.Tensor]:
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
    analyses: Sequence[Analysis] = (),
    *,
    block: int | None = None,
    tokenizer: Any = None,
    keep_qk: Iterable[int] | dict[int, Sequence[int] | None] | None = None,
    progress: bool | None = None,
) -> CaptureResult:
    """Run ``model`` once on ``inputs`` and reduce each layer's attention with ``analyses``.

    ``inputs``: token ids [B, N] or a tokenizer's output (its ``attention_mask``
    is honoured). ``block``: query rows per block (default: about 15M floats per
    block). ``keep_qk``: layers (or ``{layer: [query heads]}``) whose post-rotary
    q, k, v to keep; k and v are those of each head's key/value group.
    ``progress``: a bar over layers (default: on from 2048 tokens).

    Returns tidy rows from every analysis' ``finish()``, the :class:`CaptureInfo`
    and the kept tensors.
    """
    if block is not None and (not isinstance(block, int) or block < 1):
        raise AttnInputError(f"block: expected a positive int, got {block!r}")
    batch = _normalise_inputs(inputs)
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
    analyses = list(analyses)
    for a in analyses:
        a.begin(info)
    hidden = any(a.needs_hidden_states for a in analyses)
    show = ids.shape[1] >= 2048 if progress is None else progress
    cap = Capture(analyses=analyses, block=block, keep=_keep_spec(keep_qk, n_layers))
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
    for a in analyses:
        rows.extend(a.finish())
    return CaptureResult(rows=rows, info=info, qkv=cap.kept)


def save_qk(tensors: dict[str, torch.Tensor], path: str | Path, **metadata: str) -> Path:
    """Write ``{"layer{L}.q|k|v": [B, H, N, D]}`` to a safetensors file."""
    from safetensors.torch import save_file

    if not tensors:
        raise AttnInputError("keep_qk: no layers were kept; pass keep_qk=[...] to capture()")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(dict(tensors), str(path), metadata={k: str(v) for k, v in metadata.items()})
    return path


def load_qk(path: str | Path) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Read a file written by :func:`save_qk`: ``{layer: (q, k, v)}``."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    layers = sorted({int(n.split(".")[0][len("layer") :]) for n in tensors})
    return {
        layer: (tensors[f"layer{layer}.q"], tensors[f"layer{layer}.k"], tensors[f"layer{layer}.v"])
        for layer in layers
    }
