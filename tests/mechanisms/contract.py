"""Helpers for the contract tests: building mechanisms, inputs and error budgets."""

from __future__ import annotations

import dataclasses

import torch

import attnlab
from attnlab.core.masks import repeat_kv
from attnlab.core.reference import reference_attention

# The q/k/v contract covers every family but "heads": those mechanisms own their
# projections and are called on hidden states x [B, N, dim]; their layer-level contract
# is tests/mechanisms/test_heads_contract.py.
ALL = [name for name in attnlab.mechanisms() if attnlab.spec(name).family != "heads"]


def build(name: str, **overrides):
    """The mechanism with its tiny test config, in eval mode (no feature redraw)."""
    cls = attnlab.core.mechanism_class(name)
    return attnlab.get(name, **{**cls.tiny_config, **overrides}).eval()


def build_exact(name: str, n: int):
    """The mechanism in the setting where it must equal exact softmax (None if none)."""
    mech = build(name)
    cfg = mech.limit(n)
    if cfg is None:
        return None
    return attnlab.get(name, **dataclasses.asdict(cfg)).eval()


def inputs(b=2, hq=4, hkv=2, nq=24, nk=24, d=8, dv=6, dtype=torch.float32, grad=False):
    q = torch.randn(b, hq, nq, d, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, dtype=dtype)
    v = torch.randn(b, hkv, nk, dv, dtype=dtype)
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def refuses(name: str, causal: bool, nq: int, nk: int) -> bool:
    """Whether the mechanism says, before computing, that it cannot run this shape."""
    q, k, v = inputs(nq=nq, nk=nk)
    return bool(build(name).unsupported(q, k, v, causal=causal, mask=None))


def modes(spec):
    """(causal, nq, nk) triples the Spec claims: self-attention, and cross where supported
    (fewer queries than keys, and more queries than keys unless the mechanism refuses it
    in ``unsupported()``, which the contract allows)."""
    out = []
    for causal in (False, True):
        if (causal and not spec.causal) or (not causal and not spec.noncausal):
            continue
        out.append((causal, 24, 24))
        if spec.cross:
            out.append((causal, 13, 29))
            if not refuses(spec.name, causal, 29, 13):
                out.append((causal, 29, 13))
    return out


def causal_probes(mech, n: int) -> list[tuple[int, str]]:
    """(cut, inputs) pairs that the Spec's ``causality`` promises: redrawing ``inputs``
    (a subset of "qkv") at every position >= cut leaves the outputs of the queries before
    ``cut`` unchanged (self-attention of length ``n``).

    - "token": every later query, key and value, after query 10 (cut 11).
    - "block": every token after the end of a block of ``config.block`` positions, at each
      block end; and every later value, after queries 0, 5, 10 and 17.
    - "values": every later query and value, after queries 0, 7, 10 and 18.
    """
    causality = mech.spec.causality
    if causality == "token":
        return [(11, "qkv")]
    if causality == "values":
        return [(cut, "qv") for cut in (1, 8, 11, 19)]
    assert causality == "block", f"{mech.spec.name}: unknown causality {causality!r}"
    block = getattr(mech.config, "block", None)
    assert isinstance(block, int), (
        f"{mech.spec.name}: causality 'block' needs an int config.block, got {block!r}"
    )
    ends = [(end, "qkv") for end in range(block, n, block)]
    return ends + [(cut, "v") for cut in (1, 6, 11, 18)]


def eager_error(q, k, v, *, causal, mask=None) -> float:
    """Max error of plain eager matmul-softmax-matmul in q's dtype against fp64."""
    ref = reference_attention(q, k, v, causal=causal, mask=mask)
    groups = q.shape[1] // k.shape[1]
    kk, vv = repeat_kv(k, groups), repeat_kv(v, groups)
    s = (q @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
    if causal:
        allowed = attnlab.core.masks.causal_mask(q.shape[2], k.shape[2])
    if mask is not None:
        allowed = allowed & mask
    s = s.masked_fill(~allowed, float("-inf"))
    eager = (torch.softmax(s, dim=-1).nan_to_num(0.0) @ vv).double()
    return (eager - ref).abs().max().item()


def budget(q, k, v, *, causal, mask=None) -> float:
    """Error allowed to a mechanism: a small multiple of eager PyTorch's own error."""
    floor = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float64: 1e-12}[q.dtype]
    return 8 * max(eager_error(q, k, v, causal=causal, mask=mask), floor)


POISONS = (float("nan"), float("inf"), float("-inf"))


def compute_dtypes(name: str) -> list[torch.dtype]:
    """The dtypes among float32, float64 and bfloat16 that the mechanism computes in."""
    wanted = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
    return [dt for key, dt in wanted.items() if key in attnlab.spec(name).dtypes]


def poisoned(t: torch.Tensor, index, value: float) -> torch.Tensor:
    """A copy of t with ``value`` (NaN or an infinity) written at ``index``."""
    out = t.detach().clone()
    out[index] = value
    return out


def blind_rows(nq: int, nk: int, position: int, *, causal: bool, mask=None) -> torch.Tensor:
    """Bool [B|1, 1|H, Nq]: query rows that may not attend key ``position``, under the
    bottom-right causal mask when ``causal`` and under ``mask`` [B|1, 1|H, Nq, Nk]."""
    blind = torch.zeros(1, 1, nq, dtype=torch.bool)
    if causal:
        blind = blind | ~attnlab.core.masks.causal_mask(nq, nk)[None, None, :, position]
    if mask is not None:
        blind = blind | ~mask[..., position]
    return blind
