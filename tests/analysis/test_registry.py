"""Analyses register themselves (``@register_analysis``), as mechanisms do."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import attnlab.analysis
from attnlab import AttnInputError
from attnlab.analysis import Analysis, default_analyses, register_analysis, registry

# Analysis classes that are tools of other code, not measurements a user names
HELPERS = {"HeadMaps"}


def _analysis_classes():
    for info in pkgutil.iter_modules(attnlab.analysis.__path__, "attnlab.analysis."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__:
                yield cls


def test_every_public_analysis_is_registered():
    missing = [
        cls.__qualname__
        for cls in _analysis_classes()
        if issubclass(cls, Analysis)
        and not inspect.isabstract(cls)
        and not cls.__name__.startswith("_")
        and cls.__name__ not in HELPERS
        and registry().get(getattr(cls, "name", None)) is not cls
    ]
    assert not missing, f"not registered (add @register_analysis): {missing}"


def test_registry_lists_what_analyze_needs():
    reg = registry()
    assert list(reg)[:4] == ["sinks", "entropy", "distance", "fai"]
    assert {"patterns", "retrieval", "importance", "rollout", "flow"} <= set(reg)
    assert default_analyses() == ["sinks", "entropy", "distance", "fai", "patterns"]
    on_text = [n for n, cls in reg.items() if not cls.own_run]
    assert on_text == ["sinks", "entropy", "distance", "fai"]
    for name, cls in reg.items():
        assert cls.name == name and cls.__doc__ and "arXiv" in cls.__doc__, name
        assert isinstance(cls.default, bool) and isinstance(cls.own_run, bool)
    assert not hasattr(attnlab.analysis, "STREAMING")


def test_register_analysis_refuses_a_taken_name_and_missing_flags():
    class Other(Analysis):
        name = "sinks"

        def update(self, layer, probs, rows):
            return None

        def finish(self):
            return []

    with pytest.raises(AttnInputError, match="name: the analysis name 'sinks' is taken"):
        register_analysis(Other)

    class NoFlags:
        name = "no-flags"
        default = None

    with pytest.raises(AttnInputError, match="default: analysis 'no-flags'"):
        register_analysis(NoFlags)
    assert "no-flags" not in registry() and registry()["sinks"] is not Other
