"""Hands the C heap's free pages back to the OS after load and when idle (engine-core process).

glibc keeps memory that `free` returned inside its arenas: the model load's temporaries (the
dense parameters a quantized GGUF model replaces, the weights' repacking, the prepared folder's
reads) and each busy period's activations. On the packaged SmolLM2-135M that is ~55 MiB after
load, ~140 MiB for a 1B model; `malloc_trim(0)` returns every free page of every arena (a few
ms). Elsewhere (musl, macOS, Windows) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

_UNSET: Any = object()
_malloc_trim: Any = _UNSET


def _trim_function() -> Any:
    """libc's malloc_trim, or None where the C library has none."""
    global _malloc_trim
    if _malloc_trim is _UNSET:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _malloc_trim = libc.malloc_trim
            _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):
            _malloc_trim = None
    return _malloc_trim


def trim_heap() -> float | None:
    """Return the C heap's free pages to the OS; the seconds it took, or None where the C
    library cannot (then nothing happened)."""
    trim = _trim_function()
    if trim is None:
        return None
    t0 = time.perf_counter()
    trim(0)
    return time.perf_counter() - t0


def resident_bytes() -> int | None:
    """This process's resident set size (Linux /proc), or None elsewhere."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    import resource

    return pages * resource.getpagesize()
