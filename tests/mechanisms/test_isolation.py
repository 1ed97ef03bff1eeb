"""Contract item 9 (DESIGN.md): isolation, on every registered mechanism and mode.

A NaN or an infinity in one batch sample reaches no other sample, and one in a key or
value that a row may not attend (a later position under ``causal=True``, a key the mask
hides from that row) reaches no such row. Item 4 (``test_contract.py``) covers keys hidden
from every row (padding); here the key stays visible to other rows, so it is not cleared
before the mechanism runs. A row that does see a non-finite input may give anything.
"""

from __future__ import annotations

import pytest
import torch

import attnlab

from .contract import (
    ALL,
    POISONS,
    blind_rows,
    build,
    compute_dtypes,
    inputs,
    modes,
    poisoned,
)

CASES = [(name, *mode) for name in ALL for mode in modes(attnlab.spec(name))]
# Config variants beyond tiny_config whose blocking differs: Based's PyTorch path with
# chunks smaller and larger than the window (its halo once reached into the previous row).
VARIANTS = {"based": [{"chunk": 3, "window": 2}, {"chunk": 8, "window": 9}]}


def _id(case):
    name, causal, nq, nk = case
    return f"{name}-{'causal' if causal else 'full'}-{nq}x{nk}"


def _run(mech, q, k, v, *, causal, mask=None, grad=False):
    if grad:  # the autograd path (PyTorch, never the compiled kernels)
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    return mech(q, k, v, causal=causal, mask=mask).detach()


def _builds(name):
    return [build(name)] + [build(name, **cfg) for cfg in VARIANTS.get(name, [])]


@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_non_finite_sample_reaches_no_other_sample(case, grad):
    name, causal, nq, nk = case
    if grad and not attnlab.spec(name).backward:
        pytest.skip(f"{name} has no backward")
    for dtype in compute_dtypes(name):
        q, k, v = inputs(nq=nq, nk=nk, dtype=dtype)
        for mech in _builds(name):
            mech = mech.to(dtype)
            clean = _run(mech, q, k, v, causal=causal, grad=grad)
            # the last token of the first sample and the first token of the last one
            for sample, position, other in ((0, -1, 1), (1, 0, 0)):
                for part in "qkv":
                    for bad in POISONS:
                        x = {"q": q, "k": k, "v": v}
                        x[part] = poisoned(x[part], (sample, slice(None), position), bad)
                        out = _run(mech, x["q"], x["k"], x["v"], causal=causal, grad=grad)
                        where = f"{name} {dtype} {mech.config}: {bad} in {part} of {sample}"
                        assert torch.isfinite(out[other]).all(), where
                        torch.testing.assert_close(out[other], clean[other], msg=where)


CAUSAL_CASES = [c for c in CASES if c[1]]


def _unchanged_rows(mech, part: str, at: int, nq: int, nk: int) -> torch.Tensor:
    """Bool [Nq]: rows whose output ``Spec.causality`` promises to be independent of input
    ``part`` at position ``at``: rows before a later value always; before a later query or
    key for "token", before the key's or query's block for "block"; for "values" a later
    key may change what is chosen (none promised), a later query nothing before it."""
    rows = torch.arange(nq) + (nk - nq)
    causality = mech.spec.causality
    if part == "q":
        at = at + (nk - nq)
    if part == "v" or causality == "token" or (causality == "values" and part == "q"):
        return rows < at
    if causality == "block":
        block = mech.config.block
        return rows < (at // block) * block
    return torch.zeros(nq, dtype=torch.bool)


@pytest.mark.parametrize("case", CAUSAL_CASES, ids=_id)
def test_non_finite_later_key_or_value_reaches_no_earlier_row(case):
    """A later key or value (and a later query) leaves the rows before it finite; those of
    a later value or query, unchanged (every ``Spec.causality`` promises that)."""
    name, _, nq, nk = case
    for dtype in compute_dtypes(name):
        q, k, v = inputs(nq=nq, nk=nk, dtype=dtype)
        for mech in _builds(name):
            mech = mech.to(dtype)
            clean = _run(mech, q, k, v, causal=True)
            for position in (nk - 5, nk - 1):
                blind = blind_rows(nq, nk, position, causal=True)[0, 0]
                for part in "qkv":
                    if part == "q" and position - (nk - nq) < 0:
                        continue
                    for bad in POISONS:
                        x = {"q": q, "k": k, "v": v}
                        at = position - (nk - nq) if part == "q" else position
                        x[part] = poisoned(x[part], (slice(None), slice(None), at), bad)
                        out = _run(mech, x["q"], x["k"], x["v"], causal=True)
                        where = f"{name} {dtype} {mech.config}: {bad} in {part} at {at}"
                        assert torch.isfinite(out[:, :, blind]).all(), where
                        same = _unchanged_rows(mech, part, at, nq, nk)
                        torch.testing.assert_close(out[:, :, same], clean[:, :, same], msg=where)


MASKED_CASES = [c for c in CASES if attnlab.spec(c[0]).mask]


@pytest.mark.parametrize("case", MASKED_CASES, ids=_id)
def test_non_finite_masked_key_reaches_no_row_it_hides_from(case):
    """The mask hides key p from every other row and shows it to the rest; a NaN or an
    infinity in that key and its value leaves the rows it is hidden from finite."""
    name, causal, nq, nk = case
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 1, nq, nk, generator=gen) > 0.3
    position = nk // 2
    mask[:, :, 0::2, position] = False
    mask[:, :, 1::2, position] = True
    blind = blind_rows(nq, nk, position, causal=causal, mask=mask)  # [2, 1, Nq]
    for dtype in compute_dtypes(name):
        q, k, v = inputs(nq=nq, nk=nk, dtype=dtype)
        mech = build(name).to(dtype)
        for parts in ("k", "v", "kv"):
            for bad in POISONS:
                x = {"q": q, "k": k, "v": v}
                for part in parts:
                    x[part] = poisoned(x[part], (slice(None), slice(None), position), bad)
                out = _run(mech, x["q"], x["k"], x["v"], causal=causal, mask=mask)
                rows = out.transpose(1, 2)[blind[:, 0]]  # [rows, Hq, Dv]
                assert torch.isfinite(rows).all(), f"{name} {dtype}: {bad} in {parts}"


@pytest.mark.parametrize("name", [n for n in ALL if attnlab.spec(n).exact])
def test_a_row_that_sees_a_nan_key_is_not_made_finite(name):
    """Isolation hides nothing from the rows that see a bad key: an exact mechanism still
    answers NaN there (the definition's q·k is NaN), so the user's NaN stays visible."""
    q, k, v = inputs()
    out = build(name)(q, poisoned(k, (0, 0, 3), float("nan")), v, causal=True)
    assert torch.isnan(out[0, :2, 3:]).all()  # kv head 0 serves query heads 0 and 1
    assert torch.isfinite(out[0, :, :3]).all() and torch.isfinite(out[1]).all()
