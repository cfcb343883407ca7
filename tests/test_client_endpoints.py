"""
How the relay client connects to its backend: at once, and with the error
as soon as it is known (no 0.3 s attempt delay for an address that was
refused). On a fake reactor: nothing here may need the clock to move.
"""

import pytest
from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI
from zope.interface import implementer

from relay.outbound.connect import BackendError
from relay.outbound.endpoints import CachingEndpointFactory, NameEndpoint, TunedEndpoint, client_endpoint
from relay.outbound.h2 import H2Backend
from relay.outbound.request import OutboundRequest
from relay.outbound.tls import TrustPolicy

pytestmark = pytest.mark.memory


@implementer(IHostnameResolver)
class FakeResolver:
    """Resolves every name to C{addresses} at once."""

    def __init__(self, addresses):
        self.addresses = addresses
        self.asked = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        for address in self.addresses:
            receiver.addressResolved(address)
        receiver.resolutionComplete()


def refuse(reactor, index):
    """Make the C{index}th connection attempt fail with connection refused."""
    host, port, factory, timeout, bind = reactor.tcpClients[index]
    factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))


def accept(reactor, index):
    host, port, factory, timeout, bind = reactor.tcpClients[index]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


class LiteralAddresses(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.factory = Factory.forProtocol(Protocol)

    def test_ipv4_is_a_plain_tcp_endpoint(self):
        endpoint = client_endpoint(self.reactor, "127.0.0.1", 8080, 30)
        self.assertIsInstance(endpoint, TCP4ClientEndpoint)

    def test_ipv6_is_a_plain_tcp_endpoint(self):
        for host in ("::1", "[::1]", b"[::1]"):
            self.assertIsInstance(client_endpoint(self.reactor, host, 8080, 30), TCP6ClientEndpoint)

    def test_name_is_resolved(self):
        self.assertIsInstance(client_endpoint(self.reactor, "localhost", 8080, 30), NameEndpoint)

    def test_refused_is_reported_without_waiting(self):
        """The backend down: the error comes as the refusal does, no timer in between."""
        d = client_endpoint(self.reactor, "127.0.0.1", 8080, 30).connect(self.factory)
        self.assertEqual([(h, p) for h, p, _, _, _ in self.reactor.tcpClients], [("127.0.0.1", 8080)])
        self.assertNoResult(d)
        refuse(self.reactor, 0)
        self.failureResultOf(d, error.ConnectionRefusedError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.reactor.seconds(), 0)

    def test_agent_endpoints_use_plain_tcp_for_addresses(self):
        factory = CachingEndpointFactory(self.reactor, connect_timeout=30)
        endpoint = factory.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8080/x"))
        self.assertIsInstance(endpoint, TunedEndpoint)
        self.assertIsInstance(endpoint.endpoint, TCP4ClientEndpoint)
        d = endpoint.connect(self.factory)
        refuse(self.reactor, 0)
        self.failureResultOf(d, error.ConnectionRefusedError)
        endpoint = factory.endpointForURI(URI.fromBytes(b"http://[::1]:8080/x"))
        self.assertIsInstance(endpoint.endpoint, TCP6ClientEndpoint)

    def test_http2_backend_down_is_reported_without_waiting(self):
        """--backend_http2 too: a refused literal address fails its request at once."""
        backend = H2Backend(self.reactor, TrustPolicy())
        request = OutboundRequest(b"GET", "http", "127.0.0.1:8080", b"/x", b"127.0.0.1:8080", [], b"")
        d = Deferred.fromCoroutine(backend.open(request))
        self.assertEqual([(h, p) for h, p, _, _, _ in self.reactor.tcpClients], [("127.0.0.1", 8080)])
        refuse(self.reactor, 0)
        failure = self.failureResultOf(d, BackendError)
        self.assertIn("connection refused", str(failure.value))
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class Names(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.reactor.nameResolver = FakeResolver(
            [IPv6Address("TCP", "::1", 8080), IPv4Address("TCP", "127.0.0.1", 8080)]
        )
        self.factory = Factory.forProtocol(Protocol)

    def connect(self):
        return NameEndpoint(self.reactor, "localhost", 8080, 30).connect(self.factory)

    def test_refused_moves_on_at_once_and_fails_at_once(self):
        """
        C{localhost} is ::1 and 127.0.0.1: when the first refuses, the
        second is tried at once (not after Twisted's 0.3 s), and when it
        refuses too the error is there at once.
        """
        d = self.connect()
        self.assertEqual([h for h, _, _, _, _ in self.reactor.tcpClients], ["::1"])
        refuse(self.reactor, 0)
        self.assertEqual([h for h, _, _, _, _ in self.reactor.tcpClients], ["::1", "127.0.0.1"])
        self.assertNoResult(d)
        refuse(self.reactor, 1)
        self.failureResultOf(d, error.ConnectionRefusedError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.reactor.seconds(), 0)

    def test_slow_address_gets_a_second_attempt_after_the_delay(self):
        d = self.connect()
        self.reactor.advance(0.299)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.reactor.advance(0.001)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        protocol, _ = accept(self.reactor, 1)
        self.assertIs(self.successResultOf(d), protocol._wrappedProtocol)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        # The first attempt was given up.
        self.assertEqual([c.stoppedConnecting for c in self.reactor.connectors], [True, False])

    def test_first_address_connects(self):
        d = self.connect()
        protocol, _ = accept(self.reactor, 0)
        self.assertIs(self.successResultOf(d), protocol._wrappedProtocol)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_no_addresses_is_a_lookup_error(self):
        self.reactor.nameResolver = FakeResolver([])
        self.failureResultOf(self.connect(), error.DNSLookupError)

    def test_cancel(self):
        d = self.connect()
        d.cancel()
        self.failureResultOf(d, error.ConnectingCancelledError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual([c.stoppedConnecting for c in self.reactor.connectors], [True])
