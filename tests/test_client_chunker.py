"""
The relay client's chunking policy, on a fake clock: what goes up to the
relay, in which pieces, and when.
"""

from typing import List

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from relay.client.chunker import Chunker
from relay.proto.http_relay_pb2 import HttpResponse

pytestmark = pytest.mark.memory


def as_posted(message: HttpResponse, body) -> HttpResponse:
    """The message as the relay server gets it: the chunker hands the body over as pieces."""
    copy = HttpResponse()
    copy.CopyFrom(message)
    if body is not None:
        copy.body = b"".join(body)
    return copy


class FakeRelay:
    """Records posted messages; each post stays pending until answered."""

    def __init__(self, auto: bool = False, clock=None):
        self.auto = auto
        self.clock = clock
        self.times: List[float] = []
        self.messages: List[HttpResponse] = []
        self.pending: List[Deferred] = []

    def send(self, message: HttpResponse, body=None) -> Deferred:
        self.messages.append(as_posted(message, body))
        self.times.append(self.clock.seconds() if self.clock is not None else None)
        d: Deferred = Deferred()
        if self.auto:
            d.callback(None)
        else:
            self.pending.append(d)
        return d

    def answer(self) -> None:
        self.pending.pop(0).callback(None)

    def fail(self, exc: Exception) -> None:
        self.pending.pop(0).errback(exc)


@implementer(IPushProducer)
class FakeProducer:
    def __init__(self):
        self.paused = False
        self.stopped = False
        self.pauses = 0

    def pauseProducing(self):
        self.paused = True
        self.pauses += 1

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        self.stopped = True


def first_message() -> HttpResponse:
    m = HttpResponse(id="robot:0123", status_code=200)
    m.header.add(name="Content-Type", value="text/plain")
    return m


