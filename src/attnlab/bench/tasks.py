"""`bench tasks`: train each mechanism at several widths on a synthetic task and plot
accuracy against recurrent state size and against training throughput.

The two plots of the recall/efficiency trade-off: Zoology's figure 2 (Arora et
al., arXiv:2312.04927: MQAR accuracy against model width and state) and
BASED's figure 1 (arXiv:2402.18668: recall against the state a mechanism keeps
while decoding). The state is what decoding holds per sequence at the task's
length, summed over layers: a KV cache for softmax, the recurrent state for
linear attention, the rolling cache for a window (``TinyLM.state_size``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attnlab.core.errors import AttnInputError
from attnlab.tasks import get_task
from attnlab.tasks.train import describe_mechanism, run_training

QUICK_MECHANISMS = ("softmax", "linear", "based", "delta", "window")
FULL_MECHANISMS = (
    "softmax",
    "linear",
    "based",
    "delta",
    "window",
    "performer",
    "gsa",
    "titans",
    "lightning",
    "softmax:1+linear:1",
    "based/window",
)

# The two settings of the bench: the model, the task and the training budget of a run.
# ``lr`` holds up to width ``lr_width`` and shrinks as 1/width above it (wider models
# diverge at the narrow models' rate); runs stop once held-out accuracy reaches ``target``.
PRESETS: dict[bool, dict[str, Any]] = {
    True: {
        "widths": (32, 64),
        "task": "mqar",
        "task_config": {"vocab": 128, "seq_len": 64, "num_kv_pairs": 8},
        "layers": 2,
        "heads": 1,
        "conv": 3,
        "steps": 600,
        "batch_size": 32,
        "lr": 1e-2,
        "lr_width": 64,
        "eval_every": 50,
        "eval_examples": 256,
        "target": 0.99,
    },
    False: {
        "widths": (32, 64, 128),
        "task": "mqar",
        "task_config": {"vocab": 256, "seq_len": 128, "num_kv_pairs": 16},
        "layers": 2,
        "heads": 1,
        "conv": 3,
        "steps": 2000,
        "batch_size": 64,
        "lr": 1e-2,
        "lr_width": 64,
        "eval_every": 100,
        "eval_examples": 512,
        "target": 0.99,
    },
}


def parse_mechanism(text: str) -> Any:
    """A mechanism from its command-line spelling.

    ``"linear"``: one mechanism; ``"softmax:1+linear:3"``: a per-head mix (heads
    per mechanism); ``"based/window"``: one mechanism per layer, repeated over
    the layers in that order (BASED's and Hymba's layer schedules).
    """
    if "/" in text:
        return [parse_mechanism(part) for part in text.split("/")]
    if "+" in text:
        mix = []
        for part in text.split("+"):
            name, _, heads = part.partition(":")
            if not heads.isdigit():
                raise AttnInputError(
                    f"mechanism: expected mix entries name:heads (softmax:1+linear:3), got {part!r}"
                )
            mix.append((name, int(heads)))
        return mix
    return text


def default_configs(seq_len: int) -> dict[str, dict[str, Any]]:
    """Mechanism options at the task's scale: the local mechanisms see an eighth of the
    sequence (so recall beyond it must come from elsewhere), BASED keeps its paper's
    feature dimension 16 (arXiv:2402.18668, sec. 4)."""
    local = max(2, seq_len // 8)
    return {
        "window": {"window": local},
        "based": {"window": local, "feature_dim": 16},
        "dilated": {"window": local},
    }


def mix_heads(mechanism: Any) -> int | None:
    """The heads a per-head mix spells out (``softmax:1+linear:1`` has 2), else None."""
    if isinstance(mechanism, list) and mechanism and isinstance(mechanism[0], tuple):
        return sum(n for _, n in mechanism)
    return None


def _layers_of(mechanism: Any, layers: int) -> Any:
    """A per-layer schedule repeated over ``layers``; other mechanisms as they are."""
    if isinstance(mechanism, list) and mechanism and isinstance(mechanism[0], (str, list)):
        return [mechanism[i % len(mechanism)] for i in range(layers)]
    return mechanism


def bench_tasks(
    mechanisms: Sequence[str] | None = None,
    widths: Sequence[int] | None = None,
    task: str | None = None,
    quick: bool = True,
    out: str | Path | None = None,
    *,
    task_config: dict[str, Any] | None = None,
    mechanism_config: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
    progress: bool = True,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Train a TinyLM per (mechanism, width) on ``task`` and return one row per run.

    ``mechanisms``: names or hybrids in :func:`parse_mechanism`'s spelling
    (default: softmax, linear, based, delta, window when ``quick``, eleven
    mechanisms and hybrids otherwise). ``widths``: model dims. ``quick`` picks
    the preset (:data:`PRESETS`): a 64-token MQAR at widths 32 and 64 that a
    2-core CPU runs in minutes, or a 128-token MQAR at widths 32-128.
    ``overrides`` replace preset entries (``steps=``, ``layers=``, ...).

    Each row holds the mechanism, width, parameters, the decode state in floats
    per sequence at the task's length (all layers, and per layer), the held-out
    accuracy (last and best), the steps taken, the training throughput in
    tokens per second and the wall time. With ``out`` the rows go to that JSON
    file and the two plots next to it (``<out>.state.png``,
    ``<out>.throughput.png``).
    """
    preset = {**PRESETS[bool(quick)]}
    unknown = sorted(set(overrides) - set(preset))
    if unknown:
        raise AttnInputError(
            f"overrides: bench_tasks has no option {', '.join(unknown)}; "
            f"its options are: {', '.join(sorted(preset))}"
        )
    preset.update(overrides)
    default_widths, default_task = preset.pop("widths"), preset.pop("task")
    default_task_config = preset.pop("task_config")
    base_lr, lr_width = preset.pop("lr"), preset.pop("lr_width")
    names = list(mechanisms or (QUICK_MECHANISMS if quick else FULL_MECHANISMS))
    widths = list(widths or default_widths)
    if task is None:
        task = default_task
        task_config = default_task_config if task_config is None else task_config
    the_task = get_task(task, **(task_config or {}))
    options = {**default_configs(the_task.seq_len), **(mechanism_config or {})}
    rows = []
    for text in names:
        mechanism = _layers_of(parse_mechanism(text), preset["layers"])
        for width in widths:
            start = time.perf_counter()
            row = {"mechanism": text, "label": describe_mechanism(mechanism), "width": width}
            try:
                record = run_training(
                    the_task,
                    mechanism,
                    width,
                    mechanism_config=options,
                    seed=seed,
                    progress=progress,
                    lr=base_lr * min(1.0, lr_width / width),
                    **{**preset, "heads": mix_heads(mechanism) or preset["heads"]},
                )
            except AttnInputError as exc:  # a mechanism that cannot serve this model
                rows.append({**row, "error": str(exc)})
                continue
            result = record["result"]
            rows.append(
                {
                    **row,
                    "layers": preset["layers"],
                    "parameters": record["model"]["parameters"],
                    "state_floats": record["state_floats"],
                    "state_floats_per_layer": record["state_floats"] / preset["layers"],
                    "accuracy": result["metric"],
                    "best_accuracy": result["best_metric"],
                    "steps": result["steps"],
                    "lr": record["train"]["lr"],
                    "tokens_per_second": result["tokens_per_second"],
                    "seconds": time.perf_counter() - start,
                }
            )
    if out is not None:
        training = {**preset, "lr": base_lr, "lr_width": lr_width}
        write(rows, out, the_task.describe(), training, options, quick)
    return rows


