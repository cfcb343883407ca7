"""
Faults with real processes: a relay-client killed in the middle of a
100 MiB transfer, and a relay server restarted under load.
"""


import pytest
import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone

from tests.support import Changes, RelayServer
from tests.support import tick as _tick
from tests.support.e2e import Backend
from tests.support.engines import on_each_engine
from tests.support.ports import reserve_port
from tests.support.process import TwistdProcess

pytestmark = pytest.mark.process

MiB = 1024 * 1024


def spawn_client(relay_port: int, backend: Backend, name: str = "robot", *extra):
    return TwistdProcess.spawn(
        [
            "relay-client",
            "--relay_scheme=http",
            "--relay_address=127.0.0.1:%d" % relay_port,
            "--backend_scheme=http",
            "--backend_address=" + backend.address,
            "--server_name=" + name,
            "--disable_auth_for_remote",
        ]
        + list(extra)
    )


class Body(protocol.Protocol):
    """Counts a response body and keeps the reason it ended."""

    def __init__(self):
        self.size = 0
        self.ended = defer.Deferred()
        self.got = None
        self.reason = None

    def dataReceived(self, data):
        self.size += len(data)
        if self.got is not None and self.size >= self.got[0]:
            d, self.got = self.got[1], None
            d.callback(None)

    def wait_for(self, size):
        if self.size >= size:
            return defer.succeed(None)
        self.got = (size, defer.Deferred())
        return self.got[1]

    def connectionLost(self, reason):
        self.reason = reason
        if self.got is not None:
            self.got[1].errback(reason)
        self.ended.callback(None)


class FaultTests(unittest.TestCase):
    timeout = 90

    def setUp(self):
        self.backend = Backend()
        self.addCleanup(self.backend.stop)
        self.users = HTTPConnectionPool(reactor, persistent=False)

    def test_relay_client_killed_mid_transfer_is_an_error_for_the_user(self):
        """100 MiB with a Content-Length: the user sees an error, not a short success."""
        return self.killed_mid_transfer("/big?size=%d" % (100 * MiB), 100 * MiB)

    def test_relay_client_killed_mid_chunked_transfer(self):
        """Without a Content-Length only the missing last chunk tells: it must stay missing."""
        return self.killed_mid_transfer("/firehose", None)

    @defer.inlineCallbacks
    def killed_mid_transfer(self, path, size):
        clock = Clock()
        server = RelayServer(clock=clock)
        self.addCleanup(server.stop)
        client = spawn_client(server.port, self.backend)
        self.addCleanup(client.terminate)
        yield server.polling("robot")

        response = yield Agent(reactor, pool=self.users).request(
            b"GET", (server.base + "/client/robot" + path).encode()
        )
        self.assertEqual(response.code, 200)
        if size is not None:
            self.assertEqual(response.length, size)
        body = Body()
        response.deliverBody(body)
        yield body.wait_for(5 * MiB)

        client.transport.signalProcess("KILL")
        yield client.exited
        # The server notices through inactivity: its reaper (every 10 s on
        # its clock) drops the request after the inactive-request timeout.
        for _ in range(8):
            clock.advance(10)
        yield body.ended
        if size is not None:
            self.assertLess(body.size, size)
        self.assertIsNone(body.reason.check(ResponseDone), "a cut-short body was reported complete")
        self.assertEqual(server.broker.requests, {})

    @defer.inlineCallbacks
    def test_server_restart_under_load_recovers_without_help(self):
        # Real time on purpose: the relay-client is a process, whose
        # back-off and retries run on its own clock, and the test measures
        # how long it takes to come back; the server's drain, on the real
        # reactor too, is what such a process meets in a restart.
        port = reserve_port(self)
        server = RelayServer(port=port)
        client = spawn_client(port, self.backend, "robot", "--num_pending_requests=2")
        self.addCleanup(client.terminate)
        yield server.polling("robot")

        outcomes = []
        counted = Changes()
        stop = []

        @defer.inlineCallbacks
        def user(i):
            n = 0
            while not stop:
                n += 1
                try:
                    resp = yield treq.post(
                        "http://127.0.0.1:%d/client/robot/echo/%d/%d" % (port, i, n),
                        data=b"payload %d %d" % (i, n),
                        pool=self.users,
                        timeout=15,
                    )
                    text = yield resp.content()
                    ok = resp.code == 200 and (b"payload %d %d" % (i, n)) in text
                    outcomes.append((reactor.seconds(), ok))
                except Exception:
                    outcomes.append((reactor.seconds(), False))
                    yield _tick(0.05)
                counted.changed()

        users = [user(i) for i in range(4)]
        yield counted.when(lambda: sum(ok for _, ok in outcomes) >= 20).addTimeout(20, reactor)

        yield server.stop()
        restarted_at = reactor.seconds()
        yield _tick(0.5)  # the relay is down for a moment; clients back off
        server = RelayServer(port=port)
        self.addCleanup(server.stop)

        yield counted.when(lambda: sum(ok for t, ok in outcomes if t > restarted_at + 0.5) >= 20).addTimeout(
            30, reactor
        )
        stop.append(True)
        yield defer.gatherResults(users)
        recovered = [t for t, ok in outcomes if ok and t > restarted_at + 0.5]
        self.assertLess(recovered[0] - restarted_at, 15, "the client took too long to come back")
        self.assertEqual(outcomes[-1][1], True)
        yield server.when(lambda: not server.broker.requests)


class HangingBackendTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_backend_that_never_answers_is_504(self):
        """A backend that accepts the request and says nothing: 504 once the relay gives up."""
        from twisted.internet.protocol import Factory, Protocol

        from tests.support import started_client

        silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        clock = Clock()
        server = RelayServer(clock=clock)
        self.addCleanup(server.stop)
        started_client(self, server.base, "robot", "127.0.0.1:%d" % silent.getHost().port, stop_grace_period=0.1)
        yield server.polling("robot")
        pool = HTTPConnectionPool(reactor, persistent=False)
        user = treq.get(server.base + "/client/robot/slow", pool=pool)
        yield server.when(lambda: any(p.picked_up for p in server.broker.requests.values()))
        for _ in range(7):
            clock.advance(10)
        resp = yield user
        self.assertEqual(resp.code, 504)
        self.assertEqual(
            (yield resp.content()), b"Timeout after 1m0s, indicating that the backend request took too long"
        )


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
