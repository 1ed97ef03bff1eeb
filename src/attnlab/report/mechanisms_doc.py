"""``docs/mechanisms.md``: every registered mechanism, its Spec, its Config and its definition.

The page is generated from the registry, so it cannot disagree with the code:
each mechanism's facts come from its ``Spec`` (family, paper, modes, decode,
backward, cost), its options from the fields of its ``Config`` dataclass (name,
type, default), and its definition from the class docstring, which says what is
computed and after which paper. The output is deterministic (registry order:
family, then name; no dates), so a test can compare the file with it.

Regenerate with ``python -m attnlab.report.mechanisms_doc docs/mechanisms.md``.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path

import attnlab
from attnlab.core import mechanism_class
from attnlab.core.spec import CAUSALITIES, FAMILIES
from attnlab.report.table import _modes, _paper_link

REGENERATE = "python -m attnlab.report.mechanisms_doc docs/mechanisms.md"

FAMILY_TITLES = {
    "exact": "Exact family: softmax and its direct rivals",
    "linear": "Linear family: kernel, recurrent and hybrid forms",
    "sparse": "Sparse family: masks and routing",
    "heads": "Heads family: layer-level head structure",
}


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _type_name(annotation) -> str:
    """A Config field's annotation as written in the source (a string under
    ``from __future__ import annotations``, else the type's name)."""
    if isinstance(annotation, str):
        return annotation
    return getattr(annotation, "__name__", repr(annotation))


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return repr(field.default_factory())
    return "required"


def _cell(text: str) -> str:
    """Text for a Markdown table cell: pipes escaped."""
    return text.replace("|", "\\|")


def config_rows(name: str) -> list[tuple[str, str, str]]:
    """``(option, type, default)`` for each field of the mechanism's Config, in field order."""
    return [
        (f.name, _type_name(f.type), _default(f))
        for f in dataclasses.fields(mechanism_class(name).Config)
    ]


def mechanism_section(name: str) -> str:
    """The Markdown section of one mechanism: Spec facts, Config options, definition."""
    cls = mechanism_class(name)
    spec = cls.spec
    facts = [
        ("family", spec.family),
        ("paper", _paper_link(spec.paper)),
        ("exact", _yes(spec.exact)),
        ("modes", _modes(spec)),
        ("decode", _yes(spec.decode)),
        ("backward", _yes(spec.backward)),
        ("mask", _yes(spec.mask)),
        ("cost", spec.complexity),
        ("dtypes", ", ".join(spec.dtypes)),
    ]
    if cls.forms:
        facts.append(("forms (`form=`)", ", ".join(cls.forms)))
    if cls.backends:
        facts.append(("backends (`backend=`)", ", ".join(cls.backends)))
    lines = [f"### {name}", "", f"**{spec.title}**", "", "| Spec | |", "|---|---|"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in facts]
    lines.append("")
    options = config_rows(name)
    if options:
        lines += [
            f'Config (`attnlab.get("{name}", option=value)`):',
            "",
            "| option | type | default |",
            "|---|---|---|",
        ]
        lines += [
            f"| `{option}` | `{_cell(kind)}` | `{_cell(default)}` |"
            for option, kind, default in options
        ]
    else:
        lines.append("Config: no options.")
    lines += ["", "Definition:", "", "```text", inspect.cleandoc(cls.__doc__ or ""), "```", ""]
    return "\n".join(lines)


def mechanisms_markdown() -> str:
    """The whole of ``docs/mechanisms.md``: an index, then one section per mechanism,
    grouped by family in registry order."""
    names = attnlab.mechanisms()
    families = [f for f in FAMILIES if any(attnlab.spec(n).family == f for n in names)]
    lines = [
        "# Mechanisms",
        "",
        f"<!-- generated from the registry by `{REGENERATE}`; do not edit -->",
        "",
        f"attnlab registers {len(names)} mechanisms in {len(families)} families. Each follows "
        "the tensor contract of `torch.nn.functional.scaled_dot_product_attention` "
        "(see [architecture.md](architecture.md)); this page lists, for each, the facts of "
        "its `Spec`, the options of its `Config` with their types and defaults, and its "
        "definition (the class docstring: what is computed, after which paper). "
        "[guide.md](guide.md) shows them at work.",
        "",
        "Modes: *causal* (bottom-right aligned, so a decode step with a cache is causal "
        "too), *non-causal*, *cross* (Nq != Nk). *decode*: the mechanism has "
        "`init_state`/`step`/`state_size`. *exact*: equal to softmax attention for every "
        "input; an approximate mechanism gives `limit(n)`, the Config under which it is.",
        "",
    ]
    lines += [f"- causal ({c}): {CAUSALITIES[c]}." for c in sorted(CAUSALITIES) if c != "token"]
    lines += ["", "| name | family | what | paper |", "|---|---|---|---|"]
    for name in names:
        spec = attnlab.spec(name)
        lines.append(
            f"| [`{name}`](#{name}) | {spec.family} | {_cell(spec.title)} "
            f"| {_paper_link(spec.paper)} |"
        )
    lines.append("")
    for family in families:
        lines += [f"## {FAMILY_TITLES.get(family, family)}", ""]
        lines += [mechanism_section(n) for n in names if attnlab.spec(n).family == family]
    return "\n".join(lines).rstrip("\n") + "\n"


def write(path: Path) -> bool:
    """Write :func:`mechanisms_markdown` to ``path``; True if the file changed."""
    text = mechanisms_markdown()
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return True


def main(argv: list[str]) -> int:
    """``python -m attnlab.report.mechanisms_doc PATH``: regenerate the page at PATH."""
    if len(argv) != 1:
        print(f"usage: {REGENERATE}", file=sys.stderr)
        return 2
    path = Path(argv[0])
    changed = write(path)
    print(f"{path}: {'updated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