def write(rows, out, task, preset, options, quick) -> list[Path]:
    """The rows as JSON at ``out`` and the two plots beside it; returns the plot paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = [out.with_suffix(".state.png"), out.with_suffix(".throughput.png")]
    plot(rows, "state_floats", "decode state (floats per sequence, all layers)", plots[0], True)
    plot(rows, "tokens_per_second", "training throughput (tokens/s)", plots[1], False)
    record = {
        "bench": "tasks",
        "quick": quick,
        "task": task,
        "training": preset,
        "mechanism_config": options,
        "rows": rows,
        "plots": [p.name for p in plots],
    }
    out.write_text(json.dumps(record, indent=2))
    return plots


def plot(rows, x_key: str, x_label: str, path: Path, log_x: bool) -> None:
    """Accuracy against ``x_key``, one line per mechanism through its widths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    done = [r for r in rows if "error" not in r]
    for mechanism in dict.fromkeys(r["mechanism"] for r in done):
        mine = sorted((r for r in done if r["mechanism"] == mechanism), key=lambda r: r["width"])
        ax.plot(
            [r[x_key] for r in mine],
            [r["best_accuracy"] for r in mine],
            marker="o",
            label=mechanism,
        )
        for r in mine:
            ax.annotate(str(r["width"]), (r[x_key], r["best_accuracy"]), fontsize=7)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
