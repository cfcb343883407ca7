"""
Socket events dispatched straight to their handlers.

For every event, Twisted's epoll reactor calls the connection's handler
through the legacy log system's C{callWithLogger}: it asks the connection
for its log prefix, copies the context dict with it as C{system}, pushes
it, calls, and pops it again, about ten Python calls per event, a few
times per relayed request in each process. The C{system} key is all it
adds, and the relay's log lines (L{relay.logs}) never print it. So the
reactor's poll loop is replaced by the same loop without it
(L{relay.compat.dispatch_directly}): the same poller (busy polling wraps
it as before), the same events, the same handling of a read or write that
fails; an exception a handler lets through is logged, as Twisted logs it,
and the loop goes on. The figures are in docs/performance.md ("The lean
HTTP/1.1 engine").
"""

from twisted.logger import Logger

from relay.compat import dispatch_directly

_log = Logger()


def install(reactor, log=_log) -> bool:
    """Dispatch C{reactor}'s events directly; False (and nothing changed) on a reactor other than epoll's."""
    return dispatch_directly(reactor, lambda failure: log.failure("Unhandled error dispatching an event", failure))
