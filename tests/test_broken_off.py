"""
A backend answer that breaks off part-way (a reset, a chunked or
C{Content-Length} body cut short, an HTTP/2 stream reset) must never reach
the user as a complete answer (docs/protocol.md, "Relay-Error"). The user's
side is what is asserted: its HTTP client reports an error, or gets an
honest 502, never a clean short body.

Our pair over loopback sockets, with a raw backend that the test cuts when
it chooses; our server under a scripted relay-client, for the server's side
of the extension; the Go relay-client in front of our server, which still
posts C{eof} after a short body; and the server's abort path in memory.
"""


import pytest
import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web import server
from twisted.web.client import HTTPConnectionPool, ResponseFailed
from twisted.web.http_headers import Headers

from relay.config import ServerConfig
from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse
from relay.server.broker import Broker
from relay.server.response import UserResponse
from tests.support import RelayServer, client_service, dechunk, head_and_body
from tests.support.cases import ServerTestCase
from tests.support.e2e import CHUNKED_HEAD, Collect, RawBackend
from tests.support.engines import on_each_engine
from tests.support.go import GO_CLIENT, go_binary
from tests.support.h2_peers import H2Backend, H2BackendResource, H2Client
from tests.support.process import ChildProcess

NAME = "robot"
BACKEND_ERROR = 'broker_responses{backend="robot",method="client",result="backend_error"} 1\n'
LENGTH_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nContent-Type: text/plain\r\n\r\n"


def backend_errors(relay: RelayServer) -> bool:
    return BACKEND_ERROR in relay.broker.metrics.render().decode()


@pytest.mark.socket
class OurPair(unittest.TestCase):
    """Our relay-client and our server, a backend that breaks off."""

    timeout = 30

    def start(self, answer: bytes, close_at_once: bool = False):
        self.backend = RawBackend(answer, close_at_once)
        self.addCleanup(self.backend.stop)
        self.relay = RelayServer()
        self.addCleanup(self.relay.stop)
        client = client_service(
            reactor, self.relay.base, NAME, backend_scheme="http", backend_address=self.backend.address
        )
        client.startService()
        self.addCleanup(client.stopService)
        self.users = HTTPConnectionPool(reactor, persistent=False)
        return self.relay.polling(NAME)

    def get(self, path: str):
        return treq.get(self.relay.base + "/client/" + NAME + path, pool=self.users)

    @defer.inlineCallbacks
    def cut_midway(self, answer: bytes, received: bytes, abort: bool):
        """
        The backend sends C{answer} and, once the user has the head, cuts:
        the user's client reports an error after C{received}, never a clean
        end.
        """
        yield self.start(answer)
        response = yield self.get("/file")
        self.assertEqual(response.code, 200)
        self.backend.cut(abort=abort)
        body = Collect()
        response.deliverBody(body)
        failure = yield self.assertFailure(body.done, ResponseFailed)
        self.assertEqual(b"".join(body.pieces), received, failure)
        # The server forgot the request once the relay-client's eof came.
        yield self.relay.when(lambda: not self.relay.broker.requests)
        self.assertTrue(backend_errors(self.relay))

    def test_chunked_body_reset_midway_is_an_error_for_the_user(self):
        return self.cut_midway(CHUNKED_HEAD + b"7\r\npartial\r\n", b"partial", abort=True)

    def test_chunked_body_closed_midway_is_an_error_for_the_user(self):
        """A clean close inside a chunked body is a cut all the same."""
        return self.cut_midway(CHUNKED_HEAD + b"7\r\npartial\r\n", b"partial", abort=False)

    def test_content_length_body_cut_short_is_an_error_for_the_user(self):
        return self.cut_midway(LENGTH_HEAD + b"0123456789", b"0123456789", abort=False)

    @defer.inlineCallbacks
    def test_cut_before_anything_was_relayed_is_a_502(self):
        """
        A body of known length is gathered before it goes, so the cut comes
        while nothing has been relayed: the user gets an honest 502, not
        the first ten bytes of a hundred.
        """
        yield self.start(LENGTH_HEAD + b"0123456789", close_at_once=True)
        response = yield self.get("/file")
        self.assertEqual(response.code, 502)
        body = yield response.content()
        self.assertEqual(body, b"Backend response failed with error: connection closed before the answer was complete")
        yield self.relay.when(lambda: not self.relay.broker.requests)

    @defer.inlineCallbacks
    def test_body_ended_by_close_is_complete(self):
        """Without a length or chunking, the close is how a body ends: not an error."""
        yield self.start(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it", close_at_once=True)
        response = yield self.get("/old")
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.content()), b"all of it")
        self.assertFalse(backend_errors(self.relay))


class Resetting(H2BackendResource):
    """The HTTP/2 backend's pages, plus one that resets its stream once the test says so."""

    def render(self, request):
        if request.path == b"/reset":
            self.backend.requests.append(request)
            request.write(b"partial")
            return server.NOT_DONE_YET
        return super().render(request)


