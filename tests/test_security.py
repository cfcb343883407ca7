"""
Regression tests for defects a hostile peer could use, each through real
sockets against a real server (docs/security.md has the rules).

For the defects where a relay-client could reach into another backend's
traffic, a user pipelines (HTTP/1.1) or multiplexes (HTTP/2) a
request to a second backend, and the test shows that it gets that backend's
true answer, or a clean error, and never the first backend's bytes.
"""

import os
import re
import struct
import tempfile

import h2.config
import h2.connection
import pytest
import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from relay.options import port_endpoint
from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse
from relay.server.auth import AccessPolicy, ClientTokens, token_hash
from relay.server.metrics import RelayMetrics
from tests.support import (
    FakeRelayClient,
    RelayServer,
    dechunk,
    head_and_body,
    raw_connect,
    run_clock_until,
    server_service,
    tick,
)
from tests.support.cases import ServerTestCase
from tests.support.engines import on_each_engine
from tests.support.files import write
from tests.support.h2_peers import H2Client

pytestmark = pytest.mark.socket

FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"


def responses(data: bytes):
    """The status codes of the HTTP/1.1 responses in C{data}, in order."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", bytes(data))]


def within(d, seconds=5.0):
    """C{d}, failing after C{seconds} (a frozen connection never fires it)."""
    return d.addTimeout(seconds, reactor)


class TwoBackends(ServerTestCase):
    """A user who talks to C{robot}, then to C{other} on the same connection."""

    @defer.inlineCallbacks
    def waiting_poll(self, name):
        poll = self.relay_client.poll(name)
        yield self.polling(name)
        return poll

    @defer.inlineCallbacks
    def answer_other(self, text=b"true answer"):
        """C{other}'s relay-client picks up the next request and answers it honestly."""
        code, message = yield self.other_poll
        self.assertEqual(code, 200)
        code, _ = yield self.relay_client.respond(
            message.id, 200, text, headers=[("Content-Length", "%d" % len(text))]
        )
        self.assertEqual(code, 200)
        return message

    @defer.inlineCallbacks
    def pipelined(self, first=b"GET /client/robot/a HTTP/1.1\r\nHost: relay\r\n\r\n"):
        """A raw user who sends a request to robot and one to other at once."""
        poll = yield self.waiting_poll("robot")
        self.other_poll = yield self.waiting_poll("other")
        user = yield raw_connect(self.server.port)
        self.addCleanup(user.transport.loseConnection)
        user.transport.write(
            first + b"GET /client/other/b HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer s3cret\r\n\r\n"
        )
        code, message = yield poll
        self.assertEqual(code, 200)
        return user, message

    @defer.inlineCallbacks
    def h2_user(self):
        client = H2Client()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port), client)
        self.addCleanup(lambda: (client.transport.loseConnection(), client.lost)[1])
        return client

    @defer.inlineCallbacks
    def multiplexed(self):
        """An HTTP/2 user with one stream to robot (picked up) and one to other."""
        poll = yield self.waiting_poll("robot")
        self.other_poll = yield self.waiting_poll("other")
        client = yield self.h2_user()
        _, first = client.request("GET", "/client/robot/a")
        code, message = yield poll
        _, second = client.request("GET", "/client/other/b")
        return client, first, second, message


class FinalInterimStatusTests(TwoBackends):
    """A 1xx is never the final response."""

    @defer.inlineCallbacks
    def test_http11_final_100_with_body_is_502_and_next_request_unharmed(self):
        user, message = yield self.pipelined()
        code, _ = yield self.relay_client.respond(message.id, 100, FORGED)
        self.assertEqual(code, 200)
        yield user.wait_for(b"interim status")
        yield self.answer_other()
        yield user.wait_for(b"true answer")
        self.assertEqual(responses(user.data), [502, 200])
        self.assertNotIn(b"forged", bytes(user.data))
        self.assertNotIn(b"HTTP/1.1 100", bytes(user.data))
        self.assertEqual(self.server.broker.requests, {})

    @defer.inlineCallbacks
    def test_every_interim_status_is_refused_on_http11(self):
        for status in (100, 102, 103, 199):
            user, message = yield self.pipelined()
            yield self.relay_client.respond(message.id, status, FORGED)
            yield self.answer_other()
            yield user.wait_for(b"true answer")
            self.assertEqual(responses(user.data), [502, 200], status)
            self.assertNotIn(b"forged", bytes(user.data))

    @defer.inlineCallbacks
    def test_h2_final_103_with_body_is_502_and_other_stream_unharmed(self):
        client, first, second, message = yield self.multiplexed()
        yield self.relay_client.respond(message.id, 103, b"forged")
        yield within(first["done"])
        self.assertEqual(first["headers"][":status"], "502")
        self.assertNotIn(b"forged", first["data"])
        yield self.answer_other()
        yield within(second["done"])
        self.assertEqual((second["headers"][":status"], second["data"]), ("200", b"true answer"))


