"""Config validation: every mechanism's options checked against its ``Config`` dataclass.

A mechanism's options come from Python keyword arguments (``attnlab.get("window",
window=128)``) or from text (``--config window:window=128``). :func:`build_config` checks
each one against the field's annotation and bounds, in one place for every mechanism:

- ``bool``: True or False, or the text true/false, 1/0, yes/no, on/off (any case);
- ``int``: an integer (never a bool or a float), in [1, 2^31) unless the field declares
  other bounds with :func:`option`; text is parsed as a base-10 integer;
- ``float``: a finite number (int or float, never a bool), within the field's bounds
  (an option named ``eps`` is at least 1e-30 unless it declares otherwise);
- ``str``: text; ``X | None``: None (or the text none/null) or an X;
- ``tuple[T, ...]``: a tuple or list of T (or text "a,b,c").

Cross-field rules (a maximum at least a minimum, a block a multiple of a power of two)
stay in the Config's ``__post_init__``, next to the fields they relate. Every failure is
an :class:`AttnInputError` naming the field, what was expected and what came.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from .errors import AttnInputError

# Integer options index tensors and are handed to compiled kernels as C ints.
INT_LIMIT = 2**31

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = ("none", "null")


@dataclass(frozen=True)
class Bounds:
    """The closed or open interval a numeric option must lie in (None: unbounded)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return not (self.high is not None and (x >= self.high if self.high_open else x > self.high))

    def describe(self) -> str:
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        low = "-inf" if self.low is None else _number_text(self.low)
        high = "inf" if self.high is None else _number_text(self.high)
        return f"{left}{low}, {high}{right}"


def _number_text(x: float) -> str:
    return "2^31" if x == INT_LIMIT else f"{x:g}"


# An int option counts something (a size, a number of blocks): at least 1, below 2^31.
DEFAULT_INT = Bounds(1, INT_LIMIT, high_open=True)
DEFAULT_FLOAT = Bounds()
# Options whose name fixes their meaning: an ``eps`` guards a division or a root, so it is
# positive, and at least 1e-30 so that float32 and bfloat16 (whose smallest normal number
# is 1.2e-38) do not round it to zero (a field's own option() bounds win).
NAMED_BOUNDS = {"eps": Bounds(1e-30, None)}


