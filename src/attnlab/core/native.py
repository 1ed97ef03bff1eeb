"""attnlab's compiled CPU kernels (``csrc/``), loaded with ctypes when they were built.

``make native`` compiles ``csrc/*.c`` into one library per instruction set, next to this
file: on x86-64 ``_native_avx2.so`` (the portable baseline, x86-64-v3: AVX2 and FMA) and,
where the compiler can, ``_native_avx512.so`` (x86-64-v4); elsewhere ``_native_generic.so``.
At load time the best variant the processor runs is chosen from the flags it reports
(``/proc/cpuinfo``; elsewhere the compiler's CPU model, asked through the library's
``attnlab_cpu_level``); a variant the processor cannot run is never loaded. The
environment variable ``ATTNLAB_NATIVE_ISA=avx2|avx512|generic`` forces one (an error where
the processor cannot run it or it is not built). Every library carries the version of its
calling convention (``attnlab_abi_version``); a library of another version, a stale build
from an older checkout, is refused with a warning that says to run ``make native``, and
never called. :func:`describe` and :func:`summary` say which variant runs.

Every kernel here has a pure-PyTorch twin that is the reference and the fallback: without
a C compiler, on another device, with autograd or for shapes a kernel does not take, the
PyTorch path runs and gives the same sum. The environment variable ``ATTNLAB_NATIVE=0``
(or :func:`disabled`) turns the kernels off, for side-by-side measurements and tests. The
wrappers (:func:`causal_scan`, :func:`moba`, :func:`based`) check their own inputs and
raise :class:`~attnlab.core.errors.AttnInputError` naming the argument: float32 CPU
tensors outside autograd, consistent shapes, and every integer the C code receives within
its range (a C ``int``: below 2^31, never silently truncated).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AttnInputError

# The version of the kernels' calling convention; csrc/library.c returns the same number
# from attnlab_abi_version. Raise both together whenever a kernel's signature changes.
ABI_VERSION = 2

LIBRARY_DIR = Path(__file__).parent
# The single library of attnlab before the variants (no ABI version): refused as stale.
LEGACY_LIBRARY = "_native.so"

# The processor flags (as Linux names them in /proc/cpuinfo) each variant's compiler flags
# (the Makefile's NATIVE_ISA_*) let it use: x86-64-v3's AVX2 set, and x86-64-v4's AVX-512.
_X86_64_V3 = frozenset({"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe"})
ISA_FLAGS = {
    "avx512": _X86_64_V3 | {"avx512f", "avx512cd", "avx512dq", "avx512bw", "avx512vl"},
    "avx2": _X86_64_V3,
    "generic": frozenset(),
}
# attnlab_cpu_level's answer (csrc/library.c) -> the variant it means
_CPU_LEVELS = {4: "avx512", 3: "avx2"}
ISA_ENV = "ATTNLAB_NATIVE_ISA"
CPUINFO = Path("/proc/cpuinfo")

# feature maps the scan kernel computes itself (csrc/scan.c)
SCAN_FEATURES = {"identity": 0, "elu1": 1, "silu": 2}
_MAX_CHUNK = 256
# every integer handed to the C code is an int
_INT_LIMIT = 2**31


@dataclass(frozen=True)
class _Active:
    """The variant whose library the kernels call (None and None: the PyTorch paths)."""

    isa: str | None
    library: ctypes.CDLL | None


_active: _Active | None = None
_opened: dict[Path, ctypes.CDLL | None] = {}
_refused: dict[Path, str] = {}
_enabled = os.environ.get("ATTNLAB_NATIVE", "1") != "0"


def library_path(isa: str) -> Path:
    """Where ``make native`` puts the library of variant ``isa``."""
    return LIBRARY_DIR / f"_native_{isa}.so"


def built_variants() -> list[str]:
    """The variants whose library is present, best first (whether or not they run here)."""
    return [isa for isa in ISA_FLAGS if library_path(isa).exists()]


def open_library(path: Path) -> ctypes.CDLL | None:
    """The library at ``path`` with its kernels' signatures declared, or None (with a
    warning, once) where it cannot be loaded or its ``attnlab_abi_version`` differs from
    :data:`ABI_VERSION` or is missing: a stale build, never called."""
    if path in _opened:
        return _opened[path]
    lib, why = None, None
    try:
        candidate = ctypes.CDLL(str(path))
    except OSError as err:
        why = f"cannot be loaded ({err})"
    else:
        version_of = getattr(candidate, "attnlab_abi_version", None)
        version = None if version_of is None else version_of()
        if version != ABI_VERSION:
            found = "no ABI version" if version is None else f"ABI version {version}"
            why = f"is a stale build ({found}; this attnlab needs {ABI_VERSION})"
        else:
            lib = _declare(candidate)
    if why is not None:
        _refused[path] = f"{path.name} {why}"
        warnings.warn(
            f"attnlab: the compiled kernels in {path} {why}: run `make native`; "
            "the pure-PyTorch paths run meanwhile",
            RuntimeWarning,
            stacklevel=2,
        )
    _opened[path] = lib
    return lib


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, i = ctypes.c_void_p, ctypes.c_int
    lib.attnlab_abi_version.restype = i
    lib.attnlab_cpu_level.restype = i
    lib.attnlab_causal_scan.argtypes = [ptr] * 7 + [i] * 8
    lib.attnlab_causal_scan.restype = i
    lib.attnlab_based.argtypes = [ptr] * 5 + [i] * 8 + [ctypes.c_float, i]
    lib.attnlab_based.restype = i
    lib.attnlab_moba.argtypes = [ptr] * 4 + [i] * 10 + [ctypes.c_float, i]
    lib.attnlab_moba.restype = i
    return lib


def cpu_flags() -> frozenset[str] | None:
    """The processor's feature flags: Linux's /proc/cpuinfo ("flags", or "Features" on
    Arm); elsewhere those of the level a built library's ``attnlab_cpu_level`` reports
    (asked in code compiled for plain x86-64); None where neither tells."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    for isa in reversed(built_variants()):  # the most portable build first
        lib = open_library(library_path(isa))
        if lib is not None:
            return ISA_FLAGS.get(_CPU_LEVELS.get(lib.attnlab_cpu_level(), "generic"))
    return None


