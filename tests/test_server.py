"""
The relay server's streaming, upgrades and connection handling
(docs/protocol.md, server sections), over real loopback sockets with real
protobuf messages: the cases where the socket is the point (the routes and
status codes are in tests/test_routes.py, in memory). A
L{FakeRelayClient} plays the relay-client; the protocol's timeouts run on a
L{Clock} the tests advance.
"""


import socket

import pytest
import treq
from twisted.internet import defer

from relay.proto.http_relay_pb2 import HttpResponse
from relay.server.pending import STREAM_POLL_TIMEOUT
from tests.support import dechunk, head_and_body, raw_connect
from tests.support.cases import ServerTestCase
from tests.support.engines import on_each_engine

pytestmark = pytest.mark.socket


class ConnectionSettingsTests(ServerTestCase):
    @defer.inlineCallbacks
    def test_connections_send_without_nagle_and_in_big_writes(self):
        """
        As Go's net package does, small answers (a poll's request, a 408)
        are not held back waiting for the peer's ACK; and a megabyte body goes
        out in a few large send() calls rather than 128 KiB ones.
        """
        raw = yield raw_connect(self.server.port)
        self.addCleanup(raw.transport.loseConnection)
        # Once it has answered, the server holds the connection.
        raw.transport.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        yield raw.wait_for(b"\r\n\r\nok")
        (channel,) = self.server.service.site.connections
        sock = channel.transport.getHandle()
        self.assertTrue(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        self.assertEqual(channel.transport.SEND_LIMIT, 512 * 1024)


class ResponseTests(ServerTestCase):
    @defer.inlineCallbacks
    def test_chunks_are_streamed_as_they_come(self):
        user, message = yield self.relayed("/client/robot/stream")
        code, _ = yield self.relay_client.post(HttpResponse(id=message.id, status_code=200, body=b"first|"))
        self.assertEqual(code, 200)
        resp = yield user
        collected = []
        got_first = defer.Deferred()

        def collect(data):
            collected.append(data)
            if not got_first.called:
                got_first.callback(None)

        done = treq.collect(resp, collect)
        yield got_first
        self.assertEqual(b"".join(collected), b"first|")
        code, body = yield self.relay_client.post(HttpResponse(id=message.id, body=b"second", eof=True))
        self.assertEqual((code, body), (200, b"ok"))
        yield done
        self.assertEqual(b"".join(collected), b"first|second")

    @defer.inlineCallbacks
    def test_keepalive_messages_are_harmless(self):
        user, message = yield self.relayed("/client/robot/x")
        yield self.relay_client.post(HttpResponse(id=message.id, status_code=200, body=b"a"))
        code, body = yield self.relay_client.post(HttpResponse(id=message.id))
        self.assertEqual((code, body), (200, b"ok"))
        yield self.relay_client.post(HttpResponse(id=message.id, body=b"b", eof=True))
        self.assertEqual((yield (yield user).content()), b"ab")

    @defer.inlineCallbacks
    def test_trailers_and_grpc_headers_as_trailers(self):
        proto, message = yield self.raw_relayed(
            b"POST /rpc HTTP/1.1\r\nHost: relay\r\nX-Server-Name: robot\r\nContent-Length: 0\r\nTE: trailers\r\n\r\n"
        )
        yield self.relay_client.post(
            HttpResponse(
                id=message.id,
                status_code=200,
                header=[{"name": "Content-Type", "value": "application/grpc"}, {"name": "Grpc-Status", "value": "0"}],
                body=b"payload",
            )
        )
        yield self.relay_client.post(
            HttpResponse(id=message.id, eof=True, trailer=[{"name": "Grpc-Message", "value": "done"}])
        )
        yield proto.wait_for(b"Grpc-Status: 0\r\n\r\n")
        head, body = head_and_body(proto.data)
        payload, trailers, complete = dechunk(body)
        self.assertTrue(complete)
        self.assertEqual(payload, b"payload")
        self.assertEqual(trailers, [b"Grpc-Message: done", b"Grpc-Status: 0"])
        proto.transport.loseConnection()
        yield proto.ended

    @defer.inlineCallbacks
    def test_no_first_response_in_time_is_504(self):
        user, message = yield self.relayed("/client/robot/slow")
        self.clock.advance(60)
        self.assertNoResult(user)
        self.clock.advance(10)  # the reaper runs every 10 s
        resp = yield user
        self.assertEqual(resp.code, 504)
        self.assertEqual(
            (yield resp.content()),
            b"Timeout after 1m0s, indicating that the backend request took too long",
        )
        code, body = yield self.relay_client.respond(message.id, 200)
        self.assertEqual(code, 400)
        self.assertEqual(self.server.broker.requests, {})

    @defer.inlineCallbacks
    def test_response_ending_without_eof_aborts_user_connection(self):
        """Honest truncation: a response cut short never looks complete."""
        proto, message = yield self.raw_relayed(b"GET /client/robot/big HTTP/1.1\r\nHost: relay\r\n\r\n")
        yield self.relay_client.post(
            HttpResponse(
                id=message.id, status_code=200, header=[{"name": "Content-Length", "value": "100"}], body=b"x" * 10
            )
        )
        yield proto.wait_for(b"x" * 10)
        self.clock.advance(70)  # inactive: reaped
        yield proto.ended
        self.assertFalse(proto.clean, "the connection was closed as if the response were complete")
        head, body = head_and_body(proto.data)
        self.assertEqual(body, b"x" * 10)

    @defer.inlineCallbacks
    def test_truncated_chunked_response_has_no_final_chunk(self):
        proto, message = yield self.raw_relayed(b"GET /client/robot/big HTTP/1.1\r\nHost: relay\r\n\r\n")
        yield self.relay_client.post(HttpResponse(id=message.id, status_code=200, body=b"partial"))
        yield proto.wait_for(b"partial")
        self.clock.advance(70)
        yield proto.ended
        self.assertFalse(proto.clean)
        payload, _, complete = dechunk(head_and_body(proto.data)[1])
        self.assertFalse(complete)
        self.assertEqual(payload, b"partial")

    @defer.inlineCallbacks
    def test_user_disconnect_makes_id_unknown(self):
        proto, message = yield self.raw_relayed(b"GET /client/robot/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        code, _ = yield self.relay_client.post(HttpResponse(id=message.id, status_code=200, body=b"a"))
        self.assertEqual(code, 200)
        proto.transport.loseConnection()
        yield proto.ended
        yield self.server.when(lambda: not self.server.broker.requests)
        code, body = yield self.relay_client.post(HttpResponse(id=message.id, body=b"b"))
        self.assertEqual(code, 400)
        self.assertEqual(body, ("Duplicate or invalid request ID %s\n" % message.id).encode())


class UpgradeTests(ServerTestCase):
    @defer.inlineCallbacks
    def start_upgrade(self):
        proto, message = yield self.raw_relayed(
            b"GET /client/robot/ws HTTP/1.1\r\nHost: relay\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\nearly bytes"
        )
        code, _ = yield self.relay_client.post(
            HttpResponse(
                id=message.id,
                status_code=101,
                header=[{"name": "upgrade", "value": "websocket"}, {"name": "Connection", "value": "Upgrade"}],
            )
        )
        self.assertEqual(code, 200)
        yield proto.wait_for(b"\r\n\r\n")
        return proto, message

    @defer.inlineCallbacks
    def test_101_becomes_two_way_pipe(self):
        proto, message = yield self.start_upgrade()
        head, rest = head_and_body(proto.data)
        self.assertEqual(
            head, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade"
        )
        self.assertEqual(rest, b"")
        # Bytes sent right after the request are not lost.
        code, data = yield self.relay_client.request_stream(message.id)
        self.assertEqual((code, data), (200, b"early bytes"))
        proto.transport.write(b"ping")
        code, data = yield self.relay_client.request_stream(message.id)
        self.assertEqual((code, data), (200, b"ping"))
        yield self.relay_client.post(HttpResponse(id=message.id, body=b"pong"))
        yield proto.wait_for(b"pong")
        # Nothing to read for 30 s: an empty 200.
        pending = self.relay_client.request_stream(message.id)
        yield self.server.when(lambda: self.server.broker.requests[message.id].stream._waiters)
        self.clock.advance(STREAM_POLL_TIMEOUT)
        self.assertEqual((yield pending), (200, b""))
        # The relay-client ends it: the user's connection closes cleanly.
        yield self.relay_client.post(HttpResponse(id=message.id, eof=True))
        yield proto.ended
        self.assertTrue(proto.clean)
        code, _ = yield self.relay_client.request_stream(message.id)
        self.assertEqual(code, 410)

    @defer.inlineCallbacks
    def test_user_closing_ends_the_request(self):
        proto, message = yield self.start_upgrade()
        waiting = self.relay_client.request_stream(message.id)
        yield waiting  # early bytes
        waiting = self.relay_client.request_stream(message.id)
        yield self.server.when(lambda: self.server.broker.requests[message.id].stream._waiters)
        proto.transport.loseConnection()
        yield proto.ended
        self.assertEqual((yield waiting)[0], 410)
        self.assertEqual(self.server.broker.requests, {})
        code, _ = yield self.relay_client.post(HttpResponse(id=message.id, body=b"late"))
        self.assertEqual(code, 400)


class EchoTests(UpgradeTests):
    @defer.inlineCallbacks
    def test_echo_both_ways_in_order_then_relay_client_closes(self):
        """A 101 echo service behind the relay: every byte back, in order."""
        proto, message = yield self.start_upgrade()
        stop = []

        @defer.inlineCallbacks
        def echo_loop():
            # What a relay-client does after a 101: pull the user's bytes
            # and post them back as response chunks, until 410.
            while not stop:
                code, data = yield self.relay_client.request_stream(message.id)
                if code == 410:
                    return
                self.assertEqual(code, 200)
                if data:
                    code, _ = yield self.relay_client.post(HttpResponse(id=message.id, body=data))
                    self.assertEqual(code, 200)

        loop = echo_loop()
        sent = b"early bytes"
        for i in range(200):
            piece = b"<%d:%s>" % (i, b"x" * (i * 37 % 3000))
            sent += piece
            proto.transport.write(piece)
        sent += b"<end>"
        proto.transport.write(b"<end>")
        yield proto.wait_for(b"<end>")
        head, echoed = head_and_body(proto.data)
        self.assertEqual(echoed, sent)
        stop.append(True)
        code, _ = yield self.relay_client.post(HttpResponse(id=message.id, eof=True))
        self.assertEqual(code, 200)
        yield proto.ended
        self.assertTrue(proto.clean)
        yield loop
        self.assertEqual(self.server.broker.requests, {})


class EarlyStreamPullTests(UpgradeTests):
    @defer.inlineCallbacks
    def test_stream_pull_before_101_waits_instead_of_410(self):
        """
        The Go relay-client starts pulling the request stream just before it
        posts the 101: the pull must wait for the user's bytes, not get 410.
        """
        proto, message = yield self.raw_relayed(
            b"GET /client/robot/ws HTTP/1.1\r\nHost: relay\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        early = self.relay_client.request_stream(message.id)
        yield self.server.when(lambda: self.server.broker.requests[message.id].stream is not None)
        yield self.relay_client.post(HttpResponse(id=message.id, status_code=101))
        yield proto.wait_for(b"\r\n\r\n")
        proto.transport.write(b"hello")
        self.assertEqual((yield early), (200, b"hello"))
        proto.transport.loseConnection()
        yield proto.ended


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
