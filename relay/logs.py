"""
Log lines in the Go relay's format.

The Go server logs one JSON object per line on stderr, through C{log/slog}:
C{{"time":"…","level":"INFO","msg":"Relay server listening","Port":8080}}.
Operators' tools and tests grep those lines (for instance
C{Relay server listening.*"Port":(\\d+)}, with no space after the colon), so
ours must look the same: C{msg} is the event's format string, unformatted,
and every other key a caller passed to L{twisted.logger.Logger} becomes a
field of its own, in the order it was given. Events from Twisted itself,
whose format strings have placeholders, get C{msg} formatted.
"""

import json
import sys
import time
from functools import lru_cache
from typing import IO, Callable, Optional

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from twisted.python.failure import Failure
from zope.interface import provider

# slog's level names, and the integers Go's --log_level takes.
_LEVEL_NAMES = {
    LogLevel.debug: "DEBUG",
    LogLevel.info: "INFO",
    LogLevel.warn: "WARN",
    LogLevel.error: "ERROR",
    LogLevel.critical: "ERROR",
}
_LEVELS_BY_NAME = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
}
_GO_LEVELS = ((-4, LogLevel.debug), (0, LogLevel.info), (4, LogLevel.warn), (8, LogLevel.error))


def parse_level(text: str) -> LogLevel:
    """
    Accept Go's slog integers (-4 debug, 0 info, 4 warn, 8 error, and anything
    between rounds up) as well as level names.
    """
    s = str(text).strip().lower()
    if s in _LEVELS_BY_NAME:
        return _LEVELS_BY_NAME[s]
    try:
        number = int(s)
    except ValueError:
        raise ValueError(
            "invalid log level %r: use debug, info, warn, error or Go's -4, 0, 4, 8"
            % (text,)
        )
    for limit, level in _GO_LEVELS:
        if number <= limit:
            return level
    return LogLevel.error


def _fields(event: dict) -> dict:
    return {
        k: v
        for k, v in event.items()
        if not k.startswith("log_") and k not in ("format", "message", "isError", "system", "time", "why", "failure")
    }


def _message(event: dict) -> str:
    fmt = event.get("log_format")
    if fmt is not None and "{" not in fmt:
        return fmt
    text = formatEvent(event)
    return text


def _error_text(event: dict) -> Optional[str]:
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        return failure.getTraceback()
    return None


@lru_cache(maxsize=4)
def _second(whole: int) -> str:
    # A busy relay logs a poll per request: format each second once.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def _timestamp(event: dict) -> str:
    t = event.get("log_time") or time.time()
    whole = int(t)
    return _second(whole) + ".%06dZ" % int((t - whole) * 1e6)


def json_line(event: dict) -> str:
    """One event as a compact JSON line, slog style."""
    record = {
        "time": _timestamp(event),
        "level": _LEVEL_NAMES.get(event.get("log_level"), "INFO"),
        "msg": _message(event),
    }
    for key, value in _fields(event).items():
        record.setdefault(key, value)
    err = _error_text(event)
    if err is not None:
        record["error"] = err
    return json.dumps(record, separators=(",", ":"), default=repr) + "\n"


def text_line(event: dict) -> str:
    """One event as slog's text handler writes it: key=value pairs."""
    parts = [
        "time=" + _timestamp(event),
        "level=" + _LEVEL_NAMES.get(event.get("log_level"), "INFO"),
        "msg=" + _quote(_message(event)),
    ]
    for key, value in _fields(event).items():
        parts.append("%s=%s" % (key, _quote(value)))
    err = _error_text(event)
    if err is not None:
        parts.append("error=" + _quote(err))
    return " ".join(parts) + "\n"


def _quote(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=repr)
    if not text or any(c in text for c in ' ="\n\\') :
        return json.dumps(text)
    return text


FORMATTERS = {"json": json_line, "text": text_line}


def make_observer(
    stream: Optional[IO[str]] = None,
    log_format: str = "json",
    level: LogLevel = LogLevel.info,
) -> ILogObserver:
    """
    An observer that writes each event at C{level} or above to C{stream} (the
    current C{sys.stderr} when None, looked up at each write so that twistd's
    redirection of standard I/O cannot loop our output back into the log).
    """
    formatter: Callable[[dict], str] = FORMATTERS[log_format]
    real_stderr = sys.__stderr__
    binary = stream is not None and "b" in getattr(stream, "mode", "") or (
        stream is not None and not hasattr(stream, "encoding") and not hasattr(stream, "getvalue")
    )

    @provider(ILogObserver)
    def write(event: dict) -> None:
        out = stream if stream is not None else real_stderr
        try:
            line = formatter(event)
            out.write(line.encode("utf-8") if binary else line)
            out.flush()
        except Exception:
            pass

    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    return FilteringLogObserver(write, [predicate])


def twistd_log_observer(options):
    """
    The observer for a twistd plugin's options: JSON (or text) lines on
    stderr in the foreground, as the Go programs write them; in the log file
    twistd would use when daemonized, or when given C{--logfile} (C{-} is
    stderr). twistd's own C{--logger} wins (None).
    """
    parent = getattr(options, "parent", None) or {}
    if parent.get("logger"):
        return None
    stream = None
    logfile = parent.get("logfile")
    if parent and logfile != "-" and (logfile or not parent.get("nodaemon")):
        from twisted.python.logfile import LogFile

        stream = LogFile.fromFullPath(parent.get("logfile") or "twistd.log")
    return make_observer(stream, options["log_format"], options["log_level"])


class LogsThroughObserver:
    """
    A service mixin: when twistd (or a .tac file) adds the service to its
    application, it offers C{self.log_observer} as the application's
    ILogObserver, which twistd uses instead of its own log file.
    """

    log_observer = None

    def setServiceParent(self, parent):
        from twisted.python.components import Componentized

        if (
            self.log_observer is not None
            and isinstance(parent, Componentized)
            and parent.getComponent(ILogObserver, None) is None
        ):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)
