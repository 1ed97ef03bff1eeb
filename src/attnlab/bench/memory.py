"""Peak resident memory of one call, measured, not guessed.

Linux keeps a high-water mark of each process's resident set (``VmHWM``);
writing ``5`` to ``/proc/self/clear_refs`` resets it to the current resident
size. A call's peak extra memory is then ``VmHWM`` after it minus ``VmRSS``
before it. glibc is told to serve every large block by ``mmap`` and to give it
back on ``free``, so memory freed by an earlier call cannot hide a later
call's allocations.
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
_configured = False


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


def _configure_allocator() -> None:
    global _configured
    if _configured:
        return
    name = ctypes.util.find_library("c")
    if name:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "mallopt"):
            libc.mallopt(_M_MMAP_THRESHOLD, 256 * 1024)
            libc.mallopt(_M_TRIM_THRESHOLD, 256 * 1024)
    _configured = True


def peak_extra_bytes(fn: Callable[[], object]) -> tuple[object, int | None]:
    """Run ``fn()`` and return (its result, the peak resident bytes it added), or None
    for the bytes where the platform cannot tell."""
    if not available():
        return fn(), None
    _configure_allocator()
    gc.collect()
    before = _status_kib("VmRSS")
    _CLEAR_REFS.write_text("5")
    result = fn()
    peak = _status_kib("VmHWM")
    return result, max(peak - before, 0) * 1024