@pytest.mark.socket
class OurPairOverHTTP2(unittest.TestCase):
    """C{--force_http2}: the backend resets the stream part-way; the user is on HTTP/2 too."""

    timeout = 30

    @defer.inlineCallbacks
    def test_backend_stream_reset_resets_the_users_stream(self):
        backend = H2Backend()
        backend.site.resource = Resetting(backend)
        self.addCleanup(backend.stop)
        relay = RelayServer()
        self.addCleanup(relay.stop)
        client = client_service(
            reactor, relay.base, NAME, backend_scheme="http", backend_address=backend.address, force_http2=True
        )
        client.startService()
        self.addCleanup(client.stopService)
        yield relay.polling(NAME)
        user = H2Client()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", relay.port), user)
        self.addCleanup(lambda: (user.transport.loseConnection(), user.lost)[1])
        _, state = user.request("GET", "/client/%s/reset" % (NAME,))
        state["got_data"] = defer.Deferred()
        yield state["got_data"]
        self.assertEqual(state["data"], b"partial")
        backend.requests[-1].channel.abortConnection()  # RST_STREAM before END_STREAM
        yield self.assertFailure(state["done"], AssertionError)  # H2Client: "stream reset"
        self.assertIsNone(state["trailers"])
        yield relay.when(lambda: not relay.broker.requests)
        self.assertTrue(backend_errors(relay))
        # Only that stream: the user's connection serves the next request.
        _, state = user.request("GET", "/healthz")
        yield state["done"]
        self.assertEqual(state["data"], b"ok")


@pytest.mark.process
class GoClientOnOurServer(unittest.TestCase):
    """
    The Go relay-client posts C{eof} after a body that broke off. Our
    server still aborts the user when the body is shorter than its
    C{Content-Length}; a chunked one ends as Go's client says (a limit
    that only our relay-client lifts).
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_content_length_body_cut_short_is_an_error_for_the_user(self):
        go_binary(GO_CLIENT)
        backend = RawBackend(LENGTH_HEAD + b"0123456789", close_at_once=True)
        self.addCleanup(backend.stop)
        relay = RelayServer()
        self.addCleanup(relay.stop)
        argv = [
            GO_CLIENT,
            "--backend_scheme=http",
            "--relay_scheme=http",
            "--disable_auth_for_remote",
            "--server_name=" + NAME,
            "--backend_address=" + backend.address,
            "--relay_address=127.0.0.1:%d" % (relay.port,),
        ]
        go = ChildProcess.spawn(argv)
        self.addCleanup(go.terminate)
        yield relay.polling(NAME)
        users = HTTPConnectionPool(reactor, persistent=False)
        try:
            response = yield treq.get(relay.base + "/client/%s/file" % (NAME,), pool=users)
            body = Collect()
            response.deliverBody(body)
            yield body.done
        except Exception:
            pass  # aborted before or after the head, as the bytes happened to go
        else:
            self.fail("a body of 10 of its 100 bytes looked complete: %r" % (b"".join(body.pieces),))
        yield relay.when(lambda: not relay.broker.requests)
        self.assertTrue(backend_errors(relay))


@pytest.mark.socket
class ScriptedRelayClient(ServerTestCase):
    """Our server under a relay-client that sends the extension by hand."""

    def relay_error(self, request_id: str, reason: str = "connection reset by peer", **fields) -> HttpResponse:
        message = HttpResponse(id=request_id, **fields)
        message.trailer.add(name="Relay-Error", value=reason)
        return message

    @defer.inlineCallbacks
    def test_begun_answer_is_aborted_and_the_trailer_not_relayed(self):
        user, message = yield self.raw_relayed(b"GET /client/robot/s HTTP/1.1\r\nHost: relay\r\n\r\n")
        yield self.relay_client.post(HttpResponse(id=message.id, status_code=200, body=b"partial"))
        yield user.wait_for(b"partial")
        code, answer = yield self.relay_client.post(self.relay_error(message.id, body=b" and more"))
        self.assertEqual((code, answer), (200, b"ok"))
        yield user.ended
        self.assertFalse(user.clean, "the answer ended as if it were complete")
        payload, _, complete = dechunk(head_and_body(user.data)[1])
        self.assertFalse(complete)
        # What was still on its way may be lost with the connection.
        self.assertTrue(b"partial and more".startswith(payload) and payload.startswith(b"partial"), payload)
        self.assertNotIn(b"connection reset", bytes(user.data))
        # The eof that follows (for servers without the extension) is taken, and ends the request.
        code, _ = yield self.relay_client.respond(message.id, status=None, eof=True)
        self.assertEqual(code, 200)
        self.assertEqual(self.server.broker.requests, {})
        code, _ = yield self.relay_client.respond(message.id, status=None, eof=True)
        self.assertEqual(code, 400)
        self.assertIn(BACKEND_ERROR, self.server.broker.metrics.render().decode())

    @defer.inlineCallbacks
    def test_nothing_begun_is_a_502_with_the_reason(self):
        user, message = yield self.raw_relayed(b"GET /client/robot/s HTTP/1.1\r\nHost: relay\r\n\r\n")
        # Status, headers and part of a body, but the Relay-Error with them: nothing was begun.
        code, _ = yield self.relay_client.post(
            self.relay_error(message.id, status_code=200, body=b"partial", header=[{"name": "X-Backend", "value": "1"}])
        )
        self.assertEqual(code, 200)
        yield user.wait_for(b"peer")
        head, body = head_and_body(user.data)
        self.assertTrue(head.startswith(b"HTTP/1.1 502 "), head)
        self.assertNotIn(b"X-Backend", head)
        self.assertEqual(body, b"Backend response failed with error: connection reset by peer")
        code, _ = yield self.relay_client.respond(message.id, status=None, eof=True)
        self.assertEqual(code, 200)
        self.assertEqual(self.server.broker.requests, {})
        user.transport.loseConnection()
        yield user.ended

    @defer.inlineCallbacks
    def test_relay_error_on_an_eof_message_still_aborts(self):
        """Complete and broken at once is broken: the answer must not look complete."""
        user, message = yield self.raw_relayed(b"GET /client/robot/s HTTP/1.1\r\nHost: relay\r\n\r\n")
        yield self.relay_client.post(HttpResponse(id=message.id, status_code=200, body=b"partial"))
        yield user.wait_for(b"partial")
        code, _ = yield self.relay_client.post(self.relay_error(message.id, eof=True))
        self.assertEqual(code, 200)
        yield user.ended
        self.assertFalse(user.clean)
        self.assertEqual(self.server.broker.requests, {})

    @defer.inlineCallbacks
    def test_short_content_length_at_eof_is_counted(self):
        """The Go relay-client's way to say the same: a body shorter than declared, then eof."""
        user, message = yield self.raw_relayed(b"GET /client/robot/s HTTP/1.1\r\nHost: relay\r\n\r\n")
        yield self.relay_client.respond(message.id, 200, b"short", headers=[("Content-Length", "10")])
        yield user.ended
        self.assertFalse(user.clean)
        self.assertIn(BACKEND_ERROR, self.server.broker.metrics.render().decode())


