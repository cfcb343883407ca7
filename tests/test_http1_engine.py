"""
Which HTTP/1.1 engine each process uses: the one meant, per interpreter by
default and as the flag forces it, on both sides.
"""

import platform
import re

import pytest
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial import unittest

from relay import compat, http1_engine, wire
from relay.client import tap as client_tap
from relay.client.keepalive import KeepAliveAgent
from relay.compat import HTTP11ClientProtocol
from relay.config import ServerConfig
from relay.proto.http_relay_pb2 import HttpRequest
from relay.server import tap as server_tap
from relay.server.broker import Broker
from relay.server.resources import RootResource
from relay.server.site import RelayChannel, RelaySite
from tests.support import FakeRelayClient, RawResponse, RelayServer, tick

needs_httptools = None if http1_engine.available() else "httptools is not installed for this interpreter"


@pytest.mark.memory
class Choice(unittest.TestCase):
    def test_auto_is_httptools_on_cpython_and_twisted_on_pypy(self):
        self.patch(http1_engine, "available", lambda: True)
        self.assertEqual(http1_engine.resolve("auto", "CPython"), "httptools")
        self.assertEqual(http1_engine.resolve("auto", "PyPy"), "twisted")

    def test_auto_without_httptools_is_twisted(self):
        self.patch(http1_engine, "available", lambda: False)
        self.assertEqual(http1_engine.resolve("auto", "CPython"), "twisted")

    def test_forced_engines_are_kept_on_any_interpreter(self):
        for implementation in ("CPython", "PyPy"):
            self.assertEqual(http1_engine.resolve("twisted", implementation), "twisted")
            self.assertEqual(http1_engine.resolve("httptools", implementation), "httptools")

    def test_this_interpreter(self):
        cpython = platform.python_implementation() == "CPython"
        expected = "httptools" if cpython and http1_engine.available() else "twisted"
        self.assertEqual(http1_engine.resolve("auto"), expected)

    def test_the_flag_takes_the_three_values_on_both_sides(self):
        for options in (server_tap.Options, client_tap.Options):
            self.assertEqual(options().parseOptions(["--http1_engine=twisted"]) or "ok", "ok")
            for bad in ("h2", "fast"):
                with self.assertRaises(usage.UsageError) as caught:
                    options().parseOptions(["--http1_engine=" + bad])
                self.assertIn("auto|httptools|twisted", str(caught.exception))

    def test_httptools_is_refused_where_it_is_not_installed(self):
        self.patch(http1_engine, "available", lambda: False)
        with self.assertRaises(usage.UsageError) as caught:
            server_tap.Options().parseOptions(["--http1_engine=httptools"])
        self.assertIn("httptools is not installed", str(caught.exception))


def _site(engine: str) -> RelaySite:
    config = ServerConfig(http1_engine=engine)
    return RelaySite(RootResource(Broker(reactor, config), lambda: b""), config)


@pytest.mark.socket
class ServerEngine(unittest.TestCase):
    def test_twisted_is_twisted_webs_channel(self):
        site = _site("twisted")
        self.assertEqual(site.http1_engine, "twisted")
        self.assertIs(site.protocol, RelayChannel)

    def test_httptools_is_the_lean_channel(self):
        from relay.server.lean_http1 import LeanChannel

        site = _site("httptools")
        self.assertEqual(site.http1_engine, "httptools")
        self.assertIs(site.protocol, LeanChannel)
        # The lean channel falls back to twisted.web's for what llhttp refuses.
        self.assertIs(site.fallback_channel, RelayChannel)

    test_httptools_is_the_lean_channel.skip = needs_httptools

    def test_auto_follows_the_interpreter(self):
        self.assertEqual(_site("auto").http1_engine, http1_engine.resolve("auto"))

    @defer.inlineCallbacks
    def test_a_live_server_answers_through_the_engine_meant(self):
        """A request to a running server is read by the chosen engine's channel."""
        engines = ["twisted"] + (["httptools"] if http1_engine.available() else [])
        for engine in engines:
            server = RelayServer(http1_engine=engine)
            self.addCleanup(server.stop)
            user = RawResponse()
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port), user)
            user.transport.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
            yield user.wait_for(b"ok")
            (channel,) = server.service.site.connections
            expected = "RelayChannel" if engine == "twisted" else "LeanChannel"
            self.assertEqual(type(channel).__name__, expected)
            user.transport.loseConnection()


