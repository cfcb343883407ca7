"""
The stop sequence of the relay server, in process: during a drain every
answer closes its connection (but a relay-client's answer chunks), polls get
503 at once, the port accepts through the grace period and while requests
are in flight, then closes.
"""

import treq
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import deferLater
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse
from tests.support import RelayServer, head_and_body, raw_connect

GRACE = 0.5


def request(path: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: relay\r\n\r\n"


class DrainTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.server = RelayServer(drain_grace=GRACE)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

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

        started = reactor.seconds()
        stopped = self.server.stop()
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
        yield stopped
        self.assertGreaterEqual(reactor.seconds() - started, GRACE - 0.05)
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

        stopped = self.server.stop()
        yield deferLater(reactor, GRACE + 0.3, lambda: None)
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
        yield stopped
