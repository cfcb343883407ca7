"""
The admin page in a real headless Chromium (Debian's C{chromium}; C{.ci/run}
installs it when missing, and without it this test skips saying so).

One relay server with the view on, real relay-clients and users over
loopback. The page must show the backends and a request in flight, pick
up a relay-client that connects later without a reload, and show an error
row for a 504. A screenshot is saved as the test's artifact: its path is
printed, in C{$RELAY_TEST_ARTIFACTS} (default: the system's temporary
folder).
"""

import os
import tempfile
import time
from random import Random

import pytest
import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web import server
from twisted.web.client import HTTPConnectionPool

from relay.proto.http_relay_pb2 import HttpRequest
from relay.server.admin import TokenCheck, attach_admin
from tests.support import RelayServer, admin_stats, raw_connect, started_client
from tests.support.admin import Hanging
from tests.support.chromium import Chromium, find_chromium

pytestmark = pytest.mark.process

TOKEN = "browser-token"
CHROMIUM = find_chromium()


def artifact(name: str) -> str:
    folder = os.environ.get("RELAY_TEST_ARTIFACTS") or tempfile.gettempdir()
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


class PageCase(unittest.TestCase):
    """Helpers for a relay server with the view on, a backend, and relay-clients."""

    timeout = 120
    if CHROMIUM is None:
        skip = "no chromium on PATH (apt-get install chromium; .ci/run does this as root)"

    def start_client(self, name: str):
        started_client(self, self.relay.base, name, "127.0.0.1:%d" % (self.backend.getHost().port,))
        return self.relay.polling(name)

    @defer.inlineCallbacks
    def get(self, name: str, path: str):
        response = yield treq.get(self.relay.url("/client/%s%s" % (name, path)), pool=self.users)
        yield response.content()
        return response.code

    def start_relay(self, flags):
        """A relay on C{self.clock} with the admin view on, behind L{TOKEN}."""
        self.relay = RelayServer(clock=self.clock)
        self.addCleanup(self.relay.stop)
        self.admin = attach_admin(
            self.relay.service,
            reactor,
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
            check=TokenCheck(TOKEN.encode()),
            flags=flags,
        )
        self.admin_base = "http://127.0.0.1:%d" % (self.admin.port.getHost().port,)


