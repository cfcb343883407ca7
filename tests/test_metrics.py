"""
/metrics as the Go server writes it, over real sockets.

The series names and label sets (not values) are compared with
C{tests/fixtures/go_metrics.txt}, captured from the Go server by
C{tests/fixtures/capture_go_metrics.py} after the same traffic as
L{GoParityTests} sends here. And nobody without a backend of their own may
add series: made-up ids and refused polls leave /metrics as it was.
"""

import os
import re
import tempfile

import pytest
import treq
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from relay.config import ServerConfig
from relay.proto.http_relay_pb2 import HttpResponse
from relay.server.auth import AccessPolicy, ClientTokens
from relay.server.broker import POLL_TIMEOUT
from relay.server.metrics import RelayMetrics
from relay.server.service import REAP_INTERVAL
from tests.fixtures.capture_go_metrics import INACTIVE_REQUEST_TIMEOUT, series
from tests.support import FakeRelayClient, RelayServer
from tests.support.engines import on_each_engine

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "go_metrics.txt")

# Ours only, each documented: the broker's live state, and Python's runtime
# series where Go has its go_* ones.
EXTRA = {
    "relay_backends",
    "relay_open_polls",
    # Connection health (docs/server.md, "Metrics"); the counters only
    # once above zero.
    "relay_backend_last_poll_timestamp_seconds{backend}",
    "relay_backend_reconnects_total{backend}",
    "relay_backend_dead_connections_total{backend}",
    "relay_backend_lost_answers_total{backend,outcome}",
    "relay_dead_connections_total{reason}",
    "relay_pending_requests",
    "python_info{implementation,major,minor,patchlevel,version}",
    'python_gc_collections_total{generation}',
    'python_gc_objects_collected_total{generation}',
    'python_gc_objects_uncollectable_total{generation}',
}


def go_series():
    with open(FIXTURE) as f:
        return {line.strip() for line in f if line.strip() and not line.startswith("#")}


class MetricsTestCase(unittest.TestCase):
    timeout = 30

    def start(self, **kwargs):
        self.server = RelayServer(**kwargs)
        self.relay_client = FakeRelayClient(self.server)
        self.users = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self.server.stop)
        self.addCleanup(self.relay_client.close)
        self.addCleanup(self.users.closeCachedConnections)

    @defer.inlineCallbacks
    def fetch(self, path, data=None):
        if data is None:
            resp = yield treq.get(self.server.url(path), pool=self.users)
        else:
            resp = yield treq.post(self.server.url(path), data=data, pool=self.users)
        body = yield resp.content()
        return resp.code, body

    @defer.inlineCallbacks
    def metrics(self):
        code, body = yield self.fetch("/metrics")
        self.assertEqual(code, 200)
        return body.decode()

    @defer.inlineCallbacks
    def relay_one(self, path, name="robot1"):
        """A user GET answered by the (fake) relay-client, as Go's client answers."""
        user, message = yield self.picked_up(name, path)
        code, _ = yield self.relay_client.post(
            HttpResponse(id=message.id, status_code=200, body=b"x", eof=True, backend_duration_ms=1)
        )
        self.assertEqual(code, 200)
        code, _ = yield user
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def picked_up(self, name, path):
        """A user request that a poll of C{name} picked up: C{(user Deferred, HttpRequest)}."""
        poll = self.relay_client.poll(name)
        yield self.server.polling(name)
        user = self.fetch("/client/%s%s" % (name, path))
        code, message = yield poll
        self.assertEqual(code, 200)
        return user, message

    def fabricated(self, name):
        return self.relay_client.post(HttpResponse(id=name + ":" + "0" * 32, status_code=200, eof=True))


@pytest.mark.socket
class GoParityTests(MetricsTestCase):
    @defer.inlineCallbacks
    def test_names_and_label_sets_match_the_go_server(self):
        """The traffic of capture_go_metrics.TRAFFIC, then a diff with Go's series."""
        clock = Clock()
        self.start(metrics=RelayMetrics(), clock=clock, inactive_request_timeout=INACTIVE_REQUEST_TIMEOUT)
        yield self.relay_one("/bytes/1024")
        yield self.relay_one("/healthz")
        self.assertEqual((yield self.fetch("/client/nobody/x"))[0], 503)
        self.assertEqual((yield self.relay_client.post(b"garbage"))[0], 400)
        self.assertEqual((yield self.fabricated("robot1"))[0], 400)
        self.assertEqual((yield self.fabricated("stranger"))[0], 400)
        # robot2: answered without a status; never answered; a poll times out.
        user, message = yield self.picked_up("robot2", "/no-status")
        yield self.relay_client.post(HttpResponse(id=message.id, eof=True))
        self.assertEqual((yield user)[0], 500)
        user, message = yield self.picked_up("robot2", "/never")
        poll = self.relay_client.poll("robot2")
        yield self.server.polling("robot2")
        clock.advance(INACTIVE_REQUEST_TIMEOUT + REAP_INTERVAL)
        self.assertEqual((yield user)[0], 504)
        clock.advance(POLL_TIMEOUT)
        self.assertEqual((yield poll)[0], 408)
        ours = series((yield self.metrics()))
        go = go_series()
        self.assertEqual(sorted(go - ours), [], "series of the Go server we lack")
        self.assertEqual(sorted(ours - go - EXTRA), [], "series Go does not have (document them, or drop them)")

    @defer.inlineCallbacks
    def test_counters_are_named_as_go_names_them(self):
        self.start(metrics=RelayMetrics())
        yield self.relay_one("/x")
        text = yield self.metrics()
        self.assertIn("# TYPE broker_requests counter\n", text)
        self.assertIn("# TYPE process_cpu_seconds_total counter\n", text)
        self.assertRegex(text, r"\nprocess_cpu_seconds_total [0-9.e+]+\n")
        self.assertNotIn("broker_requests_total", text)
        self.assertNotIn("request_path", text)
        self.assertNotIn("_created", text)
        self.assertIn('broker_requests{backend="robot1",method="client"} 1\n', text)


