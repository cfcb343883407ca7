"""
Bad input gets a clear error and changes nothing else: after each case a
request that was already in flight completes normally and no state leaks.
"""

import pytest
import treq
from twisted.internet import defer
from twisted.trial import unittest

from relay.proto.http_relay_pb2 import HttpResponse
from tests.support import FakeRelayClient, RelayServer, head_and_body, raw_connect
from tests.support.cases import ServerTestCase
from tests.support.engines import on_each_engine

pytestmark = pytest.mark.socket


class BadInputTests(ServerTestCase):
    @defer.inlineCallbacks
    def in_flight(self):
        """A user request, picked up and answered with headers only."""
        user, message = yield self.relayed("/client/robot/ok")
        code, _ = yield self.relay_client.post(HttpResponse(id=message.id, status_code=200, body=b"part1,"))
        self.assertEqual(code, 200)
        return user, message

    @defer.inlineCallbacks
    def still_works(self, user, message):
        code, _ = yield self.relay_client.post(HttpResponse(id=message.id, body=b"part2", eof=True))
        self.assertEqual(code, 200)
        resp = yield user
        self.assertEqual((yield resp.content()), b"part1,part2")
        self.assertEqual(self.server.broker.requests, {})
        health = yield self.get("/healthz")
        self.assertEqual((yield health.content()), b"ok")

    @defer.inlineCallbacks
    def post_raw(self, path, data):
        resp = yield treq.post(self.server.url(path), data=data, pool=self.relay_client.pool)
        return resp.code, (yield resp.content())

    @defer.inlineCallbacks
    def test_garbage_protobuf(self):
        user, message = yield self.in_flight()
        for garbage in (b"\xff\xff\xff\xff", b"not a protobuf at all \x00\x01", b"\x0a\x05ab"):
            code, body = yield self.post_raw("/server/response", garbage)
            self.assertEqual(code, 400, garbage)
            self.assertEqual(body, b"proto: cannot parse invalid wire-format data\n")
        yield self.still_works(user, message)

    @defer.inlineCallbacks
    def test_truncated_protobuf(self):
        user, message = yield self.in_flight()
        whole = HttpResponse(id=message.id, body=b"should not arrive" * 10).SerializeToString()
        code, body = yield self.post_raw("/server/response", whole[:-5])
        self.assertEqual(code, 400)
        yield self.still_works(user, message)

    @defer.inlineCallbacks
    def test_response_without_id(self):
        user, message = yield self.in_flight()
        code, body = yield self.post_raw("/server/response", HttpResponse(status_code=200).SerializeToString())
        self.assertEqual((code, body), (400, b"HttpResponse without id\n"))
        code, body = yield self.post_raw("/server/response", b"")
        self.assertEqual(code, 400)
        yield self.still_works(user, message)

    @defer.inlineCallbacks
    def test_unknown_and_foreign_ids(self):
        user, message = yield self.in_flight()
        for bad in ("robot:" + "f" * 32, "other:" + message.id.split(":")[1], message.id + "x", ":"):
            code, body = yield self.relay_client.respond(bad, 200, b"intruder")
            self.assertEqual(code, 400, bad)
            self.assertEqual(body, ("Duplicate or invalid request ID %s\n" % bad).encode())
            code, _ = yield self.relay_client.request_stream(bad)
            self.assertEqual(code, 410)
        yield self.still_works(user, message)

    @defer.inlineCallbacks
    def test_missing_parameters(self):
        user, message = yield self.in_flight()
        resp = yield treq.get(self.server.url("/server/request"), pool=self.relay_client.pool)
        self.assertEqual((resp.code, (yield resp.content())), (400, b"Missing server query parameter\n"))
        code, body = yield self.post_raw("/server/requeststream", b"")
        self.assertEqual((code, body), (400, b"Missing id query parameter\n"))
        yield self.still_works(user, message)

    @defer.inlineCallbacks
    def test_percent_encoded_garbage_in_query(self):
        """Found by the fuzz tests: invalid UTF-8 in a query must not crash."""
        user, message = yield self.in_flight()
        poll = treq.get(self.server.url("/server/request?server=%ff%fe"), pool=self.relay_client.pool)
        yield self.server.when(lambda: len(self.server.broker.backends) == 2)
        self.clock.advance(30)
        resp = yield poll
        self.assertEqual(resp.code, 408)
        yield resp.content()
        code, body = yield self.post_raw("/server/requeststream?id=%ff", b"")
        self.assertEqual(code, 410)
        yield self.still_works(user, message)

    @defer.inlineCallbacks
    def test_empty_backend_names(self):
        user, message = yield self.in_flight()
        # Go's ServeMux cleans the path first: // is an empty segment.
        resp = yield self.get("/client//x", allow_redirects=False)
        self.assertEqual((resp.code, resp.headers.getRawHeaders(b"location")), (301, [b"/client/x"]))
        yield resp.content()
        resp = yield self.get("/client/")
        self.assertEqual(resp.code, 400)
        yield resp.content()
        resp = yield self.get("/x", headers={b"X-Server-Name": [b""]})
        self.assertEqual(resp.code, 503)
        self.assertIn(b'Cannot reach the client "". ', (yield resp.content()))
        yield self.still_works(user, message)

    @defer.inlineCallbacks
    def test_crlf_in_response_header_does_not_inject(self):
        proto, message = yield self.raw_relayed(b"GET /client/robot/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        yield self.relay_client.post(
            HttpResponse(
                id=message.id,
                status_code=200,
                header=[
                    {"name": "X-Evil", "value": "a\r\nSet-Cookie: injected=1\r\n\r\nbody"},
                    {"name": "X-Bad\r\nSet-Cookie: injected=2", "value": "v"},
                    {"name": "Content-Length", "value": "2"},
                ],
                body=b"ok",
                eof=True,
            )
        )
        yield proto.wait_for(b"\r\n\r\nok")
        head, body = head_and_body(proto.data)
        lines = head.split(b"\r\n")
        self.assertIn(b"X-Evil: a  Set-Cookie: injected=1    body", lines)
        self.assertFalse([line for line in lines if line.lower().startswith(b"set-cookie")])
        self.assertNotIn(b"X-Bad", head)
        self.assertEqual(body, b"ok")
        proto.transport.loseConnection()
        yield proto.ended


class BodyLimitTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.server = RelayServer(max_request_body=1024)
        self.relay_client = FakeRelayClient(self.server)
        self.addCleanup(self.relay_client.close)
        self.addCleanup(self.server.stop)

    @defer.inlineCallbacks
    def refused(self, request: bytes):
        proto = yield raw_connect(self.server.port)
        proto.transport.write(request)
        yield proto.ended
        head, body = head_and_body(proto.data)
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)
        self.assertIn(b"Connection: close", head)
        self.assertEqual(
            body,
            b"Request body too large: this relay accepts at most 1024 bytes (--max_request_body)\n",
        )
        self.assertEqual(self.server.broker.requests, {})

    @defer.inlineCallbacks
    def test_declared_length_over_limit(self):
        # Refused from the headers alone, before the body is sent.
        yield self.refused(b"POST /client/robot/x HTTP/1.1\r\nHost: r\r\nContent-Length: 1025\r\n\r\n")

    @defer.inlineCallbacks
    def test_expect_100_continue_gets_413_not_continue_only(self):
        yield self.refused(
            b"PUT /client/robot/x HTTP/1.1\r\nHost: r\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
        )

    @defer.inlineCallbacks
    def test_chunked_body_over_limit(self):
        chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"
        yield self.refused(
            b"POST /client/robot/x HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3 + b"0\r\n\r\n"
        )

    @defer.inlineCallbacks
    def test_limit_applies_to_relay_client_posts_too(self):
        resp = yield treq.post(
            self.server.url("/server/response"), data=b"x" * 2048, pool=self.relay_client.pool
        )
        self.assertEqual(resp.code, 413)
        yield resp.content()

    @defer.inlineCallbacks
    def test_body_at_limit_is_relayed(self):
        poll = self.relay_client.poll("robot")
        proto = yield raw_connect(self.server.port)
        yield self.server.polling("robot")
        proto.transport.write(
            b"POST /client/robot/x HTTP/1.1\r\nHost: r\r\nContent-Length: 1024\r\n\r\n" + b"y" * 1024
        )
        code, message = yield poll
        self.assertEqual(message.body, b"y" * 1024)
        yield self.relay_client.respond(message.id, 200, b"fine")
        yield proto.wait_for(b"fine")
        proto.transport.loseConnection()
        yield proto.ended