def option(
    default: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """A Config field with explicit bounds, e.g. ``seed: int = option(0, low=0)`` or
    ``eps: float = option(1e-6, low=0, low_open=True)``. Int fields keep the upper limit
    2^31 (exclusive) unless ``high`` is given."""
    return dataclasses.field(
        default=default, metadata={"bounds": Bounds(low, high, low_open, high_open)}
    )


def _alternatives(hint: Any) -> tuple[Any, ...]:
    """The types a field accepts: the members of a union, else the one type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "None"
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    return str(hint).replace("typing.", "")


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise AttnInputError(f"{name}: expected true or false (or 1/0, yes/no, on/off), got {value!r}")


def _parse_int(name: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip(), 10)
        except ValueError:
            raise AttnInputError(f"{name}: expected an integer, got {value!r}") from None
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise AttnInputError(f"{name}: expected an integer, got {value!r}")
    return value.__index__()


def _parse_float(name: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise AttnInputError(f"{name}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AttnInputError(f"{name}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise AttnInputError(f"{name}: expected a finite number, got {value!r}")
    return value


def _parse_tuple(name: str, value: Any, hint: Any) -> tuple:
    if isinstance(value, str):
        text = value.strip().strip("()[]")
        value = tuple(_number(part.strip()) for part in text.split(",") if part.strip())
    if not isinstance(value, (tuple, list)):
        raise AttnInputError(f"{name}: expected a tuple, got {value!r}")
    args = typing.get_args(hint)
    if not args:  # a bare `tuple`: the Config checks its entries
        return tuple(value)
    item = args[0]
    return tuple(_parse(f"{name}[{i}]", x, item, None) for i, x in enumerate(value))


def _number(text: str) -> Any:
    """An entry of a tuple given as text: an int, else a float, else a bool, else the text."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    lower = text.lower()
    return True if lower in _TRUE else False if lower in _FALSE else text


def _parse_as(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the one type ``hint`` (no union), or AttnInputError."""
    if hint is bool:
        return _parse_bool(name, value)
    if hint is int:
        return _parse_int(name, value)
    if hint is float:
        return _parse_float(name, value)
    if hint is str:
        if not isinstance(value, str):
            raise AttnInputError(f"{name}: expected text (str), got {value!r}")
        return value
    if hint is tuple or typing.get_origin(hint) is tuple:
        return _parse_tuple(name, value, hint)
    if hint is Any:
        return value
    raise TypeError(f"{name}: Config annotation {hint!r} has no parser")  # a code error


def _parse(name: str, value: Any, hint: Any, bounds: Bounds | None) -> Any:
    """Check (and, from text, convert) one option against its annotation and bounds."""
    kinds = _alternatives(hint)
    if type(None) in kinds and (
        value is None or (isinstance(value, str) and value.strip().lower() in _NONE)
    ):
        return None
    if value is None:
        raise AttnInputError(
            f"{name}: expected {' or '.join(_type_name(t) for t in kinds)}, got None"
        )
    candidates = [t for t in kinds if t is not type(None)]
    # a value already of one of the types is read as that type, text tries each in turn
    exact = [t for t in candidates if _is_instance(value, t)]
    errors = []
    for kind in exact or candidates:
        try:
            parsed = _parse_as(name, value, kind)
        except AttnInputError as err:
            errors.append(str(err))
            continue
        if kind in (int, float):
            limits = bounds or (DEFAULT_INT if kind is int else DEFAULT_FLOAT)
            if kind is int and bounds is not None and bounds.high is None:
                limits = dataclasses.replace(bounds, high=INT_LIMIT, high_open=True)
            if not limits.contains(parsed):
                raise AttnInputError(
                    f"{name}: expected {'an integer' if kind is int else 'a number'} in "
                    f"{limits.describe()}, got {value!r}"
                )
        return parsed
    if len(errors) == 1:
        raise AttnInputError(errors[0])
    raise AttnInputError(
        f"{name}: expected {' or '.join(_type_name(t) for t in kinds)}, got {value!r}"
    )


def _is_instance(value: Any, hint: Any) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, float)
    if hint is tuple or typing.get_origin(hint) is tuple:
        return isinstance(value, (tuple, list))
    return isinstance(value, hint) if isinstance(hint, type) else False


def field_specs(config_cls: type) -> dict[str, tuple[Any, Bounds | None, Any]]:
    """Per field of a Config dataclass: (annotation, declared bounds or None, default)."""
    hints = typing.get_type_hints(config_cls)
    return {
        f.name: (hints[f.name], f.metadata.get("bounds", NAMED_BOUNDS.get(f.name)), f.default)
        for f in dataclasses.fields(config_cls)
    }


def build_config(config_cls: type, options: dict[str, Any], *, mechanism: str) -> Any:
    """The Config of ``mechanism`` from ``options``, every option checked (see the module).

    Raises AttnInputError for an unknown option, a value of the wrong type, one out of its
    bounds, or one that the Config's own ``__post_init__`` refuses.
    """
    fields = field_specs(config_cls)
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise AttnInputError(
            f"config: mechanism {mechanism!r} has no option {', '.join(unknown)}; "
            f"its options are: {', '.join(fields) or 'none'}"
        )
    parsed = {
        name: _parse(name, value, fields[name][0], fields[name][1])
        for name, value in options.items()
    }
    try:
        return config_cls(**parsed)
    except AttnInputError:
        raise
    except (TypeError, ValueError, ArithmeticError) as err:
        raise AttnInputError(f"config: mechanism {mechanism!r} refused {parsed!r}: {err}") from err
