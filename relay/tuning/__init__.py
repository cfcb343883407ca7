"""
Process-wide runtime tuning: settings that change how fast the process
moves bytes, never what it sends. Both sides apply the same ones, through
L{apply}. Per-connection settings are not here: the code that makes a
connection applies them (L{relay.net.transport}).
"""

from relay.tuning import busy_poll, dispatch
from relay.tuning.malloc import tune_malloc
from relay.tuning.pypy_gc import log_nursery_advice


def apply(reactor, busy_poll_us: int, log) -> None:
    """
    The process-wide tuning both taps start with: malloc and the reactor's
    direct dispatch at once, malloc before the first large buffer; the PyPy
    advice and busy polling once the reactor runs, so that they go to the
    configured log.
    """
    tune_malloc()
    dispatch.install(reactor, log)
    reactor.callWhenRunning(log_nursery_advice, log)
    reactor.callWhenRunning(busy_poll.install, reactor, busy_poll_us, log)
