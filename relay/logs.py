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

Values come from peers (backend names, ids, header names), so both formats
escape every character that is not printable, as slog does: a name holding
a CR or an escape sequence cannot forge a line or rewrite a terminal. At
info the server writes nothing per request or per poll; see L{peer_text},
L{Throttle}, L{DebugInfoLogger} and L{relay.net.transport.connect_quietly}
for how.
"""

import json
import re
import sys
import time
from functools import lru_cache
from typing import IO, Any, Callable, Optional

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
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
        ) from None
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
    # Debug logging writes several lines per request: format each second once.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def _timestamp(event: dict) -> str:
    t = event.get("log_time") or time.time()
    whole = int(t)
    return _second(whole) + ".%06dZ" % int((t - whole) * 1e6)


def json_line(event: dict) -> str:
    """
    One event as a compact JSON line, slog style. Every character that is
    not printable ASCII is escaped (C{ensure_ascii}, and DEL by hand), so
    that no value from a peer can move a terminal's cursor or forge a line.
    """
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
    line = json.dumps(record, separators=(",", ":"), default=str)
    if "\x7f" in line:
        line = line.replace("\x7f", "\\u007f")
    return line + "\n"


def text_line(event: dict) -> str:
    """
    One event as slog's text handler writes it: key=value pairs, each value
    quoted (Go's C{strconv.Quote}) when it is empty or holds a space, C{=},
    C{"}, a backslash or any character that is not printable.
    """
    parts = [
        "time=" + _timestamp(event),
        "level=" + _LEVEL_NAMES.get(event.get("log_level"), "INFO"),
        "msg=" + _quote(_message(event)),
    ]
    for key, value in _fields(event).items():
        parts.append("%s=%s" % (_quote(str(key)), _quote(_text_value(value))))
    err = _error_text(event)
    if err is not None:
        parts.append("error=" + _quote(err))
    return " ".join(parts) + "\n"


def _text_value(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


# Printable ASCII other than space, '=', '"' and backslash: left bare.
_BARE = re.compile(r"[\x21\x23-\x3c\x3e-\x5b\x5d-\x7e]+")
_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    '"': '\\"',
    "\\": "\\\\",
}


def _quote(text: str) -> str:
    """C{text} bare if it is safe to, else quoted as Go's C{strconv.Quote} does."""
    if _BARE.fullmatch(text):
        return text
    if text and all(c.isprintable() and c not in ' ="\\' for c in text):
        return text  # printable non-ASCII, as slog leaves it
    out = ['"']
    for c in text:
        escaped = _ESCAPES.get(c)
        if escaped is not None:
            out.append(escaped)
        elif c.isprintable():
            out.append(c)
        else:
            n = ord(c)
            out.append("\\x%02x" % n if n < 0x80 else "\\u%04x" % n if n < 0x10000 else "\\U%08x" % n)
    out.append('"')
    return "".join(out)


FORMATTERS = {"json": json_line, "text": text_line}


def make_observer(stream: Optional[IO[Any]], log_format: str, level: LogLevel) -> ILogObserver:
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
        out: Optional[IO[Any]] = stream if stream is not None else real_stderr
        if out is None:  # no standard error at all (pythonw): nowhere to write
            return
        try:
            line = formatter(event)
            out.write(line.encode("utf-8") if binary else line)
            out.flush()
        except Exception:
            pass

    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    return FilteringLogObserver(write, [predicate])


def twistd_log_observer(config, parent) -> Optional[ILogObserver]:
    """
    The observer for a side's C{config} (its C{log_format} and
    C{log_level}) under twistd, whose own options are C{parent}: JSON (or
    text) lines on stderr in the foreground, as the Go programs write them;
    in the log file twistd would use when daemonized, or when given
    C{--logfile} (C{-} is stderr). twistd's own C{--logger} wins (None).
    """
    parent = parent or {}
    if parent.get("logger"):
        return None
    stream = None
    logfile = parent.get("logfile")
    if parent and logfile != "-" and (logfile or not parent.get("nodaemon")):
        from twisted.python.logfile import LogFile

        stream = LogFile.fromFullPath(parent.get("logfile") or "twistd.log")
    return make_observer(stream, config.log_format, config.log_level)


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


def peer_text(address) -> str:
    """
    A peer as C{host:port} (C{[v6]:port}, or a UNIX socket's path), never as
    Twisted's C{IPv4Address(type='TCP', …)} repr.
    """
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)
    name = getattr(address, "name", None)
    if name is not None:
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return "unknown"


class Throttle:
    """
    At most one line per C{interval} seconds for an event that peers can
    cause at will (a refused relay-client): an operator learns that it
    happens, and how often, without the log growing with every attempt.

    @param clock: an L{IReactorTime}.
    """

    def __init__(self, clock, interval: float = 10.0):
        self.clock = clock
        self.interval = interval
        self._next = None
        self.suppressed = 0

    def allow(self) -> bool:
        """True when a line may be written now (then read and reset L{suppressed})."""
        now = self.clock.seconds()
        if self._next is not None and now < self._next:
            self.suppressed += 1
            return False
        self._next = now + self.interval
        return True

    def take_suppressed(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n


class DebugInfoLogger(Logger):
    """
    A C{_log} for our subclasses of Twisted's request and connection classes.
    What those log at info concerns one request or connection (a HEAD
    response's body eaten, an idle client timed out), with Python reprs of
    requests, resources and peers in it: that goes to debug. Warnings and
    errors stay as they are.
    """

    def emit(self, level, format=None, **kwargs):
        if level == LogLevel.info:
            level = LogLevel.debug
        Logger.emit(self, level, format, **kwargs)
