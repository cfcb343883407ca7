"""
The broker's rules, with time driven by a Clock: pickup, polls, timeouts,
back-pressure, cancellation and reaping.
"""

import re

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relay.config import ServerConfig
from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse
from relay.server.broker import PICKUP_TIMEOUT, POLL_TIMEOUT, Broker
from relay.server.errors import BackendUnreachable, RequestExpired, ServerStopping, UnknownBackend, UnknownRequest
from relay.server.events import IBrokerEvents
from relay.server.ids import RequestIds
from relay.server.metrics import RelayMetrics
from relay.server.pending import STREAM_POLL_TIMEOUT, StreamQueue
from tests.support.sinks import Sink

pytestmark = pytest.mark.memory


def results(d):
    out = []
    d.addBoth(out.append)
    return out


class BrokerTestCase(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.metrics = RelayMetrics(process=False)
        self.broker = Broker(
            self.clock, ServerConfig(inactive_request_timeout=60, inactive_backend_timeout=1800), self.metrics
        )

    def relay(self, name="robot", url="http://invalid/x"):
        sink = Sink()
        pending = self.broker.relay(name, HttpRequest(method="GET", url=url), sink)
        sink.pending = pending
        return pending, sink

    def known(self, name="robot"):
        """Make a backend known the way a relay-client does: by polling."""
        d = self.broker.get_request(name)
        d.cancel()
        self.failureResultOf(d, CancelledError)

    def test_request_id_format(self):
        ids = RequestIds(batch=64)
        request_id = ids("robot-1")
        name, _, hexpart = request_id.partition(":")
        self.assertEqual(name, "robot-1")
        self.assertRegex(hexpart, r"^[0-9a-f]{32}$")
        # Across refills of the random pool, no id repeats.
        many = {ids("robot-1") for _ in range(1000)}
        self.assertEqual(len(many), 1000)

    def test_unknown_backend(self):
        with self.assertRaises(UnknownBackend) as e:
            self.relay("nobody")
        self.assertIn("unknown client", str(e.exception))
        self.assertIn('"nobody"', str(e.exception))

    def test_waiting_poll_gets_request(self):
        d = self.broker.get_request("robot")
        pending, _ = self.relay()
        message = self.successResultOf(d)
        self.assertEqual(message.id, pending.id)
        self.assertTrue(pending.id.startswith("robot:"))
        self.assertEqual(message.url, "http://invalid/x")

    def test_queued_request_goes_to_next_poll(self):
        self.known()
        pending, sink = self.relay()
        self.clock.advance(PICKUP_TIMEOUT - 1)
        message = self.successResultOf(self.broker.get_request("robot"))
        self.assertEqual(message.id, pending.id)
        # Picked up: the pickup timeout no longer applies.
        self.clock.advance(5)
        self.assertEqual(sink.failures, [])

    def test_each_request_goes_to_exactly_one_poll_the_newest_first(self):
        """
        After a network change the oldest polls are the ones most likely
        on dead connections: requests go to the newest, the oldest waits.
        """
        polls = [self.broker.get_request("robot") for _ in range(3)]
        ids = [self.relay()[0].id for _ in range(2)]
        self.assertEqual([self.successResultOf(d).id for d in polls[:0:-1]], ids)
        self.assertNoResult(polls[0])

    def test_pickup_timeout(self):
        self.known()
        pending, sink = self.relay()
        self.clock.advance(PICKUP_TIMEOUT)
        self.assertEqual(len(sink.failures), 1)
        self.assertIsInstance(sink.failures[0], BackendUnreachable)
        self.assertIn("timeout waiting for relay client to accept request", str(sink.failures[0]))
        self.assertNotIn(pending.id, self.broker.requests)
        # A later poll does not get the abandoned request.
        d = self.broker.get_request("robot")
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d, CancelledError)

    def test_poll_timeout(self):
        d = self.broker.get_request("robot")
        self.clock.advance(POLL_TIMEOUT - 0.1)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(d))

    def test_cancelled_poll_gets_nothing(self):
        d = self.broker.get_request("robot")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        pending, sink = self.relay()
        self.assertFalse(pending.picked_up)
        self.clock.advance(PICKUP_TIMEOUT)
        self.assertIsInstance(sink.failures[0], BackendUnreachable)

    def test_response_stream_in_order(self):
        d = self.broker.get_request("robot")
        pending, sink = self.relay()
        self.successResultOf(d)
        for i, eof in enumerate([False, False, True]):
            m = HttpResponse(id=pending.id, body=b"%d" % i, eof=eof)
            if i == 0:
                m.status_code = 200
            self.successResultOf(self.broker.send_response(m))
        self.assertEqual([m.body for m in sink.messages], [b"0", b"1", b"2"])
        self.assertNotIn(pending.id, self.broker.requests)
        with self.assertRaises(UnknownRequest):
            self.broker.send_response(HttpResponse(id=pending.id, body=b"late"))

    def test_post_is_held_while_user_is_paused(self):
        """Back-pressure: a paused user-client holds the relay-client's POST."""
        pending, sink = self._picked_up()
        pending.pauseProducing()
        first = self.broker.send_response(HttpResponse(id=pending.id, status_code=200, body=b"a"))
        second = self.broker.send_response(HttpResponse(id=pending.id, body=b"b", eof=True))
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertEqual(sink.messages, [])
        pending.resumeProducing()
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual([m.body for m in sink.messages], [b"a", b"b"])

    def test_pause_during_write_holds_the_next_post(self):
        pending, sink = self._picked_up()
        sink.pause_after_write = True
        first = self.broker.send_response(HttpResponse(id=pending.id, status_code=200, body=b"a"))
        self.successResultOf(first)
        second = self.broker.send_response(HttpResponse(id=pending.id, body=b"b"))
        self.assertNoResult(second)
        sink.pause_after_write = False
        pending.resumeProducing()
        self.successResultOf(second)

    def test_duplicate_eof_is_refused_at_once(self):
        pending, sink = self._picked_up()
        pending.pauseProducing()
        held = self.broker.send_response(HttpResponse(id=pending.id, status_code=200, eof=True))
        with self.assertRaises(UnknownRequest):
            self.broker.send_response(HttpResponse(id=pending.id, status_code=200, eof=True))
        pending.resumeProducing()
        self.successResultOf(held)
        self.assertEqual(len(sink.messages), 1)

    def test_cancel_makes_id_unknown_and_releases_held_posts(self):
        pending, sink = self._picked_up()
        pending.pauseProducing()
        held = self.broker.send_response(HttpResponse(id=pending.id, status_code=200, body=b"x"))
        self.broker.cancel(pending)
        self.failureResultOf(held, UnknownRequest)
        with self.assertRaises(UnknownRequest):
            self.broker.send_response(HttpResponse(id=pending.id, body=b"y"))
        self.assertEqual(sink.failures, [])
        self.assertEqual(self.broker.requests, {})

    def test_cancelled_post_is_not_delivered(self):
        """A relay-client whose POST timed out retries it: no duplicate data."""
        pending, sink = self._picked_up()
        pending.pauseProducing()
        held = self.broker.send_response(HttpResponse(id=pending.id, status_code=200, body=b"x"))
        held.cancel()
        self.failureResultOf(held, CancelledError)
        retry = self.broker.send_response(HttpResponse(id=pending.id, status_code=200, body=b"x"))
        pending.resumeProducing()
        self.successResultOf(retry)
        self.assertEqual([m.body for m in sink.messages], [b"x"])

    def test_inactive_request_is_reaped_once_timeout_passed(self):
        pending, sink = self._picked_up()
        self.clock.advance(59)
        self.broker.reap()
        self.assertEqual(sink.failures, [])
        self.broker.send_response(HttpResponse(id=pending.id, status_code=200, body=b"x"))
        self.clock.advance(59)
        self.broker.reap()
        self.assertEqual(sink.failures, [])
        self.clock.advance(2)
        self.broker.reap()
        self.assertEqual(len(sink.failures), 1)
        self.assertIsInstance(sink.failures[0], RequestExpired)
        self.assertEqual(self.broker.requests, {})

    def test_unpicked_request_expires_too(self):
        self.broker.inactive_request_timeout = 5
        self.known()
        pending, sink = self.relay()
        self.clock.advance(6)
        self.broker.reap()
        self.assertIsInstance(sink.failures[0], RequestExpired)
        self.assertEqual(self.broker.backends["robot"].queue.__len__(), 0)

    def test_inactive_backend_is_forgotten_with_its_metrics(self):
        d = self.broker.get_request("robot")
        self.clock.advance(POLL_TIMEOUT)
        self.successResultOf(d)
        self.assertIn(b'backend="robot"', self.metrics.render())
        self.clock.advance(1800 - 1)
        self.broker.reap()
        self.assertIn("robot", self.broker.backends)
        self.clock.advance(2)
        self.broker.reap()
        self.assertNotIn("robot", self.broker.backends)
        self.assertNotIn(b'backend="robot"', self.metrics.render())
        with self.assertRaises(UnknownBackend):
            self.relay()

    def test_backend_with_open_poll_is_kept(self):
        self.broker.inactive_backend_timeout = 10
        d = self.broker.get_request("robot")
        self.clock.advance(11)
        self.broker.reap()
        self.assertIn("robot", self.broker.backends)
        d.cancel()
        self.failureResultOf(d, CancelledError)

    def test_stop_ends_polls_and_refuses_requests(self):
        d = self.broker.get_request("robot")
        self.broker.stop()
        self.assertIsNone(self.successResultOf(d))
        with self.assertRaises(ServerStopping):
            self.relay()

    def test_request_stream(self):
        pending, sink = self._picked_up()
        self.broker.block_size = 4
        # A relay-client may ask before the 101 is through: it waits.
        d = self.broker.get_request_stream(pending.id)
        self.assertNoResult(d)
        stream = pending.open_stream()
        stream.put(b"hello world")
        self.assertEqual(self.successResultOf(d), b"hell")
        self.assertEqual(self.successResultOf(self.broker.get_request_stream(pending.id)), b"o wo")
        idle = self.broker.get_request_stream(pending.id)
        self.assertEqual(self.successResultOf(idle), b"rld")
        idle = self.broker.get_request_stream(pending.id)
        self.clock.advance(STREAM_POLL_TIMEOUT)
        self.assertEqual(self.successResultOf(idle), b"")
        waiting = self.broker.get_request_stream(pending.id)
        self.broker.cancel(pending)
        self.assertIsNone(self.successResultOf(waiting))
        with self.assertRaises(UnknownRequest):
            self.broker.get_request_stream(pending.id)

    def _picked_up(self):
        d = self.broker.get_request("robot")
        pending, sink = self.relay()
        self.successResultOf(d)
        return pending, sink


