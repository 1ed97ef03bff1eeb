"""``form`` is the algorithm's form (parallel, chunked, recurrent); where the code runs
(auto, torch, flex, sdpa, tiled) is ``backend`` (issue 13). The old spelling fails loudly."""

from __future__ import annotations

import pytest

import attnlab
from attnlab.core import mechanism_class

PLACES = {"auto", "torch", "flex", "native", "sdpa", "tiled", "compiled"}
WITH_BACKENDS = [n for n in attnlab.core.names() if mechanism_class(n).backends]


def test_the_sparse_engine_and_lowrank_bias_have_backends():
    assert {"window", "blocksparse", "moba", "biformer", "lowrank-bias"} <= set(WITH_BACKENDS)


@pytest.mark.parametrize("name", attnlab.core.names())
def test_forms_name_no_place_to_run(name):
    cls = mechanism_class(name)
    assert not PLACES & set(cls.forms), f"{name}: forms {cls.forms} name places to run"


@pytest.mark.parametrize("name", WITH_BACKENDS)
def test_old_form_option_says_it_is_now_backend(name):
    backend = mechanism_class(name).backends[-1]
    with pytest.raises(attnlab.AttnInputError, match=r"form is now backend.*backend="):
        attnlab.get(name, form=backend)
    assert attnlab.get(name, backend=backend).config.backend == backend


@pytest.mark.parametrize("name", WITH_BACKENDS)
def test_unknown_backend_names_the_choices(name):
    with pytest.raises(attnlab.AttnInputError, match=r"backend: expected one of .*'chunked'"):
        attnlab.get(name, backend="chunked")
