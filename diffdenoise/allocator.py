"""Keep freed memory in the process: glibc's defaults make large-tensor work pay the kernel for every page again.

glibc serves each allocation above its mmap threshold (128 KiB, rising to at most 32 MiB) with a fresh ``mmap``
and unmaps it on ``free``. A whole-slice forward of the diffusion U-Net allocates activations of tens to
hundreds of MB, so every call faults in and zeroes every page again: measured on one 640 x 704 pair of members
(one torch thread), 5.3 million minor page faults and a third of the CPU time in the kernel (sys 8.3 s of
24.8 s); with the thresholds raised, 0.1 million and 0.1 s. Freed blocks then stay in the heap for the next
call; the peak memory is that of the largest call, as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["retain_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # bytes: buffers up to 1 GiB come from the heap and stay there when freed


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if applied (glibc on Linux), else False."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another C library: nothing to tune
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * _THRESHOLD))
