"""The contract: tensor convention, Spec, Mechanism, registry, input checks, shared kernels."""

from .errors import AttnInputError
from .mechanism import Mechanism
from .registry import attention, get, mechanism_class, names, register, spec
from .spec import Spec

__all__ = [
    "AttnInputError",
    "Mechanism",
    "Spec",
    "attention",
    "get",
    "mechanism_class",
    "names",
    "register",
    "spec",
]
