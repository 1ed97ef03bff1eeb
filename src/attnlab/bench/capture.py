"""Capture cost: a streaming analysis pass next to the plain SDPA forward, in one process.

Both passes run the base model (no LM head) on the same tokens without
gradients or cache. Peak memory is the process's peak resident set (VmHWM),
reset between the passes through ``/proc/self/clear_refs``, so each pass's
peak includes the loaded model, as a user would see it.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch

from attnlab.analysis._stream import row_entropy
from attnlab.analysis.base import Analysis


class _RowMean(Analysis):
    """A probe for the benchmark: per head, the mean over all attention rows of one
    per-row value (``row_values`` [B, H, rows] of a block)."""

    metric = ""

    def begin(self, info):
        super().begin(info)
        self.sums = torch.zeros(info.n_layers, info.n_heads, dtype=torch.float64)

    def row_values(self, probs, logits):
        raise TypeError(f"{type(self).__name__} must define row_values()")

    def update(self, layer, probs, rows, logits=None):
        self.sums[layer] += self.row_values(probs, logits).sum(dim=(0, 2)).double()

    def finish(self):
        n = self.info.seq_len * self.info.input_ids.shape[0]
        return [
            {
                "analysis": self.name,
                "layer": layer,
                "head": h,
                "metric": self.metric,
                "value": float(self.sums[layer, h] / n),
            }
            for layer in range(self.sums.shape[0])
            for h in range(self.sums.shape[1])
        ]


class RowEntropy(_RowMean):
    """Probe: per head, the mean Shannon entropy of attention rows (nats).

    Computed as the analyses compute it (:func:`~attnlab.analysis._stream.row_entropy`):
    from the block's scores when the capture hands them, else ``-sum p log p``.
    """

    name = "row-entropy"
    metric = "entropy"
    uses_logits = True

    def row_values(self, probs, logits):
        return row_entropy(probs, logits)[0]


class RowMax(_RowMean):
    """Cheaper probe: per head, the mean of each row's largest attention weight."""

    name = "row-max"
    metric = "max"

    def row_values(self, probs, logits):
        return probs.amax(dim=-1)


def _analyze_set() -> list[Analysis]:
    """What ``attnlab analyze`` measures on its text by default, each with its defaults."""
    from attnlab.analysis import registry

    return [cls() for cls in registry().values() if cls.default and not cls.own_run]


# probe name -> the analyses it runs during the capture
PROBES = {
    "entropy": lambda: [RowEntropy()],
    "max": lambda: [RowMax()],
    "analyze": _analyze_set,
    "none": list,
}


def _status_kb(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def reset_peak() -> bool:
    """Reset the process's peak resident set to the current one (Linux); False if impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """Peak resident set of this process since start or the last :func:`reset_peak`, in MB."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def run(
    model_name: str = "smollm2",
    tokens: int = 8192,
    *,
    block: int | None = None,
    text: str | None = None,
    probe: str = "entropy",
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Time and peak memory of the plain forward and of a captured one, side by side.

    ``probe``: the analysis run during the capture (``entropy``, ``max``,
    ``analyze``: the streaming analyses ``attnlab analyze`` runs on its text by
    default, or ``none``, which measures the block-wise exact attention alone).
    ``threads``: torch threads for both passes (default: torch's setting).
    """
    from attnlab.core.errors import AttnInputError

    if probe not in PROBES:
        raise AttnInputError(f"probe: expected one of {', '.join(PROBES)}, got {probe!r}")
    if threads is not None:
        torch.set_num_threads(threads)
    from attnlab.models import capture, load
    from attnlab.models.text import text_ids

    model, tok = load(model_name)
    ids, copies = text_ids(tok, tokens, text)
    base = model.base_model
    record: dict[str, Any] = {
        "model": model_name,
        "tokens": int(ids.shape[1]),
        "text_copies": copies,
        "threads": torch.get_num_threads(),
        "block": block,
    }
    gc.collect()
    record["rss_loaded_mb"] = (_status_kb("VmRSS") or 0) / 1024
    reset_peak()
    t = time.perf_counter()
    with torch.no_grad():
        out = base(input_ids=ids, use_cache=False)
    record["sdpa_seconds"] = time.perf_counter() - t
    record["sdpa_peak_mb"] = peak_rss_mb()
    del out
    gc.collect()
    reset_peak()
    t = time.perf_counter()
    result = capture(model, ids, PROBES[probe](), block=block, progress=progress)
    record["capture_seconds"] = time.perf_counter() - t
    record["capture_peak_mb"] = peak_rss_mb()
    record["time_ratio"] = record["capture_seconds"] / record["sdpa_seconds"]
    record["probe_rows"] = len(result.rows)
    return record
