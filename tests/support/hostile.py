"""
A hostile backend's test case and the user-clients that check what reaches the
victim.
"""

from typing import Dict, List, Tuple

import h2.config
import h2.connection
import h2.events
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial import unittest

from relay.config import ServerConfig
from relay.proto.http_relay_pb2 import HttpRequest
from relay.server.broker import Broker
from relay.server.metrics import RelayMetrics
from relay.server.resources import RootResource
from relay.server.site import RelaySite
from tests.support import response_message

TRUE_ANSWER = b"the victim's true answer"


class Bytes(Protocol):
    def __init__(self):
        self.data = b""
        self.lost = False

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = True


class H2User(Protocol):
    """An HTTP/2 user-client (prior knowledge) with any number of streams."""

    def __init__(self):
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.streams: Dict[int, dict] = {}
        self.lost = False
        self.terminated = False

    def connectionMade(self):
        self.conn.initiate_connection()
        self.transport.write(self.conn.data_to_send())

    def request(self, path: str) -> dict:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream_id, [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "relay")],
            end_stream=True,
        )
        self.transport.write(self.conn.data_to_send())
        state = self.streams[stream_id] = {"headers": None, "data": b"", "trailers": None, "end": None}
        return state

    def dataReceived(self, data):
        for event in self.conn.receive_data(data):
            state = self.streams.get(getattr(event, "stream_id", None))
            if isinstance(event, h2.events.ResponseReceived):
                state["headers"] = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                state["data"] += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                state["trailers"] = dict(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                state["end"] = "ended"
            elif isinstance(event, h2.events.StreamReset):
                state["end"] = "reset"
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.terminated = True
        self.transport.write(self.conn.data_to_send())

    def connectionLost(self, reason):
        self.lost = True


def http11_responses(data: bytes) -> List[Tuple[int, Dict[bytes, List[bytes]], bytes, List[bytes]]]:
    """
    The complete responses in C{data}: C{(status, headers, body, trailer
    lines)}. Fails on anything that is not well-framed HTTP/1.1.
    """
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, "incomplete head: %r" % (data[:200],)
        lines = head.split(b"\r\n")
        assert lines[0].startswith(b"HTTP/1.1 "), lines[0]
        status = int(lines[0].split(b" ")[1])
        headers: Dict[bytes, List[bytes]] = {}
        for line in lines[1:]:
            assert b"\n" not in line and b"\r" not in line, line
            name, colon, value = line.partition(b":")
            assert colon and name and name == name.strip(), line
            headers.setdefault(name.lower(), []).append(value.strip())
        trailers: List[bytes] = []
        if status in (204, 304) or 100 <= status < 200:
            body, data = b"", rest
        elif b"content-length" in headers:
            (length,) = headers[b"content-length"]
            n = int(length)
            assert len(rest) >= n, "short body"
            body, data = rest[:n], rest[n:]
        elif headers.get(b"transfer-encoding") == [b"chunked"]:
            pieces = []
            while True:
                size_line, crlf, rest = rest.partition(b"\r\n")
                assert crlf, "incomplete chunk size"
                size = int(size_line, 16)
                if size == 0:
                    while True:
                        line, crlf, rest = rest.partition(b"\r\n")
                        assert crlf, "incomplete trailers"
                        if not line:
                            break
                        assert b"\n" not in line and b":" in line, line
                        trailers.append(line)
                    break
                pieces.append(rest[:size])
                assert rest[size : size + 2] == b"\r\n", "bad chunk end"
                rest = rest[size + 2 :]
            body, data = b"".join(pieces), rest
        else:
            body, data = rest, b""
        out.append((status, headers, body, trailers))
    return out


class HostileTestCase(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.broker = Broker(self.clock, ServerConfig(block_size=64), RelayMetrics(process=False))
        root = RootResource(self.broker, lambda: b"")
        self.site = RelaySite(root, ServerConfig(max_request_body=1 << 20, header_timeout=None), reactor=self.clock)
        self.site.body_budget = self.broker.bodies
        self.pumps: List[iosim.IOPump] = []
        for name in ("evil", "victim"):
            d = self.broker.get_request(name)
            d.cancel()
            d.addErrback(lambda f: None)

    # The wiring.

    def connect(self, client):
        server = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), greet=False)
        self.pumps.append(pump)
        return server

    def flush(self):
        for _ in range(1000):
            self.clock.advance(0)
            moved = False
            for pump in list(self.pumps):
                moved = pump.flush() or moved
            due = [c for c in self.clock.getDelayedCalls() if c.getTime() <= self.clock.seconds()]
            if not moved and not due:
                self.pumps = [p for p in self.pumps if not (p.clientIO.disconnected and p.serverIO.disconnected)]
                return
        raise AssertionError("the server never settled")

    def call(self, method: str, path: str, body: bytes = b"") -> Tuple[int, bytes]:
        """One relay-client call on a connection of its own."""
        client = Bytes()
        self.connect(client)
        client.transport.write(
            b"%s %s HTTP/1.1\r\nHost: relay\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (method.encode(), path.encode(), len(body), body)
        )
        self.flush()
        ((status, _, answer, _),) = http11_responses(client.data)
        return status, answer

    def poll(self, name: str) -> HttpRequest:
        status, body = self.call("GET", "/server/request?server=" + name)
        assert status == 200, (status, body)
        message = HttpRequest()
        message.ParseFromString(body)
        return message

    def post(self, request_id, status=None, body=b"", eof=True, headers=(), trailers=()) -> int:
        return self.post_raw(response_message(request_id, status, body, eof, headers, trailers).SerializeToString())

    def post_raw(self, data: bytes) -> int:
        return self.call("POST", "/server/response", data)[0]

    # The two users.

    def pipelined(self, first_path="/client/evil/x") -> Tuple[Bytes, HttpRequest, HttpRequest]:
        """An HTTP/1.1 user with a request to evil and then one to victim."""
        user = Bytes()
        self.connect(user)
        user.transport.write(
            b"GET %s HTTP/1.1\r\nHost: relay\r\n\r\n"
            b"GET /client/victim/y HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer victim-secret\r\n\r\n"
            % (first_path.encode(),)
        )
        self.flush()
        return user, self.poll("evil")

    def victim_answers(self, user_or_state=None) -> HttpRequest:
        """The victim's relay-client picks up its request and answers it honestly."""
        message = self.poll("victim")
        self.assertEqual(self.post(message.id, 200, TRUE_ANSWER[:5], eof=False, headers=[("X-Victim", "1")]), 200)
        self.assertEqual(self.post(message.id, None, TRUE_ANSWER[5:], eof=True, trailers=[("X-Done", "1")]), 200)
        self.flush()
        return message

    def assert_victim_unharmed_http11(self, user: Bytes):
        responses = http11_responses(user.data)
        self.assertEqual(len(responses), 2, user.data[-300:])
        status, headers, body, trailers = responses[1]
        self.assertEqual((status, body, headers.get(b"x-victim"), trailers), (200, TRUE_ANSWER, [b"1"], [b"X-Done: 1"]))
        self.assertNotIn(b"victim-secret", b"".join(r[2] for r in responses[:1]))
        return responses[0]

    def h2_user(self) -> H2User:
        user = H2User()
        self.connect(user)
        self.flush()
        return user

    def multiplexed(self, user: H2User, first_path="/client/evil/x") -> Tuple[dict, dict, HttpRequest]:
        evil = user.request(first_path)
        self.flush()
        message = self.poll("evil")
        victim = user.request("/client/victim/y")
        self.flush()
        return evil, victim, message

    def assert_victim_unharmed_h2(self, user: H2User, victim: dict):
        self.assertFalse(user.lost or user.terminated)
        self.assertEqual(victim["end"], "ended")
        self.assertEqual((victim["headers"][":status"], victim["data"]), ("200", TRUE_ANSWER))
        self.assertEqual(victim["headers"].get("x-victim"), "1")
        self.assertEqual(victim["trailers"], {"x-done": "1"})

    def assert_clean(self):
        """Nothing pending, no budget held, once the timeouts have passed."""
        for _ in range(14):
            self.clock.advance(10)
            self.broker.reap()
            self.flush()
        self.assertEqual(self.broker.requests, {})
        self.assertEqual(self.broker.bodies.used, 0)
        for backend in self.broker.backends.values():
            self.assertEqual((backend.active, list(backend.queue)), (set(), []))


