"""
Whether the relay server can be reached, as the poll loops find it: one log
line when it is lost, one when it is back, and how long to wait before the
next try.

A robot that lost the server (a restart, a dead zone, a NAT that forgot
its connections) must be back within moments of the server or the network
returning, so the wait between polls stays short: from 0.1 s, growing 1.5
times to at most 0.8 s, with jitter so that a fleet does not poll in step.
A refused connection costs the server a reset, and a poll it answers costs
it less than one relayed request, so a fleet of robots trying about once a
second is cheap; only an outage that lasts (a server gone for more than a
minute) lets the wait grow to 5 s, to spare an ingress that answers every
try with a 502.

The loops' own failures, once the server is lost, are logged at debug only:
an operator wants to know that a robot lost the server and for how long,
not each refused connection in between (the Go relay-client logs one line
per failed poll; our earlier one logged a dozen for a server restart).
When the server is lost, the idle connections kept for it are dropped too
(C{on_lost}): they crossed the same path, and a poll sent on one that
died silently would wait out the dead-connection timeout before trying a
new one.
"""

import random
from typing import Callable, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

INITIAL_DELAY = 0.1
DELAY_MULTIPLIER = 1.5
MAX_DELAY = 0.8
# After this long without the server, the delay may grow to LONG_MAX_DELAY.
LONG_OUTAGE = 60.0
LONG_MAX_DELAY = 5.0


class Reachability:
    """
    @param on_lost: called when the server is lost (not on later failures).
    @param random: a float in [0, 1) for each delay's jitter.
    """

    def __init__(
        self,
        clock: IReactorTime,
        on_lost: Optional[Callable[[], object]] = None,
        random: Callable[[], float] = random.random,
    ):
        self.clock = clock
        self.on_lost = on_lost
        self.random = random
        self.reached_once = False
        # When the current outage began, or None while the server answers.
        self.lost_at: Optional[float] = None
        self.failures = 0

    def failed(self, error: str) -> float:
        """A poll failed because of C{error}: how long to wait before the next."""
        now = self.clock.seconds()
        if self.lost_at is None:
            self.lost_at = now
            self.failures = 0
            if self.reached_once:
                log.warn("Lost the relay server", error=error)
            else:
                log.warn("Cannot reach the relay server", error=error)
            if self.on_lost is not None:
                self.on_lost()
        else:
            log.debug("Relay server still unreachable", error=error)
        self.failures += 1
        cap = MAX_DELAY if now - self.lost_at < LONG_OUTAGE else LONG_MAX_DELAY
        delay = min(INITIAL_DELAY * DELAY_MULTIPLIER ** (self.failures - 1), cap)
        return delay * (0.5 + 0.5 * self.random())

    def reached(self) -> None:
        """A poll was answered: the server is there."""
        if self.lost_at is not None:
            away = self.clock.seconds() - self.lost_at
            if self.reached_once:
                log.info("Relay server is back", Away="%.1fs" % (away,))
            else:
                log.info("Reached the relay server", Waited="%.1fs" % (away,))
            self.lost_at = None
            self.failures = 0
        self.reached_once = True