def runnable(isa: str, flags: frozenset[str] | None) -> bool:
    """Whether a processor with ``flags`` runs variant ``isa`` (unknown flags: generic)."""
    return ISA_FLAGS[isa] <= (flags or frozenset())


def choose_variant(
    built: list[str], flags: frozenset[str] | None, forced: str | None = None
) -> list[str]:
    """The variants to try, best first: the ``built`` ones a processor with ``flags`` runs,
    or only ``forced`` (the value of ATTNLAB_NATIVE_ISA) where one is named. A forced
    variant that is unknown, not built or (where the flags are known) not run by the
    processor raises AttnInputError."""
    if forced:
        if forced not in ISA_FLAGS:
            raise AttnInputError(
                f"{ISA_ENV}: expected one of {', '.join(ISA_FLAGS)}, got {forced!r}"
            )
        if forced not in built:
            raise AttnInputError(
                f"{ISA_ENV}: expected a built variant ({', '.join(built) or 'none'}), "
                f"got {forced!r}, which is not built: run `make native`"
            )
        if flags is not None and not runnable(forced, flags):
            missing = " ".join(sorted(ISA_FLAGS[forced] - flags))
            raise AttnInputError(
                f"{ISA_ENV}: expected a variant this processor runs, got {forced!r}, "
                f"which needs {missing}"
            )
        return [forced]
    return [isa for isa in built if runnable(isa, flags)]


def _load() -> _Active:
    """The active variant: chosen and opened on first use."""
    global _active
    if _active is None:
        built = built_variants()
        flags = cpu_flags() if built else None
        active = _Active(None, None)
        for isa in choose_variant(built, flags, os.environ.get(ISA_ENV) or None):
            lib = open_library(library_path(isa))
            if lib is not None:
                active = _Active(isa, lib)
                break
        legacy = LIBRARY_DIR / LEGACY_LIBRARY
        if not built and legacy.exists():
            open_library(legacy)  # refused: it says to run `make native`
        _active = active
    return _active


