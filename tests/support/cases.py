"""
Base test cases that set up a relay server (over loopback, or in memory) for
the test modules that share them; they carry no tests themselves.
"""

import treq
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse
from relay.server.broker import POLL_TIMEOUT
from tests.support import FakeRelayClient, InMemoryRelay, RelayServer, raw_connect


class ServerTestCase(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.clock = Clock()
        self.server = RelayServer(clock=self.clock)
        self.relay_client = FakeRelayClient(self.server)
        self.users = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self.users.closeCachedConnections)
        self.addCleanup(self.relay_client.close)
        self.addCleanup(self.server.stop)

    def get(self, path, **kw):
        return treq.get(self.server.url(path), pool=self.users, **kw)

    def request(self, method, path, **kw):
        return treq.request(method, self.server.url(path), pool=self.users, **kw)

    def polling(self, name="robot"):
        """Fires once a relay-client's long poll for C{name} waits at the server."""
        return self.server.polling(name)

    @defer.inlineCallbacks
    def raw_relayed(self, head: bytes, name="robot"):
        """
        A raw-socket user sends C{head} once a poll for C{name} waits, and
        the poll picks it up: C{(the user's RawResponse, HttpRequest)}.
        """
        poll = self.relay_client.poll(name)
        yield self.polling(name)
        user = yield raw_connect(self.server.port)
        user.transport.write(head)
        code, message = yield poll
        self.assertEqual(code, 200)
        return user, message

    @defer.inlineCallbacks
    def known(self, name="robot"):
        """A relay-client polls once (and times out), making C{name} known."""
        poll = self.relay_client.poll(name)
        yield self.polling(name)
        self.clock.advance(POLL_TIMEOUT)
        code, _ = yield poll
        self.assertEqual(code, 408)

    @defer.inlineCallbacks
    def relayed(self, path, method="GET", name="robot", **kw):
        """Start a user request and pick it up: C{(user Deferred, HttpRequest)}."""
        poll = self.relay_client.poll(name)
        yield self.polling(name)
        user = self.request(method, path, **kw)
        code, message = yield poll
        self.assertEqual(code, 200)
        return user, message


class RouteTestCase(unittest.SynchronousTestCase):
    def setUp(self):
        self.relay = InMemoryRelay()

    def answer(self, d):
        """C{(response, body)} of a request that has been answered."""
        response = self.successResultOf(d)
        return response, self.successResultOf(self.relay.content(response))

    def known(self, name="robot"):
        """A relay-client polls once and times out, making C{name} known."""
        poll = self.relay.get("/server/request?server=" + name)
        self.assertNoResult(poll)
        self.relay.advance(POLL_TIMEOUT)
        response, _ = self.answer(poll)
        self.assertEqual(response.code, 408)

    def relayed(self, path, name="robot", method="GET", **kwargs):
        """A user request picked up by a poll: C{(user Deferred, HttpRequest)}."""
        poll = self.relay.get("/server/request?server=" + name)
        user = self.relay.request(method, path, **kwargs)
        response, body = self.answer(poll)
        self.assertEqual(response.code, 200)
        message = HttpRequest()
        message.ParseFromString(body)
        return user, message

    def respond(self, message: HttpResponse):
        return self.answer(self.relay.post("/server/response", message.SerializeToString()))

    def respond_with(self, request_id, status=200, body=b"", headers=()):
        message = HttpResponse(id=request_id, status_code=status, body=body, eof=True)
        for name, value in headers:
            message.header.add(name=name, value=value)
        return self.respond(message)
