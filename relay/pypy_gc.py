"""
PyPy's garbage collector settings, which only the environment can set.

PyPy sizes its young generation (the nursery) from the CPU cache it detects:
1 MB on the VMs we benchmarked. A relay allocates a few objects per header
and a few pieces per body chunk, so with 1 MB it collects thousands of times
a second; with 16 MB, small relayed requests went from about 900 to
1,400-1,900 per second on one connection, and 1 MiB responses from 77 to
178 MiB/s (bench/run.py, same code, back to back). 32 MB did as well on
small requests and better on large ones (1 MiB at 8 connections: 320-340
MiB/s against 210-225 with 16 MB, back to back), since a megabyte body's
pieces then die young instead of being copied into the old generation; it
costs memory (peak RSS under that load 400 MB against 260 MB). The nursery is chosen when the interpreter starts, so the
most we can do from here is say so in the log.
"""

import os
import platform
from typing import Optional

RECOMMENDED_NURSERY = "32MB"


def nursery_advice() -> Optional[str]:
    """A line for the log when running on PyPy with its default nursery; None otherwise."""
    if platform.python_implementation() != "PyPy" or os.environ.get("PYPY_GC_NURSERY"):
        return None
    try:
        import gc

        size = gc.get_stats().nursery_size
    except Exception:
        size = "its default size"
    return (
        "PyPy's GC nursery is %s: start with PYPY_GC_NURSERY=%s in the environment for "
        "about 1.5 to 2 times the throughput (see the README's Speed section)" % (size, RECOMMENDED_NURSERY)
    )


def log_nursery_advice(log) -> None:
    advice = nursery_advice()
    if advice is not None:
        log.warn(advice)
