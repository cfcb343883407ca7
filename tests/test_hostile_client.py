"""
A hostile relay-client, as docs/security.md describes it: trusted for its
own backend (C{evil}) and nothing else. Whatever it sends (forged or
replayed ids, every status from 0 to 999 and beyond, every class of header
and trailer name, messages out of order, late, or after its user left),
the user of another backend (C{victim}) on the same HTTP/1.1 connection
(pipelined) or HTTP/2 connection (multiplexed) gets its own backend's true
answer, and the evil backend's own user gets a well-framed response or a
clean error.

The server runs in memory (L{twisted.test.iosim}) on a L{Clock}: the real
protocol stacks, with no sockets and no waiting, so that a thousand
statuses cost seconds. tests/test_security.py has the same rules over
real sockets.
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
from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse
from relay.server.broker import Broker
from relay.server.metrics import RelayMetrics
from relay.server.resources import RootResource
from relay.server.site import RelaySite
from tests.support import on_each_engine, response_message

TRUE_ANSWER = b"the victim's true answer"
FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"


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


def expected_status(status, h2=False) -> int:
    """What the evil backend's own user gets for a first message with C{status}."""
    if status is None or not 100 <= status <= 999:
        return 500
    if status == 101 and h2:
        return 500
    if status < 200:
        return 502
    return status


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


class EveryStatusTests(HostileTestCase):
    STATUSES = [None, -1, 1000, 2**31 - 1] + list(range(0, 1000))

    def test_every_status_over_http11(self):
        for status in self.STATUSES:
            user, message = self.pipelined()
            self.post(message.id, status, FORGED)
            self.flush()
            self.victim_answers()
            first = self.assert_victim_unharmed_http11(user)
            self.assertEqual(first[0], expected_status(status), status)
            if first[0] in (204, 304) or first[0] != status:
                self.assertNotIn(b"forged", user.data, status)
            user.transport.loseConnection()
            self.flush()
        self.assert_clean()

    def test_every_status_over_h2_on_one_connection(self):
        user = self.h2_user()
        for status in self.STATUSES:
            evil, victim, message = self.multiplexed(user)
            self.post(message.id, status, b"forged")
            self.flush()
            self.victim_answers()
            self.assert_victim_unharmed_h2(user, victim)
            self.assertIsNotNone(evil["end"], status)
            if evil["end"] == "ended":
                self.assertEqual(int(evil["headers"][":status"]), expected_status(status, h2=True), status)
        self.assert_clean()


class HeadAndNoBodyTests(HostileTestCase):
    def test_bodies_for_head_204_and_304_never_reach_the_next_response(self):
        for method in (b"HEAD", b"GET"):
            for status in (200, 204, 304):
                for length in (None, "6", "100", "0"):
                    user = Bytes()
                    self.connect(user)
                    user.transport.write(
                        b"%s /client/evil/x HTTP/1.1\r\nHost: relay\r\n\r\n"
                        b"GET /client/victim/y HTTP/1.1\r\nHost: relay\r\n\r\n" % (method,)
                    )
                    self.flush()
                    message = self.poll("evil")
                    headers = [("Content-Length", length)] if length is not None else []
                    self.post(message.id, status, FORGED, headers=headers)
                    self.flush()
                    if user.lost:
                        # Cut short (a body shorter than its length): aborted
                        # before the victim's request was relayed.
                        self.assertEqual((method, status, length), (b"GET", 200, "100"))
                        self.assertNotIn(TRUE_ANSWER, user.data)
                        continue
                    self.victim_answers()
                    head = user.data.split(b"\r\n\r\n", 1)[0]
                    if method == b"HEAD" or status in (204, 304):
                        self.assertNotIn(b"forged", user.data, (method, status, length))
                    if status == 204:
                        self.assertNotIn(b"Content-Length", head)
                    self.assertTrue(user.data.endswith(b"ictim's true answer\r\n0\r\nX-Done: 1\r\n\r\n"))
        self.assert_clean()