class UnaskedSwitchTests(TwoBackends):
    """101 only for a real upgrade request."""

    @defer.inlineCallbacks
    def test_101_to_a_plain_request_is_502_and_cannot_read_the_next_request(self):
        user, message = yield self.pipelined()
        code, _ = yield self.relay_client.respond(message.id, 101, b"", eof=False)
        self.assertEqual(code, 200)
        yield user.wait_for(b"did not ask to upgrade")
        code, data = yield self.relay_client.request_stream(message.id)
        self.assertEqual(code, 410)
        self.assertNotIn(b"s3cret", data)
        other = yield self.answer_other()
        self.assertIn(("Authorization", "Bearer s3cret"), [(h.name, h.value) for h in other.header])
        yield user.wait_for(b"true answer")
        self.assertEqual(responses(user.data), [502, 200])
        self.assertNotIn(b"101", bytes(user.data).split(b"\r\n")[0])

    @defer.inlineCallbacks
    def test_101_to_another_protocol_is_502(self):
        user, message = yield self.pipelined(
            b"GET /client/robot/ws HTTP/1.1\r\nHost: relay\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        yield self.relay_client.respond(message.id, 101, eof=False, headers=[("Upgrade", "h2c")])
        yield user.wait_for(b"did not ask for")
        code, _ = yield self.relay_client.request_stream(message.id)
        self.assertEqual(code, 410)
        yield self.answer_other()
        yield user.wait_for(b"true answer")
        self.assertEqual(responses(user.data), [502, 200])


class H2TrailerTests(TwoBackends):
    """Hop-by-hop trailers over HTTP/2 never stall the connection."""

    @defer.inlineCallbacks
    def test_connection_specific_trailers_are_dropped(self):
        client, first, second, message = yield self.multiplexed()
        yield self.relay_client.respond(
            message.id,
            200,
            b"robot's",
            trailers=[("Connection", "close"), ("TE", "trailers"), ("Transfer-Encoding", "chunked"),
                      ("Upgrade", "x"), ("Keep-Alive", "1"), ("Grpc-Status", "0")],
        )
        yield within(first["done"])
        self.assertEqual(first["data"], b"robot's")
        self.assertEqual(first["trailers"], {"grpc-status": "0"})
        yield self.answer_other()
        yield within(second["done"])
        self.assertEqual((second["headers"][":status"], second["data"]), ("200", b"true answer"))

    @defer.inlineCallbacks
    def test_only_bad_trailers_end_the_stream_cleanly(self):
        client, first, second, message = yield self.multiplexed()
        yield self.relay_client.respond(message.id, 200, b"robot's", trailers=[("Connection", "close")])
        yield within(first["done"])
        self.assertIsNone(first["trailers"])
        yield self.answer_other()
        yield within(second["done"])
        self.assertEqual(second["data"], b"true answer")


class ColonNameTests(ServerTestCase):
    """With --client_tokens, the name acted for is the request's own."""

    def setUp(self):
        tmp = tempfile.mkdtemp()
        path = os.path.join(tmp, "clients")
        write(path, "a:b  %s\na  %s\n" % (token_hash("token-ab"), token_hash("token-a")))
        self.clock = Clock()
        self.server = RelayServer(clock=self.clock, policy=AccessPolicy(ClientTokens(path)))
        self.relay_client = FakeRelayClient(self.server)
        self.users = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self.users.closeCachedConnections)
        self.addCleanup(self.relay_client.close)
        self.addCleanup(self.server.stop)

    def as_client(self, method, path, token, data=None):
        headers = {b"Authorization": [b"Bearer " + token]}
        return treq.request(method, self.server.url(path), headers=headers, data=data, pool=self.relay_client.pool)

    @defer.inlineCallbacks
    def test_backend_with_colon_answers_with_its_own_token_only(self):
        poll = self.as_client("GET", "/server/request?server=a:b", b"token-ab")
        yield self.polling("a:b")
        user = self.get("/client/a:b/x")
        resp = yield poll
        self.assertEqual(resp.code, 200)
        message = HttpRequest()
        message.ParseFromString((yield resp.content()))
        self.assertTrue(message.id.startswith("a:b:"))
        data = HttpResponse(id=message.id, status_code=200, body=b"from a:b", eof=True).SerializeToString()
        for path in ("/server/response", "/server/requeststream?id=" + message.id):
            resp = yield self.as_client("POST", path, b"token-a", data=data)
            self.assertEqual(resp.code, 403, path)
            yield resp.content()
        resp = yield self.as_client("POST", "/server/response", b"token-ab", data=data)
        self.assertEqual((resp.code, (yield resp.content())), (200, b"ok"))
        self.assertEqual((yield (yield user).content()), b"from a:b")


