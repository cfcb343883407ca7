"""
PyPy's garbage collector settings, which only the environment can set.

PyPy sizes its young generation (the nursery) from the CPU cache it detects,
which can be as little as 1 MB on a virtual machine. A relay allocates a few
objects per header and a few pieces per body chunk, so with a small nursery
it collects thousands of times a second. 32 MB lets a megabyte body's pieces
die young instead of being copied into the old generation, at the price of
memory under load (docs/performance.md, "Which interpreter"). The nursery is
chosen when the interpreter starts, so the most we can do from here is say
so in the log.
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

        # PyPy's gc.get_stats() returns its GcStats; typeshed describes CPython's list.
        size = gc.get_stats().nursery_size  # type: ignore[attr-defined]
    except Exception:
        size = "its default size"
    return (
        "PyPy's GC nursery is %s: start with PYPY_GC_NURSERY=%s in the environment for "
        "more throughput (see docs/performance.md)" % (size, RECOMMENDED_NURSERY)
    )


def log_nursery_advice(log) -> None:
    advice = nursery_advice()
    if advice is not None:
        log.warn(advice)
