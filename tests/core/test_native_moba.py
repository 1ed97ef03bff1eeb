"""The compiled MoBA kernel (csrc/moba.c; Lu et al., arXiv:2502.13189) against the PyTorch
path of the mechanism and the dense float64 reference of the same block selection."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.core import native
from attnlab.core.reference import reference_attention
from attnlab.mechanisms.sparse.moba import moba_select

from .test_native import (  # noqa: F401 (kernel_variant: the fixture these tests use)
    assert_as_accurate_as_the_twin,
    kernel_variant,
    needs_library,
)

pytestmark = pytest.mark.usefixtures("kernel_variant")


def selection_mask(sel: torch.Tensor, block: int, nk: int) -> torch.Tensor:
    """Bool [B, H, Nq, Nk]: the keys of each query's chosen blocks (-1: an empty slot)."""
    nkb = -(-nk // block)
    chosen = torch.zeros(*sel.shape[:3], nkb + 1, dtype=torch.bool)
    chosen.scatter_(-1, torch.where(sel >= 0, sel, nkb), True)
    return chosen[..., torch.arange(nk) // block]


# (B, Hq, Hkv, Nq, Nk, D, Dv, block, top_k)
SHAPES = {
    "whole-blocks": (1, 2, 2, 64, 64, 16, 16, 16, 3),
    "gqa": (2, 4, 2, 70, 70, 32, 16, 16, 2),
    "block-not-16-odd-d": (1, 2, 1, 100, 100, 8, 32, 7, 4),
    "partial-last-block": (1, 3, 3, 83, 83, 16, 16, 20, 3),
    "top-k-beyond-the-past": (1, 2, 2, 48, 48, 16, 16, 16, 9),
    "fewer-queries": (1, 2, 2, 50, 80, 16, 16, 12, 3),
    "more-queries": (1, 2, 2, 80, 50, 16, 16, 12, 3),
    "one-block": (1, 2, 2, 30, 30, 16, 16, 64, 3),
    "top-1": (1, 2, 2, 40, 40, 16, 16, 8, 1),
    "long-tiles": (1, 2, 1, 600, 600, 16, 16, 32, 4),
    "one-head": (1, 1, 1, 90, 90, 16, 16, 16, 3),
}


@needs_library
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_moba_kernel_equals_the_torch_path_and_the_dense_reference(shape, causal):
    """As accurate as the mechanism's plain-PyTorch form, both against float64 softmax
    attention over the keys moba_select chooses: causal and not, GQA, lengths that are not
    a multiple of the block, blocks that are not a multiple of 16, top_k beyond the number
    of eligible blocks, more or fewer queries than keys (bottom-right aligned)."""
    b, hq, hkv, nq, nk, d, dv, block, top_k = shape
    gen = torch.Generator().manual_seed(nq * 31 + nk + block)
    q = torch.randn(b, hq, nq, d, generator=gen)
    k = torch.randn(b, hkv, nk, d, generator=gen)
    v = torch.randn(b, hkv, nk, dv, generator=gen)
    scale = d**-0.5
    assert native.moba_applies(q, k, v, mask=None)
    got = native.moba(q, k, v, block=block, top_k=top_k, causal=causal, scale=scale)
    assert got.shape == (b, hq, nq, dv) and got.dtype == torch.float32
    sel = moba_select(q, k, block=block, top_k=top_k, causal=causal)
    allowed = selection_mask(sel, block, nk)
    exact = reference_attention(q, k, v, causal=causal, mask=allowed, scale=scale)
    mech = attnlab.get("moba", block=block, top_k=top_k, backend="torch")
    with torch.no_grad():
        twin = mech(q, k, v, causal=causal, scale=scale)
    assert_as_accurate_as_the_twin(got, twin, exact)


@needs_library
@pytest.mark.parametrize("causal", [False, True])
def test_moba_kernel_is_the_same_on_any_number_of_threads(causal):
    """Heads that do not divide among the threads are split into query ranges: the same
    output on 1, 2, 3 and 4 threads (5 heads, 1 to 4 ranges each)."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(1, 5, 90, 16, generator=gen)
    k, v = (torch.randn(1, 5, 90, 16, generator=gen) for _ in "kv")
    outs = [
        native.moba(q, k, v, block=8, top_k=3, causal=causal, scale=0.25, threads=t)
        for t in (1, 2, 3, 4)
    ]
    for got in outs[1:]:
        assert torch.equal(got, outs[0])


@needs_library
def test_moba_kernel_rows_that_see_nothing_are_zero():
    """Causal with more queries than keys: the first queries precede every key."""
    q, k, v = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    got = native.moba(q, k, v, block=4, top_k=2, causal=True, scale=0.25)
    assert torch.equal(got[:, :, :8], torch.zeros(1, 2, 8, 16))
    assert got[:, :, 8:].abs().sum() > 0


@needs_library
def test_moba_applies_only_where_the_kernel_is_the_same_sum():
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    assert native.moba_applies(q, k, v, mask=None) == native.enabled()
    assert not native.moba_applies(q, k, v, mask=torch.ones(1, 1, 32, 32, dtype=torch.bool))
    assert not native.moba_applies(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask=None)
    assert not native.moba_applies(q.double(), k.double(), v.double(), mask=None)
    assert not native.moba_applies(q, k, v[..., :8], mask=None)  # Dv not a multiple of 16
    grad_q = q.clone().requires_grad_()
    assert not native.moba_applies(grad_q, k, v, mask=None)
    with torch.no_grad():
        assert native.moba_applies(grad_q, k, v, mask=None) == native.enabled()
    with native.disabled():
        assert not native.moba_applies(q, k, v, mask=None)


@pytest.mark.parametrize("causal", [False, True])
def test_moba_gives_the_same_output_with_and_without_the_kernel(causal):
    """The mechanism's inference path ("auto") routes to the kernel: as accurate as its
    PyTorch tiled path; with gradients it keeps the trainable path."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 128, 32, generator=gen)
    k, v = (torch.randn(1, 2, 128, 32, generator=gen) for _ in "kv")
    mech = attnlab.get("moba", block=16, top_k=3)
    scale = q.shape[-1] ** -0.5
    allowed = selection_mask(moba_select(q, k, block=16, top_k=3, causal=causal), 16, 128)
    exact = reference_attention(q, k, v, causal=causal, mask=allowed, scale=scale)
    with torch.no_grad():
        got = mech(q, k, v, causal=causal)
        with native.disabled():
            twin = mech(q, k, v, causal=causal)
    assert_as_accurate_as_the_twin(got, twin, exact)
    grad_q = q.clone().requires_grad_()
    out = mech(grad_q, k, v, causal=causal)
    assert out.grad_fn is not None
    torch.testing.assert_close(out.detach(), twin)  # the same PyTorch sums


@needs_library
def test_moba_kernel_breaks_gate_ties_by_the_lower_block_and_survives_nan():
    """Blocks 0-2 have equal keys (equal gates, the highest): each query of the last block
    takes block 0 besides its own. A NaN query (no gate is the largest) leaves the others
    intact."""
    block, n = 4, 24
    q = torch.ones(1, 1, n, 16)
    k = torch.full((1, 1, n, 16), -1.0)
    k[:, :, : 3 * block] = 1.0
    v = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 1, n, 16).contiguous()
    got = native.moba(q, k, v, block=block, top_k=2, causal=True, scale=0.25)
    allowed = torch.zeros(1, 1, n, n, dtype=torch.bool)
    allowed[..., 20:, :4] = True
    allowed[..., 20:, 20:] = True
    exact = reference_attention(q, k, v, causal=True, mask=allowed, scale=0.25)
    visible = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2) * 0.25).masked_fill(~visible, float("-inf"))
    twin = torch.softmax(scores, dim=-1) @ v  # eager float32 attention over the same keys
    assert_as_accurate_as_the_twin(got[..., 20:, :], twin[..., 20:, :], exact[..., 20:, :])
    q[0, 0, 21] = float("nan")
    got = native.moba(q, k, v, block=block, top_k=2, causal=True, scale=0.25)
    assert_as_accurate_as_the_twin(got[..., 22:, :], twin[..., 22:, :], exact[..., 22:, :])
