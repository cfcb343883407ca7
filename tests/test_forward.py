"""
Forwarding a call to the replica that owns its name (relay/server/forward.py), over
real loopback sockets: a front site that forwards every request, and behind
it a real relay server with a relay-client played by the test. The user must
get the owner's answer as if they had asked it directly: streamed, with its
trailers, and never a cut-off answer that looks complete.
"""

import pytest
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest
from twisted.web.resource import Resource

from relay.config import ServerConfig
from relay.server.forward import FORWARDED_BY, Forwarder, forwarded
from relay.server.site import RelaySite
from tests.support import FakeRelayClient, RelayServer, dechunk, head_and_body, raw_user
from tests.support.engines import on_each_engine
from tests.support.ports import reserve_port

pytestmark = pytest.mark.socket

NAME = "robot"


class ForwardAll(Resource):
    isLeaf = True

    def __init__(self, forwarder, peer):
        super().__init__()
        self.forwarder = forwarder
        self.peer = peer
        self.seen_forwarded = []

    def render(self, request):
        self.seen_forwarded.append(forwarded(request))
        return self.forwarder.forward(request, self.peer)


class Recorder(Resource):
    """A peer that answers 200 and keeps the forwarded mark of each call."""

    isLeaf = True

    def __init__(self, answer_headers=()):
        super().__init__()
        self.marks = []
        self.headers = []
        self.answer_headers = answer_headers

    def render(self, request):
        self.marks.append(request.getHeader(FORWARDED_BY))
        self.headers.append(request.requestHeaders)
        for name, value in self.answer_headers:
            request.responseHeaders.addRawHeader(name, value)
        return b"ok"