def reset() -> None:
    """Forget the chosen variant, so that the next call chooses again from the libraries
    in :data:`LIBRARY_DIR` and ATTNLAB_NATIVE_ISA as they are then (for tests; a library
    already opened in this process keeps its code)."""
    global _active
    _active = None
    _opened.clear()
    _refused.clear()


def library() -> ctypes.CDLL | None:
    """The compiled kernels of the chosen variant, or None when none was built, none
    runs on this processor or the built ones are stale."""
    return _load().library


def variants() -> list[str]:
    """The built variants this processor runs, best first (the first one is chosen)."""
    built = built_variants()
    return choose_variant(built, cpu_flags()) if built else []


@contextlib.contextmanager
def use_variant(isa: str):
    """Within this block the kernels of variant ``isa`` run (the tests run every variant
    the processor runs); ``isa`` must be one of :func:`variants` and not stale."""
    global _active
    if isa not in variants():
        raise AttnInputError(
            f"isa: expected a built variant this processor runs "
            f"({', '.join(variants()) or 'none'}), got {isa!r}"
        )
    lib = open_library(library_path(isa))
    if lib is None:
        raise AttnInputError(f"isa: {_refused[library_path(isa)]}: run `make native`")
    before, _active = _load(), _Active(isa, lib)
    try:
        yield
    finally:
        _active = before


def enabled() -> bool:
    """Whether the compiled kernels are built and switched on."""
    return _enabled and library() is not None


@contextlib.contextmanager
def disabled():
    """Within this block every caller takes its pure-PyTorch path."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def describe() -> dict:
    """What runs: ``built`` (any compiled library present), ``enabled`` (the kernels are
    loaded and switched on), ``isa`` (the variant that runs, None: the PyTorch paths),
    ``variants`` (the built variants this processor runs, best first) and ``abi``
    (:data:`ABI_VERSION`). For benchmark records and ``attnlab list``. AttnInputError where
    ATTNLAB_NATIVE_ISA names a variant that is unknown, not built or cannot run here."""
    active = _load()
    on = _enabled and active.library is not None
    return {
        "built": bool(built_variants()) or (LIBRARY_DIR / LEGACY_LIBRARY).exists(),
        "enabled": on,
        "isa": active.isa if on else None,
        "variants": variants(),
        "abi": ABI_VERSION,
    }


def summary() -> str:
    """:func:`describe` in one line, e.g. ``native kernels: avx2 (abi 2)``."""
    info, active = describe(), _load()
    if info["enabled"]:
        return f"native kernels: {info['isa']} (abi {ABI_VERSION})"
    if active.library is not None:
        return (
            f"native kernels: {active.isa} built, switched off "
            "(ATTNLAB_NATIVE=0 or native.disabled(); pure PyTorch)"
        )
    if _refused:
        reasons = "; ".join(_refused.values())
        return f"native kernels: refused ({reasons}; pure PyTorch; run `make native`)"
    if info["built"]:
        return (
            f"native kernels: none of the built variants ({', '.join(built_variants())}) "
            "runs on this processor (pure PyTorch)"
        )
    return "native kernels: not built (pure PyTorch; run `make native`)"


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _kernel_inputs(tensors) -> bool:
    """The kernels are on and every tensor is float32 on the CPU, outside autograd."""
    if not enabled():
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _check_int(name: str, value: object, low: int = 0, high: int = _INT_LIMIT - 1) -> int:
    """An integer the C code receives as an int: within [low, high], never truncated."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or not (low <= value <= high)
    ):
        upper = "2^31)" if high == _INT_LIMIT - 1 else f"{high}]"
        raise AttnInputError(f"{name}: expected an integer in [{low}, {upper}, got {value!r}")
    return int(value)


