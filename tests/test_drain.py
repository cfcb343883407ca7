"""
The stop sequence of the relay server, in process: during a drain every
answer closes its connection (but a relay-client's answer chunks), HTTP/2
clients get a GOAWAY, polls get 503 at once, the port accepts through the
grace period and while requests are in flight, then closes.

The stop's waits (the grace period, the drain's checks, the abort of
connections that do not close) run on the server's clock, which the tests
step; real sockets carry the traffic.
"""

import shutil
import tempfile

import pytest
import treq
from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse
from relay.server.h2 import offer_h2_over_tls
from tests.support import RelayServer, head_and_body, raw_connect, run_clock_until, server_service, tick
from tests.support.engines import on_each_engine
from tests.support.h2_peers import H2Client
from tests.support.tls import make_certificate

pytestmark = pytest.mark.socket

GRACE = 0.5


def request(path: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: relay\r\n\r\n"


GOAWAY = 0x7
NO_ERROR = 0


class GoAwayWatcher(H2Client):
    """
    An HTTP/2 client that records the GOAWAY frames it gets and keeps using
    its open streams after them, as grpc and Go's HTTP/2 client do: the
    C{h2} library would refuse every frame after a GOAWAY.
    """

    def __init__(self):
        super().__init__()
        self.goaways = []
        self.got_goaway = defer.Deferred()
        self._frames = b""

    def dataReceived(self, data):
        self._frames += data
        passed = b""
        while len(self._frames) >= 9:
            length = int.from_bytes(self._frames[:3], "big")
            if len(self._frames) < 9 + length:
                break
            frame, self._frames = self._frames[: 9 + length], self._frames[9 + length :]
            if frame[3] == GOAWAY:
                last = int.from_bytes(frame[9:13], "big") & 0x7FFFFFFF
                self.goaways.append((last, int.from_bytes(frame[13:17], "big")))
                d, self.got_goaway = self.got_goaway, defer.Deferred()
                d.callback(self.goaways[-1])
            else:
                passed += frame
        if passed:
            super().dataReceived(passed)


class DrainTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.clock = Clock()
        self.server = RelayServer(drain_grace=GRACE, clock=self.clock)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def stop(self) -> defer.Deferred:
        """Begin the stop, leaving the clock to the test."""
        return defer.maybeDeferred(self.server.service.stopService)

    @defer.inlineCallbacks
    def test_order_of_a_stop(self):
        # A held poll, and an idle kept-alive connection.
        poll = yield raw_connect(self.server.port)
        poll.transport.write(request(b"/server/request?server=r"))
        idle = yield raw_connect(self.server.port)
        idle.transport.write(request(b"/healthz"))
        yield idle.wait_for(b"ok")
        self.assertFalse(idle.ended.called)
        yield self.server.polling("r")

        stopped = self.stop()
        # The poll ends at once: 503, closing.
        yield poll.ended
        head, body = head_and_body(poll.data)
        self.assertTrue(head.startswith(b"HTTP/1.1 503 "), head)
        self.assertIn(b"\r\nConnection: close", head)
        self.assertEqual(body, b"Server is restarting\n")
        # The idle connection's next request is answered, and closes it.
        idle.data = bytearray()
        idle.transport.write(request(b"/healthz"))
        yield idle.ended
        head, body = head_and_body(idle.data)
        self.assertTrue(head.startswith(b"HTTP/1.1 503 "), head)
        self.assertIn(b"\r\nConnection: close", head)
        # New connections are still accepted during the grace period: a
        # new poll is told to go away at once.
        fresh = yield raw_connect(self.server.port)
        fresh.transport.write(request(b"/server/request?server=r"))
        yield fresh.ended
        self.assertTrue(bytes(fresh.data).startswith(b"HTTP/1.1 503 "))
        # The port closes when the grace period is over, not before.
        self.clock.advance(GRACE - 0.01)
        yield tick(0)
        self.assertFalse(stopped.called)
        self.clock.advance(0.01)
        yield stopped
        with self.assertRaises(ConnectionRefusedError):
            yield raw_connect(self.server.port)

    @defer.inlineCallbacks
    def test_in_flight_request_keeps_the_port_open(self):
        relay_client = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(relay_client.closeCachedConnections)
        poll = treq.get(self.server.url("/server/request?server=r"), pool=relay_client)
        yield self.server.polling("r")
        user = treq.get(self.server.url("/client/r/x"), pool=self.pool)
        resp = yield poll
        message = HttpRequest.FromString((yield resp.content()))

        stopped = self.stop()
        self.clock.advance(GRACE + 0.3)
        yield tick(0)
        self.assertFalse(stopped.called)
        # Past the grace period, a new connection still carries the answer.
        r = yield treq.post(
            self.server.url("/server/response"),
            data=HttpResponse(id=message.id, status_code=200, body=b"late", eof=True).SerializeToString(),
            pool=self.pool,
        )
        self.assertEqual(r.code, 200)
        yield r.content()
        answer = yield user
        self.assertEqual((answer.code, (yield answer.content())), (200, b"late"))
        # The drain sees it on its next check.
        yield run_clock_until(self.clock, stopped)

    @defer.inlineCallbacks
    def test_http2_clients_get_goaway_and_in_flight_streams_finish(self):
        client = GoAwayWatcher()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port), client)
        self.addCleanup(lambda: (client.transport.loseConnection(), client.lost)[1])
        _, health = client.request("GET", "/healthz")
        yield health["done"]
        relay_client = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(relay_client.closeCachedConnections)
        poll = treq.get(self.server.url("/server/request?server=r"), pool=relay_client)
        yield self.server.polling("r")
        user_stream, user = client.request("GET", "/client/r/x")
        message = HttpRequest.FromString((yield (yield poll).content()))

        stopped = self.stop()
        # At once: open no more streams; every stream opened so far is processed.
        last, code = yield client.got_goaway
        self.assertEqual((last, code), (2**31 - 1, NO_ERROR))
        # An HTTP/2 connection opened during the drain is told the same.
        fresh = GoAwayWatcher()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port), fresh)
        self.addCleanup(lambda: (fresh.transport.loseConnection(), fresh.lost)[1])
        self.assertEqual((yield fresh.got_goaway), (2**31 - 1, NO_ERROR))
        # The stream in flight still gets its answer, on this connection.
        r = yield treq.post(
            self.server.url("/server/response"),
            data=HttpResponse(id=message.id, status_code=200, body=b"late", eof=True).SerializeToString(),
            pool=self.pool,
        )
        yield r.content()
        yield user["done"]
        self.assertEqual((user["headers"][":status"], user["data"]), ("200", b"late"))
        # Before the connection closes, the last stream the server processed.
        final = client.got_goaway
        yield run_clock_until(self.clock, stopped)
        self.assertEqual((yield final), (user_stream, NO_ERROR))
        yield client.lost
        self.assertEqual(len(client.goaways), 2)


class DrainOverTLSTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_h2_over_tls_gets_goaway(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        key, cert = make_certificate(tmp)
        endpoint = offer_h2_over_tls(
            serverFromString(reactor, "ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s" % (key, cert))
        )
        service = server_service(endpoint, reactor)
        service.startService()
        stopped = None
        try:
            port = service.listening_port.getHost().port
            with open(cert, "rb") as f:
                authority = ssl.Certificate.loadPEM(f.read())
            options = ssl.optionsForClientTLS("127.0.0.1", authority, acceptableProtocols=[b"h2"])
            client = GoAwayWatcher()
            yield connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", port, options), client)
            _, health = client.request("GET", "/healthz")
            yield health["done"]
            self.assertEqual(client.transport.negotiatedProtocol, b"h2")
            stopped = service.stopService()
            self.assertEqual((yield client.got_goaway), (2**31 - 1, NO_ERROR))
            self.assertEqual((yield client.got_goaway), (1, NO_ERROR))
            # As grpc and Go's client do with an idle connection after a
            # GOAWAY (else the server aborts it 5 s later).
            client.transport.loseConnection()
            yield client.lost
        finally:
            yield stopped if stopped is not None else service.stopService()


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
