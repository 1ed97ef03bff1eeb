"""Perplexity of a causal LM on a text, with its own attention or an attnlab mechanism."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from attnlab.core.errors import AttnInputError
from attnlab.core.registry import mechanism_class

from .swap import use


def negative_log_likelihood(model, ids: torch.Tensor, *, chunk: int = 512) -> tuple[float, int]:
    """Summed next-token NLL of ``ids`` [1, N] and the number of predicted tokens.

    The LM head runs on ``chunk`` positions at a time, so the [N, vocab] logits
    are never held whole (at 8k tokens they would take 1.6 GB).
    """
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    head = model.get_output_embeddings()
    with torch.no_grad():
        hidden = base(input_ids=ids, use_cache=False).last_hidden_state[0]
        targets = ids[0, 1:]
        total = 0.0
        for s in range(0, targets.shape[0], chunk):
            logits = head(hidden[s : s + chunk][: targets.shape[0] - s]).float()
            total += float(
                torch.nn.functional.cross_entropy(logits, targets[s : s + chunk], reduction="sum")
            )
    return total, int(targets.shape[0])


def max_positions(config) -> int | None:
    """The most positions a model with this (transformers) config reads, where it says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None) if not isinstance(config, dict) else config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_causal_lm(model) -> None:
    """AttnInputError unless ``model`` is a causal LM: perplexity is next-token prediction."""
    if "CausalLM" not in type(model).__name__ or model.get_output_embeddings() is None:
        raise AttnInputError(
            f"model: perplexity needs a causal LM (next-token prediction), got "
            f"{type(model).__name__}; use smollm2 or another *ForCausalLM model"
        )


def perplexity(model, ids: torch.Tensor, mechanism: str | None = None, **config: Any) -> float:
    """exp(mean next-token NLL) of ``ids`` [1, N]; with ``mechanism``, that mechanism inside."""
    check_causal_lm(model)
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
        raise AttnInputError(f"ids: expected [1, N] with N >= 2, got {tuple(ids.shape)}")
    limit = max_positions(model.config)
    if limit is not None and ids.shape[1] > limit:
        raise AttnInputError(
            f"ids: the model reads at most {limit} positions, got {ids.shape[1]} tokens"
        )
    if mechanism is None:
        nll, n = negative_log_likelihood(model, ids)
    else:
        with use(model, mechanism, **config):
            nll, n = negative_log_likelihood(model, ids)
    return math.exp(nll / n)


def compare(
    model,
    ids: torch.Tensor,
    mechanisms: Sequence[str],
    configs: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Perplexity of the model's own attention, then of each mechanism, side by side.

    Rows: ``mechanism, config, ppl, ratio`` (to the model's own), ``seconds``, ``error``
    (why a mechanism could not run, else None), ``note``. ``configs`` maps a mechanism's
    name to its Config options.
    """
    configs = configs or {}
    t = time.perf_counter()
    own = perplexity(model, ids)
    rows = [
        {
            "mechanism": "model (own attention)",
            "config": {},
            "ppl": own,
            "ratio": 1.0,
            "seconds": time.perf_counter() - t,
            "error": None,
            "note": None,
        }
    ]
    for name in mechanisms:
        t = time.perf_counter()
        try:
            ppl = perplexity(model, ids, name, **configs.get(name, {}))
        except AttnInputError as exc:
            rows.append(
                {
                    "mechanism": name,
                    "config": configs.get(name, {}),
                    "ppl": None,
                    "ratio": None,
                    "seconds": None,
                    "error": str(exc),
                    "note": None,
                }
            )
            continue
        rows.append(
            {
                "mechanism": name,
                "config": configs.get(name, {}),
                "ppl": ppl,
                "ratio": ppl / own,
                "seconds": time.perf_counter() - t,
                "error": None,
                "note": leak_note(name),
            }
        )
    return rows


def leak_note(mechanism: str) -> str | None:
    """Why a mechanism's perplexity may be optimistic: its causal form lets a token's
    routing read later tokens (``Spec.causality`` other than "token"), so a prediction can
    see part of what it predicts. None for token-causal mechanisms."""
    causality = mechanism_class(mechanism).spec.causality
    if causality == "token":
        return None
    return (
        f"causal per {causality}: routing reads later tokens, so this perplexity may be optimistic"
    )
