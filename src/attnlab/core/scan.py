"""Shared kernels of the linear family: attention through a feature map.

With non-negative (or any) features ``fq = phi(q)`` [B, Hq, Nq, F] and
``fk = phi(k)`` [B, Hkv, Nk, F], causal linear attention is

    out_i = sum_{j <= i + offset} w_ij (fq_i . fk_j) v_j / sum_{j <= i + offset} w_ij (fq_i . fk_j)

with ``w_ij = exp(L_i - L_j)``, ``L`` the running sum of an optional per-step
log-decay (``w = 1`` without decay), after "Transformers are RNNs"
(Katharopoulos et al., arXiv:2006.16236, eq. 4-9) and, for the decay and the
blocked evaluation, Lightning Attention-2 (Qin et al., arXiv:2401.04658).
The denominator is dropped when ``normalize=False``.

Three forms of the same sum are given:

- ``parallel``: the masked N x N matrix, the reference (quadratic);
- ``chunked``: within a chunk of C tokens a masked C x C matmul, across chunks
  a running state ``S = sum_j fk_j^T [v_j, 1]`` [B, H, F, Dv + 1] (the last
  column is the normaliser ``z = sum_j fk_j``); chunks are processed in
  blocks so that memory stays bounded at any N;
- ``recurrent``: one token at a time, ``S <- g_t S + fk_t^T [v_t, 1]``, the
  decoding form.

The non-causal form is ``fq (fk^T [v, 1])`` once. Everything accumulates in
float32 (float64 stays float64) and every exponent of a decay is <= 0, so no
normaliser or state overflows at long N. Grouped-query heads share the state
of their kv head (with a per-query-head decay the state is kept per query head).

Decoding state is the dict ``{"S": [B, H, F, Dv], "z": [B, H, F]}`` (``z``
only when normalised), see :func:`init_state`.
"""

from __future__ import annotations

import math

import torch

# Chunk size by feature dimension F, measured on the CPU of the development
# machine (2 shared cores, torch 2.13, float32, causal, B1 H8 Dv64, N=16384;
# load average 8-12 from other jobs, so differences under ~15% are noise).
# `attnlab bench chunks --n 16384` (the scan alone, median ms):
#   F=16:  C32 203, C64 240, C128 281, C256 380
#   F=64:  C32 426, C64 367, C128 388, C256 456
#   F=128: C32 893, C64 465, C128 463, C256 708
#   F=273: C32 2101, C64 1773, C128 1083, C256 1015
# whole mechanisms (process CPU ms): linear (F=64) C32 423, C64 399, C128 433, C256 513;
# lightning (F=64, with decay) C32 872, C64 488, C128 363, C256 610: with a decay the
# [nb, nb] chunk-decay matrix favours fewer, larger chunks.
CHUNK_TABLE: tuple[tuple[int, int], ...] = ((32, 32), (192, 64), (10**9, 128))
CHUNK_TABLE_DECAY: tuple[tuple[int, int], ...] = ((10**9, 128),)

# Elements allowed in one block's largest intermediate (scores or per-chunk
# states); bounds memory at any N while keeping the batched matmuls large.
_BLOCK_ELEMENTS = 1 << 25
# Chunks per block with a decay: the [nb, nb] matrix of chunk decays costs nb·F·Dv per
# chunk, so nb is capped to stay linear in N.
_DECAY_BLOCK = 128


