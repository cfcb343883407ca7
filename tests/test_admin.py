"""
The admin view: C{/api/status} as real relay-clients and users
over loopback make it change, its bounds, its redaction, and its port.

The server's timeouts run on a L{Clock} where a test needs to step through
them (a 504 after the inactive-request timeout, a 503 after the pickup
timeout, a backend forgotten, a minute passing); the relay-client, the
backend and the user run on the real reactor.
"""

import json
import os
import shutil
import tempfile
import time

import pytest
import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial import unittest
from twisted.web import server
from twisted.web.client import HTTPConnectionPool

from relay.config import ServerConfig
from relay.proto.http_relay_pb2 import HttpRequest
from relay.server import tap
from relay.server.admin import AdminStats, TokenCheck, admin_endpoint, attach_admin
from relay.server.admin.stats import DEFAULT_RING, redact_headers
from relay.server.admin.status import Query, effective_flags, snapshot
from relay.server.broker import Backend, Broker
from relay.server.events import Outcome
from relay.server.pending import Waiters
from tests.support import RelayServer, raw_connect, started_client, tick
from tests.support.admin import SECRET, Hanging, _Pending, _Sink
from tests.support.engines import on_each_engine
from tests.support.ports import reserve_port


class AdminCase(unittest.TestCase):
    """A relay server with the admin view on, a backend, and helpers."""

    timeout = 60
    token = None
    inspect_headers = False

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)  # wall-clock-like times in the JSON
        self.relay = RelayServer(clock=self.clock, inactive_backend_timeout=300.0)
        self.addCleanup(self.relay.stop)
        self.admin = attach_admin(
            self.relay.service,
            reactor,
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
            check=TokenCheck(self.token.encode() if self.token else None),
            flags={"port": "0", "admin_token_file": "<redacted>"},
            keep_headers=self.inspect_headers,
        )
        self.admin_base = "http://127.0.0.1:%d" % (self.admin.port.getHost().port,)
        self.stats = self.admin.stats
        self.backend_resource = Hanging()
        self.backend = reactor.listenTCP(0, server.Site(self.backend_resource), interface="127.0.0.1")
        self.addCleanup(self.backend.stopListening)
        self.addCleanup(self._close_hanging)
        self.users = HTTPConnectionPool(reactor, persistent=False)

    def _close_hanging(self):
        for call in self.backend_resource.calls:
            if call.active():
                call.cancel()
        for request in self.backend_resource.open:
            if not request.finished and not request._disconnected:
                request.transport.abortConnection()

    def start_client(self, name: str, address: str = None):
        return started_client(self, self.relay.base, name, address or "127.0.0.1:%d" % (self.backend.getHost().port,))

    def polled(self, name: str):
        return self.relay.polling(name)

    def user(self, name: str, path: str, **kw):
        return treq.get(self.relay.url("/client/%s%s" % (name, path)), pool=self.users, **kw)

    @defer.inlineCallbacks
    def status(self, query: str = "", headers=None):
        headers = headers or ({"Authorization": ["Bearer " + self.token]} if self.token else {})
        response = yield treq.get(self.admin_base + "/api/status" + query, headers=headers, pool=self.users)
        body = yield response.content()
        self.assertEqual(response.code, 200, body)
        return json.loads(body)

    @defer.inlineCallbacks
    def backend_status(self, name: str):
        data = yield self.status("?backend=" + name)
        return data["detail"]

    @defer.inlineCallbacks
    def until_status(self, predicate, query="", timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            data = yield self.status(query)
            if predicate(data):
                return data
            if time.monotonic() > deadline:
                raise AssertionError("status never matched: %s" % (json.dumps(data)[:2000],))
            yield tick()  # the admin API is what is polled here


@pytest.mark.socket
class StatusWithRealClients(AdminCase):
    @defer.inlineCallbacks
    def test_connects_serves_goes_idle_and_is_forgotten(self):
        client = self.start_client("robot")
        yield self.polled("robot")
        b = yield self.backend_status("robot")
        self.assertEqual(b["state"], "idle")
        self.assertEqual(b["open_polls"], 1)
        self.assertEqual([c["peer"] for c in b["relay_clients"]], ["127.0.0.1"])
        self.assertFalse(b["forgotten"])
        self.assertEqual(b["first_poll"], self.clock.seconds())

        response = yield self.user("robot", "/ok?user=alice")
        self.assertEqual((yield response.content()), b"fine")
        b = yield self.backend_status("robot")
        self.assertEqual(b["state"], "connected")
        self.assertEqual(b["totals"]["requests"], 1)
        self.assertEqual(b["last_minute"]["requests"], 1)
        self.assertIsNotNone(b["last_minute"]["p50"])
        self.assertEqual(b["series"]["rate"][-1], 0.1)  # one request in a 10 s bucket
        [r] = b["recent"]
        self.assertEqual((r["method"], r["path"], r["status"], r["kind"]), ("GET", "/ok?<redacted>", 200, "ok"))
        self.assertEqual(r["bytes_out"], 4)
        self.assertNotIn("request_headers", r)

        # A minute without traffic: idle. The clock's step also ends the
        # open poll (30 s), and the relay-client polls again at once.
        self.clock.advance(61)
        yield self.polled("robot")
        b = yield self.backend_status("robot")
        self.assertEqual((b["state"], b["last_minute"]["requests"], b["totals"]["requests"]), ("idle", 0, 1))

        # The relay-client goes: gone, then forgotten, with its history.
        yield client.stopService()
        yield self.relay.when(lambda: not self.relay.broker.backends["robot"].polls)
        self.clock.advance(11)
        b = yield self.backend_status("robot")
        self.assertEqual((b["state"], b["open_polls"], b["forgotten"]), ("gone", 0, False))
        self.clock.advance(300)
        self.relay.broker.reap()
        self.assertNotIn("robot", self.relay.broker.backends)
        data = yield self.status()
        [b] = data["backends"]["items"]
        self.assertEqual((b["name"], b["state"], b["forgotten"]), ("robot", "gone", True))
        self.assertEqual(len(b["recent"]), 1)
        self.assertEqual((data["totals"]["backends"], data["totals"]["forgotten"], data["totals"]["gone"]), (0, 1, 1))

        # A request for it now is one for an unknown backend.
        response = yield self.user("robot", "/ok?key=" + SECRET)
        self.assertEqual(response.code, 503)
        data = yield self.status()
        self.assertEqual(data["totals"]["unknown_backend_requests"], 1)
        self.assertEqual(data["unknown_backends"][0]["path"], "/ok?<redacted>")

    @defer.inlineCallbacks
    def test_in_flight_streaming_request_with_growing_byte_counts(self):
        self.start_client("robot")
        yield self.polled("robot")
        user = yield raw_connect(self.relay.port)
        user.transport.write(b"GET /client/robot/stream?sig=%s HTTP/1.1\r\nHost: relay\r\n\r\n" % (SECRET.encode(),))
        data = yield self.until_status(
            lambda s: s["in_flight"]["items"] and s["in_flight"]["items"][0]["bytes_out"] > 0
        )
        [first] = data["in_flight"]["items"]
        self.assertEqual(first["backend"], "robot")
        self.assertEqual((first["method"], first["path"], first["state"]), ("GET", "/stream?<redacted>", "streaming"))
        self.assertTrue(first["id"].startswith("robot:"))
        self.assertEqual(data["totals"]["in_flight"], 1)
        data = yield self.until_status(lambda s: s["in_flight"]["items"][0]["bytes_out"] > first["bytes_out"] + 2000)
        self.clock.advance(3)
        data = yield self.status()
        self.assertGreaterEqual(data["in_flight"]["items"][0]["age"], 3)
        b = yield self.backend_status("robot")
        self.assertEqual(b["in_flight"], 1)
        self.assertEqual([r["id"] for r in b["in_flight_requests"]["items"]], [first["id"]])
        self.assertEqual(b["state"], "connected")
        user.transport.abortConnection()  # the user walks away
        data = yield self.until_status(lambda s: not s["in_flight"]["items"])
        b = yield self.backend_status("robot")
        [r] = b["recent"]
        self.assertEqual((r["kind"], r["status"]), ("cancelled", 200))
        self.assertGreater(r["bytes_out"], 2000)
        self.assertEqual(b["totals"]["cancelled"], 1)
        self.assertEqual(b["recent_errors"], [])

    @defer.inlineCallbacks
    def test_upgraded_request_counts_both_ways(self):
        from tests.support.e2e import Backend as EchoBackend
        from tests.support.e2e import make_frame

        echo = EchoBackend()
        self.addCleanup(echo.stop)
        self.start_client("ws", address=echo.address)
        yield self.polled("ws")
        user = yield raw_connect(self.relay.port)
        self.addCleanup(user.transport.abortConnection)
        user.transport.write(
            b"GET /client/ws/chat?k=v HTTP/1.1\r\nHost: relay\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        yield user.wait_for(b"101 Switching Protocols")
        user.transport.write(make_frame(1, b"hello", mask=True))
        yield user.wait_for(b"hello")
        data = yield self.until_status(
            lambda s: s["in_flight"]["items"] and s["in_flight"]["items"][0]["bytes_out"] >= 7
        )
        [item] = data["in_flight"]["items"]
        self.assertEqual((item["state"], item["path"], item["bytes_in"]), ("upgraded", "/chat?<redacted>", 11))
        user.transport.write(make_frame(8, b"", mask=True))  # close
        yield user.ended
        yield self.until_status(lambda s: not s["in_flight"]["items"])
        b = yield self.backend_status("ws")
        [r] = b["recent"]
        self.assertEqual((r["status"], r["kind"], r["bytes_in"]), (101, "ok", 17))

    @defer.inlineCallbacks
    def test_waiting_for_pickup_then_503(self):
        client = self.start_client("robot")
        yield self.polled("robot")
        yield client.stopService()
        yield self.relay.when(lambda: not self.relay.broker.backends["robot"].polls)
        d = self.user("robot", "/ok")
        data = yield self.until_status(lambda s: s["in_flight"]["items"])
        self.assertEqual(data["in_flight"]["items"][0]["state"], "waiting_for_pickup")
        self.clock.advance(10)  # the pickup timeout
        response = yield d
        self.assertEqual(response.code, 503)
        b = yield self.backend_status("robot")
        self.assertEqual(b["errors"], {"503": 1, "504": 0, "500": 0, "truncated": 0})
        [r] = b["recent_errors"]
        self.assertEqual((r["status"], r["kind"], r["path"]), (503, "503", "/ok"))
        self.assertEqual(b["last_minute"]["errors"], 1)

    @defer.inlineCallbacks
    def test_504_truncated_and_500_counted_under_their_kinds(self):
        self.start_client("robot")
        yield self.polled("robot")
        # 504: the backend never answers.
        d = self.user("robot", "/hang")
        yield self.until_status(lambda s: [r for r in s["in_flight"]["items"] if r["state"] == "waiting_for_backend"])
        self.clock.advance(61)
        self.relay.broker.reap()
        response = yield d
        self.assertEqual(response.code, 504)
        # Truncated: 10 of the 100 bytes promised, and once the user has
        # the head, the backend hangs up. The user's connection is
        # aborted: nothing that looks complete.
        response = yield self.user("robot", "/short")
        self.backend_resource.open[-1].transport.loseConnection()
        try:
            yield response.content()
        except Exception:
            pass
        else:
            self.fail("a truncated answer looked complete")
        # 500: the relay-client cannot reach its backend.
        self.start_client("robot-500", address="127.0.0.1:%d" % (reserve_port(self),))
        yield self.polled("robot-500")
        response = yield self.user("robot-500", "/ok")
        self.assertEqual(response.code, 500)
        yield response.content()

        b = yield self.backend_status("robot")
        self.assertEqual(b["errors"], {"503": 0, "504": 1, "500": 0, "truncated": 1})
        self.assertEqual([(r["kind"], r["status"]) for r in b["recent_errors"]], [("truncated", 200), ("504", 504)])
        self.assertEqual(b["recent_errors"][0]["bytes_out"], 10)
        b = yield self.backend_status("robot-500")
        self.assertEqual(b["errors"], {"503": 0, "504": 0, "500": 1, "truncated": 0})
        self.assertEqual(b["recent"][0]["status"], 500)

    @defer.inlineCallbacks
    def test_sorting_and_paging(self):
        for name in ("b", "a", "c"):
            self.relay.broker.get_request(name)
            self.stats.poll_from(name, "10.0.0.1")
        self.stats.poll_from("c", "10.0.0.2")
        data = yield self.status("?limit=2&sort=name&order=desc&recent=0")
        page = data["backends"]
        self.assertEqual((page["total"], [b["name"] for b in page["items"]]), (3, ["c", "b"]))
        self.assertNotIn("recent", page["items"][0])
        self.assertEqual([c["peer"] for c in page["items"][0]["relay_clients"]], ["10.0.0.2", "10.0.0.1"])
        data = yield self.status("?limit=2&offset=2&sort=name&order=desc")
        self.assertEqual([b["name"] for b in data["backends"]["items"]], ["a"])
        data = yield self.status("?q=b")
        self.assertEqual([b["name"] for b in data["backends"]["items"]], ["b"])


@pytest.mark.socket
class InspectHeaders(AdminCase):
    inspect_headers = True

    @defer.inlineCallbacks
    def test_headers_kept_and_credentials_redacted(self):
        self.start_client("robot")
        yield self.polled("robot")
        response = yield self.user(
            "robot",
            "/echo?token=" + SECRET,
            headers={
                "Authorization": ["Bearer " + SECRET],
                "Cookie": ["id=" + SECRET],
                "X-Relay-Token": [SECRET],
                "Private-Token": [SECRET],
                "X-Amz-Security-Token": [SECRET],
                "X-Visible": ["plain"],
            },
        )
        yield response.content()
        data = yield self.status()
        text = json.dumps(data)
        self.assertNotIn(SECRET, text)
        [r] = data["backends"]["items"][0]["recent"]
        request = dict(r["request_headers"])
        self.assertEqual(request["Authorization"], "<redacted>")
        self.assertEqual(request["Cookie"], "<redacted>")
        self.assertEqual(request["X-Relay-Token"], "<redacted>")
        self.assertEqual(request["Private-Token"], "<redacted>")
        self.assertEqual(request["X-Amz-Security-Token"], "<redacted>")
        self.assertEqual(request["X-Visible"], "plain")
        response_headers = {k.lower(): v for k, v in r["response_headers"]}
        self.assertEqual(response_headers["set-cookie"], "<redacted>")
        self.assertEqual(response_headers["x-vault-token"], "<redacted>")
        self.assertEqual(response_headers["x-backend"], "visible")
        self.assertEqual(r["path"], "/echo?<redacted>")


@pytest.mark.memory
class SecretHeaderNames(unittest.TestCase):
    """
    Which header names hide their values: any whose name says it holds a
    credential, whatever backend invented it, in any case; the headers an
    operator reads to understand a request stay visible.
    """

    def shown(self, name, extra=()):
        [(_, value)] = redact_headers([(name, SECRET)], extra)
        return value == SECRET

    def test_credentials_by_name_in_any_case(self):
        for name in [
            "Authorization",
            "proxy-authorization",
            "COOKIE",
            "Set-Cookie",
            "X-Relay-Token",
            "Private-Token",
            "X-Vault-Token",
            "x-amz-security-token",
            "X-Amz-Signature",
            "X-Amz-Credential",
            "X-Api-Key",
            "X-APIKEY",
            "X-Goog-Api-Key",
            "X-Auth-Token",
            "X-Authtoken",
            "X-Csrf-Token",
            "X-Client-Secret",
            "X-Hub-Signature-256",
            "X-Session-Id",
            "X-Password",
            "X-Db-Passwd",
            "X-Goog-IAP-JWT-Assertion",
            "Sec-WebSocket-Key",
            "WWW-Authenticate",
        ]:
            self.assertFalse(self.shown(name), name)

    def test_ordinary_headers_shown(self):
        for name in [
            "Keep-Alive",
            "Connection",
            "Host",
            "Content-Type",
            "Content-Length",
            "Content-Security-Policy",
            "Accept",
            "Accept-Encoding",
            "Cache-Control",
            "User-Agent",
            "X-Forwarded-For",
            "X-Request-Id",
            "Sec-WebSocket-Accept",
            "Sec-WebSocket-Protocol",
            "Upgrade",
            "Trailer",
        ]:
            self.assertTrue(self.shown(name), name)

    def test_extra_names(self):
        self.assertFalse(self.shown("X-Remote-User", extra=frozenset(["x-remote-user"])))
        self.assertTrue(self.shown("X-Remote-User"))


@pytest.mark.socket
class NoToken(AdminCase):
    @defer.inlineCallbacks
    def test_without_a_token_only_ip_or_localhost_hosts(self):
        port = self.admin.port.getHost().port
        for host, code in [
            ("127.0.0.1:%d" % (port,), 200),
            ("localhost:%d" % (port,), 200),
            ("[::1]:%d" % (port,), 200),
            ("10.1.2.3", 200),
            ("rebind.example:%d" % (port,), 403),
            ("127.0.0.1.nip.io", 403),
        ]:
            response = yield treq.get(self.admin_base + "/api/status", headers={"Host": [host]}, pool=self.users)
            body = yield response.content()
            self.assertEqual(response.code, code, (host, body))


@pytest.mark.socket
class AdminPort(AdminCase):
    token = "admin-" + SECRET

    @defer.inlineCallbacks
    def get(self, url, **kw):
        response = yield treq.get(url, pool=self.users, allow_redirects=False, **kw)
        body = yield response.content()
        return response, body

    @defer.inlineCallbacks
    def test_refuses_without_the_token(self):
        for path in ("/", "/api/status", "/admin.js", "/admin.css", "/nothing"):
            response, body = yield self.get(self.admin_base + path)
            self.assertEqual(response.code, 401, path)
            self.assertEqual(response.headers.getRawHeaders(b"www-authenticate"), [b'Bearer realm="relay admin"'])
            response, _ = yield self.get(self.admin_base + path, headers={"Authorization": ["Bearer wrong"]})
            self.assertEqual(response.code, 401, path)
        response, _ = yield self.get(
            self.admin_base + "/api/status", headers={"Authorization": ["Bearer " + self.token]}
        )
        self.assertEqual(response.code, 200)
        response, _ = yield self.get(self.admin_base + "/?token=wrong")
        self.assertEqual(response.code, 401)
        response, _ = yield self.get(self.admin_base + "/?backend=robot%201&token=" + self.token)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/?backend=robot+1"])

    @defer.inlineCallbacks
    def test_browser_login_sets_a_cookie_and_leaves_the_address_bar(self):
        response, _ = yield self.get(self.admin_base + "/?token=" + self.token)
        self.assertEqual(response.code, 303)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/"])
        [cookie] = response.headers.getRawHeaders(b"set-cookie")
        self.assertIn(b"HttpOnly", cookie)
        self.assertIn(b"SameSite=strict", cookie)
        value = cookie.split(b";")[0].decode()
        response, body = yield self.get(self.admin_base + "/", headers={"Cookie": [value]})
        self.assertEqual(response.code, 200)
        self.assertIn(b"<title>relay", body)
        self.assertIn(b"script-src 'self'", response.headers.getRawHeaders(b"content-security-policy")[0])
        response, body = yield self.get(self.admin_base + "/admin.js", headers={"Cookie": [value]})
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/javascript; charset=utf-8"])
        self.assertIn(b"/api/status", body)
        response, _ = yield self.get(self.admin_base + "/api/status", headers={"Cookie": ["relay_admin=nope"]})
        self.assertEqual(response.code, 401)

    @defer.inlineCallbacks
    def test_content_never_on_the_user_port(self):
        self.start_client("robot")
        yield self.polled("robot")
        auth = {"Authorization": ["Bearer " + self.token]}
        for path in ("/", "/api/status", "/admin.js", "/admin.css", "/?token=" + self.token):
            response, body = yield self.get(self.relay.url(path), headers=auth)
            self.assertEqual(response.code, 400, path)
            self.assertNotIn(b"relay \xc2\xb7 live view", body)
            self.assertNotIn(b"backends", body)
            self.assertEqual(response.headers.getRawHeaders(b"set-cookie"), None)
            # With a backend named, the path is the backend's, as in Go.
            response, body = yield self.get(self.relay.url(path), headers=dict(auth, **{"X-Server-Name": ["robot"]}))
            self.assertEqual((response.code, body), (404, b"no"), path)


@pytest.mark.memory
class Bounds(unittest.SynchronousTestCase):
    """The statistics, driven directly: 100,000 requests in no time."""

    def finish(self, stats, name, i, code=200, truncated=False):
        pending = _Pending(stats.clock.seconds(), name, "%s:%032x" % (name, i), code, truncated)
        message = HttpRequest(method="GET", url="http://invalid/item/%d?secret=x" % (i,))
        stats.request_queued(pending, message)
        stats.clock.advance(0.001)
        stats.request_finished(pending, pending.sink.outcome())

    def test_ring_buffers_stay_at_their_bounds(self):
        clock = Clock()
        stats = AdminStats(clock, ring=50, error_ring=20, total=2000)
        names = ["robot-%d" % (i,) for i in range(100)]
        for name in names:
            stats.poll_from(name, "127.0.0.1")
        for i in range(100000):
            self.finish(stats, names[i % 7] if i % 2 else names[i % 100], i, 504 if i % 10 == 0 else 200)
        self.assertEqual(len(stats.records), 2000)
        for name in names:
            b = stats.backends[name]
            self.assertLessEqual(len(b.recent), 50)
            self.assertLessEqual(len(b.recent_errors), 20)
            self.assertLessEqual(len(b.series), 30)
        # The overall cap holds every ring record: none is outside it.
        alive = {id(r) for r in stats.records}
        for b in stats.backends.values():
            self.assertTrue(all(id(r) in alive for r in b.recent))
            self.assertTrue(all(id(r) in alive for r in b.recent_errors))
        # The newest are the ones kept.
        self.assertEqual(stats.records[-1].path, "/item/99999?<redacted>")
        self.assertIs(stats.backends["robot-4"].recent[-1], stats.records[-1])
        self.assertEqual(sum(b.requests for b in stats.backends.values()), 100000)
        self.assertEqual(sum(b.errors["504"] for b in stats.backends.values()), 10000)

    def test_memory_stops_growing_at_the_bounds(self):
        import gc

        try:
            import tracemalloc
        except ImportError:
            raise unittest.SkipTest("no tracemalloc here (PyPy): the ring bounds test counts records instead") from None

        clock = Clock()
        stats = AdminStats(clock, total=5000)
        names = ["robot-%d" % (i,) for i in range(50)]
        for name in names:
            stats.poll_from(name, "127.0.0.1")
        tracemalloc.start()
        try:
            for i in range(10000):
                self.finish(stats, names[i % 50], i, 504 if i % 3 == 0 else 200)
            gc.collect()
            at_10k = tracemalloc.get_traced_memory()[0]
            for i in range(10000, 50000):
                self.finish(stats, names[i % 50], i, 504 if i % 3 == 0 else 200)
            gc.collect()
            at_50k = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        # Five times the requests, the same memory (give or take the
        # time buckets of the latest minutes).
        self.assertLess(at_50k - at_10k, 256 * 1024, (at_10k, at_50k))

    def test_overload_and_unknown_names_are_counted_within_bounds(self):
        from relay.server.admin import stats as module
        from relay.server.errors import Overloaded, UnknownBackend

        clock = Clock()
        broker = Broker(clock, ServerConfig(max_pending_per_backend=1))
        stats = AdminStats(clock)
        broker.add_observer(stats)
        broker.get_request("robot")
        broker.poll_from("robot", None)
        broker.relay("robot", HttpRequest(method="GET", url="http://invalid/a"), _Sink(200, False))
        self.assertRaises(Overloaded, broker.relay, "robot", HttpRequest(method="GET", url="http://invalid/b"), None)
        b = stats.backends["robot"]
        self.assertEqual((b.errors["503"], b.recent[-1].status, b.recent_errors[-1].kind), (1, 503, "503"))
        for i in range(module.UNKNOWN_RING * 3):
            self.assertRaises(
                UnknownBackend,
                broker.relay,
                "x" * 1000 + str(i),
                HttpRequest(method="GET", url="http://invalid/?q"),
                None,
            )
        self.assertEqual(stats.unknown_requests, module.UNKNOWN_RING * 3)
        self.assertEqual(len(stats.unknown_recent), module.UNKNOWN_RING)
        self.assertEqual(len(stats.unknown_recent[-1][1]), module.MAX_TEXT + 1)
        self.assertEqual(stats.unknown_recent[-1][3], "/?<redacted>")
        self.assertEqual(list(stats.backends), ["robot"])

    def test_default_ring_per_backend(self):
        clock = Clock()
        stats = AdminStats(clock)
        stats.poll_from("robot", None)
        for i in range(DEFAULT_RING * 3):
            self.finish(stats, "robot", i)
        self.assertEqual(len(stats.backends["robot"].recent), DEFAULT_RING)

    def test_forgotten_backends_are_capped(self):
        from relay.server.admin import stats as module

        clock = Clock()
        stats = AdminStats(clock)
        for i in range(module.FORGOTTEN + 10):
            stats.poll_from("r%d" % (i,), None)
            stats.backend_forgotten("r%d" % (i,))
        self.assertEqual(len(stats.forgotten), module.FORGOTTEN)
        self.assertEqual(stats.backends, {})

    def test_ten_thousand_backends_page_quickly(self):
        clock = Clock()
        broker = Broker(clock, ServerConfig())
        stats = AdminStats(clock)
        broker.add_observer(stats)
        for i in range(10000):
            name = "robot-%05d" % (i,)
            # Known to the broker as a poll would make it (a Clock's
            # callLater sorts its calls, too slow for 10,000 polls).
            broker.backends[name] = Backend(name, clock.seconds(), Waiters(clock, 30.0, lambda d: None))
            stats.poll_from(name, "10.0.%d.%d" % (i // 256, i % 256))
            self.finish(stats, name, i)
        data = snapshot(
            broker,
            stats,
            {},
            Query({b"limit": [b"50"], b"offset": [b"100"], b"sort": [b"p99"], b"order": [b"desc"], b"recent": [b"0"]}),
        )
        self.assertEqual(data["backends"]["total"], 10000)
        self.assertEqual(len(data["backends"]["items"]), 50)
        self.assertEqual(data["totals"]["backends"], 10000)
        self.assertLess(len(json.dumps(data)), 200000)


@pytest.mark.process
class Flags(unittest.TestCase):
    def scratch(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        return directory

    def test_no_observer_when_the_view_is_off(self):
        self.assertEqual(Broker(Clock(), ServerConfig()).observers, ())
        relay = RelayServer()
        self.addCleanup(relay.stop)
        self.assertFalse([o for o in relay.broker.observers if isinstance(o, AdminStats)])
        self.assertEqual(sorted(s.name for s in relay.service), ["drain", "listen", "reap"])
        options = tap.Options()
        options.parseOptions(["--port=tcp:0:interface=127.0.0.1"])
        service = tap.makeService(options, reactor)
        self.assertEqual(sorted(s.name for s in service), ["drain", "listen", "reap"])
        self.assertEqual(service.broker.observers, ())

    def test_a_failing_hook_costs_the_view_not_the_request(self):
        clock = Clock()
        broker = Broker(clock, ServerConfig())
        broker.add_observer(AdminStats(clock, keep_headers=True))
        broker.get_request("robot")

        class Broken:
            """Response headers the view cannot read: stands for a bug in the view."""

            def getAllRawHeaders(self):
                raise RuntimeError("a bug")

        class Sink:
            def outcome(self):
                return Outcome(200, headers=Broken())

        pending = broker.relay("robot", HttpRequest(method="GET", url="http://invalid/"), Sink())
        broker.cancel(pending)
        self.assertEqual(broker.requests, {})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_admin_port_number_binds_loopback(self):
        self.assertEqual(admin_endpoint("8081"), "tcp:8081:interface=127.0.0.1")
        self.assertEqual(admin_endpoint("tcp:8081:interface=0.0.0.0"), "tcp:8081:interface=0.0.0.0")

    def test_off_by_default_and_checked(self):
        options = tap.Options()
        options.parseOptions([])
        self.assertIsNone(options["admin_port"])
        self.assertIsNone(options["admin_check"])
        for argv in (["--admin_token_file=x"], ["--inspect_headers"], ["--admin_port=70000"],
                     ["--admin_port=abc"], ["--admin_port=8081", "--admin_token_file=/nonexistent/token"]):
            self.assertRaises(usage.UsageError, tap.Options().parseOptions, argv)

    def test_effective_flags_redact_secrets(self):
        path = os.path.join(self.scratch(), "token")
        with open(path, "w") as f:
            f.write("tok\n")
        options = tap.Options()
        options.parseOptions(["--admin_port=0", "--admin_token_file=" + path])
        self.assertTrue(options["admin_check"].matches(b"tok"))
        self.assertFalse(options["admin_check"].matches(b"tok2"))
        flags = effective_flags(options)
        self.assertEqual(flags["admin_token_file"], "<redacted>")
        self.assertEqual(flags["log_level"], "info")
        options["client_tokens"] = path
        options["port"] = "ssl:0:privateKey=k.pem:certKey=c.pem:password=hunter2"
        flags = effective_flags(options)
        self.assertEqual(flags["client_tokens"], "<redacted>")
        self.assertNotIn("hunter2", flags["port"])
        self.assertNotIn(path, json.dumps(flags))

    @defer.inlineCallbacks
    def test_make_service_with_admin_port(self):
        path = os.path.join(self.scratch(), "token")
        with open(path, "w") as f:
            f.write("tok")
        options = tap.Options()
        options.parseOptions(
            ["--port=tcp:0:interface=127.0.0.1", "--admin_port=tcp:0:interface=127.0.0.1",
             "--admin_token_file=" + path, "--drain_grace=0"]
        )
        service = tap.makeService(options, reactor)
        service.startService()
        admin = service.getServiceNamed("admin")
        base = "http://127.0.0.1:%d" % (admin.port.getHost().port,)
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield treq.get(base + "/api/status", pool=pool)
        self.assertEqual(response.code, 401)
        yield response.content()
        response = yield treq.get(base + "/api/status", headers={"Authorization": ["Bearer tok"]}, pool=pool)
        data = yield response.json()
        self.assertEqual(data["server"]["flags"]["admin_token_file"], "<redacted>")
        self.assertEqual(data["server"]["draining"], False)
        self.assertIn(data["server"]["interpreter"].split()[0], ("CPython", "PyPy"))
        self.assertGreater(data["server"]["rss_bytes"], 0)
        self.assertGreater(data["server"]["open_fds"], 0)
        yield service.stopService()
        self.assertFalse(admin.running)


@pytest.mark.process
class Twistd(unittest.TestCase):
    """The view as an operator turns it on: relay.tac's variables under the real twistd."""

    timeout = 60

    @defer.inlineCallbacks
    def test_relay_tac_variables(self):
        from tests.support.process import ROOT, TwistdProcess

        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "token")
        with open(path, "w") as f:
            f.write("tac-token\n")
        proc = TwistdProcess.spawn(
            ["-y", os.path.join(ROOT, "relay.tac")],
            env={
                "RELAY_PORT": "tcp:0:interface=127.0.0.1",
                "RELAY_ADMIN_PORT": "tcp:0:interface=127.0.0.1",
                "RELAY_ADMIN_TOKEN_FILE": path,
                "RELAY_INSPECT_HEADERS": "1",
                "RELAY_DRAIN_GRACE": "0",
                "RELAY_LOG_FILE": "",
            },
        )
        self.addCleanup(proc.terminate)
        admin = yield proc.wait_for(r'"msg":"Admin view listening".*"Port":(\d+)')
        yield proc.wait_for(r'"msg":"Relay server listening"')
        pool = HTTPConnectionPool(reactor, persistent=False)
        url = "http://127.0.0.1:%s/api/status" % (admin.group(1),)
        response = yield treq.get(url, pool=pool)
        self.assertEqual(response.code, 401)
        yield response.content()
        response = yield treq.get(url, headers={"Authorization": ["Bearer tac-token"]}, pool=pool)
        data = yield response.json()
        flags = data["server"]["flags"]
        self.assertEqual((flags["admin_token_file"], flags["inspect_headers"]), ("<redacted>", 1))
        self.assertTrue(data["server"]["admin"]["inspect_headers"])
        self.assertEqual((yield proc.terminate()), (None, 15))


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
