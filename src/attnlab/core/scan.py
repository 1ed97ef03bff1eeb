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

import functools

import torch
import torch.nn.functional as F

from attnlab.core import native

# Chunk size by sequence length N for the PyTorch scan: the fastest C on CPU at long N
# (`attnlab bench chunks`, recorded in benchmarks/chunks-cpu.json).
CHUNK_TABLE: tuple[tuple[int, int], ...] = ((10**12, 64),)
# The same for the compiled kernel (csrc/scan.c): a chunk's own scores cost C per token,
# its state products a fixed F·Dv, so small chunks win until the per-chunk state traffic
# dominates.
COMPILED_CHUNK_TABLE: tuple[tuple[int, int], ...] = ((10**12, 32),)

# Elements allowed in one block's largest intermediate (features, scores, values):
# small enough to stay in cache and be reused by malloc, large enough that the batched
# matmuls and the per-block Python overhead are amortised.
_BLOCK_ELEMENTS = 1 << 20
# Chunks per block at most: the prefix over a block's chunk states is an [nb + 1, nb]
# matrix product, O(nb²·F·Dv), so nb stays small.
_BLOCK_CHUNKS = 32
# On a GPU the per-block Python loop, not the cache, is the cost: blocks as large as memory
# comfortably allows (all heads and the whole sequence at once up to ~256 chunks).
_BLOCK_ELEMENTS_GPU = 1 << 27
_BLOCK_CHUNKS_GPU = 256


def choose_chunk(n: int, *, compiled: bool = False) -> int:
    """Chunk size for the chunked form of N tokens: the measured best for N (see
    CHUNK_TABLE, or COMPILED_CHUNK_TABLE for the compiled kernel), never more than ``n``."""
    for max_n, chunk in COMPILED_CHUNK_TABLE if compiled else CHUNK_TABLE:
        if n <= max_n:
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


def _decay_factors(ld, nb, c, tokens):
    """Decay weights of one block of ``tokens`` steps for X heads, from their log decays
    ld [X, T] (or [X, 1]: the same decay at every step), in nb chunks of C.

    Returns (intra [X, nb, C, C], into [X, nb, C], out_of [X, nb, C], chunk_w [X, nb + 1, nb],
    start [X, nb + 1]): inside a chunk exp(L_i - L_j) (zero above the diagonal); from a
    chunk's entering state to its token i; from token j to its chunk's end; from the end of
    chunk c' to the entry of chunk c (row nb: the end of the block); from the block's
    entering state to the entry of chunk c. With a constant decay (and no padding) the
    first three are the same for every chunk and come with 1 in place of nb.
    Padded steps (past ``tokens``) do not decay. Every exponent is <= 0.
    """
    x = ld.shape[0]
    if ld.shape[-1] == 1 and tokens == nb * c:
        lc = ld.expand(x, c).cumsum(-1)[:, None]  # [X, 1, C]
        total = lc[:, :, -1].expand(x, nb)
    else:
        ld = F.pad(ld.expand(x, tokens), (0, nb * c - tokens))
        lc = ld.view(x, nb, c).cumsum(-1)
        total = lc[..., -1]
    tril = torch.ones(c, c, dtype=torch.bool, device=ld.device).tril()
    intra = _exp_normal((lc[..., :, None] - lc[..., None, :]).masked_fill(~tril, float("-inf")))
    start = F.pad(total.cumsum(-1), (1, 0))  # decay before chunk c, c = 0..nb
    gap = start[:, :, None] - start[:, None, 1:]  # entry of chunk c <- end of chunk c'
    lower = torch.ones(nb + 1, nb, dtype=torch.bool, device=ld.device).tril(-1)
    chunk_w = _exp_normal(gap.masked_fill(~lower, float("-inf")))
    return intra, _exp_normal(lc), _exp_normal(lc[..., -1:] - lc), chunk_w, _exp_normal(start)


def _exp_normal(x: torch.Tensor) -> torch.Tensor:
    """exp(x) with results below tiny/eps (1e-31 in float32) set to 0.

    Subnormal numbers slow a CPU's matrix products many times over, and a strong decay
    over many chunks reaches them (e^-96 after 3 chunks of 64 at 0.5 a step); a weight
    below tiny/eps times any value above eps stays normal. What is dropped is below
    1e-31 of the token's own weight (1 on the diagonal), far under float32's resolution."""
    e = torch.exp(x)
    info = torch.finfo(e.dtype)
    return e.masked_fill_(e < info.tiny / info.eps, 0.0)


