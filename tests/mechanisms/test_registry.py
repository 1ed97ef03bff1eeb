"""Every mechanism module is imported and every mechanism class is registered (issue 13).

A new family folder without ``__init__.py`` is skipped by ``pkgutil.walk_packages``, and a
class without ``@register`` is invisible to the registry, the contract tests and
``attnlab list``; both fail here instead of silently.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import torch

import attnlab
import attnlab.mechanisms
from attnlab.core import Mechanism, Spec
from attnlab.core.registry import mechanism_class

PACKAGE = Path(attnlab.mechanisms.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("attnlab.mechanisms", *parts))


def test_every_folder_with_python_files_is_a_package():
    missing = [
        str(folder.relative_to(PACKAGE.parent))
        for folder in [PACKAGE, *(p for p in PACKAGE.rglob("*") if p.is_dir())]
        if folder.name != "__pycache__"
        and any(folder.glob("*.py"))
        and not (folder / "__init__.py").exists()
    ]
    assert not missing, f"folders without __init__.py (never imported): {missing}"


def test_every_module_is_imported_by_the_registry():
    attnlab.mechanisms()  # the registry imports the package
    on_disk = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    walked = {
        info.name
        for info in pkgutil.walk_packages(attnlab.mechanisms.__path__, "attnlab.mechanisms.")
    } | {"attnlab.mechanisms"}
    assert on_disk == walked, f"modules the registry never imports: {sorted(on_disk - walked)}"


def _classes_with_a_spec(tree: ast.Module):
    """(class name, decorator names) of classes that assign ``spec = Spec(...)``."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            target = getattr(item, "target", None) or (getattr(item, "targets", None) or [None])[0]
            value = getattr(item, "value", None)
            if (
                isinstance(target, ast.Name)
                and target.id == "spec"
                and isinstance(value, ast.Call)
                and getattr(value.func, "id", None) == "Spec"
            ):
                decorators = {
                    getattr(d, "id", getattr(d, "attr", None)) for d in node.decorator_list
                }
                yield node.name, decorators


def test_every_class_with_a_spec_is_decorated_and_registered():
    unregistered = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        module = importlib.import_module(_module_name(path))
        for class_name, decorators in _classes_with_a_spec(tree):
            cls = getattr(module, class_name)
            if "register" not in decorators or mechanism_class(cls.spec.name) is not cls:
                unregistered.append(f"{path.relative_to(PACKAGE)}:{class_name}")
    assert not unregistered, f"mechanism classes not registered: {unregistered}"


def test_every_imported_mechanism_class_is_registered():
    attnlab.mechanisms()
    for info in pkgutil.walk_packages(attnlab.mechanisms.__path__, "attnlab.mechanisms."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or not issubclass(cls, Mechanism):
                continue
            spec = cls.__dict__.get("spec")
            if isinstance(spec, Spec):
                assert mechanism_class(spec.name) is cls, f"{cls.__qualname__} not registered"


def test_reference_and_tiny_config_are_declared_on_mechanism():
    assert inspect.getdoc(Mechanism.reference)
    assert Mechanism.tiny_config == {}
    q = k = v = torch.zeros(1, 1, 2, 2)
    assert attnlab.get("softmax").reference(q, k, v, causal=False, mask=None, scale=1.0) is None
    for name in attnlab.mechanisms():
        assert isinstance(mechanism_class(name).tiny_config, dict)
