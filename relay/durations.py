"""
Go's duration syntax (C{time.ParseDuration}), for flags that must accept what
the Go relay accepted (C{60s}, C{1m30s}, C{30m}, C{1.5h}, C{250ms}) and for
messages that must print what it printed (C{1m0s}).
"""

import re

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """
    Parse a Go duration into seconds. A bare number is taken as seconds, the
    one liberty we allow over Go, since it is what Python users will type.

    @raise ValueError: for anything else, with a message fit for a flag error.
    """
    s = text.strip()
    try:
        return float(s)
    except ValueError:
        pass
    sign = 1.0
    if s[:1] in ("-", "+"):
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if not s:
        raise ValueError("invalid duration %r" % (text,))
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            raise ValueError(
                "invalid duration %r (use Go's syntax, e.g. 60s, 1m30s, 30m)" % (text,)
            )
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def format_duration(seconds: float) -> str:
    """
    Format seconds the way Go's C{time.Duration.String} does, e.g. C{1m0s},
    C{1h30m0s}, C{1.5s}, C{500ms}: the relay's error bodies quote it.
    """
    ns = int(round(seconds * 1e9))
    if ns == 0:
        return "0s"
    neg = ns < 0
    ns = abs(ns)
    if ns < 1000000000:
        for unit, size in (("ms", 1000000), ("\u00b5s", 1000), ("ns", 1)):
            if ns >= size or unit == "ns":
                out = _trim(ns / size) + unit
                break
    else:
        hours, rest = divmod(ns, 3600 * 10**9)
        minutes, rest = divmod(rest, 60 * 10**9)
        secs = _trim(rest / 1e9) + "s"
        out = secs
        if hours or minutes:
            out = "%dm" % minutes + out
        if hours:
            out = "%dh" % hours + out
    return ("-" if neg else "") + out


def _trim(value: float) -> str:
    text = ("%.9f" % value).rstrip("0").rstrip(".")
    return text or "0"
