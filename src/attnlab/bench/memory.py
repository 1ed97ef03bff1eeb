"""Peak resident memory of one call, measured, not guessed.

Linux keeps a high-water mark of each process's resident set (``VmHWM``);
writing ``5`` to ``/proc/self/clear_refs`` resets it to the current resident
size. A call's peak extra memory is then ``VmHWM`` after it minus ``VmRSS``
before it. While a call is measured, glibc is told to serve every large block
by ``mmap`` and to give it back on ``free``, and free heap memory is returned
first (``malloc_trim``), so memory freed by an earlier call cannot hide a
later call's allocations. Afterwards glibc goes back to reusing freed blocks
up to 32 MiB, as its adaptive default does, so that timed calls do not pay a
page fault for every temporary.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MEASURE_THRESHOLD = 256 * 1024
_REUSE_THRESHOLD = 32 * 2**20
_libc = None


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{_STATUS} has no {field}")


def available() -> bool:
    """Whether this platform lets attnlab measure a call's peak memory."""
    try:
        _status_kib("VmHWM")
        _CLEAR_REFS.write_text("5")
    except (OSError, RuntimeError):
        return False
    return True


def _allocator(threshold: int) -> None:
    """Serve blocks of at least ``threshold`` bytes by mmap, and trim the heap above it."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name) if name else False
    if _libc and hasattr(_libc, "mallopt"):
        _libc.mallopt(_M_MMAP_THRESHOLD, threshold)
        _libc.mallopt(_M_TRIM_THRESHOLD, threshold)
        if threshold == _MEASURE_THRESHOLD and hasattr(_libc, "malloc_trim"):
            _libc.malloc_trim(0)


def reuse_freed_blocks() -> None:
    """Let glibc reuse freed blocks of up to 32 MiB from here on: the state its adaptive
    mmap threshold reaches in a long-running process (its ceiling, fixed). A fresh process
    starts at 128 KiB, maps every larger temporary anew and page-faults it on first touch
    (linear attention at N=1024 measured 14-93 ms there against 7 ms with reuse), so timed
    calls see the steady state, as :func:`peak_extra_bytes` leaves it after a measurement."""
    _allocator(_REUSE_THRESHOLD)


def peak_extra_bytes(fn: Callable[[], object]) -> tuple[object, int | None]:
    """Run ``fn()`` and return (its result, the peak resident bytes it added), or None
    for the bytes where the platform cannot tell."""
    if not available():
        return fn(), None
    gc.collect()
    _allocator(_MEASURE_THRESHOLD)
    try:
        before = _status_kib("VmRSS")
        _CLEAR_REFS.write_text("5")
        result = fn()
        peak = _status_kib("VmHWM")
    finally:
        _allocator(_REUSE_THRESHOLD)
    return result, max(peak - before, 0) * 1024
