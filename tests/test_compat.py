"""
One test per private Twisted (and C{h2}) API in L{relay.compat}: each checks
the behaviour the relay relies on, against the Twisted that is installed, so
that a release that changes one fails here, by name, and not somewhere in
the middle of a relayed request. CI runs them on both Twisted majors we
support (CPython's current one, PyPy's 25.5).
"""

import inspect
import os
import select

import h2.config
import h2.connection
import pytest
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial import unittest
from twisted.web import http
from twisted.web.http_headers import Headers

from relay import compat


class _Waiting(http.Request):
    """A request that never answers, so that its channel stays busy with it."""

    made = []

    def process(self):
        _Waiting.made.append(self)


def http11_channel():
    channel = http.HTTPChannel()
    channel.requestFactory = _Waiting
    channel.makeConnection(StringTransport())
    return channel


@pytest.mark.memory
class ChunkedDecoderTests(unittest.SynchronousTestCase):
    def test_chunk_line_buffer_holds_the_unparsed_size_line(self):
        data = []
        decoder = compat.ChunkedTransferDecoder(data.append, lambda rest: None)
        decoder.dataReceived(b"5;ext")
        self.assertEqual(compat.chunk_line_buffer(decoder), b"5;ext")
        decoder.dataReceived(b"\r\nhello\r\n0\r\n\r\n")
        self.assertEqual(b"".join(data), b"hello")

    def test_malformed_chunk_error(self):
        decoder = compat.ChunkedTransferDecoder(lambda data: None, lambda rest: None)
        with self.assertRaises(compat.MalformedChunkedDataError):
            decoder.dataReceived(b"zz\r\n")

    def test_bound_chunked_decoder(self):
        class Bounded(compat.ChunkedTransferDecoder):
            pass

        channel = http11_channel()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        compat.bound_chunked_decoder(channel, Bounded)
        self.assertIs(type(channel._transferDecoder), Bounded)


@pytest.mark.memory
class OverriddenTests(unittest.SynchronousTestCase):
    def test_every_overridden_method_exists(self):
        for cls, name in compat.OVERRIDDEN:
            self.assertTrue(callable(getattr(cls, name, None)), "%s.%s is gone" % (cls.__name__, name))

    def test_h2_connection_lost_takes_cancel_timeouts(self):
        parameters = inspect.signature(compat.H2Connection.connectionLost).parameters
        self.assertIn("_cancelTimeouts", parameters)


