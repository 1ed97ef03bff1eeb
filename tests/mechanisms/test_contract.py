"""The contract tests of DESIGN.md, run on every registered mechanism.

Each check applies where the mechanism's Spec claims the capability, so a new
mechanism is tested the moment it is registered.
"""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.core.reference import reference_attention

from .contract import ALL, budget, build, build_exact, causal_probes, inputs, modes

CASES = [(name, *mode) for name in ALL for mode in modes(attnlab.spec(name))]


def _id(case):
    name, causal, nq, nk = case
    return f"{name}-{'causal' if causal else 'full'}-{nq}x{nk}"


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_finite(case, dtype):
    name, causal, nq, nk = case
    if str(dtype).removeprefix("torch.") not in attnlab.spec(name).dtypes:
        pytest.skip(f"{name} does not compute in {dtype}")
    q, k, v = inputs(nq=nq, nk=nk, dtype=dtype)
    out = build(name)(q, k, v, causal=causal)
    assert out.shape == (q.shape[0], q.shape[1], nq, v.shape[-1])
    assert out.dtype == q.dtype and out.device == q.device
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_reference(case):
    """Exact mechanisms (or approximate ones at limit(n)) match the fp64 golden reference;
    mechanisms that define a different model match their own dense fp64 definition."""
    name, causal, nq, nk = case
    q, k, v = inputs(nq=nq, nk=nk)
    exact = build_exact(name, max(nq, nk))
    if exact is not None:
        err = exact(q, k, v, causal=causal).double() - reference_attention(q, k, v, causal=causal)
        assert err.abs().max().item() <= budget(q, k, v, causal=causal)
        return
    mech = build(name)
    want = mech.reference(
        q.double(), k.double(), v.double(), causal=causal, mask=None, scale=q.shape[-1] ** -0.5
    )
    assert want is not None, (
        f"{name}: an approximate mechanism needs limit(n) or a dense reference()"
    )
    got = mech(q, k, v, causal=causal).double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


EXACT_BF16 = [
    c for c in CASES if attnlab.spec(c[0]).exact and "bfloat16" in attnlab.spec(c[0]).dtypes
]


@pytest.mark.parametrize("case", EXACT_BF16, ids=_id)
def test_matches_reference_bfloat16(case):
    name, causal, nq, nk = case
    q, k, v = inputs(nq=nq, nk=nk, dtype=torch.bfloat16)
    out = build(name)(q, k, v, causal=causal)
    assert out.dtype == torch.bfloat16
    err = (out.double() - reference_attention(q, k, v, causal=causal)).abs().max().item()
    assert err <= budget(q, k, v, causal=causal)


CAUSAL = [n for n in ALL if attnlab.spec(n).causal]


@pytest.mark.parametrize("name", CAUSAL)
def test_causality(name):
    """What the Spec's ``causality`` promises (``contract.causal_probes``): redrawing
    later inputs leaves the earlier outputs unchanged, and does change later ones."""
    mech = build(name)
    q, k, v = inputs()
    before = mech(q, k, v, causal=True)
    changed = False
    for cut, parts in causal_probes(mech, q.shape[2]):
        new = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
        for part in parts:
            new[part][:, :, cut:] = torch.randn_like(new[part][:, :, cut:]) * 3
        after = mech(new["q"], new["k"], new["v"], causal=True)
        torch.testing.assert_close(after[:, :, :cut], before[:, :, :cut], rtol=1e-5, atol=1e-6)
        changed = changed or not torch.allclose(after[:, :, cut:], before[:, :, cut:])
    assert changed


MASKED = [c for c in CASES if attnlab.spec(c[0]).mask]


@pytest.mark.parametrize("case", MASKED, ids=_id)
def test_padding_nan_does_not_leak(case):
    """NaN written into padded keys and values does not reach the output."""
    name, causal, nq, nk = case
    mech = build(name)
    q, k, v = inputs(nq=nq, nk=nk)
    keep = torch.ones(2, 1, 1, nk, dtype=torch.bool)
    keep[0, ..., 3] = False  # a hole inside the sequence
    keep[1, ..., nk - 4 :] = False  # right padding
    clean = mech(q, k, v, causal=causal, mask=keep)
    k2, v2 = k.clone(), v.clone()
    k2.masked_fill_(~keep.transpose(-1, -2), float("nan"))
    v2.masked_fill_(~keep.transpose(-1, -2), float("nan"))
    dirty = mech(q, k2, v2, causal=causal, mask=keep)
    assert torch.isfinite(dirty).all()
    torch.testing.assert_close(dirty, clean)
    exact = build_exact(name, max(nq, nk))
    if exact is not None:
        ref = reference_attention(q, k, v, causal=causal, mask=keep)
        err = (exact(q, k2, v2, causal=causal, mask=keep).double() - ref).abs().max().item()
        assert err <= budget(q, k, v, causal=causal, mask=keep)