def _check_tensor(name: str, t: object, layout: str) -> torch.Tensor:
    """A float32 CPU tensor of ``layout`` (e.g. "[B, H, N, F]") outside autograd,
    made contiguous."""
    ndim = layout.count(",") + 1
    if not isinstance(t, torch.Tensor):
        raise AttnInputError(f"{name}: expected a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise AttnInputError(
            f"{name}: expected {ndim} dimensions {layout}, got shape {tuple(t.shape)}"
        )
    if t.dtype != torch.float32:
        raise AttnInputError(
            f"{name}: expected dtype torch.float32 (the compiled kernels'), got {t.dtype}"
        )
    if t.device.type != "cpu":
        raise AttnInputError(f"{name}: expected a CPU tensor, got device {t.device}")
    if torch.is_grad_enabled() and t.requires_grad:
        raise AttnInputError(
            f"{name}: expected no autograd (the kernels have no backward), got "
            "requires_grad=True; call under torch.no_grad() or use the PyTorch path"
        )
    return t.contiguous()


def _check_dims(name: str, t: torch.Tensor, layout: str, want: tuple) -> None:
    """``t``'s sizes equal ``want`` where it gives one (None: any)."""
    for size, expected in zip(t.shape, want, strict=True):
        if expected is not None and size != expected:
            shown = ", ".join("*" if e is None else str(e) for e in want)
            raise AttnInputError(
                f"{name}: expected shape {layout} = [{shown}], got {tuple(t.shape)}"
            )


def _check_multiple_of_16(name: str, size: int) -> None:
    if size % 16 or size <= 0:
        raise AttnInputError(f"{name}: expected a positive multiple of 16, got {size}")


def _check_scale(scale: object) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise AttnInputError(f"scale: expected a finite number, got {scale!r}")
    return float(scale)


def _threads(threads: object) -> int:
    """The kernel's thread count: ``threads``, default torch.get_num_threads()."""
    return _check_int("threads", torch.get_num_threads() if threads is None else threads, 1)


def _kernels() -> ctypes.CDLL:
    """The active library; RuntimeError where there is none (check ``*_applies`` first)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"attnlab: no compiled kernels to call ({summary()})")
    return lib


def _check(code: int, kernel: str) -> None:
    """Raise on a kernel's nonzero return code."""
    if code != 0:
        why = {1: "out of memory", 2: "arguments the kernel does not take"}.get(code, "unknown")
        raise RuntimeError(f"{kernel} failed with code {code}: {why}")


def scan_applies(
    tensors: tuple[torch.Tensor | None, ...], *, feature: str | None, chunk: int
) -> bool:
    """Whether :func:`causal_scan` takes these inputs (q, k, v, state, normaliser, log
    decay; None entries are skipped): float32 CPU tensors without autograd, a feature map
    the kernel knows, F and Dv multiples of 16, chunk <= 256, and a decay (if any)
    constant over the steps."""
    q, k, v, *rest = tensors
    log_decay = rest[-1] if rest else None
    present = [t for t in tensors if t is not None]
    if feature not in SCAN_FEATURES or chunk > _MAX_CHUNK or not _kernel_inputs(present):
        return False
    if log_decay is not None and log_decay.shape[-1] != 1:
        return False
    return q.shape[-1] == k.shape[-1] and q.shape[-1] % 16 == 0 and v.shape[-1] % 16 == 0