@pytest.mark.memory
class ClientEngine(unittest.TestCase):
    def test_twisted_is_twisteds_client_protocol(self):
        agent = KeepAliveAgent(reactor, None, engine="twisted")
        self.assertEqual(agent.engine, "twisted")
        self.assertIs(agent._protocol, HTTP11ClientProtocol)

    def test_httptools_is_the_lean_protocol(self):
        from relay.client.lean_http1 import LeanClientProtocol

        agent = KeepAliveAgent(reactor, None, engine="httptools")
        self.assertEqual(agent.engine, "httptools")
        self.assertIs(agent._protocol, LeanClientProtocol)

    test_httptools_is_the_lean_protocol.skip = needs_httptools

    def test_auto_follows_the_interpreter(self):
        self.assertEqual(KeepAliveAgent(reactor, None, engine="auto").engine, http1_engine.resolve("auto"))


def _undated(data: bytes) -> bytes:
    """The bytes with the Date header's value blanked: the only one that may differ."""
    return re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\nDate: -\r\n", data)


@pytest.mark.socket
class SameBytesOnTheWire(unittest.TestCase):
    """
    What each engine's server writes, byte for byte (but for the date):
    the user's answers, the poll's answer a relay-client reads, the errors.
    """

    @defer.inlineCallbacks
    def exchange(self, engine: str, user_bytes: bytes, answer=None, wait: bytes = b"\r\n\r\n"):
        """
        C{user_bytes} sent to a server of C{engine}; with C{answer}, a
        relay-client's raw poll takes the request and C{answer(id)} posts
        the reply. Returns what the user and the poll read.
        """
        self.patch(http1_engine, "resolve", lambda choice, implementation=None: engine)
        server = RelayServer()
        self.addCleanup(server.stop)
        poll = b""
        if answer is not None:
            poller = RawResponse()
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port), poller)
            poller.transport.write(b"GET /server/request?server=robot HTTP/1.1\r\nHost: relay\r\n\r\n")
            yield server.polling("robot")
        user = RawResponse()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port), user)
        user.transport.write(user_bytes)
        if answer is not None:
            yield poller.wait_until(lambda data: b"\r\n\r\n" in data and len(data) > data.index(b"\r\n\r\n") + 4)
            poll = bytes(poller.data)
            message = HttpRequest()
            wire.parse(message, poll.split(b"\r\n\r\n", 1)[1], "body")
            client = FakeRelayClient(server)
            self.addCleanup(client.close)
            yield answer(client, message.id)
            poller.transport.loseConnection()
        yield user.wait_for(wait)
        yield tick(0.05)
        user.transport.loseConnection()
        return _undated(bytes(user.data)), _undated(poll).split(b"\r\n\r\n")[0]

    @defer.inlineCallbacks
    def same(self, user_bytes: bytes, answer=None, wait: bytes = b"\r\n\r\n"):
        got = {}
        for engine in ("twisted", "httptools"):
            got[engine] = yield self.exchange(engine, user_bytes, answer, wait)
        self.assertEqual(got["httptools"], got["twisted"])
        return got["twisted"]

    def setUp(self):
        if not http1_engine.available():
            raise unittest.SkipTest(needs_httptools)

    @defer.inlineCallbacks
    def test_a_relayed_answer_and_the_poll_that_carried_it(self):
        def answer(client, request_id):
            return client.respond(
                request_id, 200, b"hello", headers=[("Content-Type", "text/plain"), ("X-Two", "a"), ("X-Two", "b")]
            )

        user, poll = yield self.same(
            b"GET /client/robot/x?q=1 HTTP/1.1\r\nHost: relay\r\nUser-Agent: t\r\n\r\n", answer, wait=b"hello"
        )
        self.assertTrue(user.startswith(b"HTTP/1.1 200 OK\r\n"), user)
        self.assertTrue(poll.startswith(b"HTTP/1.1 200 OK\r\n"), poll)

    @defer.inlineCallbacks
    def test_a_chunked_answer_with_trailers(self):
        def answer(client, request_id):
            return client.respond(request_id, 200, b"part", trailers=[("Grpc-Status", "0")])

        user, _ = yield self.same(b"GET /client/robot/y HTTP/1.1\r\nHost: relay\r\n\r\n", answer, wait=b"0\r\n")
        self.assertIn(b"Transfer-Encoding: chunked", user)

    @defer.inlineCallbacks
    def test_errors(self):
        for request in (
            b"GET /client/nobody/x HTTP/1.1\r\nHost: relay\r\n\r\n",
            b"GET /healthz HTTP/1.0\r\n\r\n",
            b"GET /a/../b HTTP/1.1\r\nHost: relay\r\n\r\n",
            b"GET /x HTTP/1.1\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: a b\r\n\r\n",
            b"POST /server/response HTTP/1.1\r\nHost: relay\r\nContent-Length: 3\r\n\r\nabc",
            b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: relay\r\n\r\n",
            # A method llhttp does not know: the lean channel hands the
            # connection to twisted.web's, which answers as it always did.
            b"BREW /healthz HTTP/1.1\r\nHost: relay\r\n\r\n",
        ):
            yield self.same(request)


