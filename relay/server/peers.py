"""
Which peer replicas are up, as the ingress sees them.

nginx leaves a server out of its consistent-hash choice after C{max_fails}
failed attempts and tries the next points of the ring (L{relay.server.ring}); the
replicas must make the same choice when they forward a call, or a name would
have two owners while one replica is down. Each replica therefore asks its
peers' C{/healthz} on a timer and treats a peer as gone after C{failures}
checks in a row have failed, and as back after one success. A draining peer
answers 503 there, so its names move before its port closes, as they do in
nginx once the peer stops accepting.

The checks take their clock and their request function as arguments, so
tests drive them with a L{twisted.internet.task.Clock} and no sockets.
"""

from typing import Callable, Dict, Iterable

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import Agent
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

log = Logger()

CHECK_TIMEOUT = 1.0  # seconds; a check every second must not pile up


class _Discard(Protocol):
    """Reads a body to its end, for the connection's sake; only the status counts."""

    def __init__(self, done: Deferred):
        self.done = done

    def connectionLost(self, reason=None):
        self.done.callback(None)


@implementer(IStreamClientEndpoint)
class _Quiet:
    """An endpoint whose connections log no C{Starting factory} line: a check a second is not news."""

    def __init__(self, endpoint):
        self.endpoint = endpoint

    def connect(self, factory):
        factory.noisy = False
        return self.endpoint.connect(factory)


@implementer(IAgentEndpointFactory)
class _QuietEndpoints:
    """Agent's own endpoints (a host's addresses tried in turn), made quiet."""

    def __init__(self, reactor):
        self.reactor = reactor

    def endpointForURI(self, uri):
        return _Quiet(HostnameEndpoint(self.reactor, uri.host, uri.port, timeout=CHECK_TIMEOUT))


def healthz_probe(reactor, scheme: str = "http") -> Callable[[str], Deferred]:
    """
    A probe that asks C{scheme://PEER/healthz}: fires True for a 200, False
    for any other answer, an error or no answer within L{CHECK_TIMEOUT}.
    """
    agent = Agent.usingEndpointFactory(reactor, _QuietEndpoints(reactor))

    def probe(peer: str) -> Deferred:
        d = agent.request(b"GET", ("%s://%s/healthz" % (scheme, peer)).encode("ascii"))

        def answered(response):
            ok = response.code == 200
            done: Deferred = Deferred()
            response.deliverBody(_Discard(done))
            return done.addCallback(lambda _: ok)

        d.addCallback(answered)
        d.addTimeout(CHECK_TIMEOUT, reactor)
        return d.addErrback(lambda _: False)

    return probe


class PeerHealth:
    """The usable peers of this replica; itself is always usable."""

    def __init__(self, peers: Iterable[str], myself: str, probe: Callable[[str], Deferred], failures: int = 2):
        self.myself = myself
        self.probe = probe
        self.failures = failures
        self._failed: Dict[str, int] = {peer: 0 for peer in peers if peer != myself}
        self._checking = False

    def usable(self, peer: str) -> bool:
        return peer == self.myself or self._failed.get(peer, self.failures) < self.failures

    def check(self) -> Deferred:
        """
        One round of checks, all peers at once. A round still running when
        the timer fires again is not doubled. Never fails: a probe's error is
        a failed check, logged when it changes the peer's state.
        """
        if self._checking or not self._failed:
            return succeed(None)
        self._checking = True
        peers = list(self._failed)
        rounds = [self.probe(peer).addErrback(lambda _: False) for peer in peers]

        def record(results):
            self._checking = False
            for peer, (_, ok) in zip(peers, results):
                self._record(peer, bool(ok))

        return DeferredList(rounds).addCallback(record)

    def _record(self, peer: str, ok: bool) -> None:
        was = self.usable(peer)
        self._failed[peer] = 0 if ok else min(self._failed[peer] + 1, self.failures)
        now = self.usable(peer)
        if was and not now:
            log.warn("Peer replica is down: its names move to the next replica", peer=peer)
        elif now and not was:
            log.info("Peer replica is back", peer=peer)