# One name of each kind a relay-client might send, with whether a
# well-behaved relay passes it on to the user as a header / as a trailer.
NAMES = [
    ("X-Plain", True, True),
    ("x-lower-case", True, True),
    ("Grpc-Status", True, True),
    ("Connection", False, False),
    ("Keep-Alive", False, False),
    ("Proxy-Connection", False, False),
    ("TE", False, False),
    ("Transfer-Encoding", False, False),
    ("Upgrade", False, False),
    ("Trailer", False, False),
    ("Content-Length", None, False),
    ("Host", True, False),
    ("Authorization", True, False),
    ("Content-Type", True, False),
    ("X-Newline\n", False, False),
    ("X-Cr\r", False, False),
    ("X-Crlf\r\nSet-Cookie: a=b", False, False),
    ("X-Nul\0", False, False),
    ("X Space", False, False),
    (" X-Leading", False, False),
    ("X-Colon:", False, False),
    (":status", False, False),
    (":path", False, False),
    ("", False, False),
    ("X-\u00e9", False, False),
    ("X-" + "a" * 5000, True, True),
]
VALUES = ["v", "", " padded ", "a\r\nInjected: 1", "\0", "x" * 3000, "\u00e9"]


class NameClassTests(HostileTestCase):
    def cases(self):
        for name, as_header, as_trailer in NAMES:
            for value in VALUES[:2] if len(name) > 100 else VALUES:
                yield name, value, as_header, as_trailer

    def test_every_name_class_over_http11(self):
        for name, value, as_header, as_trailer in self.cases():
            user, message = self.pipelined()
            self.post(message.id, 200, b"evil body", eof=False, headers=[(name, value)])
            self.post(message.id, None, b"", eof=True, trailers=[(name, value)])
            self.flush()
            self.victim_answers()
            status, headers, body, trailers = self.assert_victim_unharmed_http11(user)
            lower = name.lower().encode("utf-8")
            if lower == b"transfer-encoding":
                # Ours, for the chunked framing: never the relay-client's.
                self.assertEqual(headers[lower], [b"chunked"])
            elif as_header is not None:
                self.assertEqual(lower in headers, as_header, (name, value))
            self.assertEqual(body, b"evil body", (name, value))
            passed = [t for t in trailers if t.lower().startswith(lower + b":")]
            self.assertEqual(bool(passed), as_trailer and bool(name), (name, value))
            self.assertNotIn(b"Injected", b"".join(headers.get(b"injected", [])))
            user.transport.loseConnection()
            self.flush()
        self.assert_clean()

    def test_every_name_class_over_h2(self):
        user = self.h2_user()
        for name, value, as_header, as_trailer in self.cases():
            evil, victim, message = self.multiplexed(user)
            self.post(message.id, 200, b"evil body", eof=False, headers=[(name, value)])
            self.post(message.id, None, b"", eof=True, trailers=[(name, value)])
            self.flush()
            self.victim_answers()
            self.assert_victim_unharmed_h2(user, victim)
            self.assertEqual(evil["end"], "ended", (name, value))
            self.assertEqual(evil["data"], b"evil body")
            lower = name.lower()
            if lower.startswith(":"):
                self.assertEqual(evil["headers"][":status"], "200")
            elif as_header is not None:
                self.assertEqual(lower in evil["headers"], as_header, (name, value))
            self.assertEqual(lower in (evil["trailers"] or {}), as_trailer, (name, value))
        self.assert_clean()


class IdTests(HostileTestCase):
    def test_forged_and_replayed_ids(self):
        for protocol in ("http/1.1", "h2"):
            if protocol == "h2":
                h2user = self.h2_user()
                evil, victim, message = self.multiplexed(h2user)
            else:
                user, message = self.pipelined()
            # Evil finishes its own request; then the victim's is in flight.
            self.assertEqual(self.post(message.id, 200, b"mine"), 200)
            self.flush()
            victim_request = self.poll("victim")
            self.assertEqual(self.post(victim_request.id, 200, TRUE_ANSWER[:5], eof=False, headers=[("X-Victim", "1")]), 200)
            secret = victim_request.id.split(":", 1)[1]
            forged = [
                "victim:" + "0" * 32,
                "victim:" + secret[:-1],
                "victim:" + secret + "0",
                "victim:" + secret.upper(),
                " " + victim_request.id,
                victim_request.id + " ",
                "evil:" + secret,
                "victim::" + secret,
                secret,
                ":" + secret,
                "victim:",
                ":",
                message.id,  # replayed: evil's own, finished id
            ]
            for request_id in forged:
                self.assertEqual(self.post(request_id, 200, b"forged", eof=True, trailers=[("X-Done", "forged")]), 400, request_id)
                self.assertEqual(self.call("POST", "/server/requeststream?id=" + request_id.replace(" ", "%20"))[0], 410)
            # Invalid UTF-8 in the id, and a second copy of a field.
            self.assertEqual(self.post_raw(b"\x0a\x03\xff\xfe\xfd\x10\xc8\x01"), 400)
            self.assertEqual(self.post_raw(HttpResponse(id=message.id).SerializeToString() * 2), 400)
            self.assertEqual(self.post(victim_request.id, None, TRUE_ANSWER[5:], eof=True, trailers=[("X-Done", "1")]), 200)
            self.flush()
            if protocol == "h2":
                self.assert_victim_unharmed_h2(h2user, victim)
            else:
                evil_response = self.assert_victim_unharmed_http11(user)
                self.assertEqual(evil_response[2], b"mine")
            # Replaying the victim's finished id changes nothing either.
            self.assertEqual(self.post(victim_request.id, 200, b"again"), 400)
        self.assert_clean()