@pytest.mark.memory
class SameRequestBytes(unittest.SynchronousTestCase):
    """What each engine's relay-client writes for a request, byte for byte."""

    def setUp(self):
        if not http1_engine.available():
            raise unittest.SkipTest(needs_httptools)

    def written(self, engine: str, method: bytes, path: bytes, headers, body, host=None) -> bytes:
        from twisted.internet.testing import StringTransport
        from twisted.web.client import URI

        from relay.client.http import BytesProducer

        transport = StringTransport()
        producer = BytesProducer(body) if body is not None else None
        uri = URI.fromBytes(b"http://relay:8080" + path)
        headers = headers.copy()
        if engine == "twisted":
            if host is not None:  # as KeepAliveAgent adds it
                headers.addRawHeader(b"host", host)
            protocol = HTTP11ClientProtocol()
            protocol.makeConnection(transport)
            protocol.request(compat.client_request(method, path, headers, producer, uri))
        else:
            from relay.client.lean_http1 import LeanClientProtocol, LeanClientRequest

            protocol = LeanClientProtocol()
            protocol.makeConnection(transport)
            protocol.request(LeanClientRequest(method, path, headers, producer, uri, host))
        return transport.value()

    def test_polls_posts_and_backend_requests(self):
        from twisted.web.http_headers import Headers

        from relay.lean_headers import LeanHeaders

        for make in (Headers, LeanHeaders):
            headers = make()
            headers.setRawHeaders(b"authorization", [b"Bearer t"])
            headers.setRawHeaders(b"content-type", [b"application/x"])
            headers.addRawHeader(b"x-two", b"a")
            headers.addRawHeader(b"X-Two", b"b")
            headers.addRawHeader(b"www-authenticate", b"c")
            for host_given in (False, True):
                if host_given:
                    headers.addRawHeader(b"host", b"relay:8080")
                host = None if host_given else b"relay:8080"
                for method, path, body in (
                    (b"GET", b"/server/request?server=robot", None),
                    (b"POST", b"/server/response?id=robot:1", [b"pro", b"tobuf"]),
                    (b"POST", b"/server/requeststream?id=robot:1", b""),
                    (b"PUT", b"/x", None),
                ):
                    twisted_bytes = self.written("twisted", method, path, headers, body, host)
                    self.assertEqual(self.written("httptools", method, path, headers, body, host), twisted_bytes)
                    self.assertTrue(twisted_bytes.startswith(method + b" " + path + b" HTTP/1.1\r\n"))
                    self.assertIn(b"Host: relay:8080\r\n", twisted_bytes)


