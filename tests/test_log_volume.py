"""
What an operator reads at info: the start, the first poll
of each backend name, and trouble; nothing per request, nothing per poll,
and no Python reprs. A real relay server, our relay-client and a backend run
in this process on loopback sockets; an observer on the global log publisher
keeps every event at info or above, each rendered as the text format writes
it.
"""

import os

import pytest
import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool, ResponseFailed, _HTTP11ClientFactory

from relay.logs import text_line
from relay.net.transport import connect_quietly
from tests.support import FakeRelayClient, RawResponse, RelayServer, started_client, tick
from tests.support.e2e import CHUNKED_HEAD, Backend, RawBackend, RawUser, Relay, make_frame, open_websocket, parse_frame
from tests.support.engines import on_each_engine

pytestmark = pytest.mark.socket

NAME = "robot"


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False


def user_pool():
    """The test's own user-clients, quiet: every line seen comes from the relay."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietFactory
    return pool


class InfoLines:
    """Every event at C{level} (info) or above, as text lines, from when it starts."""

    def __init__(self, test, level=LogLevel.info):
        self.lines = []
        self.level = level
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event):
        if event.get("log_level", LogLevel.info) >= self.level:
            self.lines.append(text_line(event))

    def since(self, mark):
        return self.lines[mark:]

    def with_message(self, msg):
        return [line for line in self.lines if (" msg=%s " % msg) in line or (' msg="%s" ' % msg) in line]


class EndToEndVolume(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.backend = Backend()  # the test's backend, before we listen
        self.addCleanup(self.backend.stop)
        self.log = InfoLines(self)
        # The header timeout on a clock of the test's: an idle connection
        # is cut when the test says, not after a real wait.
        self.clock = Clock()
        self.relay = Relay(header_timeout=0.3, clock=self.clock)
        self.addCleanup(lambda: self.relay.stop())
        self.users = user_pool()
        self.addCleanup(self.users.closeCachedConnections)
        started_client(self, self.relay.base, NAME, self.backend.address)
        yield self.relay.polling(NAME)

    @defer.inlineCallbacks
    def websocket(self):
        user = yield open_websocket(self, self.relay.port, NAME, connect=connect_quietly)
        user.transport.write(make_frame(2, b"hello", mask=True))
        yield user.read_until(lambda d: parse_frame(d) is not None)
        user.transport.write(make_frame(8, b"\x03\xe8", mask=True))
        yield user.closed

    @defer.inlineCallbacks
    def test_requests_polls_and_websockets_write_nothing_at_info(self):
        self.assertEqual(len(self.log.with_message("Relay client connected")), 1, self.log.lines)
        mark = len(self.log.lines)
        for i in range(30):
            resp = yield treq.get(self.relay.base + "/client/%s/echo/%d" % (NAME, i), pool=self.users)
            self.assertEqual(resp.code, 200)
            yield resp.content()
        for _ in range(3):
            yield self.websocket()
        # Users' requests that the server answers itself, HEAD included
        # (Twisted logs "Warning: HEAD request <…> is returning a message
        # body" at info for each).
        for method, path in [
            ("HEAD", "/healthz"),
            ("HEAD", "/metrics"),
            ("HEAD", "/client/nobody/x"),
            ("GET", "/client/nobody/x"),
            ("GET", "/elsewhere"),
        ]:
            resp = yield treq.request(method, self.relay.base + path, pool=self.users)
            yield resp.content()
        # An idle keep-alive connection reaches the header timeout (0.3 s here).
        yield self.users.closeCachedConnections()
        idle = RawResponse()
        yield connect_quietly(TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.port), idle)
        self.addCleanup(idle.transport.abortConnection)
        idle.transport.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        yield idle.wait_for(b"\r\n\r\nok")
        self.clock.advance(0.3)
        yield idle.ended
        self.assertEqual(self.log.since(mark), [])

    def test_no_python_reprs(self):
        for line in self.log.lines:
            self.assertNotRegex(line, r"object at 0x|<\w+[ .]|Address\(")


class ClientLines:
    """The relay-client's events at every level, and anyone's at info or above, as text lines."""

    def __init__(self, test):
        self.lines = []
        self.client_lines = []
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event):
        level = event.get("log_level", LogLevel.info)
        ours = event.get("log_namespace", "").startswith("relay.client")
        if level >= LogLevel.info or ours:
            self.lines.append(text_line(event))
            if ours:
                self.client_lines.append(text_line(event))


class UserGoesAway(unittest.TestCase):
    """
    A user who closes a browser tab, cancels a download or drops a
    WebSocket is not trouble: nothing at info or above,
    at most one line at debug from the relay-client. A backend whose answer
    breaks off is trouble: one warning, naming the request and the
    backend's failure, not the relay's refusal of what came after it.
    """

    timeout = 30

    @defer.inlineCallbacks
    def start(self, backend):
        self.backend = backend
        self.addCleanup(self.backend.stop)
        self.relay = Relay()
        self.addCleanup(lambda: self.relay.stop())
        self.client = started_client(self, self.relay.base, NAME, self.backend.address, log_level=LogLevel.debug)
        yield self.relay.polling(NAME)
        self.log = ClientLines(self)

    def handled(self):
        """Fires when the relay-client is done with every request it has."""
        return defer.gatherResults(list(self.client.in_flight.values()))

    def assert_quiet(self, lines):
        self.assertEqual([line for line in lines if " level=DEBUG " not in line], [], lines)
        self.assertLessEqual(len(lines), 1, lines)

    @defer.inlineCallbacks
    def test_a_cancelled_download(self):
        yield self.start(Backend())
        user = RawUser()
        yield connect_quietly(TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.port), user)
        user.transport.write(b"GET /client/" + NAME.encode() + b"/forever HTTP/1.1\r\nHost: robot\r\n\r\n")
        yield user.read_until(lambda d: b"tick" in d)
        handled = self.handled()
        mark = len(self.log.lines)
        user.transport.abortConnection()
        yield handled
        yield self.backend.forever_closed
        yield tick(0.05)
        self.assert_quiet(self.log.lines[mark:])
        [line] = self.log.lines[mark:]
        self.assertIn(' msg="Request over at the relay (the user went away)" ID=robot:', line)

    @defer.inlineCallbacks
    def test_a_dropped_websocket(self):
        yield self.start(Backend())
        user = yield open_websocket(self, self.relay.port, NAME, connect=connect_quietly)
        user.transport.write(make_frame(2, b"hello", mask=True))
        yield user.read_until(lambda d: parse_frame(d) is not None)
        handled = self.handled()
        mark = len(self.log.lines)
        user.transport.abortConnection()
        yield handled
        yield tick(0.05)
        self.assert_quiet(self.log.lines[mark:])
        [line] = self.log.lines[mark:]
        self.assertIn(' msg="End of request stream" ID=robot:', line)

    @defer.inlineCallbacks
    def test_a_backend_that_breaks_off_warns_once(self):
        yield self.start(RawBackend(CHUNKED_HEAD + b"7\r\npartial\r\n"))
        users = user_pool()
        self.addCleanup(users.closeCachedConnections)
        response = yield treq.get(self.relay.base + "/client/%s/file" % (NAME,), pool=users)
        handled = self.handled()
        mark = len(self.log.client_lines)
        self.backend.cut(abort=False)
        yield self.assertFailure(response.content(), ResponseFailed)
        yield handled
        yield tick(0.05)
        # The relay server warns too ("Response ended early"), in its own log.
        lines = self.log.client_lines[mark:]
        loud = [line for line in lines if " level=DEBUG " not in line]
        self.assertEqual(len(loud), 1, lines)
        self.assertIn(" level=WARN msg=\"Failed to read from backend\" ID=", loud[0])
        self.assertIn(' error="connection closed before the answer was complete"', loud[0])


class FirstPollTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.log = InfoLines(self)

    @defer.inlineCallbacks
    def test_only_the_first_poll_of_a_name_is_logged_until_it_is_forgotten(self):
        from twisted.internet.task import Clock

        from relay.server.broker import POLL_TIMEOUT

        clock = Clock()
        server = RelayServer(clock=clock, inactive_backend_timeout=60)
        self.addCleanup(server.stop)
        relay_client = FakeRelayClient(server)
        self.addCleanup(relay_client.close)
        for round in range(2):
            for _ in range(5):
                poll = relay_client.poll(NAME)
                yield server.polling(NAME)
                clock.advance(POLL_TIMEOUT)
                self.assertEqual((yield poll)[0], 408)
            lines = self.log.with_message("Relay client connected")
            self.assertEqual(len(lines), round + 1, self.log.lines)
            self.assertTrue(lines[-1].endswith(" ServerName=robot\n"), lines[-1])
            # Forgotten (reaped) after the inactive-backend timeout: the next
            # poll is a first poll again.
            clock.advance(61)
            server.broker.reap()
            self.assertNotIn(NAME, server.broker.backends)

    @defer.inlineCallbacks
    def test_a_name_with_control_characters_is_logged_quoted(self):
        """A poll for C{server=x%0D%1B%5B2KFAKE}, through a real server: one escaped line."""
        server = RelayServer()
        self.addCleanup(server.stop)
        pool = user_pool()
        self.addCleanup(pool.closeCachedConnections)
        poll = treq.get(server.url("/server/request?server=x%0D%1B%5B2KFAKE"), pool=pool)
        poll.addErrback(lambda _: None)
        self.addCleanup(poll.cancel)
        yield server.when(lambda: self.log.with_message("Relay client connected"))
        (line,) = self.log.with_message("Relay client connected")
        self.assertTrue(line.endswith(' ServerName="x\\r\\x1b[2KFAKE"\n'), line)

    @defer.inlineCallbacks
    def test_refused_relay_clients_are_logged_at_most_every_10_s(self):
        import tempfile

        from relay.server.auth import AccessPolicy, ClientTokens

        fd, tokens = tempfile.mkstemp()
        os.close(fd)
        self.addCleanup(os.remove, tokens)
        server = RelayServer(policy=AccessPolicy(client_tokens=ClientTokens(tokens)))
        self.addCleanup(server.stop)
        pool = user_pool()
        self.addCleanup(pool.closeCachedConnections)
        mark = len(self.log.lines)
        for i in range(20):
            resp = yield treq.get(server.url("/server/request?server=intruder%d" % i), pool=pool)
            self.assertEqual(resp.code, 403)
            yield resp.content()
        (line,) = self.log.with_message("Relay client refused")
        self.assertEqual(self.log.since(mark), [line])
        self.assertIn("msg=\"Relay client refused\" ServerName=intruder0 Peer=127.0.0.1:", line)


class QuietFactoryTests(unittest.TestCase):
    def test_the_relay_connects_through_quiet_factories_only(self):
        """
        Twisted's C{connectProtocol} builds a factory that logs C{Starting
        factory <…OneShotFactory object at 0x…>} at info for every
        connection: the relay-client's WebSockets and HTTP/2 backend
        connections use L{connect_quietly} instead.
        """
        import glob

        import relay
        from relay.client.keepalive import _ConnectionFactory
        from relay.net.transport import _OneShotFactory
        from relay.server.site import RelaySite

        root = os.path.dirname(relay.__file__)
        for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
            with open(path) as f:
                self.assertNotIn("connectProtocol(", f.read(), path)
        for factory in (_OneShotFactory, _ConnectionFactory, RelaySite):
            self.assertFalse(factory.noisy, factory)


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