class ChunkerTests(SynchronousTestCase):
    def make(self, auto=True, max_chunk_size=1000, **kw):
        self.clock = Clock()
        self.clock.advance(1000)
        self.relay = FakeRelay(auto=auto, clock=self.clock)
        self.producer = FakeProducer()
        chunker = Chunker(first_message(), self.relay.send, self.clock, max_chunk_size=max_chunk_size, **kw)
        chunker.set_producer(self.producer)
        return chunker

    def test_small_answer_is_one_message(self):
        """Status, headers, body and eof share one message when the body comes in the same turn."""
        c = self.make(started=1000 - 0.3)
        c.write(b"hello ")
        c.write(b"world")
        c.finish()
        self.assertEqual(len(self.relay.messages), 1)
        m = self.relay.messages[0]
        self.assertEqual((m.id, m.status_code, m.body, m.eof), ("robot:0123", 200, b"hello world", True))
        self.assertEqual([(h.name, h.value) for h in m.header], [("Content-Type", "text/plain")])
        self.assertEqual(m.backend_duration_ms, 300)
        self.assertIsNone(self.successResultOf(c.done))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_headers_go_at_the_end_of_the_turn(self):
        """
        A streaming answer's status and headers do not wait for a body
        (server-sent events: the first event may be minutes away).
        """
        c = self.make()
        self.assertEqual(self.relay.messages, [])  # the body may follow in this turn
        self.clock.advance(0)
        self.assertEqual(len(self.relay.messages), 1)
        m = self.relay.messages[0]
        self.assertEqual(m.status_code, 200)
        self.assertFalse(m.HasField("body"))
        self.assertFalse(m.eof)
        self.assertTrue(self.successResultOf(c.first_sent))

    def test_bytes_after_a_quiet_spell_go_at_once(self):
        """
        Nothing in flight: each byte of a trickle (keystroke echoes) is sent
        in the turn it arrived in, without any gathering delay.
        """
        c = self.make()
        self.clock.advance(0)  # headers
        for i in range(20):
            c.write(b"%c" % (ord("a") + i))
            self.clock.advance(0)
            self.assertEqual(self.relay.messages[-1].body, b"%c" % (ord("a") + i))
            self.assertEqual(self.relay.times[-1], self.clock.seconds())
            self.clock.advance(0.04)
        self.assertEqual(len(self.relay.messages), 21)

    def test_gathering_only_while_a_message_is_in_flight(self):
        """
        While a post is outstanding the backend's reads are gathered (no
        timer), and all of them go in one message the moment it is taken;
        after that, the next byte goes at once again.
        """
        c = self.make(auto=False)
        self.clock.advance(0)
        self.assertEqual(len(self.relay.messages), 1)  # headers, in flight
        for piece in (b"a", b"b", b"c"):
            c.write(piece)
            self.clock.advance(0.2)
        self.assertEqual(len(self.relay.messages), 1, "one message at a time")
        self.relay.answer()
        self.assertEqual([m.body for m in self.relay.messages], [b"", b"abc"])
        self.relay.answer()
        c.write(b"d")
        self.clock.advance(0)
        self.assertEqual(self.relay.messages[-1].body, b"d")
        self.relay.answer()
        self.assertFalse(self.producer.paused)

    def test_full_chunk_goes_at_once_in_exact_pieces(self):
        c = self.make(max_chunk_size=1000)
        c.write(b"x" * 2500)
        # The relay here takes each post at once, so the rest follows at once.
        self.assertEqual([len(m.body) for m in self.relay.messages], [1000, 1000, 500])
        self.assertEqual(self.relay.messages[0].status_code, 200)
        self.assertFalse(self.relay.messages[1].HasField("status_code"))
        c.finish()
        self.assertTrue(self.relay.messages[-1].eof)
        self.assertEqual(sum(len(m.body) for m in self.relay.messages), 2500)

    def test_eof_with_big_rest_is_split(self):
        c = self.make(auto=False, max_chunk_size=1000)
        c.write(b"a" * 999)
        c.write(b"b" * 1500)  # 2499 pending: one piece goes now
        c.finish()
        self.relay.answer()
        self.relay.answer()
        self.assertEqual([len(m.body) for m in self.relay.messages], [1000, 1000, 499])
        self.assertEqual([m.eof for m in self.relay.messages], [False, False, True])

    def test_keepalive_every_3s_when_idle(self):
        c = self.make()
        self.clock.advance(0.1)
        self.assertEqual(len(self.relay.messages), 1)
        self.clock.advance(2.99)
        self.assertEqual(len(self.relay.messages), 1)
        self.clock.advance(0.01)
        self.assertEqual(len(self.relay.messages), 2)
        keepalive = self.relay.messages[1]
        self.assertEqual(keepalive.id, "robot:0123")
        for field in ("status_code", "body", "eof", "backend_duration_ms"):
            self.assertFalse(keepalive.HasField(field), field)
        self.clock.advance(3.0)
        self.assertEqual(len(self.relay.messages), 3)
        # Data resets the keep-alive clock.
        c.write(b"x")
        self.clock.advance(0.1)
        self.assertEqual(self.relay.messages[3].body, b"x")
        self.clock.advance(2.9)
        self.assertEqual(len(self.relay.messages), 4)
        c.finish()
        self.assertTrue(self.relay.messages[-1].eof)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_message_at_a_time_and_back_pressure(self):
        """
        While a post is outstanding, one more piece is gathered and then the
        backend is paused; it resumes when the relay has taken the post.
        """
        c = self.make(auto=False, max_chunk_size=1000)
        c.write(b"a" * 1000)
        self.assertEqual(len(self.relay.messages), 1)
        c.write(b"b" * 600)
        self.assertFalse(self.producer.paused)
        c.write(b"b" * 400)
        self.assertTrue(self.producer.paused)
        self.clock.advance(5)  # no timer may jump the queue
        self.assertEqual(len(self.relay.messages), 1)
        self.relay.answer()
        self.assertEqual(len(self.relay.messages), 2)
        self.assertEqual(self.relay.messages[1].body, b"b" * 1000)
        # One post in flight and nothing gathered: the backend may fill the next piece meanwhile.
        self.assertFalse(self.producer.paused)
        c.write(b"c" * 1000)
        self.assertTrue(self.producer.paused)
        self.relay.answer()
        self.assertEqual(self.relay.messages[2].body, b"c" * 1000)
        self.assertFalse(self.producer.paused)
        self.relay.answer()
        self.assertFalse(self.producer.paused)
        c.finish()
        self.relay.answer()
        self.assertTrue(self.relay.messages[-1].eof)
        self.successResultOf(c.done)

    def test_pending_data_goes_as_soon_as_post_returns(self):
        """A slow post must not add any wait for what was gathered meanwhile."""
        c = self.make(auto=False)
        self.clock.advance(0.1)
        c.write(b"late")
        self.clock.advance(0.5)
        self.assertEqual(len(self.relay.messages), 1)
        self.relay.answer()
        self.assertEqual(self.relay.messages[1].body, b"late")
        self.assertEqual(self.relay.times[1], self.clock.seconds())

    def test_failed_post_stops_backend(self):
        c = self.make(auto=False)
        c.write(b"x")
        self.clock.advance(0.1)
        self.relay.fail(ValueError("relay server responded Bad Request"))
        self.assertTrue(self.producer.stopped)
        self.failureResultOf(c.done, ValueError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        c.write(b"more")
        c.finish()
        self.assertEqual(len(self.relay.messages), 1)

    def test_trailers_on_last_message(self):
        c = self.make()
        c.write(b"body")
        c.finish([("Grpc-Status", "0")])
        m = self.relay.messages[-1]
        self.assertTrue(m.eof)
        self.assertEqual([(h.name, h.value) for h in m.trailer], [("Grpc-Status", "0")])

    def test_send_first_now(self):
        """After a 101 the relay server needs the status before the user's bytes can flow."""
        c = self.make(send_first_now=True)
        self.assertEqual(len(self.relay.messages), 1)
        self.assertEqual(self.relay.messages[0].status_code, 200)
        self.assertTrue(self.successResultOf(c.first_sent))

    def test_abort(self):
        c = self.make(auto=False)
        c.abort()
        self.assertTrue(self.producer.stopped)
        self.assertFalse(self.successResultOf(c.first_sent))
        self.failureResultOf(c.done)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class KnownLengthTests(SynchronousTestCase):
    """A body of known length that fits one piece goes out as one message."""

    def chunker(self, expected_length, max_chunk_size=8):
        """A chunker for a body of C{expected_length} bytes, and the messages it posted."""
        self.clock = Clock()
        sent = []
        chunker = Chunker(
            HttpResponse(id="r:1", status_code=200),
            lambda m, body=None: (sent.append(as_posted(m, body)), succeed(None))[1],
            self.clock,
            max_chunk_size=max_chunk_size,
            expected_length=expected_length,
        )
        return chunker, sent

    def test_full_piece_that_is_the_end_is_one_final_message(self):
        chunker, sent = self.chunker(8)
        chunker.write(b"12345678")
        self.assertEqual(sent, [])  # waits for the end it knows is here
        chunker.finish()
        self.assertEqual([(m.body, m.eof, m.status_code) for m in sent], [(b"12345678", True, 200)])

    def test_longer_bodies_still_go_in_full_pieces_at_once(self):
        chunker, sent = self.chunker(12)
        chunker.write(b"12345678")
        self.assertEqual([m.body for m in sent], [b"12345678"])
        chunker.write(b"9abc")
        chunker.finish()
        self.assertEqual([(m.body, m.eof) for m in sent], [(b"12345678", False), (b"9abc", True)])

    def test_incomplete_body_of_known_length_is_gathered_100ms(self):
        """
        Only a body of announced length is held as the Go client holds every
        body: nobody can use part of it, and a big one then goes in few POSTs.
        """
        chunker, sent = self.chunker(10, max_chunk_size=1000)
        clock = self.clock
        chunker.write(b"12345")
        clock.advance(0.099)
        self.assertEqual(sent, [])
        clock.advance(0.001)
        self.assertEqual([(m.body, m.eof) for m in sent], [(b"12345", False)])
        chunker.write(b"67890")
        chunker.finish()
        self.assertEqual([(m.body, m.eof) for m in sent], [(b"12345", False), (b"67890", True)])
        self.assertEqual(clock.getDelayedCalls(), [])


class BrokenOffTests(SynchronousTestCase):
    """
    A backend body that breaks off (L{Chunker.fail}) must not reach the
    relay server as a complete answer.
    """

    def make(self, auto=True, **kw):
        self.clock = Clock()
        self.relay = FakeRelay(auto=auto, clock=self.clock)
        self.producer = FakeProducer()
        chunker = Chunker(first_message(), self.relay.send, self.clock, max_chunk_size=1000, **kw)
        chunker.set_producer(self.producer)
        return chunker

    def trailers(self, m: HttpResponse):
        return [(h.name, h.value) for h in m.trailer]

    def test_begun_answer_ends_with_relay_error_then_eof(self):
        c = self.make(auto=False)
        c.write(b"part one")
        self.clock.advance(0)
        self.relay.answer()  # status, headers, the first bytes: the answer has begun
        c.write(b" and two")
        c.fail("connection closed\nbefore the answer was complete")
        self.assertTrue(self.producer.stopped, "the backend connection stays open")
        error = self.relay.messages[-1]
        # What was read still goes; no status, no eof, and the reason on one line.
        self.assertEqual((error.HasField("status_code"), error.body, error.eof), (False, b" and two", False))
        self.assertEqual(
            self.trailers(error), [("Relay-Error", "connection closed before the answer was complete")]
        )
        self.assertNoResult(c.done)
        self.relay.answer()
        # Then the eof that a server without the extension needs to end the answer at once.
        eof = self.relay.messages[-1]
        self.assertEqual((eof.HasField("status_code"), eof.body, eof.eof, self.trailers(eof)), (False, b"", True, []))
        self.assertEqual(len(self.relay.messages), 3)
        self.relay.answer()
        self.assertIsNone(self.successResultOf(c.done))
        # No keep-alive, no timer: the request is over.
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(len(self.relay.messages), 3)

    def test_error_waits_for_the_message_in_flight(self):
        c = self.make(auto=False)
        self.clock.advance(0)  # status and headers in flight
        c.write(b"abc")
        c.fail("stream error: stream ID 1; CANCEL")
        self.assertEqual(len(self.relay.messages), 1)
        self.relay.answer()
        self.assertEqual([(m.body, m.eof) for m in self.relay.messages], [(b"", False), (b"abc", False)])
        self.assertEqual(self.trailers(self.relay.messages[-1]), [("Relay-Error", "stream error: stream ID 1; CANCEL")])

    def test_refused_eof_after_the_error_ends_quietly(self):
        """A server that forgot the request when it aborted it may refuse the eof: nothing more to do."""
        c = self.make(auto=False)
        self.clock.advance(0)
        self.relay.answer()
        c.fail("reset")
        self.relay.answer()
        self.relay.fail(ValueError("relay server responded Bad Request"))
        self.assertIsNone(self.successResultOf(c.done))

    def test_refused_error_message_fails_done(self):
        c = self.make(auto=False)
        self.clock.advance(0)
        self.relay.answer()
        c.fail("reset")
        self.relay.fail(ValueError("relay server responded Bad Request"))
        self.failureResultOf(c.done, ValueError)
        self.assertEqual(len(self.relay.messages), 2)

    def test_nothing_sent_yet_becomes_a_502(self):
        """The status has not gone: the user can still get an honest error instead of part of a body."""
        c = self.make(expected_length=100)
        c.write(b"0123456789")  # gathered: a body of known length waits up to 100 ms
        c.fail("connection closed before the answer was complete")
        [m] = self.relay.messages
        self.assertEqual((m.status_code, m.eof, self.trailers(m)), (502, True, []))
        self.assertEqual(
            m.body, b"Backend response failed with error: connection closed before the answer was complete"
        )
        self.assertEqual([(h.name, h.value) for h in m.header], [("Content-Type", "text/plain")])
        self.assertIsNone(self.successResultOf(c.done))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_finish_or_fail_after_the_end_changes_nothing(self):
        c = self.make()
        c.write(b"all")
        c.finish()
        c.fail("late reset")
        self.assertEqual([m.eof for m in self.relay.messages], [True])
        self.assertEqual(self.trailers(self.relay.messages[0]), [])
