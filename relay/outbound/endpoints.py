"""
Endpoints for outbound connections, and for HTTP agents made once per
(scheme, host, port).

Agent's default endpoint factory builds a new HostnameEndpoint for every
request, even when a pooled connection is then reused, and each one
IDNA-encodes the host name again: a tenth of the client's time on small
requests. The relay client only ever talks to one relay and one backend, so
it keeps the few endpoints it needs (for L{relay.client.keepalive}, or any
Agent), and gives their connections the settings of
L{relay.net.transport} (send limit, TCP_NODELAY).

Connections are made by L{client_endpoint}, not by Twisted's
C{HostnameEndpoint}: that one starts a new attempt every 0.3 s and only
gives up at the first tick after the last attempt failed, so with the
backend down every request waited 0.3 s for its C{connection refused},
even for a literal address, where the Go client answers as soon as the
refusal comes. A
literal address gets a plain TCP endpoint; a name's addresses are tried as
Go's dialer does: the next one 0.3 s after the previous attempt started, or
at once when it failed, and the error is reported as soon as the last one
failed.
"""

from typing import Dict, List, Optional, Tuple, Union

from twisted.internet import error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import HostnameAddress, IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IResolutionReceiver, IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from relay.net.liveness import watch_socket_of
from relay.net.transport import tune
from relay.outbound import CONNECT_TIMEOUT

ATTEMPT_DELAY = 0.3  # Go's net.Dialer FallbackDelay, and Twisted's.


def client_endpoint(reactor, host: Union[str, bytes], port: int, timeout: float = CONNECT_TIMEOUT):
    """
    An endpoint for C{host} (a name or a literal IPv4/IPv6 address) and
    C{port}; see the module's docstring.
    """
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout)
    return NameEndpoint(reactor, host, port, timeout)


@implementer(IStreamClientEndpoint)
class NameEndpoint:
    """Resolves a host name at each connection and tries its addresses (see above)."""

    def __init__(
        self, reactor, host: str, port: int, timeout: float = CONNECT_TIMEOUT, attempt_delay: float = ATTEMPT_DELAY
    ):
        self.reactor = reactor
        self.host = host
        self.port = port
        self.timeout = timeout
        self.attempt_delay = attempt_delay

    def connect(self, factory) -> Deferred:
        try:
            host_ascii = self.host.encode("idna").decode("ascii")
        except UnicodeError:
            from twisted.internet.defer import fail

            return fail(ValueError("invalid hostname: %s" % (self.host,)))
        resolved: Deferred = Deferred()
        addresses: List[object] = []

        @implementer(IResolutionReceiver)
        class Receiver:
            @staticmethod
            def resolutionBegan(resolution):
                pass

            @staticmethod
            def addressResolved(address):
                addresses.append(address)

            @staticmethod
            def resolutionComplete():
                resolved.callback(addresses)

        self.reactor.nameResolver.resolveHostName(Receiver(), host_ascii, portNumber=self.port)

        def attempt(found):
            endpoints = []
            for address in found:
                if isinstance(address, IPv6Address):
                    endpoints.append(TCP6ClientEndpoint(self.reactor, address.host, address.port, self.timeout))
                elif isinstance(address, IPv4Address):
                    endpoints.append(TCP4ClientEndpoint(self.reactor, address.host, address.port, self.timeout))
            if not endpoints:
                raise error.DNSLookupError("no results for hostname lookup: %s" % (self.host,))
            return _Attempts(self.reactor, endpoints, factory, self.attempt_delay, self.host, self.port).winner

        return resolved.addCallback(attempt)


class _Attempts:
    """Connection attempts to one name's addresses; C{winner} fires with the first connected protocol."""

    def __init__(self, reactor, endpoints, factory, delay: float, host: str, port: int):
        self.reactor = reactor
        self.left = list(endpoints)
        self.factory = factory
        self.delay = delay
        self.address = HostnameAddress(host.encode("idna"), port)
        self.pending: List[Deferred] = []
        self.failures: List[Failure] = []
        self.timer = None
        self.over = False
        self.winner: Deferred = Deferred(self._cancel)
        self._next()

    def _next(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.over:
            return
        if not self.left:
            if not self.pending:
                self.over = True
                self.winner.errback(self.failures[0])
            return
        d = self.left.pop(0).connect(self.factory)
        self.pending.append(d)
        if self.left:
            self.timer = self.reactor.callLater(self.delay, self._next)
        d.addBoth(self._done, d)

    def _done(self, result, d: Deferred) -> None:
        if d in self.pending:
            self.pending.remove(d)
        if isinstance(result, Failure):
            if not self.over:
                self.failures.append(result)
                self._next()  # the next address at once, or the error
            return None
        if self.over:
            result.transport.loseConnection()
            return None
        self._stop()
        self.winner.callback(result)
        return None

    def _stop(self) -> None:
        self.over = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.left = []
        pending, self.pending = self.pending, []
        for d in pending:
            d.cancel()

    def _cancel(self, winner: Deferred) -> None:
        self._stop()
        winner.errback(error.ConnectingCancelledError(self.address))


@implementer(IStreamClientEndpoint)
class TunedEndpoint:
    """
    An endpoint whose connections get L{tune}d once connected and, given
    C{liveness} (a keepalive interval and a dead-connection timeout), watched
    by the kernel for a peer that went away (L{relay.net.liveness}).
    """

    def __init__(self, endpoint, liveness: Optional[Tuple[float, float]] = None):
        self.endpoint = endpoint
        self.liveness = liveness

    def connect(self, factory):
        return self.endpoint.connect(factory).addCallback(self._tune)

    def _tune(self, protocol):
        transport = getattr(protocol, "transport", None)
        tune(transport)
        if self.liveness is not None:
            watch_socket_of(transport, *self.liveness)
        return protocol


@implementer(IAgentEndpointFactory)
class CachingEndpointFactory:
    """
    @param liveness: for L{TunedEndpoint}: C{(keepalive_interval,
        dead_timeout)}, or None to leave the kernel's defaults.
    """

    def __init__(
        self,
        reactor,
        tls_policy=None,
        connect_timeout: float = CONNECT_TIMEOUT,
        liveness: Optional[Tuple[float, float]] = None,
    ):
        self.reactor = reactor
        self.tls_policy = tls_policy
        self.connect_timeout = connect_timeout
        self.liveness = liveness
        self._endpoints: Dict[Tuple[bytes, bytes, int], object] = {}

    def endpointForURI(self, uri):
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = client_endpoint(self.reactor, uri.host, uri.port, self.connect_timeout)
            if uri.scheme == b"https":
                if self.tls_policy is None:
                    from twisted.web.client import BrowserLikePolicyForHTTPS

                    self.tls_policy = BrowserLikePolicyForHTTPS()
                endpoint = wrapClientTLS(self.tls_policy.creatorForNetloc(uri.host, uri.port), endpoint)
            elif uri.scheme != b"http":
                from twisted.web.error import SchemeNotSupported

                raise SchemeNotSupported("Unsupported scheme: %r" % (uri.scheme,))
            endpoint = TunedEndpoint(endpoint, self.liveness)
            if len(self._endpoints) < 64:
                self._endpoints[key] = endpoint
        return endpoint