class Producer:
    def __init__(self):
        self.paused = False

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False


class StreamQueueTestCase(unittest.TestCase):
    def test_pauses_producer_above_high_water(self):
        q = StreamQueue(Clock(), block_size=10, high_water=20)
        producer = Producer()
        q.set_producer(producer)
        q.put(b"x" * 15)
        self.assertFalse(producer.paused)
        q.put(b"x" * 10)
        self.assertTrue(producer.paused)
        self.assertEqual(self.successResultOf(q.get()), b"x" * 10)
        self.assertTrue(producer.paused)
        self.assertEqual(self.successResultOf(q.get()), b"x" * 10)
        self.assertFalse(producer.paused)
        self.assertEqual(q.buffered, 5)


class FailingSinkTests(unittest.TestCase):
    def test_a_sink_bug_fails_the_post_and_ends_the_request(self):
        clock = Clock()
        broker = Broker(clock, ServerConfig(), RelayMetrics(process=False))

        class Broken(Sink):
            def deliver(self, message, body=None):
                raise RuntimeError("bug")

        poll = broker.get_request("robot")
        sink = Broken()
        pending = broker.relay("robot", HttpRequest(method="GET", url="http://invalid/"), sink)
        self.successResultOf(poll)
        d = broker.send_response(HttpResponse(id=pending.id, status_code=200))
        self.failureResultOf(d, RuntimeError)
        self.assertEqual(len(sink.failures), 1)
        self.assertEqual(broker.requests, {})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class MetricCardinalityTests(unittest.TestCase):
    def test_request_paths_make_no_series(self):
        """Go dropped the request_path label: users' URLs never add series."""
        metrics = RelayMetrics(process=False)
        broker = Broker(Clock(), ServerConfig(), metrics)
        d = broker.get_request("robot")
        d.cancel()
        self.failureResultOf(d)
        for i in range(10):
            broker.relay("robot", HttpRequest(method="GET", url="http://invalid/page-%d" % i), Sink())
        text = metrics.render().decode()
        self.assertEqual(
            re.findall(r"broker_requests\{([^}]*)\}", text),
            ['backend="robot",method="server_request"', 'backend="robot",method="client"'],
        )
        self.assertNotIn("page-", text)


