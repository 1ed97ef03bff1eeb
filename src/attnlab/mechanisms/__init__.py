"""The mechanisms, one module per family. Each module registers its classes on import.

This module is also callable: ``attnlab.mechanisms(family="linear", decode=True)``
lists the registered names that match, as :func:`attnlab.core.names` does.
"""

import sys
import types

from attnlab.core.registry import names


class _CallableModule(types.ModuleType):
    def __call__(self, family=None, **capabilities):
        """Registered mechanism names, filtered by family and Spec capabilities."""
        return names(family, **capabilities)


sys.modules[__name__].__class__ = _CallableModule
