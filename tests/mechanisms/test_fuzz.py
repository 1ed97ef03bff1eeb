"""A property-based fuzz suite over the whole registry (hypothesis, derandomized).

For every registered mechanism, hypothesis draws shapes (B, Hq, Hkv dividing Hq, Nq, Nk,
D, Dv), a dtype the mechanism computes in, a mode its Spec claims, a Config drawn from the
fields' annotations and bounds (valid values and, now and then, a bad one), a NaN or an
infinity at a position a row may or may not see, and a second shape for the same module.
It asserts:

- a bad option or an input the mechanism cannot take raises AttnInputError whose message
  names the argument or option; nothing else is raised;
- with finite inputs the output is finite, of the contract's shape and dtype;
- a NaN or an infinity reaches no other sample and no row that may not see it;
- identical calls in eval mode give identical outputs, also after a call with another
  shape (module reuse).

``ATTNLAB_FUZZ_TABLE=FILE`` writes the outcomes per mechanism (a JSON table).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import typing

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.core.config import DEFAULT_INT, INT_LIMIT, Bounds, field_specs

from .contract import ALL, POISONS, blind_rows, compute_dtypes, poisoned

EXAMPLES = int(os.environ.get("ATTNLAB_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ARGUMENTS = {"q", "k", "v", "mask", "causal", "scale", "config", "form"}
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def _outcome_table():
    yield
    path = os.environ.get("ATTNLAB_FUZZ_TABLE")
    if path:
        with open(path, "w") as f:
            json.dump({name: dict(c) for name, c in sorted(OUTCOMES.items())}, f, indent=1)


def _names_an_argument(err: Exception, fields) -> bool:
    """Whether an AttnInputError message starts with (or, after "cannot run:", names) an
    argument of the call or an option of the Config, as ``"name: ..."``."""
    named = set(re.findall(r"(?:^|: |; )([\w, \[\]]+?):", str(err)))
    words = {w.strip() for n in named for w in re.split(r"[,\[\]]", n) if w.strip()}
    return bool(words & (ARGUMENTS | set(fields)))


def _bounds(kind, bounds: Bounds | None) -> Bounds:
    if kind is int and bounds is None:
        return DEFAULT_INT
    return bounds or Bounds()


@st.composite
def _value(draw, kind, bounds, *, bad: bool):
    """A value of one annotated type: inside its bounds, or (``bad``) a wrong one."""
    b = _bounds(kind, bounds)
    if kind is bool:
        return (
            draw(st.sampled_from(["maybe", 2, None]))
            if bad
            else draw(st.sampled_from([True, False, "true", "no", "0"]))
        )
    if kind is int:
        low = int(b.low) + int(b.low_open) if b.low is not None else 0
        if bad:
            return draw(st.sampled_from([low - 1, INT_LIMIT, 2**32 + 4, 1.5, True, "many"]))
        return draw(st.one_of(st.integers(low, low + 11), st.integers(low, low + 11).map(str)))
    if kind is float:
        if bad:
            outside = [b.low - 1.0] if b.low is not None else []
            return draw(st.sampled_from([math.nan, math.inf, -math.inf, "nan", True, *outside]))
        low = b.low if b.low is not None else -2.0
        high = b.high if b.high is not None else low + 4.0
        return draw(
            st.floats(low, high, exclude_min=b.low_open, exclude_max=b.high_open).filter(
                lambda x: x != 0.0 or not b.low_open
            )
        )
    raise AssertionError(kind)


@st.composite
def _config(draw, cls):
    """Options for ``cls.Config``: tiny_config, some fields redrawn, at most one bad one.
    Returns (options, the bad field or None)."""
    options = dict(cls.tiny_config)
    bad_field = None
    for field, (hint, bounds, _) in field_specs(cls.Config).items():
        kinds = [t for t in (typing.get_args(hint) or (hint,)) if t is not type(None)]
        if field == "form" and cls.forms:
            if draw(st.integers(0, 3)) == 3:
                options[field] = draw(st.sampled_from([*cls.forms, "nonsense"]))
                if options[field] == "nonsense":
                    bad_field = bad_field or field
            continue
        if len(kinds) != 1 or kinds[0] not in (bool, int, float) or draw(st.integers(0, 3)) != 3:
            continue  # tuples, text and unions keep tiny_config's value; most fields too
        bad = bad_field is None and draw(st.integers(0, 9)) == 9
        if type(None) in typing.get_args(hint) and not bad and draw(st.booleans()):
            options[field] = draw(st.sampled_from([None, "none"]))
            continue
        options[field] = draw(_value(kinds[0], bounds, bad=bad))
        if bad:
            bad_field = field
    return options, bad_field


@st.composite
def _shapes(draw, spec):
    b, hkv = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 2))
    causal = draw(
        st.sampled_from([c for c in (False, True) if (spec.causal if c else spec.noncausal)])
    )
    nk = draw(st.integers(1, 20))
    nq = draw(st.integers(1, 20)) if spec.cross else nk
    d, dv = draw(st.integers(1, 8)), draw(st.integers(1, 6))
    return {"b": b, "hq": hq, "hkv": hkv, "nq": nq, "nk": nk, "d": d, "dv": dv, "causal": causal}


def _inputs(s, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((s["b"], s["hq"], s["nq"], s["d"]), (s["b"], s["hkv"], s["nk"], s["d"]))
    q, k = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in shapes)
    v = torch.randn(s["b"], s["hkv"], s["nk"], s["dv"], generator=gen, dtype=torch.float64)
    return q, k, v.to(dtype)


def _call(mech, q, k, v, causal, fields, outcomes, mask=None, scale=None):
    """The output, or None where AttnInputError (naming an argument) refused the call."""
    try:
        return mech(q, k, v, causal=causal, mask=mask, scale=scale)
    except attnlab.AttnInputError as err:
        assert _names_an_argument(err, fields), f"message names no argument: {err}"
        outcomes["refused call"] += 1
        return None


@pytest.mark.parametrize("name", ALL)
@FUZZ
@given(data=st.data())
def test_fuzz(name, data):
    cls = attnlab.core.mechanism_class(name)
    spec, fields = cls.spec, field_specs(cls.Config)
    outcomes = OUTCOMES[name]
    options, bad_field = data.draw(_config(cls), label="config")
    try:
        mech = attnlab.get(name, **options)
    except attnlab.AttnInputError as err:
        assert _names_an_argument(err, fields), f"message names no option: {err}"
        if bad_field is not None:
            assert re.match(rf"^{bad_field}\b", str(err)), (bad_field, str(err))
        outcomes["refused config"] += 1
        return
    assert bad_field is None, f"{name} accepted the bad option {bad_field}={options[bad_field]!r}"
    dtype = data.draw(st.sampled_from(compute_dtypes(name)), label="dtype")
    mech = mech.to(dtype)
    s = data.draw(_shapes(spec), label="shapes")
    causal = s["causal"]
    seed = data.draw(st.integers(0, 2**16), label="seed")
    q, k, v = _inputs(s, dtype, seed)
    mask = None
    if spec.mask and data.draw(st.booleans(), label="masked"):
        gen = torch.Generator().manual_seed(seed)
        mask = torch.rand(s["b"], 1, s["nq"], s["nk"], generator=gen) > 0.3
    scale = data.draw(st.one_of(st.none(), st.floats(-2.0, 2.0)), label="scale")
    out = _call(mech, q, k, v, causal, fields, outcomes, mask=mask, scale=scale)
    if scale is not None and scale <= 0 and mech.positive_scale:
        assert out is None, f"{name} accepted scale={scale}"
    if out is None:
        return
    assert out.shape == (s["b"], s["hq"], s["nq"], s["dv"]) and out.dtype == dtype
    assert torch.isfinite(out).all(), f"{name}: non-finite output from finite inputs"
    outcomes["finite"] += 1

    # a NaN or an infinity at a drawn place: no other sample, no blind row
    part = data.draw(st.sampled_from("qkv"), label="part")
    sample = data.draw(st.integers(0, s["b"] - 1), label="sample")
    n = s["nq"] if part == "q" else s["nk"]
    position = data.draw(st.integers(0, n - 1), label="position")
    bad = data.draw(st.sampled_from(POISONS), label="value")
    x = {"q": q, "k": k, "v": v}
    x[part] = poisoned(x[part], (sample, slice(None), position), bad)
    dirty = mech(x["q"], x["k"], x["v"], causal=causal, mask=mask, scale=scale)
    others = [i for i in range(s["b"]) if i != sample]
    torch.testing.assert_close(dirty[others], out[others])
    if part != "q" and (causal or mask is not None):
        blind = blind_rows(s["nq"], s["nk"], position, causal=causal, mask=mask)
        blind = blind[sample if mask is not None else 0, 0]
        assert torch.isfinite(dirty[sample][:, blind]).all(), f"{name}: reached a blind row"
        outcomes["blind rows checked"] += int(blind.sum())
    outcomes[f"isolated {part}" + (" +mask" if mask is not None else "")] += 1

    # module reuse: another shape, then the first call again gives the same output
    s2 = data.draw(_shapes(spec), label="second shapes")
    q2, k2, v2 = _inputs(s2, dtype, seed=1)
    _call(mech, q2, k2, v2, s2["causal"], fields, outcomes)
    again = mech(q, k, v, causal=causal, mask=mask, scale=scale)
    assert torch.equal(again, out), f"{name}: eval mode not deterministic"
    outcomes["deterministic"] += 1
