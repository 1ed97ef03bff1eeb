"""``attnlab analyze``: a real model's attention measured head by head, as a report.

The command checks every argument (the analyses, the token count against the model's
positions, the text file) before the model loads, then hands over to
:func:`attnlab.report.analyze.analyze`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from attnlab.core.errors import AttnInputError

from . import options
from .common import command, console

IMPORTANCE = ("gradient", "mask")
# positions the needle prompt adds around its context: the needle sentence, the
# question and the chat template (55 with SmolLM2's)
NEEDLE_PROMPT_TOKENS = 64
# context of the retrieval analysis's needles when --tokens asks for fewer
RETRIEVAL_MIN_TOKENS = 700


def parse_analyses(items: list[str]) -> list[str]:
    """``--analyses`` (comma-separated, repeatable, any case; ``all`` is every one) as
    known names, each once; the default set when none is named."""
    from attnlab.analysis import default_analyses, registry

    known, default = list(registry()), default_analyses()
    out: list[str] = []
    for item in items:
        for part in item.split(","):
            if not part.strip():
                continue
            if part.strip().lower() == "all":
                chosen = list(known)
            else:
                chosen = [options.choice("--analyses", part, [*known, "all"])]
            out.extend(name for name in chosen if name not in out)
    return out or list(default)


@command
def analyze(
    model: str = typer.Option("smollm2", help="smollm2, minilm, a local folder or a hub id."),
    text: Path | None = typer.Option(None, help="Analyse this text file (default: shipped text)."),
    needle: bool = typer.Option(False, "--needle", help="Analyse a needle-in-a-haystack prompt."),
    tokens: str = typer.Option("512", help="Tokens of input (of context with --needle)."),
    analyses: list[str] = typer.Option(
        ["sinks,entropy,distance,fai,patterns"],
        help="Comma-separated: sinks, entropy, distance, fai, patterns, retrieval, importance, "
        "rollout, flow, or all.",
    ),
    out: Path = typer.Option(Path("attnlab-out"), help="Folder for JSON, PNGs, report.html."),
    trials: int = typer.Option(3, min=1, help="Needles for the retrieval score."),
    importance: str = typer.Option(
        "gradient",
        help="Head importance (Michel et al.): gradient (first-order proxy, one backward "
        "pass) or mask (mask each head in turn and measure the change in loss).",
    ),
):
    """Measure a real model's attention head by head and write a self-contained report."""
    from attnlab.models.text import check_text_file
    from attnlab.report import analyze as run

    if text is not None and needle:
        raise AttnInputError("--text and --needle: give one input, not both")
    importance = options.choice("--importance", importance, IMPORTANCE)
    names = parse_analyses(analyses)
    count = options.size("--tokens", tokens, minimum=2)
    if text is not None:
        check_text_file(text)
    if out.exists() and not out.is_dir():
        raise AttnInputError(f"--out: expected a folder, got the file {out}")
    facts = options.model_facts(model)
    options.check_tokens(count, facts, extra=NEEDLE_PROMPT_TOKENS if needle else 0)
    if "retrieval" in names and facts.kind == "causal":
        options.check_tokens(max(count, RETRIEVAL_MIN_TOKENS), facts, extra=NEEDLE_PROMPT_TOKENS)
    run.analyze(
        model,
        text=text,
        needle=needle,
        tokens=count,
        analyses=names,
        out=out,
        trials=trials,
        importance=importance,
        log=console.print,
    )
