"""The ctypes wrappers of attnlab.core.native check their own inputs before the C code
sees them: float32 CPU tensors outside autograd, consistent shapes, and every integer
within what a C int holds (never truncated: 2^32 + 4 is not 4). Each bad input raises
AttnInputError naming the argument. The checks run before any library is needed."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.core import native
from attnlab.core.errors import AttnInputError

from .test_native import needs_library

BEYOND_INT = [2**32 + 4, 2**31, -1]


def moba_inputs(n=32, d=16):
    gen = torch.Generator().manual_seed(1)
    return tuple(torch.randn(1, 2, n, d, generator=gen) for _ in "qkv")


def call_moba(q=None, k=None, v=None, **overrides):
    dq, dk, dv = moba_inputs()
    args = {"block": 4, "top_k": 2, "causal": True, "scale": 0.25, **overrides}
    return native.moba(
        dq if q is None else q, dk if k is None else k, dv if v is None else v, **args
    )


def call_based(q=None, k=None, v=None, proj=None, **overrides):
    dq, dk, dv = moba_inputs()
    args = {"window": 8, "chunk": 16, "scale": 0.25, **overrides}
    proj = torch.eye(16)[:, :4].contiguous() if proj is None else proj
    return native.based(
        dq if q is None else q, dk if k is None else k, dv if v is None else v, proj, **args
    )


def scan_inputs():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 1, 24, 16, generator=gen)
    return (q, *(torch.randn(1, 2, 24, 16, generator=gen) for _ in "kv"))


def call_scan(q=None, k=None, v=None, s=None, z=None, **overrides):
    dq, dk, dv = scan_inputs()
    args = {"chunk": 8, "feature": "elu1", "log_decay": None, **overrides}
    return native.causal_scan(
        dq if q is None else q,
        dk if k is None else k,
        dv if v is None else v,
        torch.zeros(1, 2, 16, 16) if s is None else s,
        torch.ones(1, 2, 16) if z is None else z,
        **args,
    )


@pytest.mark.parametrize("value", BEYOND_INT)
@pytest.mark.parametrize("name", ["block", "top_k", "threads"])
def test_moba_integers_beyond_a_c_int_are_refused(name, value):
    """moba with block=2**32+4 used to run silently with block 4."""
    with pytest.raises(AttnInputError, match=rf"^{name}: expected an integer in \[1, 2\^31\)"):
        call_moba(**{name: value})


@pytest.mark.parametrize("value", BEYOND_INT)
def test_based_window_beyond_a_c_int_is_refused(value):
    """based with window=2**32+1 used to run silently as window 1."""
    with pytest.raises(AttnInputError, match=r"^window: expected an integer in \[1, 2\^31\)"):
        call_based(window=value)


@pytest.mark.parametrize("chunk", [2**32 + 16, 0, 272, 40, 16.0, True])
def test_based_chunk_must_be_whole_vectors_within_256(chunk):
    with pytest.raises(AttnInputError, match=r"^chunk: expected"):
        call_based(chunk=chunk)


@pytest.mark.parametrize("chunk", [2**32 + 8, 0, 257, 8.0])
def test_scan_chunk_is_an_integer_in_1_to_256(chunk):
    with pytest.raises(AttnInputError, match=r"^chunk: expected an integer in \[1, 256\]"):
        call_scan(chunk=chunk)


@pytest.mark.parametrize(
    "call,name",
    [(call_moba, "q"), (call_moba, "k"), (call_based, "v"), (call_scan, "q"), (call_scan, "k")],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_only_float32_is_taken(call, name, dtype):
    default = dict(zip("qkv", scan_inputs() if call is call_scan else moba_inputs(), strict=True))
    with pytest.raises(AttnInputError, match=rf"^{name}: expected dtype torch.float32"):
        call(**{name: default[name].to(dtype)})


def test_only_cpu_tensors_are_taken():
    q = torch.empty(1, 2, 32, 16, device="meta")
    with pytest.raises(AttnInputError, match=r"^q: expected a CPU tensor, got device meta"):
        call_moba(q=q)
    with pytest.raises(AttnInputError, match=r"^s: expected a CPU tensor"):
        call_scan(s=torch.empty(1, 2, 16, 16, device="meta"))


def test_tensors_that_need_gradients_are_refused():
    q = moba_inputs()[0].requires_grad_()
    with pytest.raises(AttnInputError, match=r"^q: expected no autograd .*torch.no_grad"):
        call_moba(q=q)
    with pytest.raises(AttnInputError, match=r"^proj: expected no autograd"):
        call_based(proj=torch.eye(16).requires_grad_())


def test_inconsistent_shapes_are_refused():
    _, k, v = moba_inputs()
    with pytest.raises(AttnInputError, match=r"^v: expected shape \[B, Hkv, Nk, Dv\]"):
        call_moba(v=v[:, :, :20])
    with pytest.raises(AttnInputError, match=r"^k: expected shape \[B, Hkv, Nk, D\]"):
        call_moba(k=k[..., :8])
    with pytest.raises(AttnInputError, match=r"^k: expected a number of heads Hkv"):
        call_moba(k=torch.randn(1, 3, 32, 16), v=torch.randn(1, 3, 32, 16))
    with pytest.raises(AttnInputError, match=r"^v: expected shape \[B, Hkv, N, Dv\]"):
        call_based(v=v[:, :, :20])
    with pytest.raises(AttnInputError, match=r"^v: Dv: expected a positive multiple of 16"):
        call_based(v=v[..., :8])
    with pytest.raises(AttnInputError, match=r"^proj: expected shape \[D, d'\]"):
        call_based(proj=torch.eye(8))
    with pytest.raises(AttnInputError, match=r"^proj: d': expected an integer in \[1, 16\]"):
        call_based(proj=torch.randn(16, 20))
    with pytest.raises(AttnInputError, match=r"^q: expected 5 dimensions \[B, H, G, N, F\]"):
        call_scan(q=torch.randn(1, 2, 24, 16))
    with pytest.raises(AttnInputError, match=r"^z: expected shape \[B, H, F\]"):
        call_scan(z=torch.ones(1, 2, 8))
    with pytest.raises(AttnInputError, match=r"^log_decay: expected shape \[B\|1, H\|1, 1\]"):
        call_scan(log_decay=torch.zeros(1, 3, 1))
    with pytest.raises(AttnInputError, match=r"^feature: expected one of identity"):
        call_scan(feature="relu")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.25"])
def test_scale_must_be_a_finite_number(scale):
    with pytest.raises(AttnInputError, match=r"^scale: expected a finite number"):
        call_moba(scale=scale)


@needs_library
def test_non_contiguous_inputs_give_the_same_output():
    q, k, v = moba_inputs()
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    assert torch.equal(call_moba(qt, kt, vt, threads=1), call_moba(q, k, v, threads=1))
    assert torch.equal(call_based(qt, kt, vt), call_based(q, k, v))
    sk = scan_inputs()[1]
    skt = sk.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(call_scan(k=skt)[0], call_scan(k=sk)[0])


@needs_library
@pytest.mark.parametrize(
    "name,config,argument",
    [("moba", {"block": 2**32 + 4}, "block"), ("based", {"window": 2**32 + 1}, "window")],
)
def test_the_mechanisms_no_longer_run_with_a_truncated_integer(name, config, argument):
    """The values of the issue through attnlab.attention, where the kernel applies."""
    q, k, v = moba_inputs(64)
    with torch.no_grad(), pytest.raises(AttnInputError, match=rf"^{argument}: expected"):
        attnlab.attention(q, k, v, mechanism=name, causal=True, **config)
