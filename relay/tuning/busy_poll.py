"""
Busy polling: look for new events for a moment before the reactor sleeps.

A relayed request is a relay of hops (user -> server -> relay-client ->
backend -> relay-client -> server -> user), and each hop wakes a process
that was asleep in C{epoll_wait}. On virtual machines waking a sleeping
vCPU can cost more than the work of the hop, so with one request at a time
looking for events a little longer before sleeping can raise throughput;
with other busy processes on few cores it can also lower it (both measured
in docs/performance.md, "Busy polling").

The price is CPU: after every burst of work a process spins for up to that
long, yielding the CPU to anything else that is ready to run (so the
backend and the users' connections are not slowed). An idle relay does not
spin at all, and a saturated one rarely has to; in between it can use up
to a core more than it needs, which counts against a container's CPU
quota. So it is off unless asked for (C{--busy_poll_us}), like Linux's
C{net.core.busy_poll}, whose idea and unit it borrows.

Works with Twisted's epoll reactor (the default on Linux) by wrapping the
reactor's poller object; on any other reactor it logs that it cannot and
does nothing.
"""

import os
import time
from typing import Callable, List, Tuple

from relay.compat import reactor_poller, set_reactor_poller

_yield = getattr(os, "sched_yield", lambda: None)


class SpinningPoller:
    """
    Wraps a C{select.epoll}: a blocking C{poll} first polls without
    blocking, for up to C{spin} seconds, and returns as soon as there are
    events. Everything else is the wrapped poller's.
    """

    def __init__(
        self,
        poller,
        spin: float,
        now: Callable[[], float] = time.monotonic,
        pause: Callable[[], None] = _yield,
    ):
        self._wrapped = poller
        self.spin = spin
        self._now = now
        self._pause = pause

    def poll(self, timeout=-1, maxevents=-1) -> List[Tuple[int, int]]:
        poll = self._wrapped.poll
        if timeout == 0:
            return poll(timeout, maxevents)
        deadline = self._now() + self.spin
        while True:
            events = poll(0, maxevents)
            if events:
                return events
            if self._now() >= deadline:
                break
            self._pause()
        if timeout is None or timeout < 0:
            return poll(-1, maxevents)
        return poll(max(0.0, timeout - self.spin), maxevents)

    def __getattr__(self, name):
        # register, modify, unregister, close, fileno, closed...
        return getattr(self._wrapped, name)


def install(reactor, microseconds: int, log) -> bool:
    """
    Make C{reactor} poll for C{microseconds} before each sleep; say so in
    C{log}. Returns whether it could.
    """
    if microseconds <= 0:
        return False
    poller = reactor_poller(reactor)
    if poller is None:
        log.warn(
            "--busy_poll_us needs the epoll reactor; {reactor} has none, so it is off",
            reactor=type(reactor).__name__,
        )
        return False
    if not isinstance(poller, SpinningPoller):
        set_reactor_poller(reactor, SpinningPoller(poller, microseconds / 1e6))
    else:
        poller.spin = microseconds / 1e6
    log.info("Busy polling for {BusyPollMicroseconds} us before sleeping", BusyPollMicroseconds=microseconds)
    return True
