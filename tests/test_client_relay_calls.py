"""
How the relay client treats the relay server's answers: when it polls again,
how it backs off, when it retries a post and when it gives up. A scripted
relay server answers in memory (the client's own agent and endpoints over
iosim transports, L{MemoryNetwork}); the client's timers run on a L{Clock}
so that back-off delays can be read off exactly. Every exchange has
finished when C{flush()} returns, so nothing here waits on the reactor.
"""


import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest
from twisted.web import server
from twisted.web.client import Agent, HTTPConnectionPool

from relay.client.relay_api import POLL_DEADLINE, Forbidden, PermanentRelayError, RelayAPI, RelayError
from relay.outbound.endpoints import CachingEndpointFactory
from relay.proto.http_relay_pb2 import HttpResponse
from tests.support import MemoryNetwork, client_service
from tests.support.e2e import temp_file
from tests.support.engines import on_each_engine
from tests.support.scripted_relay import ScriptedRelay

pytestmark = pytest.mark.memory

BASE = "http://127.0.0.1:8080"


class RelayCallsTests(unittest.TestCase):
    def setUp(self):
        self.relay = ScriptedRelay()
        self.network = MemoryNetwork(lambda reactor: server.Site(self.relay, reactor=reactor))
        self.clock = Clock()

    def polls(self):
        return [c for c in self.relay.calls if c[0] == b"/server/request"]

    def start_client(self, **kw):
        self.fatal = []
        client = client_service(
            self.network.reactor,
            BASE,
            "robot",
            backend_scheme="http",
            backend_address="127.0.0.1:1",
            clock=self.clock,
            on_fatal=self.fatal.append,
            **kw
        )
        # No jitter: the back-off delays read exactly.
        client.reachability.random = lambda: 1.0
        client.startService()
        self.addCleanup(self.stop, client)
        self.network.flush()
        return client

    def stop(self, client):
        d = client.stopService()
        self.network.flush()
        return d

    def advance(self, seconds):
        self.clock.advance(seconds)
        self.network.flush()

    def pending_delays(self):
        """The back-off waits pending (not the calls' deadlines, which are longer)."""
        now = self.clock.seconds()
        return sorted(
            round(c.getTime() - now, 6) for c in self.clock.getDelayedCalls() if c.getTime() - now < POLL_DEADLINE - 1
        )

    def log_lines(self):
        """The client's lines at info and above but its start, as C{(level name, message)}, from now on."""
        lines = []

        def observe(event):
            text = event.get("log_format")
            if (
                event.get("log_level", LogLevel.info) >= LogLevel.info
                and text != "Starting to relay server request loop"
            ):
                lines.append((event["log_level"].name, text))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return lines

    def test_408_polls_again_at_once(self):
        self.relay.script[b"/server/request"] = [(408, b"")] * 4
        self.start_client()
        # Four answered, the fifth waits: no back-off in between.
        self.assertEqual((len(self.polls()), len(self.relay.held)), (5, 1))
        self.assertEqual(self.pending_delays(), [])
        self.assertEqual(self.polls()[0][0], b"/server/request")

    def test_5xx_backs_off_growing_and_resets_on_success(self):
        self.relay.script[b"/server/request"] = [(503, b"down")] * 3 + [(408, b"")] + [(500, b"oops")]
        self.start_client()
        for expected in (0.1, 0.15, 0.225):
            self.assertEqual(self.pending_delays(), [expected])
            count = len(self.polls())
            self.advance(expected + 1e-9)
            self.assertGreater(len(self.polls()), count)
        # 408 counts as success: the next failure starts again from 0.1 s.
        self.assertEqual(self.pending_delays(), [0.1])

    def test_restarting_server_backs_off(self):
        # A draining relay answers 503 (ours now) or, before, 408 "Server is
        # restarting": both back off, where a plain 408 polls again at once.
        self.relay.script[b"/server/request"] = [
            (503, b"Server is restarting\n"),
            (408, b"Server is restarting\n"),
        ]
        self.start_client()
        for expected in (0.1, 0.15):
            self.assertEqual(self.pending_delays(), [expected])
            count = len(self.polls())
            self.advance(expected + 1e-9)
            self.assertGreater(len(self.polls()), count)

    def test_backoff_is_capped_below_a_second(self):
        # A restarted server must find its robots back within a second of
        # listening again.
        self.relay.script[b"/server/request"] = [(502, b"")] * 14
        self.start_client()
        seen = self.follow_backoff(14)
        self.assertEqual(max(seen), 0.8)
        self.assertEqual(seen[-1], 0.8)
        self.assertTrue(all(a <= b for a, b in zip(seen, seen[1:])))

    def test_backoff_grows_to_5s_after_a_minute_without_the_server(self):
        # A long outage behind an ingress that answers every try: a fleet
        # polling at once each 0.8 s would load it for nothing.
        self.relay.script[b"/server/request"] = [(502, b"")] * 200
        self.start_client()
        seen = self.follow_backoff(100)
        self.assertEqual(max(seen), 5.0)
        self.assertEqual(seen[-1], 5.0)
        self.assertTrue(all(d <= 0.8 for d in seen[:60]), "short waits during the first minute")

    def test_jitter_keeps_a_fleet_out_of_step(self):
        self.relay.script[b"/server/request"] = [(502, b"")] * 3
        client = self.start_client()
        client.reachability.random = lambda: 0.0
        self.assertEqual(self.pending_delays(), [0.1])  # the first wait was chosen at start
        self.advance(0.1 + 1e-9)
        self.assertEqual(self.pending_delays(), [0.075])  # half of 0.15

    def follow_backoff(self, count):
        seen = []
        for _ in range(count):
            (delay,) = self.pending_delays()
            seen.append(delay)
            calls = len(self.polls())
            self.advance(delay + 1e-9)
            self.assertGreater(len(self.polls()), calls)
        return seen

    def test_one_line_when_the_server_is_lost_and_one_when_it_is_back(self):
        lines = self.log_lines()
        self.relay.script[b"/server/request"] = [(408, b"")] + [(503, b"Server is restarting")] * 6 + [(408, b"")]
        self.start_client()
        self.follow_backoff(6)
        self.assertEqual(
            lines,
            [("warn", "Lost the relay server"), ("info", "Relay server is back")],
        )

    def test_a_client_that_starts_without_its_server_says_so_once(self):
        lines = self.log_lines()
        self.network.refusing = True
        self.start_client()
        for _ in range(5):
            (delay,) = self.pending_delays()
            self.advance(delay + 1e-9)
        self.network.refusing = False
        (delay,) = self.pending_delays()
        self.advance(delay + 1e-9)
        self.relay.release()
        self.network.flush()
        self.assertEqual(
            lines,
            [("warn", "Cannot reach the relay server"), ("info", "Reached the relay server")],
        )

    def test_losing_the_server_drops_its_idle_connections(self):
        # They crossed the same path: a poll sent on one that died silently
        # would wait out the dead-connection timeout before a new one.
        self.relay.script[b"/server/request"] = [(408, b""), (408, b""), (503, b"down")]
        self.start_client()
        self.assertEqual(self.network.opened, 1, "408s reuse the connection")
        (delay,) = self.pending_delays()
        self.advance(delay + 1e-9)
        self.assertEqual(len(self.polls()), 4)
        self.assertEqual(self.network.opened, 2, "the poll after the loss went on a new connection")

    def test_connection_refused_backs_off(self):
        self.network.refusing = True
        self.start_client()
        self.assertEqual(self.pending_delays(), [0.1])
        self.advance(0.1 + 1e-9)
        self.assertEqual(self.pending_delays(), [0.15])
        self.assertEqual(self.relay.calls, [])

    def test_403_is_fatal(self):
        self.relay.script[b"/server/request"] = [(403, b"Forbidden")]
        client = self.start_client()
        self.assertIn("failed to authenticate", self.fatal[0])
        self.assertEqual(len(self.polls()), 1, "no retry after 403")
        self.assertEqual(client.fatal_error, self.fatal[0])

    def test_relay_token_is_sent_on_every_call(self):
        path = temp_file(self, "relay-secret\n")
        self.relay.script[b"/server/request"] = [(408, b"")]
        self.start_client(relay_token_file=path)
        self.assertEqual(len(self.polls()), 2)
        with open(path, "w") as f:
            f.write("rotated")
        self.relay.release()
        self.network.flush()
        tokens = [c[1].getRawHeaders(b"authorization") for c in self.polls()]
        self.assertEqual(tokens, [[b"Bearer relay-secret"]] * 2 + [[b"Bearer rotated"]])

    # POST /server/response.

    def api(self):
        reactor = self.network.reactor
        pool = HTTPConnectionPool(reactor, persistent=False)
        return RelayAPI(
            Agent.usingEndpointFactory(reactor, CachingEndpointFactory(reactor), pool), self.clock, BASE, "robot"
        )

    def test_post_retried_with_exponential_backoff(self):
        self.relay.script[b"/server/response"] = [(503, b"busy"), (500, b"err"), (200, b"ok")]
        lines = self.log_lines()
        d = defer.ensureDeferred(self.api().post_response(HttpResponse(id="robot:1", status_code=200, eof=True)))
        for expected in (1.0, 2.0):
            self.network.flush()
            self.assertNoResult(d)
            self.assertEqual(self.pending_delays(), [expected])
            self.clock.advance(expected + 1e-9)
        self.network.flush()
        self.successResultOf(d)
        self.assertEqual(lines, [], "retries that work are not worth a line each")
        posts = [c for c in self.relay.calls if c[0] == b"/server/response"]
        self.assertEqual(len(posts), 3)
        message = HttpResponse()
        message.ParseFromString(posts[-1][2])
        self.assertEqual((message.id, message.status_code, message.eof), ("robot:1", 200, True))
        # The id in the query too, for an ingress that routes replicas by name.
        self.assertEqual(posts[-1][3], {b"id": [b"robot:1"]})
        self.assertEqual(
            posts[0][1].getRawHeaders(b"content-type"),
            [b"application/vnd.google.protobuf;proto=cloudrobotics.http_relay.v1alpha1.HttpResponse"],
        )

    def test_post_gives_up_after_10_retries(self):
        self.relay.script[b"/server/response"] = [(503, b"busy")] * 20
        d = defer.ensureDeferred(self.api().post_response(HttpResponse(id="robot:1")))
        delays = []
        self.network.flush()
        while not d.called:
            (delay,) = self.pending_delays()
            delays.append(delay)
            self.advance(delay + 1e-9)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0])
        error = self.failureResultOf(d, RelayError).value
        self.assertIn("Service Unavailable", str(error))
        self.assertEqual(len([c for c in self.relay.calls if c[0] == b"/server/response"]), 11)

    def answer(self, d):
        """What C{d} (a relay call, a coroutine) came to once the network is flushed."""
        d = defer.ensureDeferred(d)
        self.network.flush()
        return d

    def test_post_400_is_final(self):
        self.relay.script[b"/server/response"] = [(400, b"No ongoing request")]
        self.failureResultOf(self.answer(self.api().post_response(HttpResponse(id="robot:1"))), PermanentRelayError)
        self.assertEqual(len(self.relay.calls), 1)
        self.assertEqual(self.pending_delays(), [])

    def test_poll_answers(self):
        api = self.api()
        self.relay.script[b"/server/request"] = [(403, b""), (400, b"Missing server"), (200, b"\xff\xff"), (408, b"")]
        self.failureResultOf(self.answer(api.poll()), Forbidden)
        e = self.failureResultOf(self.answer(api.poll()), RelayError).value
        self.assertIn("Bad Request", str(e))
        self.failureResultOf(self.answer(api.poll()), RelayError)
        self.assertIsNone(self.successResultOf(self.answer(api.poll())))
        self.assertEqual(self.relay.calls[0][0], b"/server/request")


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