@pytest.mark.socket
class CardinalityTests(MetricsTestCase):
    @defer.inlineCallbacks
    def test_made_up_ids_add_no_series(self):
        """
        Each POST /server/response with a made-up
        C{name:…} id got its 400 but left a broker_responses{backend=name}
        series behind, for good. Now all of them share one series.
        """
        self.start()
        yield self.relay_one("/x")
        before = yield self.metrics()
        for i in range(20):
            self.assertEqual((yield self.fabricated("made-up-%d-%s" % (i, "n" * 200)))[0], 400)
        after = yield self.metrics()
        self.assertNotIn("made-up", after)
        added = set(after.splitlines()) - set(before.splitlines())
        self.assertEqual(
            [re.sub(r" \S+$", "", line) for line in added if not line.startswith("relay_")],
            ['broker_responses{backend="",method="server_response",'
             'result="not recognized or reaches the inactivity timeout"}'],
        )
        self.assertIn(
            'broker_responses{backend="",method="server_response",'
            'result="not recognized or reaches the inactivity timeout"} 20\n',
            after,
        )

    @defer.inlineCallbacks
    def test_made_up_ids_of_a_known_backend_count_under_its_name(self):
        self.start()
        yield self.relay_one("/x")
        for _ in range(3):
            yield self.fabricated("robot1")
        text = yield self.metrics()
        self.assertIn(
            'broker_responses{backend="robot1",method="server_response",'
            'result="not recognized or reaches the inactivity timeout"} 3\n',
            text,
        )

    @defer.inlineCallbacks
    def test_refused_relay_clients_add_no_series(self):
        """With --client_tokens, a poll or post for a name not one's own leaves no trace in /metrics."""
        fd, tokens = tempfile.mkstemp()
        os.close(fd)
        self.addCleanup(os.remove, tokens)
        self.start(policy=AccessPolicy(client_tokens=ClientTokens(tokens)))
        before = yield self.metrics()
        self.assertEqual((yield self.fetch("/server/request?server=intruder"))[0], 403)
        self.assertEqual((yield self.fabricated("intruder"))[0], 403)
        after = yield self.metrics()
        self.assertNotIn("intruder", after)
        self.assertEqual(before, after)

    def test_forgotten_backends_take_their_series_with_them(self):
        from relay.proto.http_relay_pb2 import HttpRequest
        from relay.server.broker import Broker

        clock = Clock()
        metrics = RelayMetrics(process=False)
        broker = Broker(clock, ServerConfig(inactive_backend_timeout=60), metrics)
        d = broker.get_request("robot")
        pending = broker.relay("robot", HttpRequest(method="GET", url="http://invalid/a/1"), _Sink())
        self.assertEqual(self.successResultOf(d).id, pending.id)
        broker.send_response(HttpResponse(id=pending.id, status_code=200, eof=True, backend_duration_ms=1))
        self.assertIn('backend="robot"', metrics.render().decode())
        clock.advance(61)
        broker.reap()
        self.assertNotIn('backend="robot"', metrics.render().decode())


class _Sink:
    def deliver(self, message, body=None):
        pass

    def fail(self, reason):
        pass

    def pause(self):
        pass

    def resume(self):
        pass


@pytest.mark.memory
class NumberFormatTests(unittest.TestCase):
    def test_numbers_as_client_golang_writes_them(self):
        """Values as they appeared on the Go server's /metrics page."""
        from relay.server.metrics import go_float

        for value, text in [
            (2, "2"),
            (20000, "20000"),
            (0.005, "0.005"),
            (0.008730073999999999, "0.008730073999999999"),
            (13869056.0, "1.3869056e+07"),
            (1796067704.59, "1.79606770459e+09"),
            (1300860928.0, "1.300860928e+09"),
            (float(2**64 - 1), "1.8446744073709552e+19"),
            (1e6, "1e+06"),
            (1e-05, "1e-05"),
            (-3.0, "-3"),
            (float("inf"), "+Inf"),
        ]:
            self.assertEqual(go_float(value), text)


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