class WaitersTests(unittest.TestCase):
    """The one waiting line behind long polls and stream reads."""

    def setUp(self):
        from relay.server.pending import Waiters

        self.clock = Clock()
        self.timed_out = []
        self.line = Waiters(self.clock, 30, lambda d: (self.timed_out.append(d), d.callback("late")))

    def test_oldest_first_with_its_timer_gone(self):
        first, second = self.line.wait(), self.line.wait()
        self.assertIs(self.line.pop(), first)
        self.assertEqual(list(self.line), [second])
        self.clock.advance(30)
        self.assertEqual(self.timed_out, [second])
        self.assertFalse(first.called)
        self.assertEqual(len(self.line), 0)

    def test_timeout_leaves_the_line_before_it_fires(self):
        d = self.line.wait()
        seen = []
        d.addCallback(lambda result: seen.append((result, len(self.line))))
        self.clock.advance(30)
        self.assertEqual(seen, [("late", 0)])

    def test_cancel_takes_the_timer_along(self):
        d = self.line.wait()
        d.addErrback(lambda f: None)
        d.cancel()
        self.assertEqual((len(self.line), self.clock.getDelayedCalls()), (0, []))

    def test_fire_all(self):
        waiting = [self.line.wait(), self.line.wait()]
        self.line.fire_all(None)
        self.assertEqual([d.called for d in waiting], [True, True])
        self.assertEqual((len(self.line), self.clock.getDelayedCalls()), (0, []))


