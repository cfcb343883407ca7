"""
Command-line options with the Go relay's flag spellings.

Go's C{flag} package takes C{-port 80}, C{--port=80} and C{-port=80}; our
users also type C{--block-size}. L{GoFlagOptions} accepts all of these for
the options a subclass declares, so that a Kubernetes manifest written for the
Go binary works unchanged with C{twistd relay}.

Errors are one line that names the flag, says what was wrong and what to do.
Under twistd, a bad flag ends the process with that line and exit status 1,
with no help: twistd's own handling of a L{usage.UsageError}
reprints the whole help (77 lines for C{--port=abc}) before the message.

The endpoint strings that C{--port} and C{--admin_port} take are checked
here too (L{check_port}), and given the listen backlog the relay needs
(L{port_endpoint}).
"""

import sys
from typing import List, Tuple

from twisted.internet import endpoints
from twisted.python import usage

from relay.durations import parse_duration
from relay.logs import parse_level


class GoFlagOptions(usage.Options):
    # Flags the Go binary takes that we accept and ignore, each with a
    # warning at start-up when set to anything but its default.
    ignored_go_flags: Tuple[str, ...] = ()
    # The twistd sub-command, for messages.
    command = "relay"

    def __init__(self):
        super().__init__()
        # Coercion errors name their flag and value: "--block_size=0: must
        # be a whole number above 0". Twisted's own would say "Parameter type
        # enforcement failed: must be positive: '0'".
        for name, handler in list(self._dispatch.items()):
            coerce = getattr(handler, "coerce", None)
            if coerce is not None and len(name) > 1:
                handler.coerce = _naming(name, coerce)

    def parseOptions(self, options=None):
        if options is None:
            options = sys.argv[1:]
        try:
            super().parseOptions(self.normalize(list(options)))
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise  # not under twistd: the caller reports it
            message = str(e)
            if "not recognized" in message:
                message += "; see `%s --help` for the flags" % (self.command_name(),)
            raise SystemExit("%s: %s" % (self.command_name(), message)) from None

    def command_name(self) -> str:
        return "twistd " + self.command

    def check(self, name: str, convert):
        """C{self[name] = convert(self[name])}, naming the flag in any error."""
        self[name] = _naming(name, convert)(self[name])

    def ignored_flags(self) -> List[str]:
        """The ignored Go flags that were set, for a warning each."""
        return [name for name in self.ignored_go_flags if self[name] != self.defaults[name]]

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
                if name in known or name.replace("-", "_") in known:
                    arg = candidate
            if arg.startswith("--"):
                name, eq, value = arg[2:].partition("=")
                underscored = name.replace("-", "_")
                if underscored in known and name not in known:
                    arg = "--" + underscored + eq + value
            out.append(arg)
        return out


def _naming(name: str, convert):
    def named(value):
        try:
            return convert(value)
        except (usage.UsageError, ValueError) as e:
            raise usage.UsageError("--%s=%s: %s" % (name, value, e)) from None

    return named


def duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise usage.UsageError("a duration must be above 0, e.g. 60s, 1m30s, 30m")
    return value


duration.coerceDoc = "A Go duration, e.g. 60s, 1m30s, 30m."  # type: ignore[attr-defined]


def nonnegative_duration(text: str) -> float:
    value = parse_duration(text)
    if value < 0:
        raise usage.UsageError("a duration must not be negative: use 0 for none, or e.g. 5s")
    return value


def positive_int(text: str) -> int:
    value = _whole(text)
    if value <= 0:
        raise usage.UsageError("must be a whole number above 0")
    return value


def nonnegative_int(text: str) -> int:
    value = _whole(text)
    if value < 0:
        raise usage.UsageError("must be a whole number, 0 or more")
    return value


def go_int(text: str) -> int:
    """Any whole number, as Go's C{flag.Int}."""
    return _whole(text)


def _whole(text) -> int:
    try:
        return int(text)
    except ValueError:
        raise usage.UsageError("not a whole number; use digits, e.g. 10240") from None


def log_level(text: str):
    return parse_level(text)


def log_format(text: str) -> str:
    if text not in ("json", "text"):
        raise usage.UsageError("use json or text")
    return text


def tracing_mode(text: str) -> str:
    if text not in ("auto", "true", "false"):
        raise usage.UsageError("use auto (on when OTEL_EXPORTER_OTLP_ENDPOINT is set), true or false")
    return text


def http1_engine(text: str) -> str:
    """C{--http1_engine}: auto, httptools (where it is installed) or twisted."""
    from relay.http1_engine import check_engine

    try:
        return check_engine(text)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


def ratio(text) -> float:
    try:
        value = float(text)
    except ValueError:
        raise usage.UsageError("not a number; use a ratio from 0 to 1, e.g. 0.0001") from None
    if not 0.0 <= value <= 1.0:
        raise usage.UsageError("a ratio must be from 0 to 1, e.g. 0.0001 (1 samples every trace)")
    return value


# Endpoint strings: --port and --admin_port take a port number or one.


def check_port(port: str) -> str:
    """
    What C{listen} would only find out later: a port number above 65535, or
    an endpoint string Twisted cannot parse (C{tcp:abc}).
    """
    text = str(port).strip()
    if text.isdigit():
        if int(text) > 65535:
            raise usage.UsageError("port numbers go up to 65535; use e.g. --port=8080")
        return port
    if ":" not in text:
        raise usage.UsageError(
            "not a port number or endpoint string; use e.g. --port=8080 or "
            "--port=tcp:8080:interface=127.0.0.1"
        )
    else:
        try:
            # Parsing builds an endpoint without a reactor: nothing listens.
            endpoints.serverFromString(None, text)
        except Exception as e:
            raise usage.UsageError(
                "not a valid endpoint string (%s); use a port number such as 8080 or an "
                "endpoint such as tcp:8080:interface=127.0.0.1" % (e,)
            ) from None
    return port


def port_number(endpoint: str):
    """The port of a C{tcp:PORT:…} or C{ssl:port=PORT:…} endpoint string, for messages."""
    for field in endpoint.split(":")[1:]:
        value = field.split("=", 1)[-1] if field.startswith("port=") else field
        if value.isdigit():
            return int(value)
    return None


def port_endpoint(port: str) -> str:
    """
    C{80} -> C{tcp:80:backlog=4096}; an endpoint string of a listening
    socket type (C{tcp}, C{tcp6}, C{ssl}, C{unix}) gets C{backlog=4096}
    added unless it sets its own C{backlog=}; other endpoint strings pass
    through. Twisted's default listen backlog of 50 overflows when thousands
    of relay-clients reconnect at once after a restart (Go takes the
    kernel's maximum), and users connecting at once get resets.
    """
    backlog = "backlog=4096"
    text = str(port).strip()
    if text.isdigit():
        return "tcp:%s:%s" % (text, backlog)
    if ":" not in text:
        raise usage.UsageError("--port must be a number or an endpoint string, not %r" % (port,))
    # The string's fields, split at its unescaped colons.
    fields: List[str] = []
    current: List[str] = []
    escaped = False
    for ch in text:
        if ch == ":" and not escaped:
            fields.append("".join(current))
            current = []
        else:
            current.append(ch)
        escaped = ch == "\\" and not escaped
    fields.append("".join(current))
    takes_backlog = fields[0].lower() in ("tcp", "tcp6", "ssl", "unix")
    if takes_backlog and not any(f.startswith("backlog=") for f in fields[1:]):
        return "%s:%s" % (text, backlog)
    return text
