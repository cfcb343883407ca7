"""
Start-up errors as one line.

twistd reports an exception raised while the application starts (a port in
use, say) as a traceback, and after its logging has begun every traceback
line becomes a log event of its own: 30 to 50 JSON C{ERROR} objects for one
mistake. A L{StartupError} carries a message written for the operator
instead: what was wrong, and what to do. L{report_startup_errors} makes the
interpreter print just that line on the real standard error, and exit 1.

In daemon mode twistd also hands the message to the parent process, which
prints C{An error has occurred: …} and exits 1.
"""

import errno
import sys

from twisted.internet import error as net_error
from twisted.python.failure import Failure


class StartupError(Exception):
    """Configuration that can never work: the message says why, and what to do."""


def listen_error(failure: Failure, flag: str, port) -> StartupError:
    """
    A L{StartupError} for a failed C{listen} on C{port} (the number, if
    known), set with C{flag} (e.g. C{--port=80}).
    """
    reason = failure.value
    socket_error = getattr(reason, "socketError", None)
    code = getattr(socket_error, "errno", None) or getattr(reason, "errno", None)
    if code == errno.EADDRINUSE:
        return StartupError(
            "%s: port %s is already in use by another process; stop that process or choose another port"
            % (flag, port)
        )
    if code == errno.EACCES:
        return StartupError(
            "%s: port %s needs root or CAP_NET_BIND_SERVICE; use --port=8080, or grant the "
            "capability (setcap 'cap_net_bind_service=+ep' on the interpreter, or "
            "AmbientCapabilities= in a systemd unit)" % (flag, port)
        )
    if code == errno.EADDRNOTAVAIL:
        return StartupError("%s: this host has no such address to listen on; check the interface" % (flag,))
    if isinstance(reason, OverflowError):
        return StartupError("%s: port numbers go up to 65535; use e.g. --port=8080" % (flag,))
    if isinstance(reason, net_error.CannotListenError) and socket_error is not None:
        detail = getattr(socket_error, "strerror", None) or str(socket_error)
    else:
        detail = str(reason) or type(reason).__name__
    return StartupError("%s: cannot listen: %s" % (flag, detail))


def report_startup_errors(command: str) -> None:
    """
    From now on, an uncaught L{StartupError} ends the process with one line
    on the real standard error (twistd may have redirected C{sys.stderr}
    into its log) and exit status 1; anything else is reported as before.
    """
    previous = sys.excepthook
    if getattr(previous, "relay_startup", False):
        return

    def hook(kind, value, tb):
        if isinstance(value, StartupError):
            stream = sys.__stderr__ or sys.stderr
            stream.write("%s: %s\n" % (command, value))
            stream.flush()
            return
        previous(kind, value, tb)

    hook.relay_startup = True  # type: ignore[attr-defined]
    sys.excepthook = hook