def choose_chunk(n: int, feature_dim: int, *, decay: bool = False) -> int:
    """Chunk size for the chunked form: the measured best for ``feature_dim`` (see CHUNK_TABLE;
    CHUNK_TABLE_DECAY with a decay), never more than ``n`` tokens."""
    for max_features, chunk in CHUNK_TABLE_DECAY if decay else CHUNK_TABLE:
        if feature_dim <= max_features:
            return max(1, min(chunk, n))
    raise AssertionError("CHUNK_TABLE ends with an unbounded row")


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def init_state(
    batch: int,
    heads: int,
    feature_dim: int,
    value_dim: int,
    *,
    normalize: bool = True,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> dict[str, torch.Tensor]:
    """An empty recurrent state: ``S`` [B, H, F, Dv] and, when normalised, ``z`` [B, H, F].

    States are kept in float32 (float64 when asked) whatever the input dtype.
    """
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    state = {"S": torch.zeros(batch, heads, feature_dim, value_dim, dtype=acc, device=device)}
    if normalize:
        state["z"] = torch.zeros(batch, heads, feature_dim, dtype=acc, device=device)
    return state


def state_floats(heads: int, feature_dim: int, value_dim: int, *, normalize: bool = True) -> int:
    """Floats in one batch element's state: H * F * (Dv + 1) (Dv without normaliser)."""
    return heads * feature_dim * (value_dim + int(normalize))


# --- layout helpers -------------------------------------------------------------------------


def _layout(fq, fk, v, log_decay, normalize):
    """5-d grouped layout: fq [B, H, G, Nq, F], fk [B, H, 1, Nk, F], v+1 [B, H, 1, Nk, Dv(+1)].

    H is the kv head count, or the query head count when a decay differs per query head.
    """
    acc = acc_dtype(fq)
    fq, fk, v = fq.to(acc), fk.to(acc), v.to(acc)
    b, hq, nq, f = fq.shape
    hk = fk.shape[1]
    groups = hq // hk
    if log_decay is not None:
        log_decay = log_decay.to(acc)
        if log_decay.dim() != 3:
            raise ValueError("log_decay: expected [B|1, H|1, N]")
        if log_decay.shape[1] not in (1, hk) and groups > 1:
            fk = fk.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
            hk, groups = hq, 1
        log_decay = log_decay[:, :, None]
    if normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    return (
        fq.reshape(b, hk, groups, nq, f),
        fk[:, :, None],
        v[:, :, None],
        log_decay,
    )


def _finish(out5, normalize, hq):
    """[B, H, G, N, Dv(+1)] -> [B, Hq, N, Dv], dividing by the normaliser column.

    A row that sees no key has a zero normaliser and a zero numerator: it stays 0.
    """
    b, h, g, n, dv1 = out5.shape
    out = out5.reshape(b, h * g, n, dv1)
    if not normalize:
        return out
    return out[..., :-1] / out[..., -1:].clamp_min(torch.finfo(out.dtype).tiny)


def _state_in(state, normalize, acc):
    """External state dict -> 5-d [B, H, 1, F, Dv(+1)] in the accumulation dtype."""
    s = state["S"].to(acc)
    if normalize:
        s = torch.cat([s, state["z"].to(acc)[..., None]], dim=-1)
    return s[:, :, None]


def _state_out(s5, normalize):
    s = s5[:, :, 0]
    if normalize:
        return {"S": s[..., :-1], "z": s[..., -1]}
    return {"S": s}


def _align(fk, v, nq, offset):
    """Keys for bottom-right alignment with ``offset``: query i sees key j <= i + offset.

    Returns (prefix keys, prefix values) that every query sees, and keys/values
    re-indexed so that aligned key i is key i + offset (zeros outside the sequence).
    """
    nk = fk.shape[-2]
    pre = max(offset, 0)
    start, stop = offset, offset + nq
    lo, hi = max(start, 0), min(stop, nk)
    fk_a, v_a = fk[..., lo:hi, :], v[..., lo:hi, :]
    front, back = max(0, -start), max(0, stop - nk)
    if hi <= lo:
        fk_a, v_a = fk[..., :0, :], v[..., :0, :]
        front, back = nq, 0
    if front or back:
        fk_a = torch.nn.functional.pad(fk_a, (0, 0, front, back))
        v_a = torch.nn.functional.pad(v_a, (0, 0, front, back))
    return fk[..., : min(pre, nk), :], v[..., : min(pre, nk), :], fk_a, v_a


# --- the forms ---------------------------------------------------------------------------------


def _parallel(fq5, fk5, v5, log_decay, causal, offset, mask):
    nq, nk = fq5.shape[-2], fk5.shape[-2]
    a = fq5 @ fk5.transpose(-1, -2)  # [B, H, G, Nq, Nk]
    allowed = None
    if causal:
        rows = torch.arange(nq, device=a.device)[:, None]
        cols = torch.arange(nk, device=a.device)[None, :]
        allowed = cols <= rows + offset
    if log_decay is not None:
        cum = log_decay.expand(*log_decay.shape[:-1], nk).cumsum(-1)
        expo = cum[..., :, None] - cum[..., None, :]
        if allowed is not None:
            expo = expo.masked_fill(~allowed, float("-inf"))
        a = a * torch.exp(expo)
    if mask is not None:
        h, g = a.shape[1:3]
        m = mask
        m = m.reshape(m.shape[0], h, g, *m.shape[2:]) if m.shape[1] != 1 else m[:, :, None]
        allowed = m if allowed is None else m & allowed
    if allowed is not None:
        a = a.masked_fill(~allowed, 0.0)
    return a @ v5


def _chunked(fq5, fk5, v5, log_decay, s5, chunk):
    """Causal square scan (Nq == Nk) from state s5; returns (out5, final state)."""
    b, h, g, n, f = fq5.shape
    dv1 = v5.shape[-1]
    c = max(1, min(chunk, n))
    pad = (-n) % c
    constant = log_decay is not None and log_decay.shape[-1] == 1 and not pad and g == 1
    if log_decay is not None and not constant:
        log_decay = log_decay.expand(*log_decay.shape[:-1], n)
    if pad:
        fq5 = torch.nn.functional.pad(fq5, (0, 0, 0, pad))
        fk5 = torch.nn.functional.pad(fk5, (0, 0, 0, pad))
        v5 = torch.nn.functional.pad(v5, (0, 0, 0, pad))
        if log_decay is not None:
            log_decay = torch.nn.functional.pad(log_decay, (0, pad))
    nc = (n + pad) // c
    fq6 = fq5.reshape(b, h, g, nc, c, f)
    fk6 = fk5.reshape(b, h, 1, nc, c, f)
    v6 = v5.reshape(b, h, 1, nc, c, dv1)
    per_chunk = b * h * max(g * c * c, f * dv1, g * c * dv1)
    block = max(1, min(nc, _BLOCK_ELEMENTS // max(per_chunk, 1)))
    if constant:
        block = min(block, _DECAY_BLOCK)
        return _chunked_constant(fq6, fk6, v6, log_decay[..., None, None], s5, block)
    if log_decay is None and g == 1:
        return _chunked_plain(fq6, fk6, v6, s5, block, pad)
    ld = None if log_decay is None else log_decay.reshape(*log_decay.shape[:3], nc, c)
    if ld is not None:
        block = min(block, _DECAY_BLOCK)
    tril = torch.ones(c, c, dtype=torch.bool, device=fq5.device).tril()
    outs = []
    for c0 in range(0, nc, block):
        sl = slice(c0, min(c0 + block, nc))
        q, k, vv = fq6[:, :, :, sl], fk6[:, :, :, sl], v6[:, :, :, sl]
        scores = q @ k.transpose(-1, -2)  # [B, H, G, nb, C, C]
        if ld is None:
            scores.tril_()
            cum = (k.transpose(-1, -2) @ vv).cumsum(dim=3)  # [B, H, 1, nb, F, Dv1]
            cum += s5[:, :, :, None]  # state after each chunk
            out = scores @ vv
            out[:, :, :, 1:] += q[:, :, :, 1:] @ cum[:, :, :, :-1]
            out[:, :, :, :1] += q[:, :, :, :1] @ s5[:, :, :, None]
            s5 = cum[:, :, :, -1]
        else:
            lc = ld[:, :, :, sl].cumsum(-1)  # [B|1, H|1, 1, nb, C], within-chunk running sum
            expo = (lc[..., :, None] - lc[..., None, :]).masked_fill(~tril, float("-inf"))
            scores = scores * torch.exp(expo)
            total = lc[..., -1]  # log decay over each chunk [.., nb]
            kv = (k * torch.exp(total[..., None] - lc)[..., None]).transpose(-1, -2) @ vv
            before = total.cumsum(-1) - total  # exclusive: decay accumulated before chunk c
            after = before[..., None] - before[..., None, :] - total[..., None, :]
            nb = total.shape[-1]
            lower = torch.ones(nb, nb, dtype=torch.bool, device=fq5.device).tril(-1)
            w = torch.exp(after.masked_fill(~lower, float("-inf")))  # chunk c' -> entering c
            s_in = (w @ kv.flatten(-2)).reshape(kv.shape) + torch.exp(before)[..., None, None] * s5[
                :, :, :, None
            ]
            out = scores @ vv + (q * torch.exp(lc)[..., None]) @ s_in
            end = before[..., -1] + total[..., -1]  # all decay of the block
            w_end = torch.exp(end[..., None] - before - total)  # chunk c' -> end of block
            s5 = (w_end[..., None] * kv.flatten(-2)).sum(3).reshape(s5.shape) + torch.exp(end)[
                ..., None, None
            ] * s5
        outs.append(out)
    out5 = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)).reshape(b, h, g, nc * c, dv1)
    return (out5[..., :n, :] if pad else out5), s5


def _chunked_plain(fq6, fk6, v6, s5, block, pad):
    """The chunked scan without decay, one query head per state, on 3-d batched matmuls:
    out_c = q_c S_(c-1) + tril(q_c k_cᵀ) v_c, S_c the state after chunk c."""
    b, h, _, nc, c, f = fq6.shape
    dv1 = v6.shape[-1]
    bh = b * h
    state = s5.reshape(bh, 1, f, dv1)
    outs = []
    for c0 in range(0, nc, block):
        c1 = min(c0 + block, nc)
        q = fq6[:, :, 0, c0:c1].reshape(-1, c, f)
        k = fk6[:, :, 0, c0:c1].reshape(-1, c, f)
        v = v6[:, :, 0, c0:c1].reshape(-1, c, dv1)
        kv = torch.bmm(k.transpose(1, 2), v).view(bh, c1 - c0, f, dv1)
        kv.cumsum_(1)
        kv += state  # kv[:, i]: the state after chunk i
        before = torch.cat([state, kv[:, :-1]], dim=1)  # the state entering each chunk
        state = kv[:, -1:]
        out = torch.bmm(q, before.view(-1, f, dv1))
        out.baddbmm_(torch.bmm(q, k.transpose(1, 2)).tril_(), v)
        outs.append(out.view(bh, c1 - c0, c, dv1))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    out = out.reshape(b, h, 1, nc * c, dv1)
    n = nc * c - pad
    return (out[..., :n, :] if pad else out), state.reshape(s5.shape)


def _chunked_constant(fq6, fk6, v6, lam, s5, block):
    """The chunked scan for a decay constant along the sequence, lam [B|1, H|1, 1, 1, 1, 1].

    Every chunk then shares one C x C decay mask lambda^(i-j) and one chunk decay
    lambda^C (Lightning Attention-2, Algorithm 1); one query head per state.
    """
    b, h, _, nc, c, f = fq6.shape
    dv1 = v6.shape[-1]
    bh = b * h
    lam = lam.reshape(lam.shape[0], lam.shape[1]).expand(b, h).reshape(bh, 1, 1)
    idx = torch.arange(c, device=fq6.device, dtype=fq6.dtype)
    lower = torch.ones(c, c, dtype=torch.bool, device=fq6.device).tril()
    gaps = (idx[:, None] - idx[None, :]).masked_fill(~lower, float("inf"))
    mask = torch.exp(gaps * lam)[:, None]  # [BH, 1, C, C], zero above the diagonal
    into = torch.exp((idx + 1)[:, None] * lam)[:, None]  # [BH, 1, C, 1] chunk start -> i
    out_of = torch.exp((c - 1 - idx)[:, None] * lam)[:, None]  # [BH, 1, C, 1] j -> chunk end
    state = s5.reshape(bh, f * dv1)
    outs = []
    for c0 in range(0, nc, block):
        c1 = min(c0 + block, nc)
        nb = c1 - c0
        q = fq6[:, :, 0, c0:c1].reshape(bh, nb, c, f)
        k = fk6[:, :, 0, c0:c1].reshape(bh, nb, c, f)
        v = v6[:, :, 0, c0:c1].reshape(-1, c, dv1)
        kv = torch.bmm((k * out_of).reshape(-1, c, f).transpose(1, 2), v)  # [BH*nb, F, Dv1]
        steps = torch.arange(nb, device=q.device, dtype=q.dtype)
        gap = (steps[:, None] - 1 - steps[None, :]).masked_fill(
            ~torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril(-1), float("inf")
        )
        w = torch.exp(gap * (c * lam))  # [BH, nb, nb]: chunk c' -> entering chunk c
        s_in = torch.bmm(w, kv.view(bh, nb, f * dv1))
        s_in += torch.exp(steps[:, None] * (c * lam)) * state[:, None]  # [BH, nb, F*Dv1]
        scores = (q @ k.transpose(-1, -2)).mul_(mask).view(-1, c, c)
        out = torch.bmm((q * into).view(-1, c, f), s_in.view(-1, f, dv1))
        out.baddbmm_(scores, v)
        state = torch.exp(c * lam[:, 0]) * s_in[:, -1] + kv.view(bh, nb, -1)[:, -1]
        outs.append(out.view(bh, nb, c, dv1))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return out.reshape(b, h, 1, nc * c, dv1), state.reshape(s5.shape)


def _recurrent(fq5, fk5, v5, log_decay, s5):
    """Causal square scan token by token from state s5; returns (out5, final state)."""
    outs = []
    if log_decay is not None:
        log_decay = log_decay.expand(*log_decay.shape[:-1], fq5.shape[-2])
    for t in range(fq5.shape[-2]):
        if log_decay is not None:
            s5 = torch.exp(log_decay[..., t])[..., None, None] * s5
        s5 = s5 + fk5[..., t, :, None] * v5[..., t, None, :]
        outs.append(fq5[..., t : t + 1, :] @ s5)
    return torch.cat(outs, dim=-2), s5


def causal_scan(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    *,
    form: str = "chunked",
    state: dict[str, torch.Tensor] | None = None,
    chunk: int | None = None,
    log_decay: torch.Tensor | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Causal linear attention of N new tokens after ``state`` (Nq == Nk == N).

    ``form``: "chunked" or "recurrent" (the decoding loop). ``log_decay``
    [B|1, H|1, N] is log g_t <= 0 of the per-step scalar decay ([B|1, H|1, 1]: the
    same decay at every step, which the chunked form computes with one shared mask). Returns the
    output [B, Hq, N, Dv] in float32 (float64 for float64 input) and the new
    state (see :func:`init_state`; with a per-query-head decay the state has Hq heads).
    """
    if fq.shape[-2] != fk.shape[-2]:
        raise ValueError("causal_scan: expected as many queries as keys; use linear_attention")
    hq = fq.shape[1]
    fq5, fk5, v5, ld = _layout(fq, fk, v, log_decay, normalize)
    b, h = fk5.shape[:2]
    if state is None:
        s5 = torch.zeros(b, h, 1, fq5.shape[-1], v5.shape[-1], dtype=fq5.dtype, device=fq.device)
    else:
        s5 = _state_in(state, normalize, fq5.dtype)
    if form == "recurrent":
        out5, s5 = _recurrent(fq5, fk5, v5, ld, s5)
    else:
        chunk = chunk or choose_chunk(fq.shape[-2], fq.shape[-1], decay=ld is not None)
        out5, s5 = _chunked(fq5, fk5, v5, ld, s5, chunk)
    return _finish(out5, normalize, hq), _state_out(s5, normalize)


def linear_attention(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    form: str = "chunked",
    chunk: int | None = None,
    log_decay: torch.Tensor | None = None,
    normalize: bool = True,
    mask: torch.Tensor | None = None,
    offset: int | None = None,
) -> torch.Tensor:
    """Linear attention of features fq [B, Hq, Nq, F] over fk [B, Hkv, Nk, F], v [B, Hkv, Nk, Dv].

    ``causal``: query i sees keys j <= i + offset (``offset`` defaults to
    Nk - Nq, the bottom-right alignment). ``form``: "parallel" (masked matrix,
    also the only form that takes an arbitrary bool ``mask`` [B|1, Hq|1, Nq|1, Nk]),
    "chunked" or "recurrent"; non-causal attention without a mask is the
    single state ``fk^T v`` in every form but "parallel". Returns float32
    (float64 for float64 input), [B, Hq, Nq, Dv]; rows with nothing to attend give zeros.
    """
    nq, nk = fq.shape[-2], fk.shape[-2]
    offset = nk - nq if offset is None else offset
    if log_decay is not None and (offset != 0 or nq != nk):
        raise ValueError("linear_attention: a decay needs aligned queries and keys (Nq == Nk)")
    if form == "parallel" or mask is not None:
        fq5, fk5, v5, ld = _layout(fq, fk, v, log_decay, normalize)
        return _finish(_parallel(fq5, fk5, v5, ld, causal, offset, mask), normalize, fq.shape[1])
    if not causal:
        fq5, fk5, v5, _ = _layout(fq, fk, v, None, normalize)
        kv = fk5.transpose(-1, -2) @ v5
        return _finish(fq5 @ kv, normalize, fq.shape[1])
    pre_k, pre_v, fk_a, v_a = _align(fk, v, nq, offset)
    state = None
    if pre_k.shape[-2]:
        acc = acc_dtype(fq)
        pre_v = pre_v.to(acc)
        s = pre_k.to(acc).transpose(-1, -2) @ pre_v
        state = {"S": s, "z": pre_k.to(acc).sum(-2)} if normalize else {"S": s}
    out, _ = causal_scan(
        fq, fk_a, v_a, form=form, state=state, chunk=chunk, log_decay=log_decay, normalize=normalize
    )
    return out


def orthogonal_gaussian(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, cols] random features with orthogonal rows in blocks of ``cols``, each row's norm
    drawn from the chi distribution of a Gaussian vector (Performer, arXiv:2009.14794, sec. 4)."""
    g = torch.randn(math.ceil(rows / cols), cols, cols, generator=generator, dtype=torch.float64)
    qmat, r = torch.linalg.qr(g)  # one orthogonal block per `cols` rows
    qmat = qmat * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    blocks = qmat.transpose(-1, -2)
    w = blocks.reshape(-1, cols)[:rows]
    norms = torch.randn(rows, cols, generator=generator, dtype=torch.float64).norm(dim=1)
    return (w * norms[:, None]).float()
