"""The linear family beyond the contract: shared scan kernels, long-N stability, random
features, the limits where a mechanism meets softmax, and the scaling/quality benches."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.bench import decode, quality, scaling
from attnlab.core.reference import reference_attention
from attnlab.core.scan import (
    CHUNK_TABLE,
    COMPILED_CHUNK_TABLE,
    causal_scan,
    choose_chunk,
    linear_attention,
)

# --- the shared kernels ---------------------------------------------------------------------


def _features(b=2, hq=4, hk=2, n=37, f=5, dv=3):
    fq = torch.rand(b, hq, n, f, dtype=torch.float64)
    fk = torch.rand(b, hk, n, f, dtype=torch.float64)
    v = torch.randn(b, hk, n, dv, dtype=torch.float64)
    return fq, fk, v


@pytest.mark.parametrize("heads", [(4, 2), (2, 2)], ids=["gqa", "mha"])
@pytest.mark.parametrize("decay", [None, "step", "constant"])
@pytest.mark.parametrize("normalize", [True, False])
def test_scan_forms_agree(heads, decay, normalize, monkeypatch):
    """Chunked (any chunk, several blocks) and recurrent equal the masked parallel form."""
    hq, hk = heads
    fq, fk, v = _features(hq=hq, hk=hk)
    n = fq.shape[2]
    log_decay = {
        None: None,
        "step": -torch.rand(1, hq, n, dtype=torch.float64),
        "constant": -torch.rand(1, hq, 1, dtype=torch.float64),
    }[decay]
    want = linear_attention(
        fq, fk, v, causal=True, form="parallel", log_decay=log_decay, normalize=normalize
    )
    monkeypatch.setattr("attnlab.core.scan._BLOCK_ELEMENTS", 300)  # many blocks
    for form, chunk in [("recurrent", None), ("chunked", 1), ("chunked", 4), ("chunked", 64)]:
        for m in (fq, fq[..., :32, :]):  # 37 pads the last chunk, 32 does not
            nn = m.shape[2]
            ld = None if log_decay is None else log_decay[..., : min(nn, log_decay.shape[-1])]
            got = linear_attention(
                m,
                fk[..., :nn, :],
                v[..., :nn, :],
                causal=True,
                form=form,
                chunk=chunk,
                log_decay=ld,
                normalize=normalize,
            )
            ref = (
                want
                if nn == n
                else linear_attention(
                    m,
                    fk[..., :nn, :],
                    v[..., :nn, :],
                    causal=True,
                    form="parallel",
                    log_decay=ld,
                    normalize=normalize,
                )
            )
            torch.testing.assert_close(got, ref)


@pytest.mark.parametrize(("nq", "nk", "offset"), [(13, 29, None), (29, 13, None), (20, 20, -6)])
def test_scan_offsets(nq, nk, offset):
    """Bottom-right alignment (and any shift: based's window uses offset=-W) in every form."""
    fq, fk, v = _features(n=max(nq, nk))
    fq, fk, v = fq[..., :nq, :], fk[..., :nk, :], v[..., :nk, :]
    want = linear_attention(fq, fk, v, causal=True, form="parallel", offset=offset)
    for form in ("chunked", "recurrent"):
        got = linear_attention(fq, fk, v, causal=True, form=form, chunk=4, offset=offset)
        torch.testing.assert_close(got, want)


def test_scan_state_continues():
    """A scan resumed from its own state equals one pass over the whole sequence."""
    fq, fk, v = _features()
    full, _ = causal_scan(fq, fk, v, chunk=4)
    first, state = causal_scan(fq[..., :20, :], fk[..., :20, :], v[..., :20, :], chunk=4)
    rest, _ = causal_scan(
        fq[..., 20:, :], fk[..., 20:, :], v[..., 20:, :], state=state, form="recurrent"
    )
    torch.testing.assert_close(torch.cat([first, rest], dim=2), full)


def test_choose_chunk():
    """The chooser follows the measured table by N, is never above N and covers every N."""
    for max_n, chunk in CHUNK_TABLE:
        assert choose_chunk(min(max_n, 1 << 40)) == min(chunk, max_n)
    assert choose_chunk(1 << 16) == CHUNK_TABLE[-1][1]
    assert choose_chunk(10) == 10
    assert choose_chunk(1) == 1
    assert all(c > 0 for _, c in CHUNK_TABLE)
    assert [n for n, _ in CHUNK_TABLE] == sorted(n for n, _ in CHUNK_TABLE)
    for max_n, chunk in COMPILED_CHUNK_TABLE:
        assert choose_chunk(min(max_n, 1 << 40), compiled=True) == min(chunk, max_n)
    assert choose_chunk(10, compiled=True) == 10


# --- stability at long N --------------------------------------------------------------------

LONG = {
    "linear": {},
    "lightning": {},
    "based": {"feature_dim": None, "window": 16},
    "performer": {"features": 16},
    "flow": {},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(LONG))
def test_long_sequence_is_stable(name, dtype):
    """N = 65536, D = 2: finite, and equal to the float64 computation of the same inputs."""
    gen = torch.Generator().manual_seed(1)
    n, d = 65536, 2
    q, k, v = (torch.randn(1, 1, n, d, generator=gen) * 3 for _ in range(3))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    mech = attnlab.get(name, **LONG[name])
    out = mech(q, k, v, causal=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    want = mech(q.double(), k.double(), v.double(), causal=True)
    tol = {torch.float32: 2e-3, torch.bfloat16: 2e-2}[dtype]
    err = (out.double() - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), err


# --- Performer's random features ------------------------------------------------------------


def test_performer_features_fixed_until_redraw():
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    mech = attnlab.get("performer", features=32)
    first = mech(q, k, v)
    torch.testing.assert_close(mech(q, k, v), first, rtol=0, atol=0)
    torch.testing.assert_close(attnlab.get("performer", features=32)(q, k, v), first)
    assert not torch.allclose(attnlab.get("performer", features=32, seed=1)(q, k, v), first)
    mech.redraw_features()
    redrawn = mech(q, k, v)
    assert not torch.allclose(redrawn, first)
    twin = attnlab.get("performer", features=32)
    twin.load_state_dict(mech.state_dict())  # the state dict carries the redraw
    torch.testing.assert_close(twin(q, k, v), redrawn)


def test_performer_rows_are_orthogonal():
    w = attnlab.get("performer", features=16).projection(8)
    block = w[:8] / w[:8].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(8), atol=1e-5, rtol=0)


def test_performer_approximates_softmax():
    """FAVOR+ is an unbiased estimator of exp(q·k·scale): with many features it nears softmax."""
    q, k, v = (torch.randn(1, 2, 32, 4) * 0.5 for _ in range(3))
    out = attnlab.get("performer", features=4096)(q, k, v)
    ref = reference_attention(q, k, v)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 0.05


# --- limits and definitions -----------------------------------------------------------------


def test_based_with_window_over_everything_is_softmax():
    q, k, v = (torch.randn(2, 4, 20, 8) for _ in range(3))
    for form in ("chunked", "parallel", "recurrent"):
        out = attnlab.get("based", window=20, form=form, chunk=6)(q, k, v, causal=True)
        want = reference_attention(q, k, v, causal=True)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


def _based_matches_reference(q, k, v, **config):
    """based's chunked output equals its dense definition (``reference``) on these inputs."""
    mech = attnlab.get("based", **config)
    want = mech.reference(q.detach(), k, v, causal=True, mask=None, scale=q.shape[-1] ** -0.5)
    torch.testing.assert_close(mech(q, k, v, causal=True), want)


def _qkv(gen, batch, heads, kv_heads, n, dv, grad):
    """float64 q [B, H, N, 8] (requiring grad if asked), k [B, Hkv, N, 8], v [B, Hkv, N, Dv]."""
    q = torch.randn(batch, heads, n, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, n, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, n, dv, generator=gen, dtype=torch.float64)
    return q.requires_grad_(grad), k, v


@pytest.mark.parametrize("window,chunk", [(6, 4), (3, 8), (1, 5), (16, 16)])
@pytest.mark.parametrize("grad", [False, True], ids=["fused", "autograd"])
def test_based_chunked_blocks_equal_parallel(window, chunk, grad, monkeypatch):
    """Many blocks, lags reaching back several chunks, a padded last chunk, GQA, D != Dv
    (the plain window) and D == Dv (the fused window without autograd)."""
    monkeypatch.setattr("attnlab.core.scan._BLOCK_ELEMENTS", 300)
    gen = torch.Generator().manual_seed(0)
    for dv in (8, 5):
        q, k, v = _qkv(gen, 2, 4, 2, 37, dv, grad)
        _based_matches_reference(q, k, v, window=window, chunk=chunk, feature_dim=4)


@pytest.mark.parametrize("window,chunk", [(6, 4), (3, 8), (16, 16)])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "autograd"])
def test_based_rows_together_equal_parallel(window, chunk, grad):
    """A short sequence goes several (batch, kv head) rows in one block, each row's halo the
    previous row's end (masked as no keys): GQA, a padded last chunk, D == Dv and D != Dv."""
    gen = torch.Generator().manual_seed(1)
    for dv in (8, 5):
        q, k, v = _qkv(gen, 3, 4, 2, 21, dv, grad)
        _based_matches_reference(q, k, v, window=window, chunk=chunk, feature_dim=5)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "autograd"])