class ContentLengthTests(ServerTestCase):
    """A relay-client's body must match the Content-Length it declared."""

    @defer.inlineCallbacks
    def start(self):
        proto, message = yield self.raw_relayed(b"GET /client/robot/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        return proto, message

    @defer.inlineCallbacks
    def test_bytes_beyond_content_length_are_not_written(self):
        proto, message = yield self.start()
        smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
        yield self.relay_client.post(
            HttpResponse(
                id=message.id,
                status_code=200,
                header=[{"name": "Content-Length", "value": "5"}],
                body=b"hello" + smuggled,
                eof=True,
            )
        )
        yield proto.wait_for(b"hello")
        # The connection stays usable and carries nothing after the body.
        proto.transport.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        yield proto.wait_for(b"\r\n\r\nok")
        self.assertNotIn(b"evil", proto.data)
        self.assertEqual(proto.data.count(b"HTTP/1.1 200 OK"), 2)
        proto.transport.loseConnection()
        yield proto.ended

    @defer.inlineCallbacks
    def test_body_shorter_than_content_length_aborts(self):
        proto, message = yield self.start()
        yield self.relay_client.post(
            HttpResponse(
                id=message.id,
                status_code=200,
                header=[{"name": "Content-Length", "value": "10"}],
                body=b"short",
                eof=True,
            )
        )
        yield proto.ended
        self.assertFalse(proto.clean)

    @defer.inlineCallbacks
    def test_conflicting_content_lengths_fall_back_to_chunked(self):
        proto, message = yield self.start()
        yield self.relay_client.post(
            HttpResponse(
                id=message.id,
                status_code=200,
                header=[{"name": "Content-Length", "value": "3"}, {"name": "Content-Length", "value": "7"}],
                body=b"abcdefg",
                eof=True,
            )
        )
        yield proto.wait_for(b"0\r\n\r\n")
        head, body = head_and_body(proto.data)
        self.assertNotIn(b"Content-Length", head)
        self.assertIn(b"Transfer-Encoding: chunked", head)
        proto.transport.loseConnection()
        yield proto.ended


class BodyBudgetTests(unittest.TestCase):
    """All buffered bodies together stay under --max_buffered_bodies."""

    timeout = 30

    def setUp(self):
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.server = RelayServer(clock=self.clock, max_request_body=4096, max_buffered_bodies=3000)
        self.relay_client = FakeRelayClient(self.server)
        self.addCleanup(self.relay_client.close)
        self.addCleanup(self.server.stop)

    @defer.inlineCallbacks
    def upload(self):
        proto = yield raw_connect(self.server.port)
        proto.transport.write(
            b"POST /client/robot/up HTTP/1.1\r\nHost: r\r\nContent-Length: 2000\r\n\r\n" + b"u" * 2000
        )
        return proto

    @defer.inlineCallbacks
    def test_budget_refuses_then_recovers(self):
        d = self.server.broker.get_request("robot")
        d.cancel()
        d.addErrback(lambda f: None)
        first = yield self.upload()  # waits for a relay-client: its body is held
        yield self.server.when(lambda: self.server.broker.requests)
        self.assertEqual(self.server.broker.bodies.used, 2000)
        second = yield self.upload()
        yield second.ended
        self.assertTrue(bytes(second.data).startswith(b"HTTP/1.1 503 "), second.data)
        self.assertIn(b"Too many request bodies buffered", second.data)
        # Once picked up, the first body no longer counts.
        code, message = yield self.relay_client.poll("robot")
        self.assertEqual(message.body, b"u" * 2000)
        self.assertEqual(self.server.broker.bodies.used, 0)
        third = yield self.upload()
        yield self.server.when(lambda: len(self.server.broker.requests) == 2)
        self.assertEqual(self.server.broker.bodies.used, 2000)
        yield self.relay_client.respond(message.id, 200, b"done")
        yield first.wait_for(b"done")
        for proto in (first, third):
            proto.transport.loseConnection()
            yield proto.ended
        yield self.server.when(lambda: not self.server.broker.requests)
        self.assertEqual(self.server.broker.bodies.used, 0)


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