@pytest.mark.memory
class HTTPChannelTests(unittest.SynchronousTestCase):
    def test_reading_request_line(self):
        channel = http11_channel()
        channel.dataReceived(b"GET / HT")
        self.assertTrue(compat.reading_request_line(channel))
        channel.dataReceived(b"TP/1.1\r\nHost: x\r\n")
        self.assertFalse(compat.reading_request_line(channel))

    def test_request_line(self):
        channel = http11_channel()
        channel.dataReceived(b"OPTIONS * HTTP/1.0\r\nHost: x\r\n")
        self.assertEqual(compat.request_line(channel), (b"OPTIONS", b"HTTP/1.0"))

    def test_detach_channel_hands_over_what_was_read_ahead(self):
        channel = http11_channel()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        channel.dataReceived(b"after the request")
        network, buffered = compat.detach_channel(channel)
        self.assertEqual(buffered, b"after the request")
        self.assertTrue(hasattr(network, "resumeProducing"))

    def test_request_gone(self):
        _Waiting.made[:] = []
        channel = http11_channel()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        [request] = _Waiting.made
        self.assertFalse(compat.request_gone(request))
        channel.connectionLost(Exception("gone"))
        self.assertTrue(compat.request_gone(request))


    def test_request_target(self):
        channel = http11_channel()
        channel.dataReceived(b"PUT /client/x/y?z=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual(compat.request_target(channel), b"/client/x/y?z=1")

    def test_channel_network_is_what_pauses_reading(self):
        channel = http11_channel()
        network = compat.channel_network(channel)
        self.assertIs(network, channel.transport)

        class Spy:
            calls = []

            def pauseProducing(self):
                self.calls.append("pause")

            def resumeProducing(self):
                self.calls.append("resume")

        spy = Spy()
        compat.set_channel_network(channel, spy)
        # A request being handled stops the reading; its end resumes it.
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        channel.requests[0].finish()
        self.assertIn("resume", spy.calls)


@pytest.mark.memory
class HTTP2Tests(unittest.SynchronousTestCase):
    def test_h2_stream_connection(self):
        _Waiting.made[:] = []
        server = compat.H2Connection(Clock())
        server.requestFactory = _Waiting
        server.makeConnection(StringTransport())
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        client.send_headers(
            1, [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x")], end_stream=True
        )
        server.dataReceived(client.data_to_send())
        [request] = _Waiting.made
        self.assertIs(compat.h2_stream_connection(request.channel), server)
        self.assertIsNone(compat.h2_stream_connection(http11_channel()))

    def server(self):
        server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        server.initiate_connection()
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        server.receive_data(client.data_to_send())
        return server

    def test_header_block_without_end_headers_is_pending(self):
        server = self.server()
        self.assertFalse(compat.h2_header_block_pending(server))
        # HEADERS on stream 1, no END_HEADERS: a CONTINUATION must follow.
        server.receive_data(b"\x00\x00\x01\x01\x00\x00\x00\x00\x01\x82")
        self.assertTrue(compat.h2_header_block_pending(server))

    def test_half_a_headers_frame_is_pending(self):
        server = self.server()
        server.receive_data(b"\x00\x00\x01\x01")
        self.assertTrue(compat.h2_header_block_pending(server))


@pytest.mark.memory
class EndpointTests(unittest.SynchronousTestCase):
    def test_ssl_context_factory(self):
        factory, other = object(), object()
        endpoint = SSL4ServerEndpoint(MemoryReactor(), 443, factory)
        self.assertIs(compat.ssl_context_factory(endpoint), factory)
        compat.set_ssl_context_factory(endpoint, other)
        self.assertIs(compat.ssl_context_factory(endpoint), other)


@pytest.mark.memory
class ClientRequestTests(unittest.SynchronousTestCase):
    def test_client_request_is_persistent_and_checked(self):
        from twisted.web.client import URI

        uri = URI.fromBytes(b"http://example.com/x")
        request = compat.client_request(b"GET", b"/x", Headers(), None, uri)
        self.assertEqual((request.method, request.uri, request.persistent), (b"GET", b"/x", True))
        with self.assertRaises(ValueError):
            compat.client_request(b"GET", b"/x\r\nEvil: 1", Headers(), None, uri)


@pytest.mark.memory
class ClientProtocolTests(unittest.SynchronousTestCase):
    def test_client_idle_until_a_request_is_sent(self):
        from twisted.web.client import URI

        protocol = compat.HTTP11ClientProtocol()
        protocol.makeConnection(StringTransport())
        self.assertTrue(compat.client_idle(protocol))
        uri = URI.fromBytes(b"http://example.com/")
        protocol.request(compat.client_request(b"GET", b"/", Headers({b"host": [b"example.com"]}), None, uri))
        self.assertFalse(compat.client_idle(protocol))


    def streamed_request(self, protocol):
        from twisted.internet.defer import Deferred
        from twisted.web.client import URI
        from twisted.web.iweb import UNKNOWN_LENGTH

        class Body:
            length = UNKNOWN_LENGTH
            consumer = None

            def startProducing(self, consumer):
                self.consumer = consumer
                self.done = Deferred()
                return self.done

            def pauseProducing(self):
                pass

            def resumeProducing(self):
                pass

            def stopProducing(self):
                pass

        body = Body()
        uri = URI.fromBytes(b"http://example.com/")
        written = protocol.request(
            compat.client_request(b"PUT", b"/", Headers({b"host": [b"example.com"]}), body, uri)
        )
        written.addErrback(lambda _: None)
        return body

    def test_client_response_head_fires_while_the_body_is_written(self):
        protocol = compat.HTTP11ClientProtocol()
        protocol.makeConnection(StringTransport())
        self.streamed_request(protocol)
        heads = []
        compat.client_response_head(protocol).addCallback(heads.append)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        [response] = heads
        self.assertEqual(response.code, 200)

    def test_client_response_lost_ends_the_body(self):
        from twisted.internet.protocol import Protocol
        from twisted.python.failure import Failure

        protocol = compat.HTTP11ClientProtocol()
        protocol.makeConnection(StringTransport())
        self.streamed_request(protocol)
        heads = []
        compat.client_response_head(protocol).addCallback(heads.append)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        ended = []

        class Collect(Protocol):
            def connectionLost(self, reason):
                ended.append(reason)

        heads[0].deliverBody(Collect())
        compat.client_response_lost(protocol, Failure(Exception("the body broke off")))
        self.assertEqual(len(ended), 1)

    def test_body_consumer_transport(self):
        transport = StringTransport()
        protocol = compat.HTTP11ClientProtocol()
        protocol.makeConnection(transport)
        body = self.streamed_request(protocol)
        self.assertIs(compat.body_consumer_transport(body.consumer), transport)


@pytest.mark.memory
class ReactorPollerTests(unittest.SynchronousTestCase):
    def test_epoll_reactor_polls_through_its_poller(self):
        if not hasattr(select, "epoll"):
            raise unittest.SkipTest("no epoll here")
        from twisted.internet.epollreactor import EPollReactor

        reactor = EPollReactor()
        self.addCleanup(reactor.disconnectAll)
        real = compat.reactor_poller(reactor)
        self.assertTrue(hasattr(real, "poll"))
        calls = []

        class Spy:
            def poll(self, timeout=-1, maxevents=-1):
                calls.append(timeout)
                return []

            def __getattr__(self, name):
                return getattr(real, name)

        compat.set_reactor_poller(reactor, Spy())
        reactor.doPoll(0)
        self.assertEqual(len(calls), 1)

    def test_other_reactors_have_none(self):
        self.assertIsNone(compat.reactor_poller(MemoryReactor()))


@pytest.mark.socket
class WriteBufferTests(unittest.TestCase):
    def test_nothing_to_write_follows_the_write_buffers(self):
        """A real TCP transport: empty, then holding what the socket has not taken."""
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from twisted.internet.protocol import Factory, Protocol

        class Silent(Protocol):
            def connectionMade(self):
                self.transport.pauseProducing()  # reads nothing: the writer's buffer fills

        port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol())

        def check(protocol):
            transport = protocol.transport
            self.assertTrue(compat.nothing_to_write(transport))
            transport.write(b"x" * (64 << 20))  # buffered whole: the reactor sends later
            self.assertFalse(compat.nothing_to_write(transport))
            transport.abortConnection()
            self.assertFalse(compat.nothing_to_write(transport))

        return d.addCallback(check)


@pytest.mark.memory
class OnlyHereTests(unittest.SynchronousTestCase):
    def test_no_other_module_reaches_into_twisted(self):
        """The private names above appear in relay/compat.py and nowhere else in relay/."""
        import os
        import re

        private = re.compile(
            r"from twisted[\w.]*\._|twisted[\w.]*\._\w|http\._[A-Za-z]|_HTTPChannel__"
            r"|\._(poller|sslContextFactory|networkProducer|dataBuffer|transferDecoder|disconnected"
            r"|command|version|conn|headers_buffer|construct|tempDataBuffer|writeDisconnected)\b"
        )
        root = os.path.dirname(compat.__file__)
        found = []
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                if not name.endswith(".py") or path == compat.__file__ or name.endswith("_pb2.py"):
                    continue
                with open(path, encoding="utf-8") as f:
                    for number, line in enumerate(f, 1):
                        if private.search(line.split("#")[0]) and "C{" not in line and "L{" not in line:
                            found.append("%s:%d: %s" % (os.path.relpath(path, root), number, line.strip()))
        self.assertEqual(found, [])


@pytest.mark.socket
class SocketReadTests(unittest.TestCase):
    """read_socket and unwritten_bytes, on a real loopback connection (relay.net.liveness)."""

    def test_a_reset_reaches_on_error_with_its_errno_then_connection_lost(self):
        import errno
        import socket
        import struct

        from twisted.internet import defer, reactor
        from twisted.internet.error import ConnectionLost
        from twisted.internet.protocol import Factory, Protocol

        seen = []
        lost = defer.Deferred()

        class Server(Protocol):
            def connectionMade(self):
                compat.read_socket(self.transport, seen.append)

            def dataReceived(self, data):
                seen.append(data)
                # The peer resets the connection once its bytes arrived.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()

            def connectionLost(self, reason):
                lost.callback([reason])

        port = reactor.listenTCP(0, Factory.forProtocol(Server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        client.sendall(b"hello")

        def check(reasons):
            self.assertEqual(seen, [b"hello", errno.ECONNRESET])
            self.assertTrue(reasons[0].check(ConnectionLost))

        return lost.addCallback(check)

    def test_unwritten_bytes_follows_the_write_buffers(self):
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from twisted.internet.protocol import Factory, Protocol

        class Silent(Protocol):
            def connectionMade(self):
                self.transport.pauseProducing()

        port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol())

        def check(protocol):
            transport = protocol.transport
            self.assertEqual(compat.unwritten_bytes(transport), 0)
            transport.write(b"x" * 1000)
            transport.write(b"y" * 24)
            self.assertEqual(compat.unwritten_bytes(transport), 1024)
            transport.abortConnection()

        return d.addCallback(check)


@pytest.mark.socket
class DispatchDirectlyTests(unittest.SynchronousTestCase):
    """dispatch_directly on a reactor of its own: events still arrive, and a handler's error is reported."""

    def reactor(self):
        from twisted.internet.epollreactor import EPollReactor

        reactor = EPollReactor()
        self.addCleanup(reactor.disconnectAll)
        return reactor

    def test_events_reach_their_handlers(self):
        from twisted.internet.protocol import ClientFactory, Factory, Protocol

        reactor = self.reactor()
        errors = []
        self.assertTrue(compat.dispatch_directly(reactor, errors.append))
        received = []

        class Echo(Protocol):
            def dataReceived(self, data):
                self.transport.write(data)

        class Ping(Protocol):
            def connectionMade(self):
                self.transport.write(b"ping")

            def dataReceived(self, data):
                received.append(data)
                reactor.stop()

        port = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        reactor.connectTCP("127.0.0.1", port.getHost().port, ClientFactory.forProtocol(Ping))
        reactor.callLater(10, reactor.stop)
        reactor.run(installSignalHandlers=False)
        self.assertEqual((received, errors), ([b"ping"], []))

    def test_a_handler_that_raises_is_reported_and_the_loop_goes_on(self):
        reactor = self.reactor()

        class Broken:
            def doRead(self):
                raise ValueError("broken")

        # Twisted's own handler catches a read's errors; one that does not
        # stands for a bug in it.
        reactor._doReadOrWrite = lambda selectable, fd, event: selectable.doRead()
        errors = []
        self.assertTrue(compat.dispatch_directly(reactor, errors.append))
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        reactor._selectables[r] = Broken()
        reactor._poller.register(r, select.EPOLLIN)
        os.write(w, b"x")
        reactor.doIteration(0)
        self.assertEqual([f.value.args for f in errors], [("broken",)])

    def test_other_reactors_are_left_alone(self):
        self.assertFalse(compat.dispatch_directly(MemoryReactor(), lambda f: None))
