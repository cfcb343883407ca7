"""
How the relay client treats the relay server's answers: when it polls again,
how it backs off, when it retries a post and when it gives up. A scripted
relay server answers over a real loopback socket; the client's timers run on
a L{Clock} so that back-off delays can be read off exactly.
"""


from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool

from relay.client.relay_api import Forbidden, PermanentRelayError, RelayAPI, RelayError
from relay.proto.http_relay_pb2 import HttpResponse
from tests.support import client_service, until
from tests.test_client_e2e import temp_file


class ScriptedRelay(resource.Resource):
    """Answers each call with the next scripted (code, body); records calls."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.script = {b"/server/request": [], b"/server/response": []}
        self.calls = []
        self.arrived = []

    def render(self, request):
        self.calls.append((request.path, request.requestHeaders, request.content.read()))
        waiting, self.arrived = self.arrived, []
        for d in waiting:
            reactor.callLater(0, d.callback, None)
        script = self.script.get(request.path) or []
        if not script:
            request.setResponseCode(408)
            return b"No request received within timeout"
        code, body = script.pop(0)
        request.setResponseCode(code)
        return body

    def next_call(self):
        d = defer.Deferred()
        self.arrived.append(d)
        return d


class RelayCallsTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.relay = ScriptedRelay()
        self.port = reactor.listenTCP(0, server.Site(self.relay), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.base = "http://127.0.0.1:%d" % (self.port.getHost().port,)
        self.clock = Clock()

    def until(self, condition, timeout=10.0):
        return until(condition, timeout)

    def polls(self):
        return [c for c in self.relay.calls if c[0] == b"/server/request"]

    def start_client(self, base=None, **kw):
        self.fatal = []
        client = client_service(
            reactor,
            base or self.base,
            "robot",
            backend_scheme="http",
            backend_address="127.0.0.1:1",
            clock=self.clock,
            on_fatal=self.fatal.append,
            **kw
        )
        client.startService()
        self.addCleanup(client.stopService)
        return client

    def pending_delays(self):
        now = self.clock.seconds()
        return sorted(round(c.getTime() - now, 6) for c in self.clock.getDelayedCalls() if c.getTime() - now < 59)

    @defer.inlineCallbacks
    def test_408_polls_again_at_once(self):
        self.start_client()
        yield self.until(lambda: len(self.polls()) >= 5)
        self.assertEqual(self.pending_delays(), [])
        self.assertEqual(self.polls()[0][0], b"/server/request")

    @defer.inlineCallbacks
    def test_5xx_backs_off_growing_and_resets_on_success(self):
        self.relay.script[b"/server/request"] = [(503, b"down")] * 3 + [(408, b"")] + [(500, b"oops")]
        self.start_client()
        for expected in (0.1, 0.15, 0.225):
            yield self.until(lambda: self.pending_delays() != [])
            self.assertEqual(self.pending_delays(), [expected])
            count = len(self.polls())
            self.clock.advance(expected + 1e-9)
            yield self.until(lambda: len(self.polls()) > count)
        # 408 counts as success: the next failure starts again from 0.1 s.
        yield self.until(lambda: self.pending_delays() != [])
        self.assertEqual(self.pending_delays(), [0.1])

    @defer.inlineCallbacks
    def test_restarting_server_backs_off(self):
        # A draining relay answers 503 (ours now) or, before, 408 "Server is
        # restarting": both back off, where a plain 408 polls again at once.
        self.relay.script[b"/server/request"] = [
            (503, b"Server is restarting\n"),
            (408, b"Server is restarting\n"),
        ]
        self.start_client()
        for expected in (0.1, 0.15):
            yield self.until(lambda: self.pending_delays() != [])
            self.assertEqual(self.pending_delays(), [expected])
            count = len(self.polls())
            self.clock.advance(expected + 1e-9)
            yield self.until(lambda: len(self.polls()) > count)

    @defer.inlineCallbacks
    def test_backoff_is_capped_at_10s(self):
        self.relay.script[b"/server/request"] = [(502, b"")] * 14
        self.start_client()
        seen = []
        for _ in range(14):
            yield self.until(lambda: self.pending_delays() != [])
            delay = self.pending_delays()[0]
            seen.append(delay)
            count = len(self.polls())
            self.clock.advance(delay + 1e-9)
            yield self.until(lambda: len(self.polls()) > count)
        self.assertEqual(max(seen), 10.0)
        self.assertEqual(seen[-1], 10.0)
        self.assertTrue(all(a <= b for a, b in zip(seen, seen[1:])))

    @defer.inlineCallbacks
    def test_connection_refused_backs_off(self):
        port = reactor.listenTCP(0, server.Site(resource.Resource()), interface="127.0.0.1")
        base = "http://127.0.0.1:%d" % (port.getHost().port,)
        yield port.stopListening()
        self.start_client(base=base)
        yield self.until(lambda: self.pending_delays() != [])
        self.assertEqual(self.pending_delays(), [0.1])
        self.clock.advance(0.1 + 1e-9)
        yield self.until(lambda: self.pending_delays() == [0.15])

    @defer.inlineCallbacks
    def test_403_is_fatal(self):
        self.relay.script[b"/server/request"] = [(403, b"Forbidden")]
        client = self.start_client()
        yield self.until(lambda: self.fatal)
        self.assertIn("failed to authenticate", self.fatal[0])
        self.assertEqual(len(self.polls()), 1, "no retry after 403")
        self.assertEqual(client.fatal_error, self.fatal[0])

    @defer.inlineCallbacks
    def test_relay_token_is_sent_on_every_call(self):
        path = temp_file(self, "relay-secret\n")
        self.start_client(relay_token_file=path)
        yield self.until(lambda: len(self.polls()) >= 2)
        with open(path, "w") as f:
            f.write("rotated")
        count = len(self.polls())
        yield self.until(lambda: len(self.polls()) >= count + 2)
        tokens = [c[1].getRawHeaders(b"authorization") for c in self.polls()]
        self.assertEqual(tokens[0], [b"Bearer relay-secret"])
        self.assertEqual(tokens[-1], [b"Bearer rotated"])

    # POST /server/response.

    def api(self):
        pool = HTTPConnectionPool(reactor, persistent=False)
        return RelayAPI(Agent(reactor, pool=pool), self.clock, self.base, "robot")

    @defer.inlineCallbacks
    def test_post_retried_with_exponential_backoff(self):
        self.relay.script[b"/server/response"] = [(503, b"busy"), (500, b"err"), (200, b"ok")]
        d = self.api().post_response(HttpResponse(id="robot:1", status_code=200, eof=True))
        for expected in (1.0, 2.0):
            yield self.until(lambda: self.pending_delays() != [])
            self.assertEqual(self.pending_delays(), [expected])
            self.clock.advance(expected + 1e-9)
        yield d
        posts = [c for c in self.relay.calls if c[0] == b"/server/response"]
        self.assertEqual(len(posts), 3)
        message = HttpResponse()
        message.ParseFromString(posts[-1][2])
        self.assertEqual((message.id, message.status_code, message.eof), ("robot:1", 200, True))
        self.assertEqual(
            posts[0][1].getRawHeaders(b"content-type"),
            [b"application/vnd.google.protobuf;proto=cloudrobotics.http_relay.v1alpha1.HttpResponse"],
        )

    @defer.inlineCallbacks
    def test_post_gives_up_after_10_retries(self):
        self.relay.script[b"/server/response"] = [(503, b"busy")] * 20
        d = self.api().post_response(HttpResponse(id="robot:1"))
        delays = []
        while not d.called:
            yield self.until(lambda: d.called or self.pending_delays() != [])
            if d.called:
                break
            delays.append(self.pending_delays()[0])
            self.clock.advance(delays[-1] + 1e-9)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0])
        error = yield self.assertFailure(d, RelayError)
        self.assertIn("Service Unavailable", str(error))
        self.assertEqual(len([c for c in self.relay.calls if c[0] == b"/server/response"]), 11)

    @defer.inlineCallbacks
    def test_post_400_is_final(self):
        self.relay.script[b"/server/response"] = [(400, b"No ongoing request")]
        yield self.assertFailure(self.api().post_response(HttpResponse(id="robot:1")), PermanentRelayError)
        self.assertEqual(len(self.relay.calls), 1)
        self.assertEqual(self.pending_delays(), [])

    @defer.inlineCallbacks
    def test_poll_answers(self):
        api = self.api()
        self.relay.script[b"/server/request"] = [(403, b""), (400, b"Missing server"), (200, b"\xff\xff")]
        yield self.assertFailure(defer.ensureDeferred(api.poll()), Forbidden)
        e = yield self.assertFailure(defer.ensureDeferred(api.poll()), RelayError)
        self.assertIn("Bad Request", str(e))
        yield self.assertFailure(defer.ensureDeferred(api.poll()), RelayError)
        self.assertIsNone((yield defer.ensureDeferred(api.poll())))
        self.assertEqual(self.relay.calls[0][0], b"/server/request")
