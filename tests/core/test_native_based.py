"""The compiled Based kernel (csrc/based.c, attnlab.core.native.based) against its PyTorch
twin, Based's chunked form, and the dense definition (Arora et al., arXiv:2402.18668)."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.core import native

from .test_native import (  # noqa: F401 (kernel_variant: the fixture these tests use)
    assert_as_accurate_as_the_twin,
    kernel_variant,
    needs_library,
)

pytestmark = [needs_library, pytest.mark.usefixtures("kernel_variant")]


def _inputs(b, hq, hk, n, d, dv, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=gen)
    k = torch.randn(b, hk, n, d, generator=gen)
    v = torch.randn(b, hk, n, dv, generator=gen)
    return q, k, v


@pytest.mark.parametrize(
    "shape,config",
    [
        ((1, 2, 2, 150, 64, 64), {}),  # the default window 64, d' = 16, C = 64: padded end
        ((2, 4, 2, 37, 8, 16), {"window": 4, "feature_dim": 4, "chunk": 16}),  # GQA
        ((1, 2, 1, 70, 16, 32), {"window": 17, "feature_dim": None, "chunk": 32}),  # d' = D
        ((1, 3, 3, 10, 16, 16), {"window": 64, "chunk": 64}),  # N shorter than the window
        ((1, 1, 1, 90, 32, 16), {"window": 1, "feature_dim": 5, "chunk": 16}),  # only Taylor
        ((1, 2, 2, 130, 24, 16), {"window": 40, "feature_dim": 7, "chunk": 48}),  # halo > C
        ((1, 1, 1, 40, 8, 16), {"window": 2, "feature_dim": 3, "chunk": 256}),  # one chunk
    ],
    ids=["default", "gqa-pad", "full-dim", "short", "window-1", "long-halo", "big-chunk"],
)
def test_based_kernel_equals_the_torch_chunked_form_and_the_definition(shape, config):
    """As accurate as the PyTorch chunked form, both against that form in float64, which
    equals the dense weights (exact softmax in the window, Taylor beyond it): over windows,
    feature dims and chunks the kernel takes."""
    q, k, v = _inputs(*shape)
    mech = attnlab.get("based", **config)
    chunk = config.get("chunk", 64)
    assert native.based_applies(q, k, v, chunk=chunk)
    got = mech(q, k, v, causal=True)
    with native.disabled():
        twin = mech(q, k, v, causal=True)
        exact = mech(q.double(), k.double(), v.double(), causal=True)
    assert_as_accurate_as_the_twin(got, twin, exact)
    scale = q.shape[-1] ** -0.5
    dense = mech.reference(q.double(), k.double(), v.double(), causal=True, mask=None, scale=scale)
    torch.testing.assert_close(exact, dense, rtol=1e-10, atol=1e-12)


def test_based_kernel_large_scores_do_not_overflow():
    """Scores far beyond exp's range: every weight is relative to the window's largest."""
    q, k, v = _inputs(1, 2, 2, 100, 16, 16, seed=1)
    q, k = q * 6.0, k * 6.0  # scores up to ~150: e^150 overflows float32
    mech = attnlab.get("based", window=8, feature_dim=4, chunk=16)
    got = mech(q, k, v, causal=True)
    assert torch.isfinite(got).all()
    with native.disabled():
        twin = mech(q, k, v, causal=True)
        exact = mech(q.double(), k.double(), v.double(), causal=True)
    assert_as_accurate_as_the_twin(got, twin, exact)


def test_based_kernel_applies_only_where_it_is_the_same_sum():
    q, k, v = _inputs(1, 2, 2, 20, 16, 16)
    expected = native.enabled()
    assert native.based_applies(q, k, v, chunk=64) == expected
    assert not native.based_applies(q, k, v, chunk=5)  # not whole vectors of tokens
    assert not native.based_applies(q, k, v, chunk=512)
    assert not native.based_applies(q, k, v[..., :8], chunk=64)  # Dv not a multiple of 16
    assert not native.based_applies(q.bfloat16(), k.bfloat16(), v.bfloat16(), chunk=64)
    assert not native.based_applies(q.double(), k.double(), v.double(), chunk=64)
    grad_q = q.clone().requires_grad_()
    assert not native.based_applies(grad_q, k, v, chunk=64)
    with torch.no_grad():
        assert native.based_applies(grad_q, k, v, chunk=64) == expected
    with native.disabled():
        assert not native.based_applies(q, k, v, chunk=64)


def test_based_with_autograd_takes_the_torch_path():
    """Gradients flow (through the PyTorch form); the kernel's values are as accurate."""
    q, k, v = _inputs(1, 2, 2, 40, 16, 16, seed=2)
    mech = attnlab.get("based", window=8, feature_dim=4, chunk=16)
    grad_q = q.clone().requires_grad_()
    out = mech(grad_q, k, v, causal=True)
    out.sum().backward()
    assert grad_q.grad is not None and torch.isfinite(grad_q.grad).all()
    with native.disabled():
        exact = mech(q.double(), k.double(), v.double(), causal=True)
    assert_as_accurate_as_the_twin(mech(q, k, v, causal=True), out.detach(), exact)
