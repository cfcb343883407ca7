"""
Access control and limits: relay-client and user tokens, per-backend and
global limits, the slowloris guard, and the headers relayed to backends.
"""

import os
import subprocess
import sys
import tempfile

import treq
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from relay.proto.http_relay_pb2 import HttpResponse
from relay.server.auth import AccessPolicy, ClientTokens, UserTokens, token_hash
from tests.support import FakeRelayClient, RelayServer, raw_connect, tick as _tick
from tests.test_server import ServerTestCase


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    # A new mtime even within the same clock tick: reloads key on it.
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1000000))


class AuthTestCase(ServerTestCase):
    client_tokens = "# relay-clients\nrobot-a  %s\nlab-*    %s\n" % (token_hash("token-a"), token_hash("token-lab"))
    user_tokens = None
    trusted_user_header = None

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        client = user = None
        if self.client_tokens is not None:
            client = os.path.join(self.tmp, "clients")
            write(client, self.client_tokens)
            client = ClientTokens(client)
        if self.user_tokens is not None:
            user = os.path.join(self.tmp, "users")
            write(user, self.user_tokens)
            user = UserTokens(user)
        self.clock = Clock()
        self.server = RelayServer(
            clock=self.clock, policy=AccessPolicy(client, user, self.trusted_user_header)
        )
        self.relay_client = FakeRelayClient(self.server)
        self.users = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self.users.closeCachedConnections)
        self.addCleanup(self.relay_client.close)
        self.addCleanup(self.server.stop)

    def as_client(self, method, path, token, **kw):
        headers = kw.pop("headers", {})
        if token is not None:
            headers[b"Authorization"] = [b"Bearer " + token.encode()]
        return treq.request(method, self.server.url(path), headers=headers, pool=self.relay_client.pool, **kw)


class ClientTokenTests(AuthTestCase):
    @defer.inlineCallbacks
    def test_poll_needs_a_token_for_that_name(self):
        for token, name in ((None, "robot-a"), ("wrong", "robot-a"), ("token-a", "robot-b"), ("token-lab", "robot-a")):
            resp = yield self.as_client("GET", "/server/request?server=" + name, token)
            self.assertEqual(resp.code, 403, (token, name))
            self.assertIn(b"Forbidden", (yield resp.content()))
        self.assertEqual(self.server.broker.backends, {})

    @defer.inlineCallbacks
    def test_glob_and_own_name_allowed(self):
        for token, name in (("token-a", "robot-a"), ("token-lab", "lab-7")):
            poll = self.as_client("GET", "/server/request?server=" + name, token)
            yield self.polling(name)
            self.clock.advance(30)
            self.assertEqual((yield poll).code, 408)

    @defer.inlineCallbacks
    def test_cannot_answer_or_stream_another_backends_requests(self):
        poll = self.as_client("GET", "/server/request?server=lab-1", "token-lab")
        yield self.polling("lab-1")
        user = self.get("/client/lab-1/secret")
        resp = yield poll
        self.assertEqual(resp.code, 200)
        from relay.proto.http_relay_pb2 import HttpRequest

        message = HttpRequest.FromString((yield resp.content()))
        # robot-a's client tries to answer lab-1's request, and read its stream.
        forged = HttpResponse(id=message.id, status_code=200, body=b"forged", eof=True).SerializeToString()
        resp = yield self.as_client("POST", "/server/response", "token-a", data=forged)
        self.assertEqual(resp.code, 403)
        yield resp.content()
        resp = yield self.as_client("POST", "/server/requeststream?id=" + message.id, "token-a", data=b"")
        self.assertEqual(resp.code, 403)
        yield resp.content()
        # The rightful client answers.
        real = HttpResponse(id=message.id, status_code=200, body=b"real", eof=True).SerializeToString()
        resp = yield self.as_client("POST", "/server/response", "token-lab", data=real)
        self.assertEqual(resp.code, 200)
        yield resp.content()
        self.assertEqual((yield (yield user).content()), b"real")

    @defer.inlineCallbacks
    def test_token_file_is_reloaded(self):
        write(os.path.join(self.tmp, "clients"), "robot-a %s\n" % (token_hash("rotated"),))
        resp = yield self.as_client("GET", "/server/request?server=robot-a", "token-a")
        self.assertEqual(resp.code, 403)
        yield resp.content()
        poll = self.as_client("GET", "/server/request?server=robot-a", "rotated")
        yield self.polling("robot-a")
        self.clock.advance(30)
        self.assertEqual((yield poll).code, 408)

    @defer.inlineCallbacks
    def test_broken_reload_keeps_previous_tokens(self):
        write(os.path.join(self.tmp, "clients"), "robot-a not-a-hash\n")
        poll = self.as_client("GET", "/server/request?server=robot-a", "token-a")
        yield self.polling("robot-a")
        self.clock.advance(30)
        self.assertEqual((yield poll).code, 408)
        self.flushLoggedErrors()