class DotSegmentTests(ServerTestCase):
    """Paths are cleaned as Go's ServeMux does (301), never relayed."""

    @defer.inlineCallbacks
    def test_dot_segments_redirect_and_are_not_relayed(self):
        yield self.known("robot")
        cases = {
            b"/client/robot/../x": b"/client/x",
            b"/client/robot/%2e%2e/x": b"/client/x",
            b"/client/robot/%2E%2E/%2e/x": b"/client/x",
            b"/client/robot/a%2F..%2Fb": b"/client/robot/b",
            b"/client/robot/./a/?q=1": b"/client/robot/a/?q=1",
            b"/x/../client/robot/y": b"/client/robot/y",
        }
        for path, location in cases.items():
            user = yield raw_connect(self.server.port)
            user.transport.write(b"GET %s HTTP/1.1\r\nHost: relay\r\nX-Server-Name: robot\r\n\r\n" % (path,))
            yield user.wait_for(b"Moved Permanently</a>")
            head, _ = head_and_body(user.data)
            self.assertTrue(head.startswith(b"HTTP/1.1 301 "), head)
            self.assertIn(b"\r\nLocation: " + location + b"\r\n", head)
            self.assertEqual(self.server.broker.requests, {})
            user.transport.loseConnection()

    @defer.inlineCallbacks
    def test_encoded_slash_and_dots_inside_a_segment_are_relayed_as_sent(self):
        user, message = yield self.relayed("/client/robot/a%2Fb/c%2e%2ed/%2e.x")
        self.assertEqual(message.url, "http://invalid/a%2Fb/c%2e%2ed/%2e.x")
        yield self.relay_client.respond(message.id, 200)
        self.assertEqual((yield user).code, 200)


class H2SlowlorisTests(unittest.TestCase):
    """
    --header_timeout applies to HTTP/2 connections too. The
    header timer runs on the server's clock, which the tests step; real
    sockets carry the frames, a reactor turn after each step.
    """

    timeout = 30

    def setUp(self):
        self.clock = Clock()
        self.server = RelayServer(clock=self.clock, header_timeout=0.3)
        self.addCleanup(self.server.stop)

    @defer.inlineCallbacks
    def h2_raw(self):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        user = yield raw_connect(self.server.port)
        self.addCleanup(user.transport.loseConnection)
        user.transport.write(conn.data_to_send())
        return conn, user

    @defer.inlineCallbacks
    def test_pings_do_not_keep_an_idle_connection(self):
        conn, user = yield self.h2_raw()
        # A PING every 0.1 s of the server's clock, each answered before the
        # clock moves on: the header timer still cuts the connection at 0.3.
        for n in range(3):
            payload = b"ping%04d" % (n,)
            conn.ping(payload)
            user.transport.write(conn.data_to_send())
            yield within(user.wait_for(payload))
            self.clock.advance(0.1)
        yield within(user.ended).addErrback(lambda f: self.fail("PINGs kept the connection open"))

    @defer.inlineCallbacks
    def test_unfinished_header_block_is_cut_off(self):
        conn, user = yield self.h2_raw()
        # HEADERS on stream 1 without END_HEADERS, and no CONTINUATION.
        payload = b"\x82\x86\x84"  # :method GET, :scheme http, :path /
        frame = struct.pack(">I", len(payload))[1:] + b"\x01\x00" + struct.pack(">I", 1) + payload
        # (Any other frame now would be a protocol error: the peer just waits.)
        user.transport.write(frame)
        try:
            yield run_clock_until(self.clock, user.ended, step=0.05, limit=3.0)
        except AssertionError:
            self.fail("a header block never finished kept the connection open")

    @defer.inlineCallbacks
    def test_half_sent_headers_frame_is_cut_off_while_another_stream_is_open(self):
        client = H2Client()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port), client)
        self.addCleanup(lambda: (client.transport.loseConnection(), client.lost)[1])
        self.server.broker.get_request("robot").addErrback(lambda f: None)
        _, state = client.request("GET", "/client/robot/slow")
        state["done"].addErrback(lambda f: None)  # it ends with the connection
        # Stream 1 is open: its request waits at the broker.
        yield within(self.server.when(lambda: self.server.broker.requests))
        # A HEADERS frame on stream 3 announcing 100 bytes, 3 of which come.
        client.transport.write(struct.pack(">I", 100)[1:] + b"\x01\x04" + struct.pack(">I", 3) + b"\x82\x86\x84")
        try:
            yield run_clock_until(self.clock, client.lost, step=0.05, limit=3.0)
        except AssertionError:
            self.fail("a half-sent HEADERS frame kept the connection open")

    @defer.inlineCallbacks
    def test_an_open_stream_is_not_a_slow_header(self):
        client = H2Client()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port), client)
        self.addCleanup(lambda: (client.transport.loseConnection(), client.lost)[1])
        self.server.broker.get_request("robot").addErrback(lambda f: None)
        _, state = client.request("GET", "/client/robot/slow")
        yield within(self.server.when(lambda: self.server.broker.requests))
        (pending,) = self.server.broker.requests.values()
        # Well past the header timeout, a reactor turn after each step.
        for _ in range(16):
            self.clock.advance(0.05)
            yield tick(0)
        self.assertFalse(client.lost.called)
        self.server.broker.send_response(HttpResponse(id=pending.id, status_code=200, body=b"late", eof=True))
        yield within(state["done"])
        self.assertEqual(state["data"], b"late")


