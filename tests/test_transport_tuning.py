"""
The per-connection transport tuning (L{relay.net.transport}) over real
loopback sockets: writes that go straight to the socket must arrive whole
and in order, whatever the socket's buffer can take, and must not starve
the producers twisted.web and the HTTP client register on the transport.
"""

import socket

import pytest
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web.client import URI
from zope.interface import implementer

from relay.net.liveness import watch_socket_of
from relay.net.transport import corked, tune
from relay.outbound.endpoints import CachingEndpointFactory

pytestmark = pytest.mark.socket


class _Collect(Protocol):
    """Collects what arrives until C{expected} bytes are in."""

    def __init__(self, expected: int, done: defer.Deferred):
        self.expected = expected
        self.done = done
        self.data = []
        self.size = 0

    def dataReceived(self, data):
        self.data.append(data)
        self.size += len(data)
        if self.size >= self.expected and not self.done.called:
            self.done.callback(b"".join(self.data))


class _Tuned(Protocol):
    def connectionMade(self):
        tune(self.transport)


@implementer(IPullProducer)
class _Pieces:
    """A pull producer: one piece each time the transport asks."""

    def __init__(self, transport, pieces):
        self.transport = transport
        self.pieces = list(pieces)

    def resumeProducing(self):
        if self.pieces:
            self.transport.write(self.pieces.pop(0))
        else:
            self.transport.unregisterProducer()

    def stopProducing(self):
        self.pieces = []


class EagerWriteTests(unittest.TestCase):
    @defer.inlineCallbacks
    def connected(self, expected: int):
        """A tuned writer connected to a collector; the Deferred fires with all it got."""
        done = defer.Deferred()
        factory = Factory.forProtocol(lambda: _Collect(expected, done))
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        writer = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), _Tuned())
        self.addCleanup(writer.transport.loseConnection)
        done.addTimeout(30, reactor)
        return writer.transport, done

    @defer.inlineCallbacks
    def test_writes_beyond_the_socket_buffer_arrive_whole_and_in_order(self):
        pieces = [bytes([i]) * size for i, size in enumerate([10, 8 << 20, 1, 300_000, 5, 2 << 20, 7])]
        expected = b"".join(pieces)
        transport, done = yield self.connected(len(expected))
        for i, piece in enumerate(pieces):
            if i % 2:
                transport.writeSequence([piece[:3], piece[3:]])
            else:
                transport.write(piece)
        got = yield done
        self.assertEqual(len(got), len(expected))
        self.assertTrue(got == expected, "bytes arrived out of order")

    @defer.inlineCallbacks
    def test_a_pull_producer_is_asked_until_it_is_done(self):
        pieces = [b"%05d" % i for i in range(200)]
        transport, done = yield self.connected(5 * 200)
        transport.registerProducer(_Pieces(transport, pieces), False)
        self.assertEqual((yield done), b"".join(pieces))

    @defer.inlineCallbacks
    def test_corked_writes_leave_in_one_send(self):
        transport, done = yield self.connected(9)
        writes = transport._relay_writes
        sends = []
        real_send = writes.send
        writes.send = lambda data: sends.append(bytes(data)) or real_send(data)

        def answer():
            transport.write(b"head|")
            corked(transport, transport.writeSequence, [b"bo", b"dy"])  # nested: no second cork
            return "answered"

        self.assertEqual(corked(transport, answer), "answered")
        transport.write(b"!")
        self.assertEqual((yield done), b"head|body!")
        self.assertEqual(sends, [b"head|body", b"!"])

    def test_an_untuned_transport_runs_the_action_as_it_is(self):
        transport = StringTransport()
        self.assertEqual(corked(transport, lambda: transport.write(b"x") or 7), 7)
        self.assertEqual(transport.value(), b"x")


class DeadPeerTests(unittest.TestCase):
    """
    The relay-client's connections to the relay server carry the settings
    that let the kernel notice a dead path (a NAT that forgot them, a robot
    out of Wi-Fi): read back from the real socket. That they then close in
    time is shown by the bad-network tests.
    """

    @defer.inlineCallbacks
    def connect(self, liveness):
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        factory = CachingEndpointFactory(reactor, liveness=liveness)
        endpoint = factory.endpointForURI(URI.fromBytes(b"http://127.0.0.1:%d/" % (port.getHost().port,)))
        protocol = yield endpoint.connect(Factory.forProtocol(Protocol))
        self.addCleanup(protocol.transport.loseConnection)
        return protocol.transport.socket

    @defer.inlineCallbacks
    def test_keepalive_and_user_timeout_are_set(self):
        sock = yield self.connect((3.0, 10.0))
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), 3)
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL), 3)
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT), 2)
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT), 10000)

    @defer.inlineCallbacks
    def test_zero_leaves_the_kernel_defaults(self):
        sock = yield self.connect((0.0, 0.0))
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 0)
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT), 0)

    def test_a_transport_without_a_socket_is_left_alone(self):
        watch_socket_of(StringTransport(), 3.0, 10.0)
