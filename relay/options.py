"""
Command-line options with the Go relay's flag spellings.

Go's C{flag} package takes C{-port 80}, C{--port=80} and C{-port=80}; our
users also type C{--block-size}. L{GoFlagOptions} accepts all of these for
the options a subclass declares, so that a Kubernetes manifest written for the
Go binary works unchanged with C{twistd relay}.
"""

from typing import List

from twisted.python import usage

from relay.durations import parse_duration
from relay.logs import parse_level


class GoFlagOptions(usage.Options):
    def parseOptions(self, options=None):
        if options is None:
            import sys

            options = sys.argv[1:]
        super().parseOptions(self.normalize(list(options)))

    def normalize(self, argv: List[str]) -> List[str]:
        known = {name.rstrip("=") for name in self.longOpt}
        out = []
        for arg in argv:
            if arg == "--":
                out.append(arg)
                continue
            if arg.startswith("-") and not arg.startswith("--") and len(arg) > 2:
                # Go's single-dash long flag, e.g. -port=80.
                candidate = "-" + arg
                name = candidate[2:].split("=", 1)[0]
                if name.replace("-", "_") in known:
                    arg = candidate
            if arg.startswith("--"):
                name, eq, value = arg[2:].partition("=")
                underscored = name.replace("-", "_")
                if underscored in known and name not in known:
                    arg = "--" + underscored + eq + value
            out.append(arg)
        return out


def duration(text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError as e:
        raise usage.UsageError(str(e))
    if value <= 0:
        raise usage.UsageError("duration must be positive: %r" % (text,))
    return value


duration.coerceDoc = "A Go duration, e.g. 60s, 1m30s, 30m."  # type: ignore[attr-defined]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise usage.UsageError("not a whole number: %r" % (text,))
    if value <= 0:
        raise usage.UsageError("must be positive: %r" % (text,))
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise usage.UsageError("not a whole number: %r" % (text,))
    if value < 0:
        raise usage.UsageError("must not be negative: %r" % (text,))
    return value


def log_level(text: str):
    try:
        return parse_level(text)
    except ValueError as e:
        raise usage.UsageError(str(e))


def log_format(text: str) -> str:
    if text not in ("json", "text"):
        raise usage.UsageError("--log_format must be json or text, not %r" % (text,))
    return text
