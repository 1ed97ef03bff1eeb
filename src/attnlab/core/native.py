"""attnlab's compiled CPU kernels (``csrc/``), loaded with ctypes when they were built.

``make`` compiles ``csrc/*.c`` into ``src/attnlab/core/_native.so`` for the machine it
runs on (``-march=native``). Every kernel here has a pure-PyTorch twin that is the
reference and the fallback: without a C compiler, on another device, with autograd or
for shapes a kernel does not take, the PyTorch path runs and gives the same sum. The
environment variable ``ATTNLAB_NATIVE=0`` (or :func:`disabled`) turns the kernels off,
for side-by-side measurements and tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

import torch

LIBRARY_PATH = Path(__file__).with_name("_native.so")

# feature maps the scan kernel computes itself (csrc/scan.c)
SCAN_FEATURES = {"identity": 0, "elu1": 1, "silu": 2}
_MAX_CHUNK = 256

_library: ctypes.CDLL | None = None
_loaded = False
_enabled = os.environ.get("ATTNLAB_NATIVE", "1") != "0"


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when ``_native.so`` was not built."""
    global _library, _loaded
    if not _loaded:
        _loaded = True
        if LIBRARY_PATH.exists():
            lib = ctypes.CDLL(str(LIBRARY_PATH))
            ptr, i = ctypes.c_void_p, ctypes.c_int
            lib.attnlab_causal_scan.argtypes = [ptr] * 7 + [i] * 8
            lib.attnlab_causal_scan.restype = i
            lib.attnlab_based.argtypes = [ptr] * 5 + [i] * 8 + [ctypes.c_float, i]
            lib.attnlab_based.restype = i
            lib.attnlab_moba.argtypes = [ptr] * 4 + [i] * 10 + [ctypes.c_float, i]
            lib.attnlab_moba.restype = i
            _library = lib
    return _library


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


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _kernel_inputs(tensors) -> bool:
    """The kernels are on and every tensor is float32 on the CPU, outside autograd."""
    if not enabled():
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


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
    b, h, g, n, f = q.shape
    dv = v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    s = s.to(torch.float32, copy=True).contiguous()
    z = None if z is None else z.to(torch.float32, copy=True).contiguous()
    if log_decay is not None:
        log_decay = log_decay.expand(b, h, 1).to(torch.float32).contiguous()
    out = torch.empty(b, h, g, n, dv, dtype=torch.float32)
    code = library().attnlab_causal_scan(
        _ptr(q),
        _ptr(k),
        _ptr(v),
        _ptr(out),
        _ptr(s),
        _ptr(z),
        _ptr(log_decay),
        b * h,
        g,
        n,
        f,
        dv,
        chunk,
        SCAN_FEATURES[feature],
        torch.get_num_threads(),
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
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(b, hq, nq, dv, dtype=torch.float32)
    code = library().attnlab_moba(
        _ptr(q),
        _ptr(k),
        _ptr(v),
        _ptr(out),
        b * hq,
        hq,
        hkv,
        nq,
        nk,
        d,
        dv,
        block,
        top_k,
        int(causal),
        scale,
        torch.get_num_threads() if threads is None else threads,
    )
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
    b, hq, n, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    proj = proj.to(torch.float32).contiguous()
    out = torch.empty(b, hq, n, dv, dtype=torch.float32)
    code = library().attnlab_based(
        _ptr(q),
        _ptr(k),
        _ptr(v),
        _ptr(proj),
        _ptr(out),
        b * hkv,
        hq // hkv,
        n,
        d,
        dv,
        proj.shape[1],
        window,
        chunk,
        scale,
        torch.get_num_threads(),
    )
    _check(code, "attnlab_based")
    return out