class _UserRequest:
    """Just what L{UserResponse} uses of a twisted.web request; C{on_write} plays the user's buffer filling up."""

    method = b"GET"
    code = None
    finished = False
    _disconnected = False

    def __init__(self):
        self.responseHeaders = Headers()
        self.channel = self
        self.written = []
        self.trailers = []
        self.aborted = False
        self.producer = None
        self.on_write = None

    def setResponseCode(self, code):
        self.code = code

    def write(self, data):
        self.written.append(data)
        if self.on_write is not None:
            self.on_write()

    def add_trailer(self, name, value):
        self.trailers.append((name, value))

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def finish(self):
        self.finished = True

    def abortConnection(self):
        self.aborted = True
        self._disconnected = True


@pytest.mark.memory
class AbortPath(unittest.SynchronousTestCase):
    """The server's side in memory: the broker and L{UserResponse}, on a fake clock."""

    def setUp(self):
        self.clock = Clock()
        self.broker = Broker(self.clock, ServerConfig())
        poll = self.broker.get_request(NAME)
        self.request = _UserRequest()
        self.sink = UserResponse(self.broker, self.request)
        self.sink.pending = self.broker.relay(NAME, HttpRequest(method="GET", url="http://invalid/x"), self.sink)
        self.request.registerProducer(self.sink.pending, True)
        self.id = self.successResultOf(poll).id
        self.successResultOf(self.broker.send_response(HttpResponse(id=self.id, status_code=200, body=b"begun")))

    def post(self, message: HttpResponse):
        return self.broker.send_response(message)

    def relay_error(self, **fields) -> HttpResponse:
        message = HttpResponse(id=self.id, **fields)
        message.trailer.add(name="Relay-Error", value="stream error: stream ID 1; CANCEL")
        return message

    def test_eof_after_the_error_is_taken_even_if_the_user_had_paused_us(self):
        self.request.on_write = self.sink.pending.pauseProducing  # the user's buffer is full
        self.successResultOf(self.post(self.relay_error(body=b" more")))
        self.assertTrue(self.request.aborted)
        self.assertEqual(self.request.written, [b"begun", b" more"])
        self.assertEqual(self.request.trailers, [])
        self.assertFalse(self.request.finished)
        # The abort takes the user away; the request waits for the client's eof all the same.
        self.sink.user_gone()
        self.assertIn(self.id, self.broker.requests)
        self.successResultOf(self.post(HttpResponse(id=self.id, eof=True)))
        self.assertEqual(self.broker.requests, {})
        self.assertTrue(self.sink.truncated)

    def test_without_the_eof_the_request_goes_at_the_inactivity_timeout(self):
        self.successResultOf(self.post(self.relay_error()))
        self.clock.advance(self.broker.inactive_request_timeout + 1)
        self.broker.reap()
        self.assertEqual(self.broker.requests, {})
        self.assertFalse(self.request.finished)

    def test_messages_between_the_error_and_the_eof_are_dropped(self):
        self.successResultOf(self.post(self.relay_error()))
        self.successResultOf(self.post(HttpResponse(id=self.id, body=b"late")))
        self.assertEqual(self.request.written, [b"begun"])


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
