"""
Streaming without buffering: 256 MiB through a real C{twistd relay} process
to a user-client that reads slowly. The relay-client's POSTs are held while
the reader is stalled (back-pressure), the bytes arrive intact, and the
server's peak RSS grows by far less than what went through it.
"""

import hashlib

import pytest
import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse
from tests.support import rss_peak_kib
from tests.support.engines import on_each_engine
from tests.support.process import TwistdProcess

pytestmark = pytest.mark.process

MiB = 1024 * 1024
TOTAL = 256 * MiB
CHUNK = 1 * MiB


def chunk_bytes(i: int) -> bytes:
    return bytes([i % 251]) * CHUNK


class SlowReader(protocol.Protocol):
    """
    Reads a response, stalling now and then: stopped completely until told
    to start, then pausing 20 ms after every 8 MiB.
    """

    def __init__(self):
        self.head = b""
        self.body_bytes = 0
        self.digest = hashlib.sha256()
        self.ended = defer.Deferred()
        self._since_pause = 0
        self.clean = None

    def connectionMade(self):
        self.transport.write(b"GET /client/bulk/data HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.transport.pauseProducing()

    def start_reading(self):
        self.transport.resumeProducing()

    def dataReceived(self, data):
        if not self.head.endswith(b"\r\n\r\n") and b"\r\n\r\n" not in self.head:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            self.head, _, data = self.head.partition(b"\r\n\r\n")
            self.head += b"\r\n\r\n"
        self.body_bytes += len(data)
        self.digest.update(data)
        self._since_pause += len(data)
        if self._since_pause >= 8 * MiB and self.body_bytes < TOTAL:
            self._since_pause = 0
            self.transport.pauseProducing()
            reactor.callLater(0.02, self.transport.resumeProducing)
        if self.body_bytes >= TOTAL:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.ended.callback(None)


class StreamingTest(unittest.TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def test_256_mib_to_slow_reader_with_backpressure_and_bounded_memory(self):
        proc = TwistdProcess.spawn(["relay", "--port=tcp:0:interface=127.0.0.1", "--drain_grace=0"])
        self.addCleanup(proc.terminate)
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        port = yield proc.listening_port()
        base = "http://127.0.0.1:%d" % port

        poll = treq.get(base + "/server/request?server=bulk", pool=pool)
        yield proc.wait_for("Relay client connected")
        rss_before = rss_peak_kib(proc.pid)
        reader = SlowReader()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), reader)
        resp = yield poll
        request = HttpRequest.FromString((yield resp.content()))

        expected = hashlib.sha256()
        state = {"posted": 0, "answered": 0}

        @defer.inlineCallbacks
        def post(message):
            state["posted"] += 1
            r = yield treq.post(base + "/server/response", data=message.SerializeToString(), pool=pool)
            body = yield r.content()
            self.assertEqual((r.code, body), (200, b"ok"))
            state["answered"] += 1

        @defer.inlineCallbacks
        def relay_client():
            count = TOTAL // CHUNK
            for i in range(count):
                data = chunk_bytes(i)
                expected.update(data)
                m = HttpResponse(id=request.id, body=data, eof=(i == count - 1))
                if i == 0:
                    m.status_code = 200
                    m.header.add(name="Content-Length", value=str(TOTAL))
                    m.header.add(name="Content-Type", value="application/octet-stream")
                yield post(m)

        sending = relay_client()

        # The reader has not read a byte: once the socket buffers are full,
        # the relay must hold the relay-client's POST instead of buffering.
        stalled_at = None
        for _ in range(400):  # at most ~20 s
            before = state["answered"]
            yield deferLater(reactor, 0.05, lambda: None)
            if state["answered"] == before and state["posted"] > state["answered"]:
                if stalled_at is None:
                    stalled_at = (reactor.seconds(), before)
                elif reactor.seconds() - stalled_at[0] >= 1.0:
                    break
            else:
                stalled_at = None
        self.assertIsNotNone(stalled_at, "POSTs were never held while the reader was stalled")
        self.assertGreaterEqual(reactor.seconds() - stalled_at[0], 1.0)
        held_after = state["answered"]
        # Only what fits in the transport and kernel buffers was accepted.
        self.assertLess(held_after * CHUNK, 64 * MiB)

        reader.start_reading()
        yield sending
        yield reader.ended
        self.assertIn(b"HTTP/1.1 200 OK", reader.head)
        self.assertIn(b"Content-Length: %d" % TOTAL, reader.head)
        self.assertEqual(reader.body_bytes, TOTAL)
        self.assertEqual(reader.digest.hexdigest(), expected.hexdigest())

        growth_mib = (rss_peak_kib(proc.pid) - rss_before) / 1024.0
        self.assertLess(growth_mib, 64, "server peak RSS grew by %.1f MiB" % growth_mib)


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
