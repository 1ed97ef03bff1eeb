"""Parsing and checking the options that several commands share, before any work starts:
sizes (``4k`` is 4096), mechanism names (any case, with a suggestion when misspelt),
``--config NAME:KEY=VALUE`` (typed by each mechanism's Config), choices, models."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import attnlab
from attnlab.core.errors import AttnInputError
from attnlab.core.registry import mechanism_class

from .common import suggest

_SIZE = re.compile(r"([-+]?\d+)([km]?)", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}
MECHANISMS_LISTED = "`attnlab list` shows every mechanism"
# SDPA's keyword -> attnlab's name for the same thing (a command-line option)
_SDPA_WORDS = {"is_causal": "causal (--causal)", "attn_mask": "mask"}


_LARGEST = 2**31 - 1  # what the kernels' int arguments hold


def size(option: str, text: str, *, minimum: int = 1) -> int:
    """One size: ``4096``, ``4k`` (= 4096, k = 1024) or ``1m`` (= 1048576), from
    ``minimum`` to 2^31 - 1."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise AttnInputError(
            f"{option}: expected a size like 1024, 4k or 16k (k = 1024), got {text!r}"
        )
    value = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if not minimum <= value <= _LARGEST:
        raise AttnInputError(
            f"{option}: expected a size from {minimum} to {_LARGEST}, got {text.strip()!r}"
        )
    return value


def indices(option: str, text: str) -> list[int]:
    """Comma-separated indices (layers, heads): integers >= 0, each once, in order."""
    out: list[int] = []
    for part in text.split(","):
        if not part.strip():
            continue
        if not re.fullmatch(r"[0-9]+", part.strip()):
            raise AttnInputError(f"{option}: expected indices >= 0 like 0,3,5, got {part!r}")
        if int(part) not in out:
            out.append(int(part))
    return out


def check_indices(option: str, chosen: list[int], count: int | None, what: str, model: str):
    """Every index in ``chosen`` is below ``count`` (the model's layers or heads)."""
    if count is not None and any(i >= count for i in chosen):
        bad = ", ".join(str(i) for i in chosen if i >= count)
        raise AttnInputError(f"{option}: {model} has {count} {what} (0..{count - 1}), got {bad}")


def sizes(option: str, text: str, *, minimum: int = 1) -> list[int]:
    """Comma-separated sizes (see :func:`size`); at least one."""
    out = [size(option, part, minimum=minimum) for part in text.split(",") if part.strip()]
    if not out:
        raise AttnInputError(f"{option}: expected at least one size like 1024,4k, got {text!r}")
    return out


def choice(option: str, value: str, choices, *, listed: str = "") -> str:
    """``value`` as spelt in ``choices`` (any case), or an error with the closest choice
    and, for a few choices, all of them (else ``listed``: where they are listed)."""
    by_key = {c.lower(): c for c in choices}
    key = value.strip().lower()
    if key in by_key:
        return by_key[key]
    hint = suggest(value, list(choices))
    if hint and len(choices) > 12:
        where = f"; {listed}" if listed else ""
        raise AttnInputError(f"{option}: unknown name {value!r}{hint}{where}")
    raise AttnInputError(f"{option}: unknown name {value!r}{hint}; known: {', '.join(choices)}")


def mechanism(option: str, name: str) -> str:
    """A registered mechanism's name, given in any case."""
    return choice(option, name, attnlab.mechanisms(), listed=MECHANISMS_LISTED)


def mechanisms(option: str, text: str, *, required: bool = True) -> list[str]:
    """Comma-separated registered mechanism names (any case), each once, in order."""
    out: list[str] = []
    for part in text.split(","):
        if part.strip():
            name = mechanism(option, part)
            if name not in out:
                out.append(name)
    if required and not out:
        raise AttnInputError(f"{option}: expected mechanism names (see `attnlab list`), got none")
    return out


