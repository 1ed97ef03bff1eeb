"""``attnlab eval ppl`` and ``attnlab capture-qk``: a real model with mechanisms swapped
in, and its queries and keys kept for the benches. Every argument is checked (the
model's config read, not its weights) before the model loads."""

from __future__ import annotations

from pathlib import Path

import typer

from attnlab.core.errors import AttnInputError
from attnlab.report import records
from attnlab.report import table as tables

from . import options
from .common import CSV_HELP, OUT_HELP, command, console, new_app, say, write

eval_app = new_app("Evaluate a real model with mechanisms swapped in.")

SHIPPED = "shipped text (Pride and Prejudice, ch. 1-3)"


def _text(text: Path | None) -> Path | None:
    """``--text`` checked: a readable UTF-8 file with some text in it."""
    from attnlab.models.text import check_text_file

    return None if text is None else check_text_file(text)


@eval_app.command("ppl")
@command
def ppl(
    model: str = typer.Option("smollm2", help="smollm2, a local folder or a hub id."),
    mechanism: str = typer.Option(..., help="Mechanism name(s), comma-separated."),
    config: list[str] = typer.Option([], help="Mechanism options, NAME:KEY=VALUE (repeatable)."),
    text: Path | None = typer.Option(None, help="A UTF-8 text file (default: shipped text)."),
    tokens: str = typer.Option(
        "1k", help="Tokens to score, e.g. 512 or 2k (the text repeats if shorter)."
    ),
    out: Path | None = typer.Option(None, help=OUT_HELP),
    csv: Path | None = typer.Option(None, help=CSV_HELP),
):
    """Perplexity with a mechanism in place of the model's attention, next to the model's own."""
    from attnlab.models import load
    from attnlab.models.perplexity import compare
    from attnlab.models.text import file_ids

    names = options.mechanisms("--mechanism", mechanism)
    configs = options.configs(config, names)
    count = options.size("--tokens", tokens, minimum=2)
    text = _text(text)
    facts = options.model_facts(model)
    if facts.kind == "encoder":
        raise AttnInputError(
            f"--model: perplexity needs a causal LM (next-token prediction); {model} is an "
            "encoder; use smollm2 or a *ForCausalLM model"
        )
    options.check_tokens(count, facts)
    lm, tok = load(model)
    options.check_tokens(count, options.loaded_facts(model, lm))
    ids, copies = file_ids(tok, count, text)
    with console.status(f"perplexity on {ids.shape[1]} tokens"):
        rows = compare(lm, ids, names, configs)
    source = str(text) if text is not None else SHIPPED
    note = f", repeated {copies}x" if copies > 1 else ""
    title = f"perplexity of {model} on {ids.shape[1]} tokens of {source}{note}"
    console.print(tables.perplexity_table(rows, title))
    write(out, csv, rows, model=model, tokens=int(ids.shape[1]), text=source, copies=copies)


@command
def capture_qk(
    model: str = typer.Option("smollm2", help="smollm2, minilm, a local folder or a hub id."),
    layers: str = typer.Option("0,15", help="Layers to keep, comma-separated."),
    heads: str = typer.Option("", help="Query heads to keep (default: all), comma-separated."),
    tokens: str = typer.Option("1k", help="Tokens of input (the text repeats if shorter)."),
    text: Path | None = typer.Option(None, help="A UTF-8 text file (default: shipped text)."),
    out: Path = typer.Option(Path("qk.safetensors"), help="The safetensors file to write."),
):
    """Keep a real model's post-rotary q, k, v (``layer{L}.q|k|v``, [B, H, N, D]) for benchmarks."""
    from attnlab.models import capture, load
    from attnlab.models.text import file_ids

    keep_layers = options.indices("--layers", layers)
    if not keep_layers:
        raise AttnInputError(f"--layers: expected layer indices like 0,15, got {layers!r}")
    chosen = options.indices("--heads", heads) or None
    count = options.size("--tokens", tokens, minimum=2)
    text = _text(text)

    def check(facts: options.ModelFacts) -> None:
        options.check_tokens(count, facts)
        options.check_indices("--layers", keep_layers, facts.layers, "layers", model)
        options.check_indices("--heads", chosen or [], facts.heads, "query heads", model)

    check(options.model_facts(model))
    lm, tok = load(model)
    check(options.loaded_facts(model, lm))  # a hub id's config is known only now
    ids, copies = file_ids(tok, count, text)
    result = capture(lm, ids, [], keep_qk=dict.fromkeys(keep_layers, chosen))
    path = result.save_qk(
        out,
        model=model,
        tokens=ids.shape[1],
        text=text or "shipped",
        copies=copies,
        heads=heads or "all",
        command=records.current_command(),
    )
    for name, tensor in result.qkv.items():
        say(f"  {name}: {tuple(tensor.shape)}")
    say(f"wrote {path}")