class UserTokenTests(AuthTestCase):
    client_tokens = None
    user_tokens = "%s robot-1,lab-*\n%s robot-2\n" % (token_hash("alice"), token_hash("bob"))

    @defer.inlineCallbacks
    def test_no_token_is_401_with_challenge(self):
        yield self.known("robot-1")
        resp = yield self.get("/client/robot-1/x")
        self.assertEqual(resp.code, 401)
        self.assertEqual(resp.headers.getRawHeaders(b"www-authenticate"), [b'Bearer realm="relay"'])
        yield resp.content()
        self.assertEqual(self.server.broker.requests, {})

    @defer.inlineCallbacks
    def test_token_for_other_backend_is_403(self):
        yield self.known("robot-1")
        resp = yield self.get("/client/robot-1/x", headers={b"Authorization": [b"Bearer bob"]})
        self.assertEqual(resp.code, 403)
        yield resp.content()
        # Even for names nobody serves: no 503 that would reveal which exist.
        resp = yield self.get("/client/ghost/x", headers={b"Authorization": [b"Bearer bob"]})
        self.assertEqual(resp.code, 403)
        yield resp.content()

    @defer.inlineCallbacks
    def test_bearer_token_is_consumed(self):
        user, message = yield self.relayed(
            "/client/lab-3/x", name="lab-3", headers={b"Authorization": [b"Bearer alice"]}
        )
        self.assertNotIn("Authorization", [h.name for h in message.header])
        yield self.relay_client.respond(message.id, 200, b"hi")
        self.assertEqual((yield (yield user).content()), b"hi")

    @defer.inlineCallbacks
    def test_x_relay_token_leaves_authorization_for_the_backend(self):
        user, message = yield self.relayed(
            "/client/robot-2/x",
            name="robot-2",
            headers={b"X-Relay-Token": [b"bob"], b"Authorization": [b"Basic dXNlcjpwdw=="]},
        )
        headers = [(h.name, h.value) for h in message.header]
        self.assertIn(("Authorization", "Basic dXNlcjpwdw=="), headers)
        self.assertNotIn("X-Relay-Token", [h.name for h in message.header])
        yield self.relay_client.respond(message.id, 200)
        yield (yield user).content()


class TrustedHeaderTests(AuthTestCase):
    client_tokens = None
    trusted_user_header = "X-Forwarded-User"

    @defer.inlineCallbacks
    def test_requests_need_the_proxy_header(self):
        yield self.known()
        resp = yield self.get("/client/robot/x")
        self.assertEqual(resp.code, 401)
        yield resp.content()
        user, message = yield self.relayed("/client/robot/x", headers={b"X-Forwarded-User": [b"alice@example.com"]})
        yield self.relay_client.respond(message.id, 200)
        self.assertEqual((yield user).code, 200)


class HashCommandTests(unittest.TestCase):
    def test_hash_of_stdin(self):
        from tests.process import ROOT

        env = dict(os.environ, PYTHONPATH=ROOT)
        out = subprocess.run(
            [sys.executable, "-m", "relay.server.auth", "hash"], input=b"s3cret\n", capture_output=True, check=True, env=env
        ).stdout
        self.assertEqual(out.strip().decode(), token_hash("s3cret"))


