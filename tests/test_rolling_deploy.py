"""
A rolling deploy as Kubernetes does it: SIGTERM to a real C{twistd -n relay}
with three relay-clients polling it (two of ours and the Go one; without
the Go binary the test is skipped) and a request in flight for each. The drain must end
within the grace period plus the requests' own time, write few log lines,
and send no relay-client into a loop of polls.

The relay-clients reach the server through a counting proxy, so that polls
answered at once (a loop) are counted even though neither side logs them.
"""

import json
import re

import pytest
import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.protocols import portforward
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import HTTPConnectionPool

from tests.support.go import GO_CLIENT, go_binary
from tests.support.process import ChildProcess, TwistdProcess

pytestmark = pytest.mark.process

GRACE = 2.0
SLOW = 3.0  # the backend's answer comes after the grace period


class SlowBackend(resource.Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.hits = 0

    def render_GET(self, request):
        self.hits += 1
        deferLater(reactor, SLOW, lambda: None).addCallback(lambda _: (request.write(b"done"), request.finish()))
        return server.NOT_DONE_YET


class PollCounter:
    """How many polls reached the server, and when."""

    def __init__(self):
        self.times = []

    def count(self, data: bytes) -> None:
        for _ in range(data.count(b"/server/request?")):
            self.times.append(reactor.seconds())

    def since(self, t: float) -> int:
        return len([x for x in self.times if x >= t])


def counting_proxy(counter: PollCounter, port: int):
    class Server(portforward.ProxyServer):
        def dataReceived(self, data):
            counter.count(data)
            super().dataReceived(data)

    factory = portforward.ProxyFactory("127.0.0.1", port)
    factory.protocol = Server
    factory.noisy = False
    return TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)


class RollingDeployTest(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_sigterm_with_three_relay_clients_and_requests_in_flight(self):
        go_binary(GO_CLIENT)
        backend = SlowBackend()
        backend_port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(backend))
        self.addCleanup(backend_port.stopListening)
        relay = TwistdProcess.spawn(
            ["relay", "--port=tcp:0:interface=127.0.0.1", "--drain_grace=%gs" % GRACE]
        )
        self.addCleanup(relay.terminate)
        port = yield relay.listening_port()
        counter = PollCounter()
        proxy = yield counting_proxy(counter, port)
        self.addCleanup(proxy.stopListening)
        relay_address = "127.0.0.1:%d" % proxy.getHost().port
        common = [
            "--backend_scheme=http",
            "--relay_scheme=http",
            "--disable_auth_for_remote",
            "--backend_address=127.0.0.1:%d" % backend_port.getHost().port,
            "--relay_address=" + relay_address,
        ]
        names = ["ours1", "ours2", "go"]
        clients = []
        for name in names[:2]:
            client = TwistdProcess.spawn(["relay-client", "--server_name=" + name] + common)
            self.addCleanup(client.terminate)
            clients.append(client)
        go = ChildProcess.spawn([GO_CLIENT, "--server_name=go"] + common)
        self.addCleanup(go.terminate)
        for name in names:
            yield relay.wait_for(r'"Relay client connected","ServerName":"%s"' % name)

        # A request in flight through each relay-client.
        users = HTTPConnectionPool(reactor, persistent=False)
        base = "http://127.0.0.1:%d" % port
        answers = [treq.get("%s/client/%s/slow" % (base, name), pool=users) for name in names]
        while backend.hits < len(names):
            yield deferLater(reactor, 0.05, lambda: None)

        lines_before = len(relay.lines)
        relay.transport.signalProcess("TERM")
        started = reactor.seconds()
        for answer in answers:
            response = yield answer
            self.assertEqual((response.code, (yield response.content())), (200, b"done"))
        code, signal = yield relay.exited
        elapsed = reactor.seconds() - started
        self.assertIn((code, signal), [(0, None), (None, 15)])

        # The drain took the requests' time (they outlast the grace period),
        # not much more.
        self.assertLess(elapsed, SLOW + 3.0)
        # Quiet: a handful of lines, none of them an error.
        drain_lines = relay.lines[lines_before:]
        self.assertLess(len(drain_lines), 20, "\n".join(drain_lines))
        records = [json.loads(line) for line in drain_lines if line.startswith("{")]
        self.assertEqual([r for r in records if r["level"] == "ERROR"], [])
        # No loop: each poll loop backs off (0.1 s growing 1.5 times), about
        # ten polls per client in these few seconds; a loop makes thousands.
        polls = counter.since(started)
        self.assertLess(polls, 15 * len(names), "polls during the drain")
        # The relay-clients are still running, waiting for a server.
        for client in clients:
            self.assertFalse(client.exited.called)
            self.assertFalse(
                [line for line in client.lines if re.search(r'"level":"(ERROR|CRITICAL)"', line)],
                client.lines,
            )
