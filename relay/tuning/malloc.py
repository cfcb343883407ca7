"""
glibc malloc settings for a process that moves megabyte buffers around.

By default glibc serves every allocation above 128 KiB with a fresh mmap()
and gives it back with munmap() when freed, so each 1 MiB body chunk the
relay builds, serializes and parses costs page faults on fresh memory,
several times the cost of the work itself (docs/performance.md). Raising
the thresholds here is the same as setting MALLOC_MMAP_THRESHOLD_
and MALLOC_TRIM_THRESHOLD_ in the environment, which operators rarely do.
Freed chunks are then reused from the heap; the trim threshold lets up to
256 MiB of free heap stay mapped instead of being returned and faulted in
again. Memory use stays bounded by what the relay holds at once.
"""

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 64 * 1024 * 1024
TRIM_THRESHOLD = 256 * 1024 * 1024


def tune_malloc() -> bool:
    """Apply the settings; False where there is no glibc mallopt (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