def block_plan(
    n: int, c: int, per_token: int, rows: int, device, *, max_chunks: int | None = None
) -> tuple[int, int]:
    """(tokens per block, rows per step) for a blocked scan of N tokens in chunks of C over
    ``rows`` independent (batch, head) rows, whose largest intermediate holds ``per_token``
    floats per token: a block stays near ``_BLOCK_ELEMENTS`` floats (on a GPU far more) and
    at most ``max_chunks`` chunks (default ``_BLOCK_CHUNKS``); a sequence that fits one block
    goes several rows a step.
    """
    budget, max_chunks = _BLOCK_ELEMENTS, max_chunks or _BLOCK_CHUNKS
    if torch.device(device).type != "cpu":
        budget, max_chunks = _BLOCK_ELEMENTS_GPU, _BLOCK_CHUNKS_GPU
    block = max(c, min(max_chunks * c, budget // per_token // c * c))
    group = 1
    if n <= block:  # the whole sequence in one block: several rows a step
        group = max(1, min(rows, budget // (-(-n // c) * c * per_token)))
    return block, group


def _scan_blocks(q, k, v, s, z, *, chunk, feature_map, log_decay):
    """The chunked causal scan (Nq == Nk), a group of (batch, kv head) rows at a time, in
    blocks of tokens.

    q [B, H, G, N, *] (G query heads per state), k [B, H, N, *], v [B, H, N, Dv];
    ``feature_map(x, query=...)`` turns a block of raw q or k into features [..., F] (None:
    they already are features). State s [B, H, F, Dv], normaliser z [B, H, F] or None
    (unnormalised). log_decay None or [B|1, H|1, N|1] (log g_t <= 0).

    Inside a chunk of C tokens the masked C x C product; across the chunks of a block
    their states by one [nb + 1, nb] (decayed) prefix-sum matrix product; across blocks the
    running state. The normaliser is the row sum of the masked chunk scores plus the
    query's features against the entering z (kept apart from the values, so the value
    products are exactly Dv wide and a block's result can be computed straight into the
    output). Long sequences go one head at a time (a block of one head's rows is a view,
    not a copy); a sequence that fits one block goes with as many heads as fit. A block's
    largest intermediate holds about ``_BLOCK_ELEMENTS`` floats, so temporaries stay small
    enough to be reused by the allocator, and nothing of size N x N is built. Returns out
    [B, H, G, N, Dv] (normalised) and the final (s, z).
    """
    b, h, g, n, _ = q.shape
    dv, f = v.shape[-1], s.shape[-2]
    c, acc = max(1, min(chunk, n)), s.dtype
    normalize = z is not None
    rows = b * h
    block, group = block_plan(n, c, g * max(c, f, dv), rows, q.device)
    q, k, v = q.reshape(rows, g, n, -1), k.reshape(rows, n, -1), v.reshape(rows, n, dv)
    if log_decay is not None:
        log_decay = log_decay.expand(b, h, -1).reshape(rows, -1)
    out = torch.empty(rows, g, n, dv, dtype=acc, device=q.device)
    final_s = torch.empty(rows, f, dv, dtype=acc, device=q.device)
    final_z = torch.empty(rows, f, dtype=acc, device=q.device) if normalize else None
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, s))
    tiny = torch.finfo(acc).tiny
    cache: dict[tuple, tuple] = {}  # per-shape constants: prefix matrices, constant decays
    for r0 in range(0, rows, group):
        r1 = min(r0 + group, rows)
        x = r1 - r0
        state = s.reshape(rows, f * dv)[r0:r1].to(acc).unsqueeze(1)  # [X, 1, F*Dv]
        norm = z.reshape(rows, f)[r0:r1].to(acc).unsqueeze(1) if normalize else None
        for t0 in range(0, n, block):
            t1 = min(t0 + block, n)
            nb = -(-(t1 - t0) // c)
            pad = nb * c - (t1 - t0)
            fq, fk = q[r0:r1, :, t0:t1].to(acc), k[r0:r1, t0:t1].to(acc)
            vb = v[r0:r1, t0:t1].to(acc)
            if feature_map is not None:
                fq, fk = feature_map(fq, query=True), feature_map(fk, query=False)
            if pad:
                fq, fk = F.pad(fq, (0, 0, 0, pad)), F.pad(fk, (0, 0, 0, pad))
                vb = F.pad(vb, (0, 0, 0, pad))
            fq = fq.reshape(x, g, nb, c, f).transpose(1, 2).reshape(x * nb, g * c, f)
            fk, vb = fk.reshape(x * nb, c, f), vb.reshape(x * nb, c, dv)
            if log_decay is None:
                if ("prefix", nb) not in cache:
                    ones = torch.ones(nb + 1, nb, dtype=acc, device=q.device)
                    cache["prefix", nb] = (ones.tril_(-1),)
                (chunk_w,) = cache["prefix", nb]
                q_in, fk_out, start = fq, fk, None
            else:
                if log_decay.shape[-1] > 1:
                    weights = _decay_factors(log_decay[r0:r1, t0:t1], nb, c, t1 - t0)
                else:
                    key = ("decay", r0, nb, pad)
                    if key not in cache:
                        cache[key] = _decay_factors(log_decay[r0:r1], nb, c, t1 - t0)
                    weights = cache[key]
                intra, into, out_of, chunk_w, start = weights
                fk_out = (fk.view(x, -1, c, f) * out_of[..., None]).view(x * nb, c, f)
                q_in = fq.view(x, nb, g, c, f) * into[:, :, None, :, None]
                q_in = q_in.view(x * nb, g * c, f)
            kv = torch.bmm(fk_out.transpose(1, 2), vb).view(x, nb, f * dv)
            states = _carry(torch.matmul(chunk_w, kv), state, start)  # [X, nb + 1, F*Dv]
            scores = torch.bmm(fq, fk.transpose(1, 2))  # [X*nb, G*C, C]
            if log_decay is None:
                scores.view(-1, c, c).tril_()
            else:
                scores.view(x, nb, g, c, c).mul_(intra[:, :, None])
            # a block of one head (no padding, one query head) is computed in the output itself
            direct = not grad and x == 1 and g == 1 and not pad
            if direct:
                o = out[r0, 0, t0:t1].view(nb, c, dv)
                torch.bmm(scores, vb, out=o)
            else:
                o = torch.bmm(scores, vb)
            entering = states[:, :nb] if x == 1 else states[:, :nb].contiguous()
            o.baddbmm_(q_in, entering.view(x * nb, f, dv))
            state = states[:, nb : nb + 1]
            if normalize:
                ksum = fk_out.view(x, nb, c, f).sum(2)
                norms = _carry(torch.matmul(chunk_w, ksum), norm, start)  # [X, nb + 1, F]
                z_in = norms[:, :nb].reshape(x * nb, f, 1)
                den = torch.baddbmm(scores.sum(-1, keepdim=True), q_in, z_in)
                norm = norms[:, nb : nb + 1]
                den = den.clamp_min(tiny)  # a row that sees nothing has 0 / tiny = 0
                o = o.div_(den) if not grad else o / den
            if not direct:
                o = o.view(x, nb, g, c, dv).transpose(1, 2).reshape(x, g, nb * c, dv)
                out[r0:r1, :, t0:t1] = o[:, :, : t1 - t0]
        final_s[r0:r1] = state.view(x, f, dv)
        if normalize:
            final_z[r0:r1] = norm.view(x, f)
    out = out.view(b, h, g, n, dv)
    return out, final_s.view(b, h, f, dv), (final_z.view(b, h, f) if normalize else None)


def _carry(prefix: torch.Tensor, entering: torch.Tensor, start: torch.Tensor | None):
    """Add a block's entering state [X, 1, W] to its chunk prefix sums [X, nb + 1, W],
    decayed by ``start`` [X, nb + 1] (None: no decay)."""
    if start is None:
        return prefix.add_(entering)
    return prefix.baddbmm_(start[:, :, None], entering)


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


def _features(fq, fk, feature_map):
    """Apply ``feature_map`` (if any) to whole q and k, in the accumulation dtype."""
    if feature_map is None:
        return fq, fk
    acc = acc_dtype(fq)
    return feature_map(fq.to(acc), query=True), feature_map(fk.to(acc), query=False)


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
    feature_map=None,
    native_feature: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Causal linear attention of N new tokens after ``state`` (Nq == Nk == N).

    ``form``: "chunked" or "recurrent" (the decoding loop). ``log_decay``
    [B|1, H|1, N] is log g_t <= 0 of the per-step scalar decay ([B|1, H|1, 1]: the
    same decay at every step, whose weights the chunked form builds once).
    ``feature_map(x, query=...)``: when given, fq and fk are the raw queries and keys and
    the chunked form maps them block by block (no full-length feature tensors).
    ``native_feature``: the name of ``feature_map`` among the compiled kernel's
    (:data:`attnlab.core.native.SCAN_FEATURES`), which then computes the chunked form when
    it takes the inputs (see :mod:`attnlab.core.native`); without a feature map the kernel
    is used with the identity. Returns
    the output [B, Hq, N, Dv] in float32 (float64 for float64 input) and the new state
    (see :func:`init_state`; with a per-query-head decay the state has Hq heads).
    """
    if fq.shape[-2] != fk.shape[-2]:
        raise ValueError("causal_scan: expected as many queries as keys; use linear_attention")
    if form == "recurrent":
        fq, fk = _features(fq, fk, feature_map)
        hq = fq.shape[1]
        fq5, fk5, v5, ld = _layout(fq, fk, v, log_decay, normalize)
        if state is None:
            s5 = fq5.new_zeros(*fk5.shape[:2], 1, fq5.shape[-1], v5.shape[-1])
        else:
            s5 = _state_in(state, normalize, fq5.dtype)
        out5, s5 = _recurrent(fq5, fk5, v5, ld, s5)
        return _finish(out5, normalize, hq), _state_out(s5, normalize)
    acc = acc_dtype(fq)
    b, hq, n, _ = fq.shape
    hk = fk.shape[1]
    if log_decay is not None:
        log_decay = log_decay.to(acc)
        if log_decay.dim() != 3:
            raise ValueError("log_decay: expected [B|1, H|1, N]")
        if log_decay.shape[1] not in (1, hk):  # a decay per query head: a state per query head
            fk = fk.repeat_interleave(hq // hk, dim=1)
            v = v.repeat_interleave(hq // hk, dim=1)
            hk = hq
    if feature_map is None:
        f = fq.shape[-1]
    else:
        f = feature_map(fq[:, :1, :1].to(acc), query=True).shape[-1]
    if state is None:
        s = torch.zeros(b, hk, f, v.shape[-1], dtype=acc, device=fq.device)
        z = torch.zeros(b, hk, f, dtype=acc, device=fq.device) if normalize else None
    else:
        s, z = state["S"].to(acc), (state["z"].to(acc) if normalize else None)
    name = "identity" if feature_map is None else native_feature
    compiled_chunk = chunk or choose_chunk(n, compiled=True)
    if native.scan_applies((fq, fk, v, s, z, log_decay), feature=name, chunk=compiled_chunk):
        kernel = functools.partial(native.causal_scan, feature=name)
        chunk = compiled_chunk
    else:
        kernel = functools.partial(_scan_blocks, feature_map=feature_map)
        chunk = chunk or choose_chunk(n)
    out, s, z = kernel(
        fq.reshape(b, hk, hq // hk, n, fq.shape[-1]),
        fk,
        v,
        s,
        z,
        chunk=chunk,
        log_decay=log_decay,
    )
    return out.reshape(b, hq, n, -1), ({"S": s, "z": z} if normalize else {"S": s})


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
    feature_map=None,
    native_feature: str | None = None,
) -> torch.Tensor:
    """Linear attention of features fq [B, Hq, Nq, F] over fk [B, Hkv, Nk, F], v [B, Hkv, Nk, Dv].

    ``causal``: query i sees keys j <= i + offset (``offset`` defaults to
    Nk - Nq, the bottom-right alignment). ``form``: "parallel" (masked matrix,
    also the only form that takes an arbitrary bool ``mask`` [B|1, Hq|1, Nq|1, Nk]),
    "chunked" or "recurrent"; non-causal attention without a mask is the
    single state ``fk^T v`` in every form but "parallel". With ``feature_map`` fq and fk
    are raw queries and keys (see :func:`causal_scan`, also for ``native_feature``). Returns float32
    (float64 for float64 input), [B, Hq, Nq, Dv]; rows with nothing to attend give zeros.
    """
    nq, nk = fq.shape[-2], fk.shape[-2]
    offset = nk - nq if offset is None else offset
    if log_decay is not None and (offset != 0 or nq != nk):
        raise ValueError("linear_attention: a decay needs aligned queries and keys (Nq == Nk)")
    if causal and form == "chunked" and mask is None and offset == 0 and nq == nk:
        out, _ = causal_scan(
            fq,
            fk,
            v,
            chunk=chunk,
            log_decay=log_decay,
            normalize=normalize,
            feature_map=feature_map,
            native_feature=native_feature,
        )
        return out
    fq, fk = _features(fq, fk, feature_map)
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