class LimitTests(unittest.TestCase):
    timeout = 30

    def start(self, **kwargs):
        self.clock = Clock()
        self.server = RelayServer(clock=self.clock, **kwargs)
        self.relay_client = FakeRelayClient(self.server)
        self.users = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.relay_client.close)
        self.addCleanup(self.server.stop)

    @defer.inlineCallbacks
    def healthy(self):
        resp = yield treq.get(self.server.url("/healthz"), pool=self.users)
        self.assertEqual((yield resp.content()), b"ok")

    @defer.inlineCallbacks
    def test_pending_requests_per_backend(self):
        self.start(max_pending_per_backend=2)
        for name in ("busy", "other"):
            d = self.server.broker.get_request(name)
            d.cancel()
            d.addErrback(lambda f: None)
        first = [treq.get(self.server.url("/client/busy/%d" % i), pool=self.users) for i in range(2)]
        while len(self.server.broker.requests) < 2:
            yield _tick()
        resp = yield treq.get(self.server.url("/client/busy/3"), pool=self.users)
        self.assertEqual(resp.code, 503)
        self.assertEqual(resp.headers.getRawHeaders(b"retry-after"), [b"1"])
        self.assertIn(b"Too many pending requests", (yield resp.content()))
        # Another backend is not affected.
        other = treq.get(self.server.url("/client/other/x"), pool=self.users)
        while len(self.server.broker.requests) < 3:
            yield _tick()
        yield self.healthy()
        self.clock.advance(10)  # nobody picks them up: 503 each, state released
        for d in first + [other]:
            self.assertEqual((yield d).code, 503)
        self.assertEqual(self.server.broker.requests, {})

    @defer.inlineCallbacks
    def test_max_backends(self):
        self.start(max_backends=1)
        poll = self.relay_client.poll("one")
        while "one" not in self.server.broker.backends:
            yield _tick()
        code, body = yield self.relay_client.poll("two")
        self.assertEqual(code, 503)
        self.assertIn(b"Too many relay clients", body)
        yield self.healthy()
        self.clock.advance(30)
        self.assertEqual((yield poll)[0], 408)

    @defer.inlineCallbacks
    def test_too_many_headers(self):
        self.start(max_headers=10)
        proto = yield raw_connect(self.server.port)
        proto.transport.write(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(20)) + b"\r\n"
        )
        yield proto.ended
        self.assertTrue(bytes(proto.data).startswith(b"HTTP/1.1 400 "), proto.data)
        yield self.healthy()

    @defer.inlineCallbacks
    def test_oversized_headers(self):
        self.start(max_header_bytes=1024)
        proto = yield raw_connect(self.server.port)
        proto.transport.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 2000 + b"\r\n\r\n")
        yield proto.ended
        self.assertTrue(bytes(proto.data).startswith(b"HTTP/1.1 400 "), proto.data)
        yield self.healthy()

    @defer.inlineCallbacks
    def test_slowloris_is_cut_off(self):
        self.start(header_timeout=0.3)
        proto = yield raw_connect(self.server.port)
        proto.transport.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never finishes
        started = reactor.seconds()
        yield proto.ended
        self.assertLess(reactor.seconds() - started, 5)
        self.assertEqual(bytes(proto.data), b"")
        yield self.healthy()

    @defer.inlineCallbacks
    def test_long_poll_is_not_a_slow_header(self):
        self.start(header_timeout=0.2)
        poll = self.relay_client.poll("robot")
        while "robot" not in self.server.broker.backends:
            yield _tick()
        yield _tick(0.5)
        self.clock.advance(30)
        self.assertEqual((yield poll)[0], 408)


class RelayedHeaderTests(ServerTestCase):
    @defer.inlineCallbacks
    def test_hop_by_hop_dropped_and_forwarding_added(self):
        user, message = yield self.relayed(
            "/client/robot/x",
            headers={
                b"Connection": [b"keep-alive, X-Private"],
                b"Keep-Alive": [b"timeout=5"],
                b"X-Private": [b"hop"],
                b"Proxy-Authorization": [b"Basic secret"],
                b"TE": [b"trailers, deflate"],
                b"Upgrade": [b"h2c"],
                b"X-Forwarded-For": [b"203.0.113.9"],
                b"X-End-To-End": [b"kept"],
            },
        )
        headers = [(h.name, h.value) for h in message.header]
        names = [name for name, _ in headers]
        for dropped in ("Connection", "Keep-Alive", "X-Private", "Proxy-Authorization", "Upgrade"):
            self.assertNotIn(dropped, names)
        self.assertIn(("Te", "trailers"), headers)
        self.assertIn(("X-End-To-End", "kept"), headers)
        self.assertIn(("X-Forwarded-For", "203.0.113.9, 127.0.0.1"), headers)
        self.assertIn(("X-Forwarded-Proto", "http"), headers)
        yield self.relay_client.respond(message.id, 200)
        yield (yield user).content()

    @defer.inlineCallbacks
    def test_upgrade_request_keeps_upgrade_headers(self):
        proto, message = yield self.raw_relayed(
            b"GET /client/robot/ws HTTP/1.1\r\nHost: r\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        headers = [(h.name, h.value) for h in message.header]
        self.assertIn(("Connection", "Upgrade"), headers)
        self.assertIn(("Upgrade", "websocket"), headers)
        proto.transport.loseConnection()
        yield proto.ended
