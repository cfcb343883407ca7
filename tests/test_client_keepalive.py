"""
The relay client's keep-alive agent, against a real twisted.web server on
loopback: connections are reused, a request that meets a connection the
server dropped is retried only when Agent would retry it, idle connections
are closed on time (a L{Clock}) and on shutdown, and no more are kept than
allowed.
"""

import pytest
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.client import ResponseFailed

from relay.client.http import BytesProducer, read_all
from relay.client.keepalive import KeepAliveAgent
from relay.outbound.endpoints import CachingEndpointFactory
from tests.support import Changes
from tests.support.engines import on_each_engine

pytestmark = pytest.mark.socket


class Recorder(resource.Resource):
    """Answers with the client's port and Host; C{/drop} aborts once, unanswered."""

    isLeaf = True

    def __init__(self, changes: Changes):
        super().__init__()
        self.changes = changes
        self.drops = 0
        self.held = []

    def render(self, request):
        if request.path == b"/drop" and self.drops == 0:
            self.drops += 1
            request.channel.transport.abortConnection()
            return server.NOT_DONE_YET
        if request.path == b"/hold":
            self.held.append(request)
            self.changes.changed()
            return server.NOT_DONE_YET
        return b"%d %s %s" % (request.getClientAddress().port, request.getHeader(b"host"), request.content.read())


class Tracking(server.Site):
    """Counts the connections the server sees open and closed."""

    def __init__(self, root: Recorder):
        super().__init__(root)
        self.changes = root.changes
        self.opened = 0
        self.closed = 0

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        site = self
        lost = channel.connectionLost

        def connectionLost(reason):
            site.closed += 1
            try:
                return lost(reason)
            finally:
                site.changes.changed()

        channel.connectionLost = connectionLost
        self.opened += 1
        return channel


class KeepAliveAgentTests(unittest.TestCase):
    timeout = 20

    def setUp(self):
        self.root = Recorder(Changes())
        self.site = Tracking(self.root)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.url = "http://127.0.0.1:%d" % (self.port.getHost().port,)
        self.clock = Clock()
        self.agent = KeepAliveAgent(self.clock, CachingEndpointFactory(reactor), max_idle_per_host=2, idle_timeout=90)
        self.addCleanup(self.agent.closeCachedConnections)

    @defer.inlineCallbacks
    def get(self, path, method=b"GET", body=None):
        producer = BytesProducer(body) if body is not None else None
        response = yield self.agent.request(method, (self.url + path).encode(), None, producer)
        data = yield read_all(response)
        return response.code, data

    @defer.inlineCallbacks
    def test_connection_reused_with_host_header(self):
        code1, first = yield self.get("/a")
        code2, second = yield self.get("/b?x=1", b"POST", b"payload")
        self.assertEqual((code1, code2), (200, 200))
        port1, host, _ = first.split(b" ")
        port2, _, body = second.split(b" ")
        self.assertEqual(port1, port2)
        self.assertEqual(host, b"127.0.0.1:%d" % (self.port.getHost().port,))
        self.assertEqual(body, b"payload")
        self.assertEqual(self.site.opened, 1)

    @defer.inlineCallbacks
    def test_get_retried_on_a_fresh_connection_when_the_server_dropped_it(self):
        yield self.get("/a")
        code, _ = yield self.get("/drop")
        self.assertEqual(code, 200)
        self.assertEqual(self.site.opened, 2)

    @defer.inlineCallbacks
    def test_post_with_body_not_retried(self):
        yield self.get("/a")
        with self.assertRaises((ResponseNeverReceived, ResponseFailed)):
            yield self.get("/drop", b"POST", b"chunk")
        self.assertEqual(self.site.opened, 1)

    @defer.inlineCallbacks
    def test_idle_connection_closed_after_timeout(self):
        yield self.get("/a")
        self.clock.advance(89)
        yield self.get("/a")
        self.assertEqual((self.site.opened, self.site.closed), (1, 0))
        self.clock.advance(90)
        yield self.site.changes.when(lambda: self.site.closed == 1)
        yield self.get("/a")
        self.assertEqual(self.site.opened, 2)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 179 + 90)

    @defer.inlineCallbacks
    def test_keeps_at_most_max_idle_per_host(self):
        held = [self.get("/hold") for _ in range(3)]
        yield self.site.changes.when(lambda: len(self.root.held) == 3)
        for request in self.root.held:
            request.write(b"done")
            request.finish()
        yield defer.gatherResults(held)
        yield self.site.changes.when(lambda: self.site.closed == 1)
        self.assertEqual(self.site.opened, 3)
        self.assertEqual(len(self.agent._origins[self.url.encode()].idle), 2)

    @defer.inlineCallbacks
    def test_close_cached_connections(self):
        yield self.get("/a")
        yield self.agent.closeCachedConnections()
        yield self.site.changes.when(lambda: self.site.closed == 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        yield self.get("/a")
        self.assertEqual(self.site.opened, 2)

    @defer.inlineCallbacks
    def test_url_without_path_asks_for_slash(self):
        response = yield self.agent.request(b"GET", self.url.encode() + b"?q=1")
        data = yield read_all(response)
        self.assertEqual(response.code, 200)
        self.assertIn(b"127.0.0.1", data)


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