def causal_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None,
    *,
    chunk: int,
    feature: str,
    log_decay: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The fused chunked causal scan of ``csrc/scan.c`` (same sum as
    :func:`attnlab.core.scan._scan_blocks`): q [B, H, G, N, F], k [B, H, N, F],
    v [B, H, N, Dv] raw queries and keys that the kernel maps by ``feature``, state
    s [B, H, F, Dv] and normaliser z [B, H, F] (None: unnormalised), log_decay None or
    [B|1, H|1, 1]. Returns out [B, H, G, N, Dv] and the final (s, z), float32.
    Check :func:`scan_applies` first (it is given q, k, v, s, z, log_decay)."""
    q = _check_tensor("q", q, "[B, H, G, N, F]")
    b, h, g, n, f = q.shape
    k = _check_tensor("k", k, "[B, H, N, F]")
    _check_dims("k", k, "[B, H, N, F]", (b, h, n, f))
    v = _check_tensor("v", v, "[B, H, N, Dv]")
    _check_dims("v", v, "[B, H, N, Dv]", (b, h, n, None))
    dv = v.shape[-1]
    _check_multiple_of_16("q: F", f)
    _check_multiple_of_16("v: Dv", dv)
    s = _check_tensor("s", s, "[B, H, F, Dv]")
    _check_dims("s", s, "[B, H, F, Dv]", (b, h, f, dv))
    s = s.clone()  # the kernel writes the final state into it
    if z is not None:
        z = _check_tensor("z", z, "[B, H, F]")
        _check_dims("z", z, "[B, H, F]", (b, h, f))
        z = z.clone()
    if log_decay is not None:
        log_decay = _check_tensor("log_decay", log_decay, "[B|1, H|1, 1]")
        _check_dims("log_decay", log_decay, "[B|1, H|1, 1]", (None, None, 1))
        if log_decay.shape[0] not in (1, b) or log_decay.shape[1] not in (1, h):
            raise AttnInputError(
                f"log_decay: expected shape [B|1, H|1, 1] with B={b}, H={h}, "
                f"got {tuple(log_decay.shape)}"
            )
        log_decay = log_decay.expand(b, h, 1).contiguous()
    if feature not in SCAN_FEATURES:
        raise AttnInputError(
            f"feature: expected one of {', '.join(SCAN_FEATURES)}, got {feature!r}"
        )
    args = (
        _check_int("q: B*H", b * h, 1),
        _check_int("q: G", g, 1),
        _check_int("q: N", n),
        _check_int("q: F", f, 1),
        _check_int("v: Dv", dv, 1),
        _check_int("chunk", chunk, 1, _MAX_CHUNK),
        SCAN_FEATURES[feature],
        _threads(None),
    )
    out = torch.empty(b, h, g, n, dv, dtype=torch.float32)
    code = _kernels().attnlab_causal_scan(
        _ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(s), _ptr(z), _ptr(log_decay), *args
    )
    _check(code, "attnlab_causal_scan")
    return out, s, z


def moba_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask) -> bool:
    """Whether :func:`moba` takes these inputs: float32 CPU tensors without autograd, no
    mask, Dv a multiple of 16 (any D, block, top_k and lengths; GQA)."""
    if mask is not None or not _kernel_inputs((q, k, v)):
        return False
    return v.shape[-1] % 16 == 0 and q.shape[2] > 0 and k.shape[2] > 0


def moba(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block: int,
    top_k: int,
    causal: bool,
    scale: float,
    threads: int | None = None,
) -> torch.Tensor:
    """MoBA attention (Lu et al., arXiv:2502.13189) in ``csrc/moba.c``: the gate, the
    top-k block selection of :func:`attnlab.mechanisms.sparse.moba.moba_select` (ties:
    the lower block index) and the attention of each query over its own block (causal
    inside it under ``causal``) and its chosen blocks, with one softmax. q [B, Hq, Nq, D],
    k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv]; returns [B, Hq, Nq, Dv] float32. The kernel's
    threads (default torch.get_num_threads()) share the heads, each head split into query
    ranges where the heads do not divide evenly. Check :func:`moba_applies` first."""
    q = _check_tensor("q", q, "[B, Hq, Nq, D]")
    b, hq, nq, d = q.shape
    k = _check_tensor("k", k, "[B, Hkv, Nk, D]")
    _check_dims("k", k, "[B, Hkv, Nk, D]", (b, None, None, d))
    hkv, nk = k.shape[1], k.shape[2]
    v = _check_tensor("v", v, "[B, Hkv, Nk, Dv]")
    _check_dims("v", v, "[B, Hkv, Nk, Dv]", (b, hkv, nk, None))
    dv = v.shape[-1]
    if hkv == 0 or hq % hkv:
        raise AttnInputError(f"k: expected a number of heads Hkv that divides Hq={hq}, got {hkv}")
    _check_multiple_of_16("v: Dv", dv)
    args = (
        _check_int("q: B*Hq", b * hq, 1),
        _check_int("q: Hq", hq, 1),
        _check_int("k: Hkv", hkv, 1),
        _check_int("q: Nq", nq, 1),
        _check_int("k: Nk", nk, 1),
        _check_int("q: D", d, 1),
        _check_int("v: Dv", dv, 1),
        _check_int("block", block, 1),
        _check_int("top_k", top_k, 1),
        int(bool(causal)),
        _check_scale(scale),
        _threads(threads),
    )
    out = torch.empty(b, hq, nq, dv, dtype=torch.float32)
    code = _kernels().attnlab_moba(_ptr(q), _ptr(k), _ptr(v), _ptr(out), *args)
    _check(code, "attnlab_moba")
    return out


# chunks the Based kernel takes (csrc/based.c): whole vectors of 16 tokens
BASED_CHUNKS = range(16, _MAX_CHUNK + 1, 16)


def based_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk: int) -> bool:
    """Whether :func:`based` takes these inputs: float32 CPU tensors without autograd, Dv a
    multiple of 16 and a chunk of whole vectors (16 .. 256, a multiple of 16)."""
    if chunk not in BASED_CHUNKS or not _kernel_inputs((q, k, v)):
        return False
    return v.shape[-1] % 16 == 0 and q.shape[2] == k.shape[2]


def based(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj: torch.Tensor,
    *,
    window: int,
    chunk: int,
    scale: float,
) -> torch.Tensor:
    """Based's causal attention (Arora et al., arXiv:2402.18668) in ``csrc/based.c``, the
    same sum as :meth:`attnlab.mechanisms.linear.based.Based._chunked`: exact softmax
    weights inside the last ``window`` positions, the 2nd-order Taylor weights of the
    projected q~ = q proj, k~ = k proj beyond it, one normaliser. q [B, Hq, N, D],
    k [B, Hkv, N, D], v [B, Hkv, N, Dv], proj [D, d'] (scale^1/2 included); returns
    [B, Hq, N, Dv] float32. Check :func:`based_applies` first."""
    q = _check_tensor("q", q, "[B, Hq, N, D]")
    b, hq, n, d = q.shape
    k = _check_tensor("k", k, "[B, Hkv, N, D]")
    _check_dims("k", k, "[B, Hkv, N, D]", (b, None, n, d))
    hkv = k.shape[1]
    v = _check_tensor("v", v, "[B, Hkv, N, Dv]")
    _check_dims("v", v, "[B, Hkv, N, Dv]", (b, hkv, n, None))
    dv = v.shape[-1]
    if hkv == 0 or hq % hkv:
        raise AttnInputError(f"k: expected a number of heads Hkv that divides Hq={hq}, got {hkv}")
    _check_multiple_of_16("v: Dv", dv)
    proj = _check_tensor("proj", proj, "[D, d']")
    _check_dims("proj", proj, "[D, d']", (d, None))
    if _check_int("chunk", chunk, 16, _MAX_CHUNK) % 16:
        raise AttnInputError(f"chunk: expected a multiple of 16 in [16, 256], got {chunk!r}")
    args = (
        _check_int("k: B*Hkv", b * hkv, 1),
        _check_int("q: Hq/Hkv", hq // hkv, 1),
        _check_int("q: N", n),
        _check_int("q: D", d, 1),
        _check_int("v: Dv", dv, 1),
        _check_int("proj: d'", proj.shape[1], 1, d),
        _check_int("window", window, 1),
        chunk,
        _check_scale(scale),
        _threads(None),
    )
    out = torch.empty(b, hq, n, dv, dtype=torch.float32)
    code = _kernels().attnlab_based(_ptr(q), _ptr(k), _ptr(v), _ptr(proj), _ptr(out), *args)
    _check(code, "attnlab_based")
    return out