@implementer(IBrokerEvents)
class Recorder:
    """An observer that keeps every event, by name, with its arguments."""

    def __init__(self):
        self.events = []

    def __getattr__(self, name):
        if name not in IBrokerEvents:
            raise AttributeError(name)
        return lambda *args: self.events.append((name,) + args)


class ObserverTests(BrokerTestCase):
    """Those who watch the broker are told of its events, through IBrokerEvents."""

    def setUp(self):
        super().setUp()
        self.recorder = Recorder()
        self.broker.add_observer(self.recorder)

    def names(self):
        return [event[0] for event in self.recorder.events]

    def test_every_observer_implements_the_interface(self):
        from relay.server.admin.stats import AdminStats
        from tests.support import BrokerEvents

        for observer in (AdminStats(self.clock), BrokerEvents(self.broker)):
            self.assertTrue(verifyObject(IBrokerEvents, observer))
        for name in IBrokerEvents:
            getattr(self.recorder, name)
        self.assertRaises(AttributeError, getattr, self.recorder, "something_else")

    def test_a_request_from_start_to_finish(self):
        poll = self.broker.get_request("robot")
        pending, sink = self.relay()
        self.assertEqual(self.successResultOf(poll).id, pending.id)
        self.broker.send_response(HttpResponse(id=pending.id, status_code=201, body=b"abc", eof=True))
        self.assertEqual(
            self.names(), ["poll_waiting", "request_queued", "request_picked_up", "request_finished", "response_posted"]
        )
        _, finished, outcome = self.recorder.events[-2]
        self.assertIs(finished, pending)
        self.assertEqual(
            (outcome.status, outcome.bytes_out, outcome.reason, outcome.cancelled, outcome.started),
            (201, 3, None, False, True),
        )

    def test_a_refused_or_expired_request_says_why(self):
        self.assertRaises(UnknownBackend, self.relay, "nobody")
        self.assertEqual(self.recorder.events[-1][:2], ("unknown_backend", "nobody"))
        self.known()
        self.assertEqual(self.names()[-2:], ["poll_waiting", "poll_ended"])
        pending, sink = self.relay()
        self.clock.advance(PICKUP_TIMEOUT)
        _, _, outcome = self.recorder.events[-1]
        self.assertIsInstance(outcome.reason, BackendUnreachable)
        self.assertEqual((outcome.status, outcome.started), (0, False))

    def test_a_cancelled_request_and_a_forgotten_backend(self):
        self.known()
        pending, sink = self.relay()
        self.broker.cancel(pending)
        self.assertTrue(self.recorder.events[-1][2].cancelled)
        self.clock.advance(1801)
        self.broker.reap()
        self.assertEqual(self.recorder.events[-1], ("backend_forgotten", "robot"))

    def test_nobody_watching_after_removal(self):
        self.broker.remove_observer(self.recorder)
        self.assertEqual(self.broker.observers, ())
        self.known()
        self.assertEqual(self.recorder.events, [])
