"""
Latency through our pair, end to end, without timing assertions: small
interactive exchanges are posted without a gathering delay, and a backend
that is down is answered without a connection attempt delay.

What is checked is the chunker's own use of its clock (which timers it
sets) and which messages it posts, not the wall clock.
"""

import time

import pytest
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

import relay.client.handler as handler_module
from relay.client.chunker import Chunker
from tests.support import started_client
from tests.support.e2e import NAME, Backend, RawUser, Relay
from tests.support.engines import on_each_engine

pytestmark = pytest.mark.socket


class RecordingClock:
    """The reactor, as a chunker's clock, noting the delay of every timer it sets."""

    def __init__(self, clock, delays):
        self.clock = clock
        self.delays = delays

    def seconds(self):
        return self.clock.seconds()

    def callLater(self, delay, f, *args, **kw):
        self.delays.append(delay)
        return self.clock.callLater(delay, f, *args, **kw)

    def getDelayedCalls(self):
        return self.clock.getDelayedCalls()


class RawEcho(protocol.Protocol):
    """Answers any request with a 101, then echoes every byte back as it comes."""

    head = b""
    switched = False

    def dataReceived(self, data):
        if self.switched:
            self.transport.write(data)
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            rest = self.head.split(b"\r\n\r\n", 1)[1]
            self.switched = True
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
            if rest:
                self.transport.write(rest)


class Latency(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.timers = []
        self.chunkers = []
        test = self

        class Recording(Chunker):
            def __init__(self, first, send, clock, **kw):
                test.chunkers.append(self)
                self.bodies = []  # the body size of every message posted

                def recording_send(message, body=None):
                    self.bodies.append(sum(map(len, body)) if body else len(message.body))
                    return send(message, body)

                super().__init__(first, recording_send, RecordingClock(clock, test.timers), **kw)

        self.patch(handler_module, "Chunker", Recording)
        self.echo_port = reactor.listenTCP(0, protocol.Factory.forProtocol(RawEcho), interface="127.0.0.1")
        self.addCleanup(self.echo_port.stopListening)
        self.relay = Relay()
        self.addCleanup(lambda: self.relay.stop())
        self.users = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.users.closeCachedConnections)

    def start_client(self, backend_address):
        started_client(self, self.relay.base, NAME, backend_address)
        return self.relay.polling(NAME)

    @defer.inlineCallbacks
    def test_keystrokes_on_an_upgraded_connection_are_not_held(self):
        """
        Single bytes, each sent after the echo of the one before (a typist),
        go up as one message each, and the chunker never sets a gathering
        timer for them: nothing waits for the Go client's 100 ms.
        """
        yield self.start_client("127.0.0.1:%d" % (self.echo_port.getHost().port,))
        user = RawUser()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.port), user)
        user.transport.write(
            b"GET /client/" + NAME.encode() + b"/tty HTTP/1.1\r\nHost: robot\r\n"
            b"Upgrade: echo\r\nConnection: Upgrade\r\n\r\n"
        )
        yield user.read_until(lambda d: b"\r\n\r\n" in d)
        head, _, user.data = user.data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        keys = b"ls -l\r"
        for i in range(len(keys)):
            user.transport.write(keys[i : i + 1])
            yield user.read_until(lambda d, sent=i + 1: len(d) >= sent)
        self.assertEqual(user.data, keys)
        [chunker] = self.chunkers
        # The 101, then one message per keystroke (and maybe a keep-alive,
        # empty, if this machine is very slow).
        self.assertEqual([n for n in chunker.bodies if n], [1] * len(keys))
        gathering = [d for d in self.timers if 0 < d < 1]
        self.assertEqual(gathering, [], "a keystroke waited for a gathering timer")
        user.transport.loseConnection()
        yield user.closed

    @defer.inlineCallbacks
    def test_streaming_answer_pieces_are_not_held(self):
        """
        A chunked answer that trickles (the backend writes a piece every
        0.3 s): each piece is posted on its own, with no gathering timer.
        """
        backend = Backend()
        self.addCleanup(backend.stop)
        yield self.start_client(backend.address)
        user = RawUser()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.port), user)
        user.transport.write(b"GET /client/" + NAME.encode() + b"/trickle HTTP/1.1\r\nHost: robot\r\n\r\n")
        yield user.read_until(lambda d: b"piece 4\n" in d)
        [chunker] = self.chunkers
        self.assertGreaterEqual(len([n for n in chunker.bodies if n]), 5)
        self.assertEqual([d for d in self.timers if 0 < d < 1], [])
        user.transport.abortConnection()

    @defer.inlineCallbacks
    def test_backend_down_is_answered_at_once(self):
        """
        A refused connection is a 500 as soon as the refusal is known. The
        real check is in test_client_endpoints (no timer between the refusal
        and the error); here only a loose bound against Twisted's 0.3 s
        attempt delay coming back, which added 0.3 s to every request.
        """
        port = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        address = "127.0.0.1:%d" % (port.getHost().port,)
        yield port.stopListening()
        yield self.start_client(address)
        import treq

        for path in ("/plain", "/upgrade"):
            headers = {"Upgrade": ["echo"], "Connection": ["Upgrade"]} if path == "/upgrade" else {}
            started = time.monotonic()
            response = yield treq.get(self.relay.base + "/client/" + NAME + path, headers=headers, pool=self.users)
            body = yield response.content()
            elapsed = time.monotonic() - started
            self.assertEqual(response.code, 500)
            self.assertIn(b"connection refused", body)
            self.assertLess(elapsed, 2.0, path)


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
