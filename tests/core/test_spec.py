"""`Spec` validates what it declares."""

import pytest

import attnlab
from attnlab.core import Spec
from attnlab.core.spec import CAUSALITIES

BASE = {"name": "x", "family": "sparse", "title": "x", "paper": "arXiv:0000.00000", "exact": False}


def test_causality_defaults_to_token_and_takes_the_declared_values():
    assert Spec(**BASE).causality == "token"
    for causality in CAUSALITIES:
        assert Spec(**BASE, causality=causality).to_dict()["causality"] == causality


def test_causality_is_validated():
    with pytest.raises(ValueError, match=r"Spec\.causality: expected one of"):
        Spec(**BASE, causality="blocks")
    with pytest.raises(ValueError, match=r"Spec\.causality: 'x' has no causal form"):
        Spec(**BASE, causal=False, causality="block")


def test_routed_mechanisms_declare_their_causality():
    assert attnlab.spec("sparge").causality == "block"
    assert attnlab.spec("pyramid").causality == "block"
    assert attnlab.spec("mosa").causality == "values"
    assert all(attnlab.spec(n).causal for n in ("sparge", "pyramid", "mosa"))
