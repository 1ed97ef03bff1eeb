"""``import attnlab`` is enough for ``attn_implementation="attnlab:<name>"``.

transformers resolves an ``attn_implementation`` through its
``AttentionInterface``, which lives in ``transformers.modeling_utils``;
importing that module takes seconds, far longer than ``import attnlab``. So
``import attnlab`` does not import transformers: it calls
:func:`register_with_transformers`, which registers every mechanism at once if
transformers' modeling module is already loaded, and otherwise places a small
finder on ``sys.meta_path`` that registers them the moment that module has
been imported (and then removes itself). Either way, by the time
``AutoModelForCausalLM.from_pretrained(..., attn_implementation="attnlab:window")``
checks the name, ``attnlab:window`` is registered. A mechanism registered after
that (a user's own ``@attnlab.register``) is added by
:func:`attnlab.models.register_attention`, or on entering :func:`attnlab.use`.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from typing import Any

from .swap import register_all

TRIGGER = "transformers.modeling_utils"
_GUARD = threading.local()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of :data:`TRIGGER` so that attnlab's
    mechanisms are registered right after that module has executed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None):
        if fullname != TRIGGER or getattr(_GUARD, "busy", False):
            return None
        _GUARD.busy = True
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            _GUARD.busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            run(module)
            _uninstall()
            register_all()

        spec.loader.exec_module = exec_then_register
        return spec


_FINDER = _RegisterAfterImport()


def _uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def register_with_transformers() -> bool:
    """Register every attnlab mechanism with transformers now if its modeling module is
    loaded (returns True), else as soon as it is imported (returns False)."""
    if TRIGGER in sys.modules:
        _uninstall()
        register_all()
        return True
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    return False
