"""Config validation (core/config.py): every option of every mechanism, from its annotation."""

from __future__ import annotations

import dataclasses
import math
import types
import typing

import pytest
import torch

import attnlab
from attnlab.core.config import INT_LIMIT, field_specs

NAMES = attnlab.mechanisms()


def _fields(kind):
    """(mechanism, field) pairs whose annotation admits ``kind`` (int or float)."""
    out = []
    for name in NAMES:
        for field, (hint, _, _) in field_specs(attnlab.core.mechanism_class(name).Config).items():
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            kinds = typing.get_args(hint) if union else (hint,)
            if kind in kinds and tuple not in kinds and not (kind is float and int in kinds):
                out.append((name, field))
    return out


INT_FIELDS = _fields(int)
FLOAT_FIELDS = _fields(float)


@pytest.mark.parametrize(("name", "field"), INT_FIELDS, ids=lambda x: x)
@pytest.mark.parametrize("value", [INT_LIMIT, 2**32 + 4, -1, 1.5, True, "lots", [3]])
def test_int_option_out_of_range_or_type_names_the_field(name, field, value):
    with pytest.raises(attnlab.AttnInputError, match=rf"^{field}\b"):
        attnlab.get(name, **{field: value})


@pytest.mark.parametrize(("name", "field"), FLOAT_FIELDS, ids=lambda x: x)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", "abc", True, (1.0,)])
def test_float_option_non_finite_or_wrong_type_names_the_field(name, field, value):
    with pytest.raises(attnlab.AttnInputError, match=rf"^{field}\b"):
        attnlab.get(name, **{field: value})


@pytest.mark.parametrize("name", NAMES)
def test_every_default_config_passes_its_own_validation(name):
    cls = attnlab.core.mechanism_class(name)
    defaults = dataclasses.asdict(cls.Config())
    built = attnlab.get(name, **defaults)
    assert dataclasses.asdict(built.config) == defaults


@pytest.mark.parametrize(
    ("text", "want"),
    [
        *[("false", False), ("False", False), ("0", False), ("no", False), ("off", False)],
        *[("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True)],
    ],
)
def test_booleans_from_text_are_parsed_strictly(text, want):
    assert attnlab.get("softplus", reweight=text).config.reweight is want
    assert attnlab.get("radial", sink=text).config.sink is want


@pytest.mark.parametrize("text", ["maybe", "", "2", "truee"])
def test_a_boolean_that_does_not_parse_is_refused(text):
    with pytest.raises(attnlab.AttnInputError, match=r"^reweight: expected true or false"):
        attnlab.get("softplus", reweight=text)


def test_numbers_and_none_from_text():
    mech = attnlab.get("performer", features="32", chunk="none", seed="0")
    assert (mech.config.features, mech.config.chunk, mech.config.seed) == (32, None, 0)
    assert attnlab.get("gsa", tau="2.5").config.tau == 2.5
    assert attnlab.get("pyramid", thresholds="0.5,0.9").config.thresholds == (0.5, 0.9)


def test_huge_blocks_and_windows_are_refused_before_allocating():
    with pytest.raises(
        attnlab.AttnInputError, match=r"^block: expected an integer in \[1, 2\^31\)"
    ):
        attnlab.get("moba", block=2**32 + 4)
    with pytest.raises(attnlab.AttnInputError, match=r"^window: .*2\^31"):
        attnlab.get("based", window=2**32 + 1)


def test_positive_floats_refuse_zero_and_negatives():
    for name, field in (("flow", "eps"), ("gsa", "tau"), ("infsa", "eps"), ("softplus", "power")):
        for value in (0.0, -1.0):
            with pytest.raises(attnlab.AttnInputError, match=rf"^{field}: expected a number in"):
                attnlab.get(name, **{field: value})


@pytest.mark.parametrize("name", ["based", "performer"])
@pytest.mark.parametrize("scale", [-1.0, 0.0])
def test_feature_map_mechanisms_refuse_a_scale_that_is_not_positive(name, scale):
    q = k = v = torch.randn(1, 2, 8, 4)
    with pytest.raises(attnlab.AttnInputError, match=r"^scale: expected a positive number"):
        attnlab.get(name)(q, k, v, causal=True, scale=scale)


@pytest.mark.parametrize(
    ("keyword", "ours"), [("is_causal", "causal"), ("attn_mask", "mask"), ("dropout_p", "dropout")]
)
def test_sdpa_keywords_get_attnlabs_names(keyword, ours):
    q = k = v = torch.randn(1, 2, 8, 4)
    with pytest.raises(attnlab.AttnInputError, match=rf"^{keyword}: .*{ours}"):
        attnlab.attention(q, k, v, **{keyword: True})


def test_a_config_that_its_own_rules_refuse_raises_attn_input_error():
    with pytest.raises(attnlab.AttnInputError, match="max_chunk"):
        attnlab.get("dhsa", min_chunk=8, max_chunk=4)