class OrderTests(HostileTestCase):
    """Out-of-order, late and orphaned messages."""

    def run_both(self, hostile, check_evil):
        for protocol in ("http/1.1", "h2"):
            if protocol == "h2":
                user = self.h2_user()
                evil, victim, message = self.multiplexed(user)
            else:
                user, message = self.pipelined()
            hostile(message, user)
            self.flush()
            self.victim_answers()
            if protocol == "h2":
                self.assert_victim_unharmed_h2(user, victim)
                check_evil(evil)
            else:
                first = self.assert_victim_unharmed_http11(user)
                check_evil({"headers": {":status": str(first[0])}, "data": first[2], "end": "ended"})
        self.assert_clean()

    def test_body_before_status(self):
        def hostile(message, user):
            self.assertEqual(self.post(message.id, None, b"body first", eof=False), 200)
            self.flush()
            self.assertEqual(self.post(message.id, 200, b"then status"), 400)

        self.run_both(hostile, lambda evil: self.assertEqual(evil["headers"][":status"], "500"))

    def test_messages_after_eof(self):
        def hostile(message, user):
            self.assertEqual(self.post(message.id, 200, b"done"), 200)
            for _ in range(3):
                self.assertEqual(self.post(message.id, 200, b"late", eof=False), 400)
                self.assertEqual(self.post(message.id, None, b"later", trailers=[("X-Late", "1")]), 400)

        def check(evil):
            self.assertEqual((evil["headers"][":status"], evil["data"]), ("200", b"done"))

        self.run_both(hostile, check)

    def test_second_status_and_keepalives_mid_response(self):
        def hostile(message, user):
            self.assertEqual(self.post(message.id, 201, b"a", eof=False), 200)
            self.assertEqual(self.post(message.id, None, b"", eof=False), 200)  # keep-alive
            self.assertEqual(self.post(message.id, 100, b"b", eof=False, headers=[("Connection", "close")]), 200)
            self.assertEqual(self.post(message.id, 999, b"c", eof=True), 200)

        def check(evil):
            self.assertEqual((evil["headers"][":status"], evil["data"]), ("201", b"abc"))

        self.run_both(hostile, check)

    def test_messages_after_the_user_left(self):
        for protocol in ("http/1.1", "h2"):
            if protocol == "h2":
                leaver = self.h2_user()
                leaver.request("/client/evil/x")
            else:
                leaver = Bytes()
                self.connect(leaver)
                leaver.transport.write(b"GET /client/evil/x HTTP/1.1\r\nHost: relay\r\n\r\n")
            self.flush()
            message = self.poll("evil")
            self.assertEqual(self.post(message.id, 200, b"part", eof=False), 200)
            leaver.transport.loseConnection()
            self.flush()
            # A victim on another connection, in flight while evil keeps posting.
            victim_user = Bytes()
            self.connect(victim_user)
            victim_user.transport.write(b"GET /client/victim/y HTTP/1.1\r\nHost: relay\r\n\r\n")
            self.flush()
            for _ in range(3):
                self.assertEqual(self.post(message.id, None, b"more", eof=False), 400)
                self.assertEqual(self.post(message.id, 200, b"", eof=True), 400)
                self.assertEqual(self.call("POST", "/server/requeststream?id=" + message.id)[0], 410)
            self.victim_answers()
            ((status, headers, body, trailers),) = http11_responses(victim_user.data)
            self.assertEqual((status, body, trailers), (200, TRUE_ANSWER, [b"X-Done: 1"]))
        self.assert_clean()


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
