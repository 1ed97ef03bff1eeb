"""``attnlab analyze``: run the analyses on a real model and write JSON, PNGs and report.html."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from attnlab.analysis import (
    STREAMING,
    Flow,
    Rollout,
    TokenPatterns,
    head_importance,
    make_needle,
    needle_trials,
    repeated_random_tokens,
    retrieval_heads,
    shipped_text,
)
from attnlab.analysis.maps import HeadMaps

from . import html as page
from . import plots

ALL = (
    "sinks",
    "entropy",
    "distance",
    "fai",
    "patterns",
    "retrieval",
    "importance",
    "rollout",
    "flow",
)
DEFAULT = ("sinks", "entropy", "distance", "fai", "patterns")
ON_TEXT = ("sinks", "entropy", "distance", "fai")
HEATMAPS = (  # (analysis, metric, title)
    ("sinks", "first_token_attention", "Attention received by the first token (α₀, Gu et al.)"),
    ("entropy", "normalized_entropy", "Normalised attention entropy (1 = uniform)"),
    ("distance", "mean_distance", "Mean attention distance (tokens)"),
    ("distance", "waad", "Windowed average attention distance (W = 10)"),
    ("fai", "fai_peak", "Peak future attention influence (tokens ≥ 1)"),
    ("patterns", "previous_token", "Previous-token score (repeated random tokens)"),
    ("patterns", "duplicate_token", "Duplicate-token score (repeated random tokens)"),
    ("patterns", "induction", "Induction score (repeated random tokens)"),
    ("retrieval", "retrieval_score", "Retrieval score (Wu et al., needle in a haystack)"),
    ("importance", "head_importance", "Head importance (Michel et al.; method in results.json)"),
)
FLOW_TOKENS = 24
ROLLOUT_TOKENS = 64
MAP_TOKENS = 64


def check_analyses(names: Sequence[str]) -> list[str]:
    """The analysis names, validated (``all`` expands to every one)."""
    out: list[str] = []
    for n in names:
        for part in str(n).split(","):
            part = part.strip()
            if not part:
                continue
            if part == "all":
                out.extend(a for a in ALL if a not in out)
            elif part not in ALL:
                raise ValueError(f"analyses: unknown analysis {part!r}; known: {', '.join(ALL)}")
            elif part not in out:
                out.append(part)
    return out or list(DEFAULT)


def analyze(
    model: str = "smollm2",
    *,
    text: str | Path | None = None,
    needle: bool = False,
    tokens: int = 512,
    analyses: Sequence[str] = DEFAULT,
    out: str | Path = "attnlab-out",
    trials: int = 3,
    importance: str = "gradient",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run ``analyses`` on ``model`` and write ``results.json``, PNGs and ``report.html``
    into ``out`` (nothing is written anywhere else).

    The input is ``tokens`` tokens of ``text`` (a file; default: the text that ships
    with attnlab) or, with ``needle=True``, a needle-in-a-haystack prompt with
    ``tokens`` tokens of context. ``patterns`` runs on a repeated random
    sequence, ``rollout``/``flow`` on the first tokens of the input,
    ``retrieval`` on ``trials`` generated needles, ``importance`` by
    ``importance``: ``"gradient"`` (Michel et al.'s first-order proxy) or
    ``"mask"`` (each head masked in turn, the change in loss). Returns the
    summary written as ``results.json``'s ``meta``.
    """
    from attnlab.models import capture, load

    names = check_analyses(analyses)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"loading {model} ...")
    lm, tok = load(model)
    causal = "CausalLM" in type(lm).__name__
    if needle:
        nd = make_needle(tok, context_tokens=tokens)
        ids = nd.input_ids
        source = f"needle in a haystack ({tokens} tokens of context, code {nd.code})"
    else:
        body = Path(text).read_text(encoding="utf-8") if text is not None else shipped_text()
        ids = tok(body, return_tensors="pt", truncation=False)["input_ids"][:, :tokens]
        source = str(text) if text is not None else "the text shipped with attnlab"
    words = tok.convert_ids_to_tokens(ids[0].tolist())
    rows: list[dict[str, Any]] = []
    stages = [n for n in names if n in ON_TEXT]
    head_maps: dict[str, Any] = {}
    if stages:
        log(f"capturing {', '.join(stages)} over {ids.shape[1]} tokens ...")
        res = capture(lm, ids, [STREAMING[n]() for n in stages], tokenizer=tok, progress=progress)
        rows.extend(res.rows)
    if "patterns" in names:
        log("previous-token, duplicate-token and induction heads on repeated random tokens ...")
        rep = repeated_random_tokens(len(tok), 64, batch=2, bos=_bos(tok))
        res = capture(lm, rep, [TokenPatterns()], progress=False)
        rows.extend({**r, "input": "repeated random tokens"} for r in res.rows)
    if "retrieval" in names:
        if not causal:
            log("retrieval: skipped (needs a generative model)")
        else:
            log(f"retrieval heads: {trials} needles of {max(tokens, 700)} tokens ...")
            run = needle_trials(
                lm,
                tok,
                trials=trials,
                context_tokens=max(tokens, 700),
                score=True,
                progress=progress,
            )
            rows.extend(run.rows)
    if "importance" in names:
        if not causal:
            log("importance: skipped (the loss is next-token prediction; needs a causal LM)")
        else:
            how = "masking each head" if importance == "mask" else "gradient proxy"
            log(f"head importance ({how}) ...")
            rows.extend(head_importance(lm, ids[:, :256], method=importance, progress=progress))
    short = {n for n in ("rollout", "flow") if n in names}
    if short:
        n_short = min(ids.shape[1], FLOW_TOKENS if "flow" in short else ROLLOUT_TOKENS)
        log(f"{' and '.join(sorted(short))} over the first {n_short} tokens ...")
        analyses_short = [Rollout()] if "rollout" in short else []
        analyses_short += [Flow()] if "flow" in short else []
        res = capture(lm, ids[:, :n_short], analyses_short, tokenizer=tok, progress=False)
        rows.extend(res.rows)
        for a in analyses_short:
            head_maps[a.name] = (a, words[:n_short])
    chosen = _chosen_heads(rows)
    if chosen:
        log(f"attention maps of {len(chosen)} chosen heads ...")
        n_map = min(ids.shape[1], MAP_TOKENS)
        inputs = {
            "input": (ids[:, :n_map], f"the first {n_map} tokens of the input"),
            "repeated": (
                repeated_random_tokens(len(tok), 24, batch=1, bos=_bos(tok)),
                "a random token sequence repeated once",
            ),
        }
        head_maps["heads"] = []
        for on, (map_ids, label) in inputs.items():
            picked = [(lh, why) for lh, why, where in chosen if where == on]
            if not picked:
                continue
            hm = HeadMaps([lh for lh, _ in picked], max_tokens=map_ids.shape[1])
            capture(lm, map_ids, [hm], progress=False)
            toks = tok.convert_ids_to_tokens(map_ids[0].tolist())
            head_maps["heads"].append((hm, toks, picked, label))
    meta = {
        "model": model,
        "source": source,
        "tokens": int(ids.shape[1]),
        "analyses": names,
        **({"importance": importance} if "importance" in names else {}),
        "seconds": round(time.perf_counter() - t0, 1),
        "n_layers": int(lm.config.num_hidden_layers),
        "n_heads": int(lm.config.num_attention_heads),
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    log("plotting and writing the report ...")
    write_report(out, rows, meta, words, head_maps)
    log(f"wrote {out / 'results.json'}, {out / 'report.html'} and the PNGs in {out}")
    return meta


def _bos(tok) -> int | None:
    return tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id


def _best(rows, metric: str, analysis: str):
    sel = [
        r
        for r in rows
        if r["metric"] == metric and r["analysis"] == analysis and r.get("head") is not None
    ]
    return max(sel, key=lambda r: r["value"]) if sel else None


def _chosen_heads(rows) -> list[tuple[tuple[int, int], str, str]]:
    """A few heads worth looking at, with why and which input shows them best:
    the strongest sink and retrieval heads on the input, the best previous-token
    and induction heads on repeated random tokens."""
    picks: list[tuple[tuple[int, int], str, str]] = []
    for analysis, metric, why, on in (
        ("sinks", "first_token_attention", "strongest first-token sink", "input"),
        ("retrieval", "retrieval_score", "best retrieval head", "input"),
        ("patterns", "previous_token", "best previous-token head", "repeated"),
        ("patterns", "induction", "best induction head", "repeated"),
    ):
        r = _best(rows, metric, analysis)
        if r is not None and ((r["layer"], r["head"]), on) not in [(p, w) for p, _, w in picks]:
            picks.append(((r["layer"], r["head"]), f"{why} ({metric} {r['value']:.2f})", on))
    return picks


def _top(rows, metric: str, analysis: str, n: int = 8):
    sel = [
        r
        for r in rows
        if r["metric"] == metric and r["analysis"] == analysis and r.get("head") is not None
    ]
    return sorted(sel, key=lambda r: -r["value"])[:n]


def write_report(
    out: Path, rows, meta: dict[str, Any], words: Sequence[str], head_maps: dict[str, Any]
) -> Path:
    """PNG plots and ``report.html`` for ``rows`` into ``out``."""
    sections: list[page.Section] = []
    summary = page.Section("Run")
    summary.tables.append(("", ["field", "value"], [[k, v] for k, v in meta.items()]))
    summary.paragraphs.append("Input (first tokens): " + " ".join(words[:80]))
    sections.append(summary)

    present = {(r["analysis"], r["metric"]) for r in rows}
    if ("sinks", "sink") in present:
        s = page.Section("Attention sinks")
        s.paragraphs.append(
            "Per layer, the key positions with the highest head-mean attention received "
            "(α, mean over the queries that see the key, first 4 query rows left out). "
            "'heads' counts heads with α > 0.3; a position other than 0 that some head "
            "sinks into is a secondary sink."
        )
        sink_rows = [r for r in rows if r["analysis"] == "sinks" and r["metric"] == "sink"]
        dominant = [r for r in sink_rows if r["rank"] == 0]
        first = sum(1 for r in dominant if r["position"] == 0)
        s.paragraphs.append(
            f"The first token is the dominant sink in {first} of {len(dominant)} layers."
        )
        s.tables.append(
            (
                "Top attended positions per layer",
                ["layer", "rank", "position", "token", "α (head mean)", "heads", "kind"],
                [
                    [
                        r["layer"],
                        r["rank"],
                        r["position"],
                        r["token"],
                        r["value"],
                        r["heads"],
                        r["kind"],
                    ]
                    for r in sink_rows
                ],
            )
        )
        secondary = [r for r in sink_rows if r["kind"] == "secondary" and r["is_sink"]]
        s.paragraphs.append(
            "Secondary sinks: "
            + (
                ", ".join(
                    f"layer {r['layer']} position {r['position']} {r['token']!r}" for r in secondary
                )
                or "none found"
            )
        )
        mass = [r for r in rows if r["metric"] == "massive_activation"]
        if mass:
            s.tables.append(
                (
                    "Largest hidden-state dimensions of the sink tokens (entering the "
                    "layer); massive = |x| > 100 and > 1000x the median (Sun et al.)",
                    ["layer", "position", "token", "dim", "value", "x median", "massive"],
                    [
                        [
                            r["layer"],
                            r["position"],
                            r["token"],
                            r["dim"],
                            r["value"],
                            r["ratio"],
                            r["massive"],
                        ]
                        for r in mass[:60]
                    ],
                )
            )
        p = plots.sink_positions(rows, out / "sink_positions.png")
        if p:
            s.images.append(("Sink positions per layer", p))
        sections.append(s)

    maps = page.Section("Per-head scores (layer x head)")
    for analysis, metric, title in HEATMAPS:
        if (analysis, metric) not in present:
            continue
        p = plots.heatmap(
            rows, metric, out / f"heatmap_{metric}.png", analysis=analysis, title=title
        )
        if p:
            maps.images.append((title, p))
        top = _top(rows, metric, analysis, 6)
        extra = "position" if metric in ("fai_peak",) else None
        maps.tables.append(
            (
                f"Top heads: {title}",
                ["layer", "head", metric] + ([extra, "token"] if extra else []),
                [
                    [r["layer"], r["head"], r["value"]]
                    + ([r.get(extra), r.get("token")] if extra else [])
                    for r in top
                ],
            )
        )
    if maps.images:
        sections.append(maps)

    acc = [r for r in rows if r["metric"] == "needle_accuracy"]
    if acc:
        s = page.Section("Retrieval heads")
        found = retrieval_heads(rows)
        n_heads = meta["n_layers"] * meta["n_heads"]
        s.paragraphs.append(
            f"Needle accuracy {acc[0]['value']:.2f} over {acc[0]['trials']} needles; "
            f"{len(found)} of {n_heads} heads score above 0.1: "
            + ", ".join(f"L{layer}H{h}" for layer, h in found)
        )
        s.tables.append(("Answers", ["#", "answer"], list(enumerate(acc[0]["answers"]))))
        sections.append(s)

    for name, title in (("rollout", "Attention rollout"), ("flow", "Attention flow")):
        if name in head_maps:
            a, toks = head_maps[name]
            last = max(r["layer"] for r in rows if r["analysis"] == name)
            n = len(toks)
            m = torch.zeros(n, n)
            for r in rows:
                if r["analysis"] == name and r["layer"] == last:
                    m[r["query"], r["key"]] = r["value"]
            p = plots.attention_map(
                m,
                toks,
                out / f"{name}.png",
                title=f"{title} after layer {last} (rows: output positions, columns: input tokens)",
                xlabel="input token",
                ylabel="output position",
            )
            s = page.Section(title)
            s.paragraphs.append(a.__doc__.strip().split("\n\n")[0].replace("\n", " "))
            s.images.append((title, p))
            sections.append(s)

    if head_maps.get("heads"):
        s = page.Section("Attention maps of chosen heads")
        s.paragraphs.append("Recomputed for these heads only (no other map is kept).")
        for hm, toks, chosen, label in head_maps["heads"]:
            tag = "rep" if "repeated" in label else "input"
            for (layer, h), why in chosen:
                p = plots.attention_map(
                    hm.maps[(layer, h)],
                    toks,
                    out / f"map_{tag}_L{layer}H{h}.png",
                    title=f"layer {layer} head {h}: {why}",
                )
                s.images.append((f"layer {layer} head {h}: {why}; on {label}", p))
        sections.append(s)
    return page.write(
        out / "report.html",
        f"attnlab analysis of {meta['model']}",
        sections,
        intro=[
            "Generated by `attnlab analyze`; every number here is in "
            "results.json next to this page."
        ],
    )
