"""The compiled CPU kernels (csrc/, attnlab.core.native) against their PyTorch twins, on
every variant (instruction set) that was built and that this processor runs.

Accuracy is never a fixed float32 tolerance between a kernel and its twin (sums in another
order differ by more on some processors than on others): both are compared with a float64
computation of the same sums, and the kernel may be at most a small multiple of its twin's
own error away from it (:func:`assert_as_accurate_as_the_twin`, used by every kernel test).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.core import native, scan

NOTHING_BUILT = "no C compiler: nothing compiled to test"
needs_library = pytest.mark.skipif(not native.describe()["built"], reason=NOTHING_BUILT)


@pytest.fixture(params=native.variants() or [None], ids=lambda isa: isa or "no-kernels")
def kernel_variant(request):
    """Runs a test once per built variant this processor runs, with that variant's
    library active (none where nothing is built: the test skips or needs none)."""
    if request.param is None:
        yield None
        return
    with native.use_variant(request.param):
        assert native.describe()["isa"] == request.param
        yield request.param


def assert_as_accurate_as_the_twin(
    got: torch.Tensor, twin: torch.Tensor, exact: torch.Tensor, *, what: str = "out"
) -> None:
    """The kernel's float32 result ``got`` is as accurate as its PyTorch twin's float32
    result ``twin``: measured against ``exact``, a float64 computation of the same sums,
    the kernel's largest error is at most 4 times the twin's, plus a floor of 8 float32
    rounding steps of the largest exact value (for a twin that happens to be exact)."""
    assert got.shape == twin.shape == exact.shape, (got.shape, twin.shape, exact.shape)
    assert got.dtype == twin.dtype == torch.float32 and exact.dtype == torch.float64
    kernel_error = (got.double() - exact).abs().max().item()
    twin_error = (twin.double() - exact).abs().max().item()
    floor = 8 * torch.finfo(torch.float32).eps * exact.abs().max().item()
    allowed = 4 * twin_error + floor
    assert kernel_error <= allowed, (
        f"{what}: the kernel is {kernel_error:.3g} from float64, its twin {twin_error:.3g}; "
        f"allowed 4 x twin + {floor:.3g} = {allowed:.3g}"
    )


def test_library_is_built_where_a_compiler_is():
    """`make` builds the kernels whenever a C compiler is on PATH (as on CI), and the best
    variant this processor runs is the one loaded."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        assert native.library() is None or native.describe()["built"]
        return
    assert native.variants(), f"run `make native`: nothing in {native.LIBRARY_DIR} runs here"
    assert native.library() is not None, native.summary()
    assert native.enabled()
    assert native.describe()["isa"] == native.variants()[0]


def test_disabled_turns_the_kernels_off():
    with native.disabled():
        assert not native.enabled()
        assert native.describe()["isa"] is None
    assert native.enabled() == (native.library() is not None)


_MAPS = {
    "identity": lambda x, *, query: x,
    "elu1": lambda x, *, query: F.elu(x) + 1.0,
    "silu": lambda x, *, query: F.silu(x),
}


@needs_library
@pytest.mark.usefixtures("kernel_variant")
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
    s_before = s.clone()
    assert native.scan_applies((q, k, v, s, z, log_decay), feature=feature, chunk=chunk)
    got, got_s, got_z = native.causal_scan(
        q, k, v, s, z, chunk=chunk, feature=feature, log_decay=log_decay
    )
    twin = scan._scan_blocks(
        q, k, v, s, z, chunk=chunk, feature_map=_MAPS[feature], log_decay=log_decay
    )
    exact = scan._scan_blocks(
        *(None if t is None else t.double() for t in (q, k, v, s, z)),
        chunk=chunk,
        feature_map=_MAPS[feature],
        log_decay=None if log_decay is None else log_decay.double(),
    )
    assert_as_accurate_as_the_twin(got, twin[0], exact[0], what="out")
    assert_as_accurate_as_the_twin(got_s, twin[1], exact[1], what="s")
    if normalize:
        assert_as_accurate_as_the_twin(got_z, twin[2], exact[2], what="z")
    else:
        assert got_z is None
    assert torch.equal(s, s_before)  # the caller's state is not written


@needs_library
@pytest.mark.usefixtures("kernel_variant")
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


@needs_library
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


@pytest.mark.usefixtures("kernel_variant")
@pytest.mark.parametrize(
    "name,config", [("linear", {}), ("lightning", {}), ("lightning", {"feature": "identity"})]
)
def test_mechanisms_give_the_same_output_with_and_without_the_kernels(name, config):
    """The mechanisms that route their chunked causal form to the kernel: as accurate as
    their PyTorch path, against the same path in float64."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 150, 32, generator=gen)
    k = torch.randn(1, 2, 150, 32, generator=gen)
    v = torch.randn(1, 2, 150, 16, generator=gen)
    mech = attnlab.get(name, **config)
    with torch.no_grad():
        got = mech(q, k, v, causal=True)
        with native.disabled():
            twin = mech(q, k, v, causal=True)
            exact = mech(q.double(), k.double(), v.double(), causal=True)
    assert_as_accurate_as_the_twin(got, twin, exact)


@needs_library
@pytest.mark.usefixtures("kernel_variant")
@pytest.mark.parametrize("name", ["linear", "lightning"])
def test_kernel_is_stable_at_65536_tokens(name):
    """No overflow in the normaliser or the decayed state over 65536 tokens (tiny D)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 65536, 16, generator=gen) * 3 for _ in range(3))
    mech = attnlab.get(name)
    with torch.no_grad():
        got = mech(q, k, v, causal=True)
        with native.disabled():
            twin = mech(q, k, v, causal=True)
            exact = mech(q.double(), k.double(), v.double(), causal=True)
    assert torch.isfinite(got).all()
    assert_as_accurate_as_the_twin(got, twin, exact)
