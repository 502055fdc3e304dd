"""Keep a long-running stage's heap from growing with the number of batches (glibc's malloc only).

glibc serves allocations above a threshold with mmap (returned to the system when freed) and below it from the
heap. The threshold starts at 128 KiB and rises to the size of any mmapped block that is freed (up to 32 MiB), so
after a few batches the batch-sized tensors of a loop (a batch of pixels, the frozen models' activations) come
from the heap, where differently sized ones fragment it: `dinodiff cache` at 100k images peaked 600 MB higher than
at 10k, with the same batches. A fixed threshold keeps such blocks in mmap: measured flat (benchmarks/bench_scale.py,
BENCHMARKS.md "Scale"). It is the documented `mallopt(M_MMAP_THRESHOLD)` setting (also settable as the
MALLOC_MMAP_THRESHOLD_ environment variable); elsewhere than glibc nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 1 << 20  # blocks of 1 MiB and more: mmap, whatever was freed before
_done = False


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold for this process (once); True when it took effect."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    logger.debug("malloc: mmap threshold fixed at %d bytes (%s)", threshold, "ok" if _done else "refused")
    return _done