@pytest.mark.memory
class SameAnswersRead(unittest.SynchronousTestCase):
    """What each engine's relay-client makes of the same answers: status, headers, body, how it ended, reuse."""

    def setUp(self):
        if not http1_engine.available():
            raise unittest.SkipTest(needs_httptools)

    def exchange(self, engine: str, method: bytes, answers):
        """Each of C{answers} (the bytes of one reply) to a request on one kept-alive connection."""
        from twisted.internet.protocol import Protocol
        from twisted.internet.testing import StringTransport
        from twisted.web.client import URI
        from twisted.web.http_headers import Headers

        idle = []
        transport = StringTransport()
        if engine == "twisted":
            protocol = HTTP11ClientProtocol(idle.append)
        else:
            from relay.client.lean_http1 import LeanClientProtocol

            protocol = LeanClientProtocol(idle.append)
        protocol.makeConnection(transport)
        seen = []
        for answer in answers:
            headers = Headers({b"host": [b"backend"]})
            uri = URI.fromBytes(b"http://backend/x")
            if engine == "twisted":
                request = compat.client_request(method, b"/x", headers, None, uri)
            else:
                from relay.client.lean_http1 import LeanClientRequest

                request = LeanClientRequest(method, b"/x", headers, None, uri)
            got = []
            protocol.request(request).addBoth(got.append)
            for i in range(len(answer)):  # a byte at a time: every split point
                protocol.dataReceived(answer[i : i + 1])
            if not got:
                protocol.connectionLost(Failure(ConnectionDone()))
            response = got[0]
            if isinstance(response, Failure):
                seen.append(("failed", type(response.value).__name__))
                break
            body = []

            class Collect(Protocol):
                def __init__(self, into):
                    self.into = into

                def dataReceived(self, data):
                    self.into.append(data)

                def connectionLost(self, reason):
                    self.into.append(type(reason.value).__name__)

            response.deliverBody(Collect(body))
            if body[-1:] and isinstance(body[-1], str):
                end = body.pop()
            else:
                protocol.connectionLost(Failure(ConnectionDone()))
                end = body.pop() if body and isinstance(body[-1], str) else None
            seen.append(
                (
                    response.code,
                    sorted(response.headers.getAllRawHeaders()),
                    response.length if isinstance(response.length, int) else "unknown",
                    b"".join(body),
                    end,
                    len(idle),
                )
            )
        return seen

    def same(self, method: bytes, answers):
        twisted_saw = self.exchange("twisted", method, answers)
        self.assertEqual(self.exchange("httptools", method, answers), twisted_saw)
        return twisted_saw

    def test_answers_in_a_row(self):
        seen = self.same(
            b"GET",
            [
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\nX-A: 2\r\n\r\nhi",
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nGrpc-Status: 0\r\n\r\n",
                b"HTTP/1.1 204 No Content\r\n\r\n",
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
            ],
        )
        self.assertEqual([s[0] for s in seen], [200, 201, 200, 204, 404])

    def test_a_head_answer_has_no_body_and_the_next_one_is_read(self):
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
        self.same(b"HEAD", [head, head])

    def test_a_body_that_ends_with_the_connection(self):
        self.same(b"GET", [b"HTTP/1.1 200 OK\r\n\r\nuntil the end"])

    def test_an_answer_cut_short(self):
        self.same(b"GET", [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"])

    def test_no_answer(self):
        self.same(b"GET", [b""])
