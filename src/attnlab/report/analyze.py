"""``attnlab analyze``: run the analyses on a real model and write JSON, PNGs and report.html."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from attnlab.analysis import (
    Analysis,
    Flow,
    Rollout,
    TokenPatterns,
    default_analyses,
    head_importance,
    make_needle,
    needle_trials,
    registry,
    repeated_random_tokens,
)
from attnlab.analysis.maps import HeadMaps
from attnlab.models.text import file_text

from .page import environment, write_report
from .records import write_json
from .tokens import token_texts


def streaming_analyses() -> dict[str, type[Analysis]]:
    """The registered streaming analyses (classes that ride on a capture) by name."""
    return {
        name: cls
        for name, cls in registry().items()
        if isinstance(cls, type) and issubclass(cls, Analysis)
    }


# every registered analysis, the default set, and those measured on the one capture of
# the input text (the others run the model separately: own_run)
ALL = tuple(registry())
DEFAULT = tuple(default_analyses())
ON_TEXT = tuple(name for name, cls in registry().items() if not cls.own_run)
FLOW_TOKENS = 24
ROLLOUT_TOKENS = 32
MAP_TOKENS = 32  # the attention maps' spans: short enough to label every token
REPEATED_MAP_TOKENS = 16  # a random sequence of this many tokens, repeated once


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
    ``retrieval`` (Wu et al., arXiv:2404.15574) on ``trials`` needles hidden in the
    same text and as many tokens as the input, ``importance`` (Michel et al.,
    arXiv:1905.10650) by ``importance``: ``"gradient"`` (the first-order proxy) or
    ``"mask"`` (each head masked in turn, the change in loss). Returns the
    summary written as ``results.json``'s ``meta``, which also names the
    environment (versions, compiled kernels).
    """
    from attnlab.models import capture, load

    names = check_analyses(analyses)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"loading {model} ...")
    lm, tok = load(model)
    causal = "CausalLM" in type(lm).__name__
    body = file_text(tok, tokens, text)
    text_name = f"the file {text}" if text is not None else "the text shipped with attnlab"
    if needle:
        nd = make_needle(tok, context_tokens=tokens, text=body)
        ids = nd.input_ids
        source = f"a needle in {tokens} tokens of {text_name} (code {nd.code})"
    else:
        ids = tok(body, return_tensors="pt", truncation=False)["input_ids"][:, :tokens]
        source = text_name
    words = token_texts(tok, ids[0].tolist())
    rows: list[dict[str, Any]] = []
    stages = [n for n in names if n in ON_TEXT]
    head_maps: dict[str, Any] = {}
    if stages:
        log(f"capturing {', '.join(stages)} over {ids.shape[1]} tokens ...")
        classes = streaming_analyses()
        res = capture(lm, ids, [classes[n]() for n in stages], tokenizer=tok, progress=progress)
        rows.extend(res.rows)
    if "patterns" in names:
        log("previous-token, duplicate-token and induction heads on repeated random tokens ...")
        rep = repeated_random_tokens(len(tok), 64, batch=2, bos=_bos(tok))
        res = capture(lm, rep, [TokenPatterns()], progress=False)
        rows.extend({**r, "input": "repeated random tokens"} for r in res.rows)
    # the needles hide in the same text and the same number of tokens as the input
    haystack = tokens if needle else int(ids.shape[1])
    if "retrieval" in names:
        if not causal:
            log("retrieval: skipped (needs a generative model)")
        else:
            log(f"retrieval heads: {trials} needles in {haystack} tokens of {text_name} ...")
            run = needle_trials(
                lm,
                tok,
                trials=trials,
                context_tokens=haystack,
                text=body,
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
        head_maps["heads"] = _head_maps(lm, tok, ids, chosen)
    meta = {
        "model": model,
        "source": source,
        "tokens": int(ids.shape[1]),
        "analyses": names,
        **({"importance": importance} if "importance" in names else {}),
        **({"retrieval_text": text_name} if "retrieval" in names else {}),
        "seconds": round(time.perf_counter() - t0, 1),
        "n_layers": int(lm.config.num_hidden_layers),
        "n_heads": int(lm.config.num_attention_heads),
        "environment": environment(),
    }
    write_json(out / "results.json", rows, meta=meta)
    log("plotting and writing the report ...")
    write_report(out, rows, meta, words, head_maps)
    log(f"wrote {out / 'results.json'}, {out / 'report.html'} and the PNGs in {out}")
    return meta


def _head_maps(lm, tok, ids, chosen) -> list[tuple[HeadMaps, list[str], list, str]]:
    """The attention maps of the ``chosen`` heads on short spans: the start of the input,
    and a random sequence repeated once, with the spans' decoded tokens."""
    from attnlab.models import capture

    n_map = min(ids.shape[1], MAP_TOKENS)
    inputs = {
        "input": (ids[:, :n_map], f"the first {n_map} tokens of the input"),
        "repeated": (
            repeated_random_tokens(len(tok), REPEATED_MAP_TOKENS, batch=1, bos=_bos(tok)),
            f"a random sequence of {REPEATED_MAP_TOKENS} tokens repeated once",
        ),
    }
    maps = []
    for on, (map_ids, label) in inputs.items():
        picked = [(lh, why) for lh, why, where in chosen if where == on]
        if not picked:
            continue
        hm = HeadMaps([lh for lh, _ in picked], max_tokens=map_ids.shape[1])
        capture(lm, map_ids, [hm], progress=False)
        maps.append((hm, token_texts(tok, map_ids[0].tolist()), picked, label))
    return maps


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
    the strongest sink head on the input; the best previous-token, induction and
    retrieval (copying) heads on repeated random tokens. A head chosen twice is
    drawn once, with both reasons."""
    picks: dict[tuple[tuple[int, int], str], str] = {}
    for analysis, metric, why, on in (
        ("sinks", "first_token_attention", "strongest first-token sink", "input"),
        ("patterns", "previous_token", "best previous-token head", "repeated"),
        ("patterns", "induction", "best induction head", "repeated"),
        ("retrieval", "retrieval_score", "best retrieval head", "repeated"),
    ):
        r = _best(rows, metric, analysis)
        if r is not None:
            key = ((r["layer"], r["head"]), on)
            reason = f"{why}, {r['value']:.2f}"
            picks[key] = f"{picks[key]}; {reason}" if key in picks else reason
    return [(head, why, on) for (head, on), why in picks.items()]
