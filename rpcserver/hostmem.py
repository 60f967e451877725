"""Host allocator tuning for a CPU node.

Each op makes fresh temporaries of megabytes. glibc serves blocks above its mmap threshold with
mmap and returns them on free, so every step pays page faults to zero new pages again. Keeping
such blocks in the heap (a high mmap threshold, no trimming) made a 336-token prefill of
SmolLM2-135M 1.5x faster here (490 -> 750 tokens/s, 2 threads). Process-wide, so it is done once,
by the node; a no-op where glibc's mallopt is missing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
_done = False


def tune_malloc(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30, top_pad: int = 64 << 20) -> bool:
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = all(mallopt(opt, val) == 1 for opt, val in ((M_MMAP_THRESHOLD, mmap_threshold),
                                                     (M_TRIM_THRESHOLD, trim_threshold), (M_TOP_PAD, top_pad)))
    _done = ok
    log.debug("malloc tuned for large temporaries: %s", ok)
    return ok