class HeaderNameTests(ServerTestCase):
    """Names ending in a newline are not names."""

    @defer.inlineCallbacks
    def test_header_and_trailer_names_with_final_newline_are_dropped(self):
        user, message = yield self.raw_relayed(b"GET /client/robot/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        code, _ = yield self.relay_client.respond(
            message.id, 200, b"body", headers=[("X-Evil\n", "v"), ("X-Good", "1")],
            trailers=[("X-Trail\n", "t"), ("X-Fine", "2")],
        )
        self.assertEqual(code, 200)
        yield user.wait_for(b"\r\n0\r\n")
        yield user.wait_for(b"X-Fine: 2\r\n\r\n")
        head, body = head_and_body(user.data)
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertNotIn(b"X-Evil", head)
        self.assertIn(b"\r\nX-Good: 1", head)
        payload, trailers, complete = dechunk(user.data[len(head) + 4 :])
        self.assertTrue(complete)
        self.assertEqual((payload, trailers), (b"body", [b"X-Fine: 2"]))
        self.assertNotIn(b"X-Trail", bytes(user.data))

    @defer.inlineCallbacks
    def test_101_head_has_no_bad_names(self):
        user, message = yield self.raw_relayed(
            b"GET /client/robot/ws HTTP/1.1\r\nHost: relay\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        yield self.relay_client.respond(
            message.id, 101, eof=False, headers=[("Upgrade", "websocket"), ("X-Evil\n", "v")]
        )
        yield user.wait_for(b"\r\n\r\n")
        head, _ = head_and_body(user.data)
        self.assertEqual(head, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket")
        yield self.relay_client.respond(message.id, None, eof=True)


class RawRequestTests(ServerTestCase):
    """Request framing: Go's answers, not silence."""

    @defer.inlineCallbacks
    def exchange(self, data: bytes) -> bytes:
        user = yield raw_connect(self.server.port)
        user.transport.write(data)
        yield within(user.ended)
        return bytes(user.data)

    @defer.inlineCallbacks
    def test_host_rules(self):
        yield self.known("robot")
        cases = {
            b"GET /client/robot/x HTTP/1.1\r\n\r\n": b"400 Bad Request: missing required Host header",
            b"GET /client/robot/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n": b"400 Bad Request",
            b"GET /client/robot/x HTTP/1.1\r\nHost: a, b\r\n\r\n": b"400 Bad Request: malformed Host header",
            b"GET /client/robot/x HTTP/1.1\r\nHost: a b\r\n\r\n": b"400 Bad Request: malformed Host header",
        }
        for request, status in cases.items():
            data = yield self.exchange(request)
            self.assertEqual(
                data,
                b"HTTP/1.1 %s\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n%s"
                % (status, status),
            )
            self.assertEqual(self.server.broker.requests, {})

    @defer.inlineCallbacks
    def test_http10_without_host_is_relayed(self):
        user, message = yield self.raw_relayed(b"GET /client/robot/x HTTP/1.0\r\n\r\n")
        self.assertEqual((message.url, message.host), ("http://invalid/x", ""))
        yield self.relay_client.respond(message.id, 204)
        yield within(user.ended)

    @defer.inlineCallbacks
    def test_absolute_form_is_routed_by_its_path(self):
        user, message = yield self.raw_relayed(
            b"GET http://user:pw@relay.example/client/robot/x/y?q=1 HTTP/1.1\r\nHost: ignored\r\n\r\n"
        )
        self.addCleanup(user.transport.loseConnection)
        self.assertEqual((message.url, message.host), ("http://invalid/x/y?q=1", "relay.example"))
        yield self.relay_client.respond(message.id, 200, b"ok", headers=[("Content-Length", "2")])
        yield user.wait_for(b"\r\n\r\nok")

    @defer.inlineCallbacks
    def test_absolute_form_with_x_server_name(self):
        user, message = yield self.raw_relayed(
            b"GET HTTP://relay/api?x HTTP/1.1\r\nHost: relay\r\nX-Server-Name: robot\r\n\r\n"
        )
        self.addCleanup(user.transport.loseConnection)
        self.assertEqual(message.url, "http://invalid/api?x")
        yield self.relay_client.respond(message.id, 204)

    @defer.inlineCallbacks
    def test_absurd_chunk_size_is_400(self):
        yield self.known("robot")
        for spelling in (b"Transfer-Encoding", b"transfer-encoding", b"TRANSFER-ENCODING"):
            data = yield self.exchange(
                b"POST /client/robot/x HTTP/1.1\r\nHost: relay\r\n%s: chunked\r\n\r\n"
                b"ffffffffffffffffffff\r\nabc" % (spelling,)
            )
            self.assertTrue(data.startswith(b"HTTP/1.1 400 "), (spelling, data))
            self.assertEqual(self.server.broker.requests, {})

    @defer.inlineCallbacks
    def test_long_request_line_is_414_and_long_header_line_431(self):
        data = yield self.exchange(b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 414 URI Too Long\r\n"), data[:100])
        data = yield self.exchange(b"GET / HTTP/1.1\r\nHost: relay\r\nX-A: " + b"a" * 17000 + b"\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), data[:100])
        resp = yield self.get("/healthz")
        self.assertEqual((yield resp.content()), b"ok")


class BackendNameLimitTests(ServerTestCase):
    """Backend names are capped, so polls cannot grow the table in bytes."""

    @defer.inlineCallbacks
    def test_long_names_are_refused_without_state(self):
        for size in (257, 10000):
            code, body = yield self.relay_client.poll("n" * size)
            self.assertEqual((code, body), (400, b"Backend name longer than 256 bytes\n"))
        code, body = yield self.relay_client.poll("\u00e9" * 129)  # 258 bytes in UTF-8
        self.assertEqual(code, 400)
        self.assertEqual(self.server.broker.backends, {})
        yield self.known("n" * 256)
        self.assertEqual(list(self.server.broker.backends), ["n" * 256])


class ListenBacklogTests(unittest.TestCase):
    """Every port the server opens gets the large backlog."""

    @defer.inlineCallbacks
    def listening(self, port_option):
        endpoint = serverFromString(reactor, port_endpoint(port_option))
        service = server_service(endpoint, reactor, clock=Clock(), metrics=RelayMetrics(process=False))
        service.startService()
        self.addCleanup(service.stopService)
        yield tick()
        return service.listening_port

    @defer.inlineCallbacks
    def test_endpoint_strings_get_4096(self):
        port = yield self.listening("tcp:0:interface=127.0.0.1")
        self.assertEqual(port.backlog, 4096)
        # What the kernel was told: ss shows a listener's backlog as Send-Q.
        number = port.getHost().port
        with os.popen("ss -ltnH 'sport = :%d' 2>/dev/null" % (number,)) as f:
            out = f.read().split()
        if out:
            self.assertEqual(out[2], "4096")
        self.assertEqual(port_endpoint("ssl:0:privateKey=k.pem"), "ssl:0:privateKey=k.pem:backlog=4096")

    @defer.inlineCallbacks
    def test_an_explicit_backlog_is_kept(self):
        port = yield self.listening("tcp:0:interface=127.0.0.1:backlog=64")
        self.assertEqual(port.backlog, 64)


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
