"""
C{relay.tac}: the server's flags from C{RELAY_*} environment variables.

Each flag of C{twistd relay} has a variable, C{RELAY_} and the flag's name
in capitals, dashes as underscores, derived from the option table so that a
new flag gets its variable with it. The values go through the same option
parsing as the command line's, so the same L{ServerConfig} comes of them.

A mistyped variable would otherwise be ignored without a word, so any other
C{RELAY_*} variable stops the start, as does an on/off value that is
neither. The exception is Kubernetes: a Service named C{relay} (or
C{relay-...}) gives every pod of its namespace "service links" such as
C{RELAY_SERVICE_HOST} and C{RELAY_PORT=tcp://10.0.0.1:80}. Those are
ignored; one of them that lands on a flag's variable (C{RELAY_PORT},
C{RELAY_ADMIN_PORT}) is recognised only in that exact form, and ignored
with a warning: an operator who sets the variable in the container's
C{env} overrides the link, and nobody means C{tcp://IP:PORT} as a port.
"""

import difflib
import re
from typing import Dict, List, Mapping, Tuple

from twisted.logger import Logger
from twisted.python import usage

from relay.server.tap import Options, makeService

log = Logger()

PREFIX = "RELAY_"
# Not a flag: where the log goes, overriding twistd's --logfile.
LOG_FILE = "RELAY_LOG_FILE"
_ON = ("1", "true", "yes")
_OFF = ("", "0", "false", "no")

# Kubernetes' service links (and Docker's links before them), for a Service
# whose name, in capitals with dashes as underscores, starts with RELAY.
_LINK_NAME = re.compile(
    r"^RELAY(_[A-Z0-9_]+)?_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)$"
)
_LINK_URL = re.compile(r"^(tcp|udp|sctp)://([0-9.]+|\[[0-9a-fA-F:.]+\]):(\d+)$")


def variable(flag: str) -> str:
    """C{trace-stackdriver-project-id} -> C{RELAY_TRACE_STACKDRIVER_PROJECT_ID}."""
    return PREFIX + flag.upper().replace("-", "_")


def variables() -> Dict[str, Tuple[str, bool]]:
    """Each variable's flag, and whether it is an on/off flag, in the option table's order."""
    # Every row has its long name (Twisted's rows allow None there).
    table = {variable(row[0]): (row[0], False) for row in Options.optParameters if row[0]}
    table.update((variable(row[0]), (row[0], True)) for row in Options.optFlags if row[0])
    return table


def service_link(name: str, environ: Mapping[str, str]) -> bool:
    """
    Whether C{name}, none of our variables, is one of Kubernetes' service
    links.
    """
    return bool(_LINK_NAME.match(name)) or linked_port(name, environ)


def linked_port(name: str, environ: Mapping[str, str]) -> bool:
    """
    Whether C{name} is a service link's C{NAME_PORT=tcp://IP:80}: told from
    a value an operator wrote by its twin C{NAME_PORT_80_TCP}, which
    Kubernetes always sets to the same value.
    """
    value = environ[name]
    url = _LINK_URL.match(value)
    if not (name.endswith("_PORT") and url):
        return False
    return environ.get("%s_%s_%s" % (name, url.group(3), url.group(1).upper())) == value


def flags(environ: Mapping[str, str]) -> Tuple[List[str], List[str]]:
    """
    The command line that C{environ}'s variables stand for, and the flag
    variables skipped as service links (for a warning each).

    @raise usage.UsageError: a C{RELAY_*} variable that is none of ours,
        or an on/off variable set to something else; the message names it.
    """
    table = variables()
    argv, links = [], []
    for name in sorted(environ):
        if not name.startswith(PREFIX) or name == LOG_FILE:
            continue
        value = environ[name]
        if name in table and linked_port(name, environ):
            links.append(name)
            continue
        if name not in table:
            if service_link(name, environ):
                continue
            close = difflib.get_close_matches(name, list(table) + [LOG_FILE], n=1)
            hint = "; did you mean %s?" % (close[0],) if close else ""
            raise usage.UsageError(
                "%s=%s: not a relay.tac variable (the comment at the top of relay.tac lists them)%s"
                % (name, value, hint)
            )
        flag, on_off = table[name]
        if not on_off:
            argv.append("--%s=%s" % (flag, value))
        elif value.strip().lower() in _ON:
            argv.append("--" + flag)
        elif value.strip().lower() not in _OFF:
            raise usage.UsageError(
                "%s=%s: use 1, true or yes to turn it on; 0, false, no or unset for off" % (name, value)
            )
    return argv, links


def options_from(environ: Mapping[str, str], twistd_argv: List[str]) -> Options:
    """
    The parsed options of C{environ}'s variables, their log destination
    from C{RELAY_LOG_FILE} or twistd's own C{twistd_argv}.

    @raise SystemExit: one line naming the variable that is wrong.
    """
    options = Options()
    try:
        argv, options.service_links = flags(environ)
        options.parseOptions(argv)
    except usage.UsageError as e:
        message = str(e)
        for name, (flag, _) in variables().items():
            message = message.replace("--%s=" % (flag,), "%s=" % (name,))
        raise SystemExit("relay.tac: %s" % (message,)) from None
    if environ.get(LOG_FILE):
        # makeService hands twistd's own options (.parent) to the log observer.
        # twistd's options as a plain dict, where Twisted types .parent as an
        # Options (itself a dict): the log observer only reads it as a mapping.
        options.parent = {"nodaemon": False, "logfile": environ[LOG_FILE]}  # type: ignore[assignment]
    else:
        options.parent = twistd_options(twistd_argv)  # type: ignore[assignment]
    return options


def tac_service(environ: Mapping[str, str], twistd_argv: List[str], reactor=None):
    """The server C{relay.tac} runs: C{makeService} of L{options_from}."""
    if reactor is None:
        from twisted.internet import reactor
    options = options_from(environ, twistd_argv)
    service = makeService(options, reactor)
    for name in options.service_links:
        reactor.callWhenRunning(
            log.warn,
            "Ignoring {variable}={value}: Kubernetes' service link of a Service named {service}, "
            "not a flag; set {variable} in the container's env to choose, or enableServiceLinks: false",
            variable=name,
            value=environ[name],
            service=name[: -len("_PORT")].lower().replace("_", "-"),
        )
    return service


def twistd_options(argv) -> dict:
    """
    twistd's own options (C{-n}, C{--logfile}, C{--logger}) from its command
    line, for C{relay.tac}: twistd gives a .tac file no other way to see
    them, and without them the tac's log would go to stderr even when
    daemonized, where stderr goes nowhere. Parsed without side effects
    (twistd installs the reactor while parsing C{--reactor}); {} if that
    fails.
    """
    from twisted.scripts.twistd import ServerOptions

    class Peek(ServerOptions):
        def opt_reactor(self, name):
            pass

        opt_r = opt_reactor

        def postOptions(self):
            pass

    peek = Peek()
    try:
        peek.parseOptions(list(argv))
    except (usage.UsageError, SystemExit):
        return {}
    return {key: peek[key] for key in ("nodaemon", "logfile", "logger")}
