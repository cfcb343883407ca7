"""
Which HTTP/1.1 engine a process uses on its relay paths: C{httptools}
(llhttp, in C: L{relay.server.lean_http1}, L{relay.client.lean_http1}) or
twisted.web's own pure-Python one.

C{auto} chooses per interpreter, by measurement (docs/performance.md): on
CPython the C parser and the lean objects around it take about half the
instructions of an exchange through twisted.web; on PyPy, httptools goes
through cpyext (every callback crosses from the JIT into emulated C-API
objects) and twisted.web's Python, which the JIT compiles, is the faster
path, so PyPy keeps it. Either can be forced (C{--http1_engine}), for
diagnosis.
"""

import platform
from typing import Optional

ENGINES = ("auto", "httptools", "twisted")

# --help's text for --http1_engine, the same on both sides.
HELP = (
    "Not in Go: the HTTP/1.1 engine: httptools (a C parser, llhttp, and lean request objects), "
    "twisted (twisted.web's own), or auto: httptools on CPython, twisted on PyPy, where it is "
    "faster. For diagnosis; the wire is the same."
)


def available() -> bool:
    """Whether httptools imports here (it is a CPython-only dependency)."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return False
    return True


def check_engine(value: str) -> str:
    """The flag's parser: one of L{ENGINES}, and httptools only where it imports."""
    value = str(value).strip().lower()
    if value not in ENGINES:
        raise ValueError("must be one of %s, not %r" % ("|".join(ENGINES), value))
    if value == "httptools" and not available():
        raise ValueError("httptools is not installed for this interpreter (pip install httptools)")
    return value


def resolve(choice: str, implementation: Optional[str] = None) -> str:
    """
    The engine C{choice} (a value of L{ENGINES}) means on this interpreter
    (C{implementation} stands in for C{platform.python_implementation()}).
    """
    if choice in ("httptools", "twisted"):
        return choice
    implementation = implementation or platform.python_implementation()
    if implementation == "CPython" and available():
        return "httptools"
    return "twisted"