def _parse_value(raw: str, hint: Any) -> Any:
    """``raw`` as a value of the type ``hint`` (a Config field's annotation); ValueError
    naming what was expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(hint):
            try:
                return _parse_value(raw, member)
            except ValueError:
                continue
        raise ValueError(" or ".join(_type_name(m) for m in typing.get_args(hint)))
    if hint is type(None):
        if raw.strip().lower() == "none":
            return None
        raise ValueError("none")
    if hint is bool:
        words = {"true": True, "false": False, "1": True, "0": False}
        if raw.strip().lower() in words:
            return words[raw.strip().lower()]
        raise ValueError("true or false")
    if hint is int:
        try:
            return size("", raw, minimum=-_LARGEST)
        except AttnInputError as exc:
            raise ValueError("an integer (4k = 4096)") from exc
    if hint is float:
        try:
            value = float(raw)
        except ValueError as exc:
            raise ValueError("a number") from exc
        if not math.isfinite(value):
            raise ValueError("a finite number")
        return value
    if hint is tuple or origin is tuple:
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError) as exc:
            raise ValueError("a tuple such as (1,2)") from exc
        if not isinstance(value, tuple | list):
            raise ValueError("a tuple such as (1,2)")
        args = typing.get_args(hint)
        if args and args[-1] is Ellipsis:
            return tuple(_parse_value(str(v), args[0]) for v in value)
        return tuple(value)
    if hint is str:
        return raw
    raise ValueError(_type_name(hint))


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def config_options(name: str, key: str, raw: str) -> Any:
    """The value of option ``key`` of mechanism ``name`` parsed from ``raw`` by the type
    its Config declares; AttnInputError naming the option when the key or value is wrong."""
    cls = mechanism_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    where = f"--config {name}:{key}={raw}"
    if key not in fields:
        if key in _SDPA_WORDS:
            hint = f"; attnlab calls SDPA's {key} {_SDPA_WORDS[key]}"
        else:
            hint = suggest(key, list(fields))
        raise AttnInputError(
            f"{where}: {name} has no option {key!r}{hint}; "
            f"its options: {', '.join(fields) or 'none'} (see `attnlab info {name}`)"
        )
    hint = typing.get_type_hints(cls.Config)[key]
    try:
        return _parse_value(raw, hint)
    except ValueError as exc:
        raise AttnInputError(f"{where}: expected {exc} for {key}, got {raw!r}") from exc


def configs(items: list[str], running: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["chunked:query_chunk=512", "window:window=4k"]`` -> per-mechanism Config options,
    each value typed by the mechanism's Config. ``running``: the mechanisms the command
    runs; an option for any other is an error (it would be ignored)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, assignment = item.partition(":")
        key, eq, raw = assignment.partition("=")
        if not sep or not eq or not name.strip() or not key.strip():
            raise AttnInputError(
                f"--config: expected NAME:KEY=VALUE such as chunked:query_chunk=512, got {item!r}"
            )
        canonical = mechanism("--config", name)
        if running is not None and canonical not in running:
            raise AttnInputError(
                f"--config {item}: {canonical} is not among the mechanisms this command runs "
                f"({', '.join(running)}); add it to them or drop the option"
            )
        key = key.strip()
        out.setdefault(canonical, {})[key] = config_options(canonical, key, raw.strip())
    return out


@dataclass(frozen=True)
class ModelFacts:
    """What a model's config says, read before its weights are loaded (None: unknown
    until it is loaded, as for a hub id)."""

    name: str
    kind: str | None  # "causal" or "encoder"
    positions: int | None
    layers: int | None
    heads: int | None


def model_facts(name: str) -> ModelFacts:
    """The facts of model ``name`` (an embedded name in any case, a local folder or a hub
    id) from its config.json, without loading weights; an unknown name is an error with
    a suggestion."""
    from attnlab.models.loading import EMBEDDED, resolve
    from attnlab.models.perplexity import max_positions

    is_hub_id = "/" in name and not name.startswith((".", "/", "~"))
    if name.lower() not in EMBEDDED and not Path(name).expanduser().exists() and not is_hub_id:
        raise AttnInputError(
            f"--model: unknown model {name!r}{suggest(name, list(EMBEDDED))}; embedded: "
            f"{', '.join(EMBEDDED)}, or a local Hugging Face folder, or a hub id such as org/model"
        )
    source, kind = resolve(name)
    config: dict[str, Any] = {}
    if isinstance(source, Path) and (source / "config.json").is_file():
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
        if kind is None:
            archs = config.get("architectures") or []
            kind = "causal" if any(a.endswith("ForCausalLM") for a in archs) else "encoder"
    return ModelFacts(
        name=name,
        kind=kind,
        positions=max_positions(config),
        layers=config.get("num_hidden_layers"),
        heads=config.get("num_attention_heads"),
    )


def loaded_facts(name: str, model) -> ModelFacts:
    """The facts of a loaded model (for a hub id, whose config was not read before)."""
    from attnlab.models.perplexity import max_positions

    config = model.config
    return ModelFacts(
        name=name,
        kind="causal" if "CausalLM" in type(model).__name__ else "encoder",
        positions=max_positions(config),
        layers=getattr(config, "num_hidden_layers", None),
        heads=getattr(config, "num_attention_heads", None),
    )


def check_tokens(tokens: int, facts: ModelFacts, *, extra: int = 0) -> None:
    """``--tokens`` (plus ``extra`` positions the command adds) fits the model's positions."""
    if facts.positions is not None and tokens + extra > facts.positions:
        room = facts.positions - extra
        raise AttnInputError(
            f"--tokens: {facts.name} reads at most {facts.positions} positions"
            + (f" ({extra} of them taken by the prompt around the text)" if extra else "")
            + f", got {tokens}; pass --tokens {room} or less"
        )