class ForwardTests(unittest.TestCase):
    timeout = 20
    @defer.inlineCallbacks
    def setUp(self):
        self.owner = RelayServer()
        self.addCleanup(self.owner.stop)
        self.robot = FakeRelayClient(self.owner)
        self.addCleanup(self.robot.close)
        self.forwarder = Forwarder(reactor, "front:1")
        self.addCleanup(self.forwarder.close)
        self.front = ForwardAll(self.forwarder, "127.0.0.1:%d" % self.owner.port)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(RelaySite(self.front, ServerConfig()))
        self.addCleanup(port.stopListening)
        self.front_port = port.getHost().port
        # The name is known to the owner once its relay-client has polled.
        self.polls = [self.robot.poll(NAME)]
        yield self.owner.polling(NAME)

    def user(self, data: bytes):
        return raw_user(self, self.front_port, data)

    @defer.inlineCallbacks
    def test_request_and_answer_pass_through(self):
        user = yield self.user(
            b"POST /client/robot/path?q=1 HTTP/1.1\r\nHost: relay.example\r\nX-Thing: a\r\n"
            b"Content-Length: 5\r\n\r\nhello"
        )
        status, message = yield self.polls[0]
        self.assertEqual(status, 200)
        self.assertEqual((message.method, message.url, message.body), ("POST", "http://invalid/path?q=1", b"hello"))
        headers = {h.name: h.value for h in message.header}
        self.assertEqual(headers.get("X-Thing"), "a")
        code, _ = yield self.robot.respond(
            message.id, 201, b"made", headers=[("Content-Type", "text/plain"), ("Content-Length", "4")]
        )
        self.assertEqual(code, 200)
        yield user.wait_for(b"made")
        head, body = head_and_body(user.data)
        self.assertTrue(head.startswith(b"HTTP/1.1 201 "), head)
        self.assertIn(b"Content-Type: text/plain", head)
        self.assertEqual(body, b"made")
        self.assertEqual(self.front.seen_forwarded, [False])

    @defer.inlineCallbacks
    def test_answer_streams_with_its_trailers(self):
        user = yield self.user(b"GET /client/robot/s HTTP/1.1\r\nHost: x\r\n\r\n")
        _, message = yield self.polls[0]
        yield self.robot.respond(message.id, 200, b"first", eof=False, headers=[("Grpc-Encoding", "identity")])
        yield user.wait_for(b"first")  # before the rest exists: streamed, not buffered
        yield self.robot.respond(message.id, None, b"-second", trailers=[("Grpc-Status", "0")])
        yield user.wait_until(lambda data: dechunk(head_and_body(data)[1])[2], "the last chunk")
        payload, trailers, complete = dechunk(head_and_body(user.data)[1])
        self.assertEqual(payload, b"first-second")
        self.assertTrue(complete)
        self.assertIn(b"Grpc-Status: 0", trailers)
        head = head_and_body(user.data)[0]
        self.assertEqual(head.count(b"\r\nDate: "), 1, head)

    @defer.inlineCallbacks
    def test_answer_cut_short_is_never_complete(self):
        """The owner dies during a begun answer: the user's connection is aborted."""
        user = yield self.user(b"GET /client/robot/s HTTP/1.1\r\nHost: x\r\n\r\n")
        _, message = yield self.polls[0]
        yield self.robot.respond(message.id, 200, b"partial", eof=False)
        yield user.wait_for(b"partial")
        for channel in list(self.owner.service.site.connections):
            channel.transport.abortConnection()
        yield user.ended
        self.assertFalse(user.clean)
        _, _, complete = dechunk(head_and_body(user.data)[1])
        self.assertFalse(complete)

    @defer.inlineCallbacks
    def test_owner_unreachable_is_502(self):
        self.front.peer = "127.0.0.1:%d" % reserve_port(self)
        user = yield self.user(b"GET /client/robot/x HTTP/1.1\r\nHost: x\r\n\r\n")
        yield user.wait_for(b"unreachable")
        self.assertTrue(bytes(user.data).startswith(b"HTTP/1.1 502 "), bytes(user.data))
        # The poll is still waiting: nothing reached the owner.
        self.assertFalse(self.polls[0].called)
        self.polls[0].addErrback(lambda _: None)

    @defer.inlineCallbacks
    def test_user_gone_cancels_the_forwarded_call(self):
        user = yield self.user(b"GET /client/robot/x HTTP/1.1\r\nHost: x\r\n\r\n")
        _, message = yield self.polls[0]
        user.transport.abortConnection()
        yield user.ended
        # The owner drops the request once the forwarded stream is reset:
        # the relay-client's next post for it is refused.
        yield self.owner.when(lambda: not self.owner.broker.requests)
        code, _ = yield self.robot.respond(message.id, 200, b"late")
        self.assertEqual(code, 400)

    @defer.inlineCallbacks
    def test_forwarded_calls_carry_the_mark(self):
        """The mark that stops a second hop: the peer sees who forwarded."""
        recorder = Recorder()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(RelaySite(recorder, ServerConfig()))
        self.addCleanup(port.stopListening)
        self.front.peer = "127.0.0.1:%d" % port.getHost().port
        user = yield self.user(b"GET /anything HTTP/1.1\r\nHost: x\r\n\r\n")
        yield user.wait_for(b"ok")
        self.assertEqual(recorder.marks, ["front:1"])
        self.polls[0].addErrback(lambda _: None)

    @defer.inlineCallbacks
    def test_header_values_that_are_not_utf8_pass_byte_exact(self):
        """Latin-1 or stray bytes in a value reach the owner, and come back, as they were sent."""
        value = b"caf\xe9 \xff\xfe;q=\x80"
        recorder = Recorder(answer_headers=[(b"X-Answer", value)])
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(RelaySite(recorder, ServerConfig()))
        self.addCleanup(port.stopListening)
        self.front.peer = "127.0.0.1:%d" % port.getHost().port
        user = yield self.user(b"GET /anything HTTP/1.1\r\nHost: x\r\nX-Value: " + value + b"\r\n\r\n")
        yield user.wait_for(b"ok")
        self.assertEqual(recorder.headers[0].getRawHeaders(b"x-value"), [value])
        head, body = head_and_body(user.data)
        self.assertIn(b"\r\nX-Answer: " + value + b"\r\n", head)
        self.assertEqual(body, b"ok")
        self.polls[0].addErrback(lambda _: None)


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
