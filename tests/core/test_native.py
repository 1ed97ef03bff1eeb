"""The compiled CPU kernels (csrc/, attnlab.core.native) against their PyTorch twins."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.core import native, scan


def test_library_is_built_where_a_compiler_is():
    """`make` builds the kernels whenever a C compiler is on PATH (as on CI)."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        assert native.library() is None or native.LIBRARY_PATH.exists()
        return
    assert native.library() is not None, f"run `make native`: {native.LIBRARY_PATH} is missing"
    assert native.enabled()


def test_disabled_turns_the_kernels_off():
    with native.disabled():
        assert not native.enabled()
    assert native.enabled() == (native.library() is not None)


_MAPS = {
    "identity": lambda x, *, query: x,
    "elu1": lambda x, *, query: F.elu(x) + 1.0,
    "silu": lambda x, *, query: F.silu(x),
}


@pytest.mark.skipif(native.library() is None, reason="no C compiler: nothing compiled to test")
@pytest.mark.parametrize("feature", list(_MAPS))
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(
    "shape",
    [(1, 2, 1, 70, 16, 32, 16), (2, 1, 3, 40, 32, 16, 5), (1, 2, 2, 7, 16, 16, 64)],
    ids=["pad-last-chunk", "gqa-odd-chunk", "shorter-than-a-chunk"],
)
def test_scan_kernel_equals_the_torch_scan(feature, decay, normalize, shape):
    """Same output and final state as `_scan_blocks`, with an entering state: every
    feature map, with and without a constant decay or a normaliser, GQA, a padded last
    chunk, chunks that are not a multiple of 16 and sequences shorter than a chunk."""
    b, h, g, n, f, dv, chunk = shape
    gen = torch.Generator().manual_seed(n + f)
    q = torch.randn(b, h, g, n, f, generator=gen)
    k = torch.randn(b, h, n, f, generator=gen)
    if normalize and feature != "elu1":  # positive features: normalisers stay away from 0
        q, k = q.abs(), k.abs()
    v = torch.randn(b, h, n, dv, generator=gen)
    s = torch.rand(b, h, f, dv, generator=gen)
    z = torch.rand(b, h, f, generator=gen) + 1.0 if normalize else None
    log_decay = -torch.rand(1, h, 1, generator=gen) * 0.5 if decay else None
    assert native.scan_applies((q, k, v, s, z, log_decay), feature=feature, chunk=chunk)
    got, got_s, got_z = native.causal_scan(
        q, k, v, s, z, chunk=chunk, feature=feature, log_decay=log_decay
    )
    want, want_s, want_z = scan._scan_blocks(
        q, k, v, s, z, chunk=chunk, feature_map=_MAPS[feature], log_decay=log_decay
    )
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got_s, want_s, rtol=2e-5, atol=2e-5)
    if normalize:
        torch.testing.assert_close(got_z, want_z, rtol=2e-5, atol=2e-5)
    assert s.abs().sum() > 0 and torch.equal(s, s)  # the caller's state is not written


@pytest.mark.skipif(native.library() is None, reason="no C compiler: nothing compiled to test")
def test_scan_kernel_exp_is_accurate_over_float32s_range():
    """elu+1 and silu go through the kernel's own exp: with zero keys and values and the
    identity as entering state, the unnormalised scan returns phi(q) itself."""
    x = torch.linspace(-100.0, 100.0, 16 * 64).reshape(1, 1, 1, 64, 16)
    zeros = torch.zeros(1, 1, 64, 16)
    state = torch.eye(16).reshape(1, 1, 16, 16)
    x64 = x.double()
    want = {"elu1": torch.where(x64 > 0, x64 + 1.0, x64.exp()), "silu": F.silu(x64)}
    for feature, phi in want.items():
        got, _, _ = native.causal_scan(
            x, zeros, zeros, state, None, chunk=64, feature=feature, log_decay=None
        )
        torch.testing.assert_close(got.double(), phi, rtol=3e-6, atol=1e-36)


@pytest.mark.skipif(native.library() is None, reason="no C compiler: nothing compiled to test")
def test_scan_applies_only_where_the_kernel_is_the_same_sum():
    q, k, v = (torch.randn(1, 2, 1, 8, 16) for _ in range(3))
    k, v = k[:, :, 0], v[:, :, 0]
    inputs = (q, k, v, None, None, None)
    expected = native.enabled()
    assert native.scan_applies(inputs, feature="elu1", chunk=64) == expected
    assert not native.scan_applies(inputs, feature=None, chunk=64)  # an unknown feature map
    assert not native.scan_applies(inputs, feature="elu1", chunk=512)
    assert not native.scan_applies((q.double(), k, v, None, None, None), feature="elu1", chunk=8)
    assert not native.scan_applies(
        (q[..., :8], k[..., :8], v, None, None, None), feature="elu1", chunk=8
    )
    step_decay = -torch.rand(1, 2, 8)
    assert not native.scan_applies((q, k, v, None, None, step_decay), feature="elu1", chunk=8)
    grad_q = q.clone().requires_grad_()
    assert not native.scan_applies((grad_q, k, v, None, None, None), feature="elu1", chunk=8)
    with torch.no_grad():
        assert (
            native.scan_applies((grad_q, k, v, None, None, None), feature="elu1", chunk=8)
            == expected
        )


@pytest.mark.parametrize(
    "name,config", [("linear", {}), ("lightning", {}), ("lightning", {"feature": "identity"})]
)
def test_mechanisms_give_the_same_output_with_and_without_the_kernels(name, config):
    """The mechanisms that route their chunked causal form to the kernel: same output."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 150, 32, generator=gen)
    k = torch.randn(1, 2, 150, 32, generator=gen)
    v = torch.randn(1, 2, 150, 16, generator=gen)
    mech = attnlab.get(name, **config)
    with torch.no_grad():
        got = mech(q, k, v, causal=True)
        with native.disabled():
            want = mech(q, k, v, causal=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(native.library() is None, reason="no C compiler: nothing compiled to test")
@pytest.mark.parametrize("name", ["linear", "lightning"])
def test_kernel_is_stable_at_65536_tokens(name):
    """No overflow in the normaliser or the decayed state over 65536 tokens (tiny D)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 65536, 16, generator=gen) * 3 for _ in range(3))
    mech = attnlab.get(name)
    with torch.no_grad():
        got = mech(q, k, v, causal=True)
        with native.disabled():
            want = mech(q, k, v, causal=True)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
