"""
Property-based tests: random and mutated protobuf bodies, paths, query
strings and headers thrown at every endpoint. Whatever comes in, the server
answers with a status it documents, never crashes, never leaves a request
stuck and never leaks pending state.

The server runs in memory (L{twisted.test.iosim}) on a L{Clock}, so each
example is fast and deterministic.
"""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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
from tests.support.engines import on_each_engine

# The default profile replays the same examples every run, so that CI is
# deterministic; HYPOTHESIS_PROFILE=explore searches afresh and far longer.
# The tests run once per HTTP/1.1 engine, from twin classes: the same
# test function on two executors, which is what hypothesis' check warns of.
_SUPPRESSED = [HealthCheck.too_slow, HealthCheck.differing_executors]
settings.register_profile(
    "default", max_examples=150, deadline=None, derandomize=True, suppress_health_check=_SUPPRESSED
)
settings.register_profile(
    "explore", max_examples=3000, deadline=None, suppress_health_check=_SUPPRESSED
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# What the server may answer, by endpoint family; 500 only for the
# documented "Received no header from relay client".
ALLOWED = {200, 204, 301, 400, 401, 403, 404, 408, 410, 413, 502, 503, 504}

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.%", min_size=0, max_size=12)
path_segments = st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.%~/", max_size=10), max_size=4)
paths = st.one_of(
    st.sampled_from(
        ["/server/request", "/server/response", "/server/requeststream", "/healthz", "/metrics", "/client/", "/"]
    ),
    st.builds(lambda n, p: "/client/%s/%s" % (n, "/".join(p)), names, path_segments),
    st.builds(lambda p: "/" + "/".join(p), path_segments),
)
queries = st.one_of(
    st.just(""),
    st.builds(lambda k, v: "?%s=%s" % (k, v), st.sampled_from(["server", "id", "x", ""]), names),
    st.builds(lambda v: "?id=robot:%s" % v, st.text(alphabet="0123456789abcdef", max_size=32)),
)
header_names = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=16)
header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
headers = st.lists(st.tuples(header_names, header_values), max_size=6)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])


def response_bodies(ids):
    valid = st.builds(
        lambda i, status, body, eof: HttpResponse(id=i, status_code=status, body=body, eof=eof).SerializeToString(),
        ids,
        st.integers(min_value=-5, max_value=1200),
        st.binary(max_size=64),
        st.booleans(),
    )
    return st.one_of(
        st.binary(max_size=80),
        valid,
        st.builds(lambda b, cut: b[:cut], valid, st.integers(min_value=0, max_value=40)),
        st.builds(lambda b, i, x: b[:i] + bytes([x]) + b[i + 1 :], valid, st.integers(0, 40), st.integers(0, 255)),
    )


class RawClient(Protocol):
    def __init__(self):
        self.data = b""

    def dataReceived(self, data):
        self.data += data


class FuzzTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.broker = Broker(self.clock, ServerConfig(block_size=64), RelayMetrics(process=False))
        root = RootResource(self.broker, lambda: b"")
        self.site = RelaySite(root, ServerConfig(max_request_body=4096, header_timeout=None), reactor=self.clock)
        self.site.body_budget = self.broker.bodies

    def exchange(self, raw: bytes):
        server = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        client = RawClient()
        pump = iosim.connect(
            server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), greet=False
        )
        client.transport.write(raw)
        pump.flush()
        return server, client, pump

    def status(self, data: bytes) -> int:
        line = data.split(b"\r\n", 1)[0]
        self.assertTrue(line.startswith(b"HTTP/1.1 "), data[:200])
        return int(line.split()[1])

    def settle(self, pumps):
        """Let every timeout pass; then nothing may be left pending."""
        for _ in range(14):
            self.clock.advance(10)
            self.broker.reap()  # what the service's TimerService does every 10 s
            for pump in pumps:
                pump.flush()
        self.assertEqual(self.broker.requests, {})
        for backend in self.broker.backends.values():
            self.assertEqual(backend.active, set())
            self.assertEqual(list(backend.queue), [])
            self.assertEqual(list(backend.polls), [])
            self.assertEqual(backend.active, set())

    def request_bytes(self, method, path, query, hdrs, body):
        head = "%s %s%s HTTP/1.1\r\nHost: relay\r\n" % (method, path, query)
        for k, v in hdrs:
            head += "%s: %s\r\n" % (k, v)
        head += "Content-Length: %d\r\n\r\n" % len(body)
        return head.encode("latin-1") + body

    @given(methods, paths, queries, headers, st.binary(max_size=200), st.booleans())
    def test_any_request_any_endpoint(self, method, path, query, hdrs, body, known):
        if known:
            d = self.broker.get_request("robot")
            d.cancel()
            d.addErrback(lambda f: None)
        server, client, pump = self.exchange(self.request_bytes(method, path, query, hdrs, body))
        self.settle([pump])
        if client.data:
            code = self.status(client.data)
            self.assertIn(code, ALLOWED | {500}, client.data[:300])
            if code == 500:
                self.assertIn(b"Received no header from relay client", client.data)
        server.transport.loseConnection()
        pump.flush()
        self.settle([pump])
        self.assertEqual(self.broker.bodies.used, 0)

    @given(st.data())
    def test_mutated_responses_to_a_live_request(self, data):
        poll = self.broker.get_request("robot")
        _, user, user_pump = self.exchange(b"GET /client/robot/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        request = poll.result
        self.assertIsInstance(request, HttpRequest)
        ids = st.sampled_from([request.id, request.id + "0", "robot:", "other:" + request.id[6:], ""])
        pumps = [user_pump]
        for body in data.draw(st.lists(response_bodies(ids), min_size=1, max_size=5)):
            _, rc, pump = self.exchange(self.request_bytes("POST", "/server/response", "", [], body))
            pumps.append(pump)
            user_pump.flush()
            code = self.status(rc.data)
            self.assertIn(code, (200, 400), rc.data)
        # Whatever the relay-client sent, the user's request ends: completed,
        # refused (500/504) or aborted, and nothing is left behind.
        self.settle(pumps)
        if user.data:
            self.assertIn(self.status(user.data), ALLOWED | {101, 500} | set(range(100, 1000)))


# The relay-client's side and HTTP/2: random response messages (any status,
# any header or trailer name, bodies, eof anywhere) for a user who also has a
# request to another backend on the same connection, pipelined (HTTP/1.1) or
# multiplexed (HTTP/2); and random requests over HTTP/2.

from tests.support.hostile import TRUE_ANSWER, HostileTestCase  # noqa: E402

pytestmark = pytest.mark.memory

any_names = st.one_of(
    st.sampled_from(
        ["Connection", "TE", "Transfer-Encoding", "Upgrade", "Keep-Alive", "Trailer", "Content-Length",
         "Host", "Grpc-Status", ":status", "X-A\n", "X-B\r\nInjected: 1", ""]
    ),
    st.text(max_size=12),
    header_names,
)
any_values = st.one_of(st.text(max_size=20), st.sampled_from(["0", "5", "-1", "abc", " x ", "a\r\nInjected: 1"]))
statuses = st.one_of(st.none(), st.integers(min_value=-3, max_value=1002), st.sampled_from([100, 101, 103, 204, 304]))
response_messages = st.lists(
    st.tuples(
        statuses,
        st.binary(max_size=40),
        st.booleans(),
        st.lists(st.tuples(any_names, any_values), max_size=3),
        st.lists(st.tuples(any_names, any_values), max_size=3),
    ),
    min_size=1,
    max_size=4,
)


class RelayClientFuzzTests(HostileTestCase):
    def setUp(self):
        pass  # a fresh server per example: see fresh()

    def fresh(self):
        HostileTestCase.setUp(self)

    def post_all(self, request_id, messages):
        for status, body, eof, hdrs, trailers in messages:
            self.assertIn(self.post(request_id, status, body, eof, hdrs, trailers), (200, 400))
            self.flush()

    def end_evil(self):
        """Let the inactive-request timeout end whatever evil left open."""
        for _ in range(8):
            if not any(p.backend == "evil" for p in self.broker.requests.values()):
                return
            self.clock.advance(10)
            self.broker.reap()
            self.flush()

    def victim_waiting(self):
        return any(p.backend == "victim" and not p.picked_up for p in self.broker.requests.values())

    @given(response_messages)
    def test_response_messages_to_a_pipelining_http11_user(self, messages):
        self.fresh()
        user, message = self.pipelined()
        self.post_all(message.id, messages)
        self.end_evil()
        if self.victim_waiting():
            self.victim_answers()
        if user.lost:
            # The evil response was cut short: the connection is aborted,
            # and the victim's request was never relayed.
            self.assertNotIn(TRUE_ANSWER, user.data)
        else:
            self.assert_victim_unharmed_http11(user)
        self.assert_clean()

    @given(response_messages)
    def test_response_messages_to_a_multiplexing_h2_user(self, messages):
        self.fresh()
        user = self.h2_user()
        evil, victim, message = self.multiplexed(user)
        self.post_all(message.id, messages)
        self.victim_answers()
        self.assert_victim_unharmed_h2(user, victim)
        # Whatever evil left open ends (by the inactive-request timeout, or
        # with the connection at its idle timeout), without an error.
        self.end_evil()
        self.assertTrue(evil["end"] is not None or user.lost or user.terminated)
        self.assert_clean()

    @given(
        st.lists(
            st.tuples(methods, paths, queries, st.lists(st.tuples(header_names, header_values), max_size=4),
                      st.binary(max_size=100)),
            min_size=1,
            max_size=3,
        ),
        st.booleans(),
    )
    def test_any_requests_over_h2(self, requests, known):
        self.fresh()
        if not known:
            self.broker.backends.clear()
        user = self.h2_user()
        states = []
        for method, path, query, hdrs, body in requests:
            stream_id = user.conn.get_next_available_stream_id()
            pairs = [(":method", method), (":path", path + query), (":scheme", "http"), (":authority", "relay")]
            pairs += [(k.lower(), v) for k, v in hdrs if k.lower() not in _H2_FORBIDDEN]
            user.conn.send_headers(stream_id, pairs, end_stream=not body)
            if body:
                user.conn.send_data(stream_id, body, end_stream=True)
            user.transport.write(user.conn.data_to_send())
            state = user.streams[stream_id] = {"headers": None, "data": b"", "trailers": None, "end": None}
            states.append(state)
        self.flush()
        # Long polls end after 30 s, unclaimed requests after 10 s: well
        # within the connection's idle timeout.
        for _ in range(4):
            self.clock.advance(10)
            self.broker.reap()
            self.flush()
        for state in states:
            if state["end"] == "ended":
                self.assertIn(int(state["headers"][":status"]), ALLOWED | {500}, state)
        health = user.request("/healthz")
        self.flush()
        self.assertEqual((health["end"], health["data"]), ("ended", b"ok"))
        self.assert_clean()


_H2_FORBIDDEN = frozenset(
    ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "host"]
)


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