def test_based_many_chunks_equal_parallel(batch, grad):
    """More chunks in a block than one triangular product sums (the state's prefix sums go
    in groups): one row a block (in place) and two rows (copied)."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = _qkv(gen, batch, 2, 1, 45, 8, grad)
    _based_matches_reference(q, k, v, window=3, chunk=2, feature_dim=4)


def test_based_strided_inputs(monkeypatch):
    """Queries, keys and values that are slices of one packed tensor (row stride 3·D), in
    blocks of tokens (the keys of a block are then not a plain view)."""
    monkeypatch.setattr("attnlab.core.scan._BLOCK_ELEMENTS", 300)
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(1, 2, 29, 24, generator=gen, dtype=torch.float64)
    q, k, v = qkv.split(8, dim=-1)
    _based_matches_reference(q, k, v, window=5, chunk=3, feature_dim=4)


def test_based_taylor_kernel():
    from attnlab.mechanisms.linear.based import taylor_features

    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    s = (x * y).sum(-1)
    torch.testing.assert_close((taylor_features(x) * taylor_features(y)).sum(-1), 1 + s + s * s / 2)


def test_lightning_is_the_decayed_masked_product():
    """[(Q Kᵀ) ⊙ M] V, M_ij = lambda_h^(i-j), written out densely here."""
    from attnlab.mechanisms.linear.lightning import decay_slopes

    q, k, v = (torch.randn(1, 4, 19, 8, dtype=torch.float64) for _ in range(3))
    mech = attnlab.get("lightning", feature="identity", norm=False, chunk=5)
    i = torch.arange(19.0, dtype=torch.float64)
    gap = (i[:, None] - i[None, :]).clamp_min(0)
    lam = torch.exp(-decay_slopes(4, dtype=torch.float64))[:, None, None]
    m = lam**gap * (gap.new_ones(19, 19).tril())
    want = ((q @ k.transpose(-1, -2)) * m) @ v
    torch.testing.assert_close(mech(q, k, v, causal=True), want)


def test_linear_key_padding_uses_the_fast_path():
    """A key-padding mask in the chunked form equals the masked parallel form."""
    q, k, v = (torch.randn(2, 4, 24, 8) for _ in range(3))
    keep = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    keep[1, ..., 18:] = False
    for causal in (False, True):
        fast = attnlab.get("linear", chunk=5)(q, k, v, causal=causal, mask=keep)
        dense = attnlab.get("linear", form="parallel")(q, k, v, causal=causal, mask=keep)
        torch.testing.assert_close(fast, dense)


@pytest.mark.parametrize("name", ["linear", "lightning", "based", "performer", "flow"])
def test_state_does_not_grow(name):
    mech = attnlab.get(name)
    sizes = {
        mech.state_size(n, q_heads=8, kv_heads=8, head_dim=64, value_dim=64)
        for n in (1024, 16384, 65536)
    }
    assert len(sizes) == 1


@pytest.mark.parametrize("name", ["efficient", "agent", "lightning", "based"])
def test_one_sided_mechanisms_say_why(name):
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    causal = not attnlab.spec(name).causal
    with pytest.raises(attnlab.AttnInputError, match=r"causal: .*(paper|causal)"):
        attnlab.get(name)(q, k, v, causal=causal)


# --- the benches ----------------------------------------------------------------------------


def test_fit_exponent_and_crossover():
    ns = [1024, 2048, 4096]
    assert scaling.fit_exponent(ns, [1.0, 2.0, 4.0]) == pytest.approx(1.0)
    assert scaling.fit_exponent(ns, [1.0, 4.0, 16.0]) == pytest.approx(2.0)
    assert scaling._crossover(ns, [0.5, 1.5, 3.0])[0] == 2048
    assert scaling._crossover(ns, [2.0, 0.9, 3.0])[0] == 4096
    assert scaling._crossover(ns, [0.5, 0.6, 0.9])[0] is None


def test_bench_scaling_and_decode_run(monkeypatch):
    from attnlab.bench import memory

    steady = []  # every timing loop first puts the allocator in its steady state
    monkeypatch.setattr(memory, "reuse_freed_blocks", lambda: steady.append(True))
    res = scaling.run_scaling(
        ["linear"], [64, 128], sdpa_max=128, heads=2, head_dim=8, repeats=1, fit_range=(64, 128)
    )
    assert res[0].ms[0] > 0 and res[0].speedup[1] is not None and res[0].exponent is not None
    assert len(steady) == 2  # one timing loop per N
    dec = decode.run_decode(["linear", "softmax"], [8, 32], heads=2, head_dim=8, repeats=2)
    assert dec[0].state_floats[0] == dec[0].state_floats[1]
    assert dec[1].state_floats[1] > dec[1].state_floats[0]


def test_bench_quality_random_and_file(tmp_path):
    from safetensors.torch import save_file

    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    path = tmp_path / "qkv.safetensors"
    save_file({"layer0.q": q, "layer0.k": k, "layer0.v": v, "other": q.clone()}, str(path))
    inputs = quality.load_qkv(path)
    assert list(inputs) == ["layer0"]
    recs = quality.run_quality(inputs, ["linear", "efficient", "performer"])
    by = {(r.mechanism, r.causal): r for r in recs}
    assert by[("efficient", True)].skipped and "causal" in by[("efficient", True)].skipped
    assert 0 < by[("linear", False)].rel_error < 2 and by[("linear", True)].state_floats > 0
    assert by[("efficient", False)].state_floats is None
    default = quality.run_quality(
        quality.random_qkv(16, heads=2, kv_heads=2, head_dim=8), causal_modes=(True,)
    )
    assert {r.mechanism for r in default} == set(attnlab.mechanisms(exact=False))
    with pytest.raises(attnlab.AttnInputError, match="qk:"):
        save_file({"x": q}, str(tmp_path / "bad.safetensors"))
        quality.load_qkv(tmp_path / "bad.safetensors")