class AdminPage(PageCase):
    def setUp(self):
        # The server's timeouts on a Clock set to the wall clock, so that
        # the test steps to a 504 and the page shows real times.
        self.clock = Clock()
        self.clock.advance(time.time())
        self.start_relay({"port": "0", "inactive_request_timeout": 60.0})
        self.backend_resource = Hanging()
        self.backend = reactor.listenTCP(0, server.Site(self.backend_resource), interface="127.0.0.1")
        self.addCleanup(self.backend.stopListening)
        self.users = HTTPConnectionPool(reactor, persistent=False)

    @defer.inlineCallbacks
    def test_page_renders_updates_live_and_shows_errors(self):
        yield self.start_client("robot-1")
        for _ in range(3):
            self.assertEqual((yield self.get("robot-1", "/ok")), 200)
        # A 504: the backend never answers, the request goes inactive.
        hang = self.get("robot-1", "/hang")
        yield self.relay.when(lambda: any(p.picked_up for p in self.relay.broker.requests.values()))
        self.clock.advance(61)
        self.relay.broker.reap()
        self.assertEqual((yield hang), 504)
        # A streaming request that stays in flight.
        user = yield raw_connect(self.relay.port)
        self.addCleanup(user.transport.abortConnection)
        user.transport.write(b"GET /client/robot-1/stream HTTP/1.1\r\nHost: relay\r\n\r\n")
        yield user.wait_for(b"xxxx")

        browser = Chromium(CHROMIUM)
        self.addCleanup(browser.close)
        yield browser.open(self.admin_base + "/?token=" + TOKEN)
        yield browser.wait_for("!!document.querySelector('#backends tr[data-backend=\"robot-1\"]')")
        yield browser.wait_for("!!document.querySelector('#inflight tr[data-state=\"streaming\"]')")
        state = yield browser.evaluate("document.querySelector('#backends tr[data-backend=\"robot-1\"]').dataset.state")
        self.assertEqual(state, "connected")
        page_id = yield browser.evaluate("document.body.dataset.pageId")
        bytes_out = yield browser.evaluate("document.querySelector('#inflight td.bytes-out').textContent")
        self.assertTrue(bytes_out and bytes_out != "0 B", bytes_out)

        # A relay-client connects: the page shows it without a reload.
        yield self.start_client("robot-2")
        yield browser.wait_for("!!document.querySelector('#backends tr[data-backend=\"robot-2\"]')")
        self.assertEqual((yield browser.evaluate("document.body.dataset.pageId")), page_id)
        self.assertGreater(int((yield browser.evaluate("document.body.dataset.updates"))), 1)

        # The backend's panel lists the 504 as an error row.
        yield browser.evaluate("document.querySelector('#backends tr[data-backend=\"robot-1\"]').click()")
        yield browser.wait_for("!!document.querySelector('#recent-errors tr.error[data-status=\"504\"]')")
        kind = yield browser.evaluate("document.querySelector('#recent-errors tr.error td.kind').textContent")
        self.assertEqual(kind, "504")
        self.assertEqual((yield browser.evaluate("document.querySelector('#banner').hidden")), True)

        path = yield browser.screenshot(artifact("relay-admin.png"))
        print("admin page screenshot: " + path)
        self.assertGreater(os.path.getsize(path), 10000)

    @defer.inlineCallbacks
    def test_ten_thousand_backends_are_paged_sorted_and_filtered(self):
        from relay.server.broker import Backend
        from relay.server.pending import Waiters

        broker = self.relay.broker
        for i in range(10000):
            name = "robot-%05d" % (i,)
            broker.backends[name] = Backend(name, broker.clock.seconds(), Waiters(broker.clock, 30.0, lambda d: None))
            admin_stats(broker).poll_from(name, "10.0.%d.%d" % (i // 256, i % 256))
        browser = Chromium(CHROMIUM)
        self.addCleanup(browser.close)
        yield browser.open(self.admin_base + "/?token=" + TOKEN)
        rows = "document.querySelectorAll('#backends tbody tr')"
        first = "document.querySelector('#backends tbody tr').dataset.backend"
        yield browser.wait_for("document.querySelector('#page').textContent === '1–50 of 10000'")
        self.assertEqual((yield browser.evaluate(rows + ".length")), 50)
        yield browser.evaluate("document.querySelector('#next').click()")
        yield browser.wait_for("document.querySelector('#page').textContent === '51–100 of 10000'")
        self.assertEqual((yield browser.evaluate(first)), "robot-00050")
        yield browser.evaluate("document.querySelector('#backends th[data-sort=\"name\"]').click()")
        yield browser.wait_for(first + " === 'robot-09999'")
        yield browser.evaluate(
            "var f = document.querySelector('#filter'); f.value = 'robot-0123';"
            "f.dispatchEvent(new Event('input'))"
        )
        yield browser.wait_for(rows + ".length === 10 && " + first + " === 'robot-01239'")
        path = yield browser.screenshot(artifact("relay-admin-10000.png"))
        print("admin page screenshot: " + path)


class BusyRelayPage(PageCase):
    """
    A relay with five minutes of history, for the sparklines (and for the
    screenshot in docs/server.md): the server's clock is a L{Clock} set to
    the wall clock, stepped through the buckets while finished requests
    are fed to the statistics directly.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(time.time() - 300)
        self.start_relay({"port": "8080", "admin_port": "8081", "admin_token_file": "<redacted>"})
        self.backend_resource = Hanging()
        self.backend = reactor.listenTCP(0, server.Site(self.backend_resource), interface="127.0.0.1")
        self.addCleanup(self.backend.stopListening)
        self.users = HTTPConnectionPool(reactor, persistent=False)

    def history(self):
        from relay.server.broker import Backend
        from relay.server.pending import Waiters
        from tests.support.admin import _Pending

        broker = self.relay.broker
        stats = admin_stats(broker)
        names = ["arm-%02d" % (i,) for i in range(1, 9)] + ["dock-1", "dock-2", "lidar-7", "robot-1"]
        random = Random(16)
        for name in names:
            broker.backends[name] = Backend(name, self.clock.seconds(), Waiters(self.clock, 30.0, lambda d: None))
            stats.poll_from(name, "10.8.0.%d" % (random.randint(2, 250),))
        count = 0
        for step in range(60):  # 5 minutes in 5 s steps
            for name in names:
                busy = 1 + (sum(map(ord, name)) % 5) + (3 if 20 < step < 35 and name.startswith("arm") else 0)
                if name == "lidar-7" and step > 45:
                    busy = 0  # idle for the last minute
                for _ in range(random.randint(0, busy)):
                    count += 1
                    code = random.choice([200] * 60 + [504, 503, 500]) if name != "lidar-7" else 200
                    pending = _Pending(0, name, "%s:%032x" % (name, count), code, False)
                    pending.start = self.clock.seconds() - random.lognormvariate(-4 + (step > 40), 0.6)
                    message = HttpRequest(
                        method=random.choice(["GET", "GET", "POST"]),
                        url="http://invalid/api/v1/" + random.choice(["state", "joints", "map?tile=7"]),
                    )
                    stats.request_queued(pending, message)
                    stats.request_finished(pending, pending.sink.outcome())
            self.clock.advance(5)
            for name in names:
                if name != "dock-2" or step < 30:
                    stats.poll_from(name, None)
        stats.backend_forgotten("dock-2")
        del broker.backends["dock-2"]
        for name in names:
            if name not in ("dock-2", "robot-1"):
                for _ in range(1 + sum(map(ord, name)) % 3):
                    broker.get_request(name)  # polls waiting, as relay-clients' would
                stats.poll_from(name, None)

    @defer.inlineCallbacks
    def test_sparklines_of_a_busy_relay(self):
        self.history()
        yield self.start_client("robot-1")
        user = yield raw_connect(self.relay.port)
        self.addCleanup(user.transport.abortConnection)
        user.transport.write(b"GET /client/robot-1/stream?follow=1 HTTP/1.1\r\nHost: relay\r\n\r\n")
        yield user.wait_for(b"xxxx")
        hang = self.get("robot-1", "/hang")
        hang.addErrback(lambda _: None)
        self.addCleanup(hang.cancel)  # or the drain waits for it
        yield self.relay.when(lambda: len(self.relay.broker.requests) == 2)
        self.clock.advance(2.5)  # ages, and "last poll … ago"
        browser = Chromium(CHROMIUM, height=1200)
        self.addCleanup(browser.close)
        yield browser.open(self.admin_base + "/?token=" + TOKEN + "&backend=arm-03")
        yield browser.wait_for("document.querySelectorAll('#backends tbody tr').length === 12")
        yield browser.wait_for("document.querySelectorAll('#inflight tbody tr').length === 2")
        yield browser.wait_for("!!document.querySelector('#recent-errors tr.error')")
        # A rate line of many points for a busy backend, and a p99 line.
        points = yield browser.evaluate(
            "document.querySelector('#backends tr[data-backend=\"arm-03\"] svg.rate polyline')"
            ".getAttribute('points').split(' ').length"
        )
        self.assertGreater(points, 20)
        self.assertTrue((yield browser.evaluate(
            "!!document.querySelector('#backends tr[data-backend=\"arm-03\"] svg.p99 polyline')")))
        states = yield browser.evaluate(
            "Array.from(document.querySelectorAll('#backends tbody tr')).map(r => r.dataset.state).join(' ')"
        )
        self.assertEqual(sorted(set(states.split())), ["connected", "gone", "idle"])
        path = yield browser.screenshot(artifact("relay-admin-busy.png"))
        print("admin page screenshot: " + path)