@pytest.mark.parametrize("case", MASKED, ids=_id)
def test_fully_masked_rows_are_zero(case):
    name, causal, nq, nk = case
    q, k, v = inputs(nq=nq, nk=nk)
    mask = torch.rand(2, 1, nq, nk) > 0.3
    mask[:, :, 0] = False  # the first query sees nothing
    mask[1, :, 5] = False
    mask[:, :, -1, -1] = True  # the last query always sees the last key
    out = build(name)(q, k, v, causal=causal, mask=mask)
    assert torch.isfinite(out).all()
    assert (out[:, :, 0] == 0).all() and (out[1, :, 5] == 0).all()
    assert (out[:, :, -1] != 0).any()


DECODE = [n for n in ALL if attnlab.spec(n).decode]


@pytest.mark.parametrize("name", DECODE)
def test_decoding_equals_parallel(name):
    """`step` token by token equals the causal parallel pass."""
    mech = build(name)
    q, k, v = inputs(nq=17, nk=17)
    full = mech(q, k, v, causal=True)
    state = mech.init_state(2, 4, 2, q.shape[-1], v.shape[-1], dtype=q.dtype)
    outs = []
    for t in range(q.shape[2]):
        out, state = mech.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=1e-4, atol=1e-5)
    size = mech.state_size(17, q_heads=4, kv_heads=2, head_dim=q.shape[-1], value_dim=v.shape[-1])
    assert isinstance(size, int) and size > 0


FORMS = [
    (c, option, value)
    for c in CASES
    for option, values in (
        ("form", attnlab.core.mechanism_class(c[0]).forms),
        ("backend", attnlab.core.mechanism_class(c[0]).backends),
    )
    for value in values
]


@pytest.mark.parametrize(
    ("case", "option", "value"), FORMS, ids=lambda x: x if isinstance(x, str) else _id(x)
)
def test_forms_agree(case, option, value):
    """Every form of the algorithm (parallel, chunked, recurrent, ...) and every backend
    (torch, flex, compiled, ...) gives one answer."""
    name, causal, nq, nk = case
    q, k, v = inputs(nq=nq, nk=nk)
    default = build(name)
    other = build(name, **{option: value})
    other.load_state_dict(default.state_dict())
    torch.testing.assert_close(
        other(q, k, v, causal=causal), default(q, k, v, causal=causal), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_grouped_query_equals_repeated_kv(case):
    name, causal, nq, nk = case
    mech = build(name)
    q, k, v = inputs(nq=nq, nk=nk, hq=4, hkv=2)
    grouped = mech(q, k, v, causal=causal)
    repeated = mech(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), causal=causal)
    torch.testing.assert_close(grouped, repeated, rtol=1e-5, atol=1e-6)


BACKWARD = [
    c for c in CASES if attnlab.spec(c[0]).backward and "float64" in attnlab.spec(c[0]).dtypes
]


@pytest.mark.parametrize("case", BACKWARD, ids=_id)
def test_gradcheck(case):
    name, causal, nq, nk = case
    mech = build(name).double()
    nq, nk = (9, 9) if nq == nk else (7, 11)
    q, k, v = inputs(b=1, hq=2, hkv=1, nq=nq, nk=nk, d=4, dv=3, dtype=torch.float64, grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: mech(q, k, v, causal=causal), (q, k, v), eps=1e-6, atol=1e-5
    )


BAD_INPUTS = {
    "rank": (lambda q, k, v: (q[0], k, v, None), "q"),
    "heads": (lambda q, k, v: (q[:, :3], k, v, None), "k"),
    "head-dim": (lambda q, k, v: (q, k[..., :5], v, None), "k"),
    "value-length": (lambda q, k, v: (q, k, v[:, :, :-1], None), "v"),
    "dtype": (lambda q, k, v: (q.to(torch.int64), k, v, None), "q"),
    "mixed-dtype": (lambda q, k, v: (q, k.double(), v, None), "k"),
    "batch": (lambda q, k, v: (q, k[:1], v[:1], None), "k"),
    "mask-shape": (lambda q, k, v: (q, k, v, torch.ones(3, 5, dtype=torch.bool)), "mask"),
    "mask-dtype": (lambda q, k, v: (q, k, v, torch.ones(24, 24)), "mask"),
}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
def test_bad_input_names_the_argument(name, bad):
    make, argument = BAD_INPUTS[bad]
    q, k, v, mask = make(*inputs())
    causal = attnlab.spec(name).causal
    with pytest.raises(attnlab.AttnInputError, match=rf"^{argument}\b|\b{argument}:"):
        build(name)(q, k, v, causal=causal, mask=mask)


@pytest.mark.parametrize("name", ALL)
def test_unsupported_mode_says_why(name):
    spec = attnlab.spec(name)
    q, k, v = inputs()
    if not spec.noncausal:
        with pytest.raises(attnlab.AttnInputError, match="causal"):
            build(name)(q, k, v, causal=False)
    if not spec.causal:
        with pytest.raises(attnlab.AttnInputError, match="causal"):
            build(name)(q, k, v, causal=True)
    if not spec.cross:
        q2, k2, v2 = inputs(nq=5, nk=9)
        with pytest.raises(attnlab.AttnInputError, match="Nk"):
            build(name)(q2, k2, v2, causal=spec.causal)
    with pytest.raises(attnlab.AttnInputError, match="config"):
        attnlab.get(name, no_such_option=1)
