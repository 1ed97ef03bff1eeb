"""The report page of ``attnlab analyze``: findings first, then one section per analysis.

:func:`write_report` turns the rows of the analyses (the same rows as
``results.json``) into PNGs and ``report.html``: a summary of the findings with
their scores, the input as decoded tokens, the sinks, the per-head heatmaps, the
retrieval heads, rollout and flow, attention maps of the heads the summary names,
the benchmark results found next to the page, and the environment.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import plots
from .html import Figure, Finding, Section, Table, Token, write
from .measures import HEATMAPS
from .tokens import visible

INPUT_TOKENS_SHOWN = 160  # tokens of the input printed under "Input"
TOP_HEADS = 3  # heads named per finding in the summary


def head_name(layer: int, head: int) -> str:
    """``L3H5``: layer 3, head 5 (both from 0)."""
    return f"L{layer}H{head}"


def top_heads(rows, analysis: str, metric: str, n: int) -> list[dict[str, Any]]:
    """The ``n`` per-head rows of ``metric`` with the largest values."""
    sel = [
        r
        for r in rows
        if r["analysis"] == analysis and r["metric"] == metric and r.get("head") is not None
    ]
    return sorted(sel, key=lambda r: -r["value"])[:n]


def _chips(rows) -> list[tuple[str, float]]:
    return [(head_name(r["layer"], r["head"]), r["value"]) for r in rows]


def _token(words: Sequence[str], row: dict[str, Any]) -> Token:
    """The decoded token at the row's position (else the row's own token text)."""
    pos = row.get("position")
    if pos is not None and pos < len(words):
        return Token(words[pos])
    return Token(row.get("token") or "")


def findings(rows, meta: dict[str, Any], words: Sequence[str]) -> list[Finding]:
    """The summary: sinks, retrieval heads, the strongest previous-token, induction and
    duplicate-token heads and the most important heads, with their scores."""
    out: list[Finding] = []
    sinks = [r for r in rows if r["analysis"] == "sinks" and r["metric"] == "sink"]
    if sinks:
        dominant = [r for r in sinks if r["rank"] == 0]
        first = sum(1 for r in dominant if r["position"] == 0)
        rate = [r for r in rows if r["metric"] == "sink_rate" and r["layer"] is None]
        secondary: dict[int, list[int]] = {}
        for r in sinks:
            if r["kind"] == "secondary" and r["is_sink"]:
                secondary.setdefault(r["position"], []).append(r["layer"])
        text = f"the first token is the most-attended key in {first} of {len(dominant)} layers"
        if rate:
            eps = rate[0].get("epsilon", 0.3)
            text += (
                f"; {rate[0]['value']:.0%} of heads put more than {eps} of their attention on it"
            )
        text += "; secondary sinks: " + (
            "; ".join(
                f"‘{visible(_token(words, {'position': p}).text)}’ at position {p} "
                f"(layers {', '.join(map(str, layers))})"
                for p, layers in sorted(secondary.items())
            )
            or "none"
        )
        text += ". Strongest first-token heads (α₀):"
        strongest = top_heads(rows, "sinks", "first_token_attention", TOP_HEADS)
        out.append(Finding("Attention sinks", text, _chips(strongest), "attention-sinks"))
    acc = [r for r in rows if r["metric"] == "needle_accuracy"]
    if acc:
        scored = top_heads(rows, "retrieval", "retrieval_score", 10**6)
        above = [r for r in scored if r["value"] > 0.1]
        text = (
            f"the model answered {acc[0]['value']:.0%} of {acc[0]['trials']} needles hidden "
            f"in {acc[0]['context_tokens']} tokens of {meta.get('retrieval_text', 'the text')}; "
            f"{len(above)} of {len(scored)} heads score above 0.1"
        )
        text += ":" if above else ". Highest scores:"
        out.append(
            Finding("Retrieval heads", text, _chips((above or scored)[:5]), "retrieval-heads")
        )
    for metric, title, measure in (
        ("previous_token", "Previous-token heads", "weight on the token before"),
        ("induction", "Induction heads", "weight on the token after an earlier copy"),
        ("duplicate_token", "Duplicate-token heads", "weight on earlier copies"),
    ):
        best = top_heads(rows, "patterns", metric, TOP_HEADS)
        if best:
            out.append(
                Finding(
                    title,
                    f"on a random sequence repeated once, the {measure}:",
                    _chips(best),
                    "per-head-scores",
                )
            )
    best = top_heads(rows, "importance", "head_importance", TOP_HEADS)
    if best:
        out.append(
            Finding(
                "Most important heads",
                f"removing them raises the loss most ({meta.get('importance', '')}):",
                _chips(best),
                "per-head-scores",
            )
        )
    return out


def _sinks_section(rows, words: Sequence[str], out: Path) -> Section | None:
    sinks = [r for r in rows if r["analysis"] == "sinks" and r["metric"] == "sink"]
    if not sinks:
        return None
    s = Section("Attention sinks", wide=True)
    s.paragraphs.append(
        "Per layer, the key positions that draw the most attention: α is the mean weight "
        "the queries that can see a key put on it, averaged over heads (the first 4 queries "
        "left out). A position is a sink when it draws at least 10 times its share under "
        "uniform attention; a sink other than position 0 is a secondary sink "
        "(Yu et al., arXiv:2406.15765)."
    )
    p = plots.sink_positions(rows, out / "sink_positions.png", tokens=words)
    if p:
        s.figures.append(
            Figure(
                p,
                "Each marker is one of a layer's most-attended positions: x = its position "
                "in the input, y = the layer, area = α. Red: the first token; blue: later "
                "positions, labelled with their token when they are secondary sinks; "
                "hollow: drew attention but below the sink threshold.",
                alt="Most-attended key positions per layer",
            )
        )
    s.tables.append(
        Table(
            "Most-attended positions per layer",
            ["layer", "rank", "position", "token", "α (head mean)", "× uniform", "heads > 0.3"],
            [
                [
                    r["layer"],
                    r["rank"],
                    r["position"],
                    _token(words, r),
                    r["value"],
                    r.get("ratio"),
                    r["heads"],
                ]
                for r in sinks
            ],
        )
    )
    mass = [r for r in rows if r["metric"] == "massive_activation"]
    if mass:
        s.tables.append(
            Table(
                "Largest hidden-state dimensions of the sink tokens entering each layer; "
                "massive = |x| > 100 and > 1000× the median (Sun et al., arXiv:2402.17762)",
                ["layer", "position", "token", "dim", "value", "× median", "massive"],
                [
                    [
                        r["layer"],
                        r["position"],
                        _token(words, r),
                        r["dim"],
                        r["value"],
                        r["ratio"],
                        "yes" if r["massive"] else "no",
                    ]
                    for r in mass
                ],
            )
        )
    return s


def _heatmaps_section(rows, out: Path) -> Section | None:
    present = {(r["analysis"], r["metric"]) for r in rows}
    s = Section("Per-head scores")
    s.paragraphs.append(
        "Every head of every layer on one grid per measure; heads are named LlayerHhead, "
        "counting from 0. The three highest scores follow each caption."
    )
    for m in HEATMAPS:
        if (m.analysis, m.metric) not in present:
            continue
        p = plots.heatmap(
            rows, m.metric, out / f"heatmap_{m.metric}.png", analysis=m.analysis,
            title=m.title, unit=m.unit,
        )  # fmt: skip
        if p is None:
            continue
        best = top_heads(rows, m.analysis, m.metric, TOP_HEADS)
        highest = ", ".join(f"{head_name(r['layer'], r['head'])} {r['value']:.3g}" for r in best)
        s.figures.append(Figure(p, f"{m.reading} Highest: {highest}.", alt=m.title))
    return s if s.figures else None


def _retrieval_section(rows, meta: dict[str, Any]) -> Section | None:
    acc = [r for r in rows if r["metric"] == "needle_accuracy"]
    if not acc:
        return None
    s = Section("Retrieval heads")
    a = acc[0]
    s.paragraphs.append(
        f'{a["trials"]} needles ("The secret code is NNNN.") hidden at spread-out depths in '
        f"the first {a['context_tokens']} tokens of {meta.get('retrieval_text', 'the text')}; "
        f"the model answered {a['value']:.0%} of them. The retrieval score of a head is "
        "measured while the model writes its answer (Wu et al., arXiv:2404.15574); the "
        "heatmap is under Per-head scores."
    )
    scored = top_heads(rows, "retrieval", "retrieval_score", 10**6)
    s.tables.append(
        Table(
            "Heads with retrieval score above 0.1",
            ["head", "retrieval score"],
            [[head_name(r["layer"], r["head"]), r["value"]] for r in scored if r["value"] > 0.1],
        )
    )
    s.tables.append(
        Table("The model's answers", ["needle", "answer"], list(enumerate(a["answers"])))
    )
    return s


FLOW_READING = {
    "rollout": "Rollout multiplies the head-averaged attention of the layers, each with "
    "the residual path added (0.5 A + 0.5 I): every path from an input token counts.",
    "flow": "Flow treats the layers as a graph whose edges carry the same weights and "
    "takes the maximum flow from each input token: a path counts only as much as its "
    "narrowest edge.",
}


def _flow_section(rows, head_maps: dict[str, Any], out: Path) -> Section | None:
    shown = [n for n in ("rollout", "flow") if n in head_maps]
    if not shown:
        return None
    s = Section("Attention rollout and flow", wide=True)
    s.paragraphs.append(
        "How much of each input token reaches each position through all the layers "
        "(Abnar & Zuidema, arXiv:2005.00928), over the first tokens of the input."
    )
    for name in shown:
        _, toks = head_maps[name]
        last = max(r["layer"] for r in rows if r["analysis"] == name)
        m = torch.zeros(len(toks), len(toks))
        for r in rows:
            if r["analysis"] == name and r["layer"] == last:
                m[r["query"], r["key"]] = r["value"]
        title = f"Attention {name} after layer {last}"
        p = plots.attention_map(
            m, toks, out / f"{name}.png", title=title,
            xlabel="input token", ylabel="output position", unit="share of the input",
        )  # fmt: skip
        s.figures.append(
            Figure(
                p,
                f"Row i: the share of position i after layer {last} that traces back to each "
                f"input token (column). {FLOW_READING[name]} Weight in the first column is "
                "the sink; a bright diagonal: positions keep mostly their own token.",
                alt=title,
            )
        )
    return s


# how to read the attention map of a head chosen for one of these reasons
MAP_READING = {
    "sink": "A sink head puts its weight in the first column.",
    "previous-token": "A previous-token head lights the diagonal just below the main one.",
    "induction": "An induction head lights, in the second half, the line one step right of "
    "the earlier copy of each token: it looks up what followed the token last time.",
    "retrieval": "A retrieval head copies from its context: in the second half it looks where "
    "an induction head does, at the earlier copy of the token it is about to write.",
}


def _maps_section(head_maps: dict[str, Any], out: Path) -> Section | None:
    if not head_maps.get("heads"):
        return None
    s = Section("Attention maps of the heads in the summary", wide=True)
    s.paragraphs.append(
        "Each head's attention recomputed on a short span so every token can be labelled. "
        "Row: the query token; column: the key token it attends to; colour: the weight."
    )
    for hm, toks, chosen, label in head_maps["heads"]:
        tag = "rep" if "repeated" in label else "input"
        for (layer, h), why in chosen:
            p = plots.attention_map(
                hm.maps[(layer, h)], toks, out / f"map_{tag}_L{layer}H{h}.png",
                title=f"{head_name(layer, h)}: {why}",
            )  # fmt: skip
            reading = " ".join(text for kind, text in MAP_READING.items() if kind in why)
            s.figures.append(
                Figure(p, f"On {label}. {reading}", alt=f"{head_name(layer, h)}: {why}")
            )
    return s


def bench_tables(folder: Path) -> list[Table]:
    """A table per ``bench-*.json`` in ``folder`` (a list of records, or an envelope object
    with ``rows``): the columns that vary; the envelope's fields and the values shared by
    every row go in the caption."""
    tables = []
    for path in sorted(Path(folder).glob("bench-*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:  # a file that is not a bench record is named, not fatal
            tables.append(Table(f"{path.name}: not readable as JSON ({exc})", [], []))
            continue
        envelope = data if isinstance(data, dict) else {}
        records = [
            r for r in (envelope.get("rows", []) if envelope else data) if isinstance(r, dict)
        ]
        if not records:
            continue
        keys = [k for k in records[0] if not isinstance(records[0][k], list | dict)]
        varying = [k for k in keys if len({json.dumps(r.get(k)) for r in records}) > 1]
        shared = [f"{k} {v}" for k, v in envelope.items() if isinstance(v, str | int | float)]
        shared += [
            f"{k} {records[0][k]}" for k in keys if k not in varying and records[0][k] is not None
        ]
        caption = path.name + (": " + ", ".join(shared) if shared else "")
        tables.append(
            Table(caption, varying, [[r.get(k) for k in varying] for r in records], folded=False)
        )
    return tables


def environment() -> list[tuple[str, str]]:
    """The software the run used: attnlab, Python, torch, transformers, the compiled kernels."""
    import attnlab
    from attnlab.core import native

    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = "not installed"
    kernels = native.describe() if hasattr(native, "describe") else (
        "compiled kernels on" if native.enabled() else "compiled kernels off (PyTorch paths)"
    )  # fmt: skip
    return [
        ("attnlab", attnlab.__version__),
        ("Python", platform.python_version()),
        ("torch", f"{torch.__version__} ({torch.get_num_threads()} threads)"),
        ("transformers", transformers_version),
        ("native kernels", kernels),
        ("machine", f"{platform.system()} {platform.machine()}"),
    ]


def write_report(
    out: Path, rows, meta: dict[str, Any], words: Sequence[str], head_maps: dict[str, Any]
) -> Path:
    """PNG plots and ``report.html`` for ``rows`` into ``out``.

    ``words``: the input's tokens as decoded text; ``head_maps``: the rollout/flow
    analyses with their tokens, and ``heads``: (HeadMaps, tokens, [(head, why)], label)
    for the attention maps. ``meta`` is ``results.json``'s summary of the run.
    """
    out = Path(out)
    summary = Section("Summary of findings")
    summary.findings = findings(rows, meta, words)
    if not summary.findings:
        summary.paragraphs.append("No sink, pattern, retrieval or importance analysis ran.")
    text = Section("Input")
    text.paragraphs.append(
        f"{meta.get('source', 'the input')}: {meta.get('tokens', len(words))} tokens, the "
        f"first {min(len(words), INPUT_TOKENS_SHOWN)} shown one box per token."
    )
    text.tokens = list(words[:INPUT_TOKENS_SHOWN])
    sections = [summary, text]
    sections += [
        s
        for s in (
            _sinks_section(rows, words, out),
            _heatmaps_section(rows, out),
            _retrieval_section(rows, meta),
        )
        if s is not None
    ]
    sections += [
        s for s in (_flow_section(rows, head_maps, out), _maps_section(head_maps, out)) if s
    ]
    bench = bench_tables(out)
    if bench:
        b = Section("Benchmarks in this folder")
        b.paragraphs.append(
            "The bench-*.json files next to this page, as written by attnlab bench."
        )
        b.tables = bench
        sections.append(b)
    env = Section("Environment")
    env.tables.append(
        Table("", ["software", "version"], meta.get("environment") or environment(), folded=False)
    )
    sections.append(env)
    facts = [
        ("model", meta.get("model")),
        ("input", f"{meta.get('source')} ({meta.get('tokens')} tokens)"),
        ("analyses", ", ".join(meta.get("analyses", []))),
        ("layers × heads", f"{meta.get('n_layers')} × {meta.get('n_heads')}"),
        ("time", f"{meta['seconds']} s" if "seconds" in meta else None),
    ]
    if "importance" in meta:
        facts.append(("head importance", meta["importance"]))
    return write(
        out / "report.html",
        f"attnlab analysis of {meta['model']}",
        sections,
        intro=[
            "Written by attnlab analyze; every number on this page is in results.json "
            "next to it, and every plot is a PNG there too."
        ],
        facts=[(k, v) for k, v in facts if v is not None],
    )
