"""
Access control and limits: relay-client and user tokens, per-backend and
global limits, the slowloris guard, and the headers relayed to backends.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import treq
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse
from relay.server.auth import AccessPolicy, ClientTokens, UserTokens, token_hash
from relay.server.broker import POLL_TIMEOUT
from tests.support import FakeRelayClient, InMemoryRelay, RelayServer, polled_by, raw_connect, run_clock_until
from tests.support import tick as _tick
from tests.support.cases import RouteTestCase, ServerTestCase
from tests.support.engines import on_each_engine
from tests.support.files import write


@pytest.mark.memory
class AuthTestCase(RouteTestCase):
    """The access policy in memory: only HTTP semantics matter here."""

    client_tokens = "# relay-clients\nrobot-a  %s\nlab-*    %s\n" % (token_hash("token-a"), token_hash("token-lab"))
    user_tokens = None
    trusted_user_header = None

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        client = user = None
        if self.client_tokens is not None:
            client = os.path.join(self.tmp, "clients")
            write(client, self.client_tokens)
            client = ClientTokens(client)
        if self.user_tokens is not None:
            user = os.path.join(self.tmp, "users")
            write(user, self.user_tokens)
            user = UserTokens(user)
        self.relay = InMemoryRelay(policy=AccessPolicy(client, user, self.trusted_user_header))

    def as_client(self, method, path, token, data=b""):
        headers = {}
        if token is not None:
            headers[b"Authorization"] = [b"Bearer " + token.encode()]
        return self.relay.request(method, path, headers=headers, data=data)

    def polled(self, name, token):
        """A poll for C{name} with C{token} waits, then times out (408)."""
        poll = self.as_client("GET", "/server/request?server=" + name, token)
        self.assertNoResult(poll)
        self.assertTrue(polled_by(self.relay.broker, name))
        self.relay.advance(POLL_TIMEOUT)
        self.assertEqual(self.answer(poll)[0].code, 408)


class ClientTokenTests(AuthTestCase):
    def test_poll_needs_a_token_for_that_name(self):
        for token, name in ((None, "robot-a"), ("wrong", "robot-a"), ("token-a", "robot-b"), ("token-lab", "robot-a")):
            response, body = self.answer(self.as_client("GET", "/server/request?server=" + name, token))
            self.assertEqual(response.code, 403, (token, name))
            self.assertIn(b"Forbidden", body)
        self.assertEqual(self.relay.broker.backends, {})

    def test_glob_and_own_name_allowed(self):
        for token, name in (("token-a", "robot-a"), ("token-lab", "lab-7")):
            self.polled(name, token)

    def test_cannot_answer_or_stream_another_backends_requests(self):
        poll = self.as_client("GET", "/server/request?server=lab-1", "token-lab")
        user = self.relay.get("/client/lab-1/secret")
        response, body = self.answer(poll)
        self.assertEqual(response.code, 200)
        message = HttpRequest.FromString(body)
        # robot-a's client tries to answer lab-1's request, and read its stream.
        forged = HttpResponse(id=message.id, status_code=200, body=b"forged", eof=True).SerializeToString()
        self.assertEqual(self.answer(self.as_client("POST", "/server/response", "token-a", data=forged))[0].code, 403)
        response, _ = self.answer(self.as_client("POST", "/server/requeststream?id=" + message.id, "token-a"))
        self.assertEqual(response.code, 403)
        # The rightful client answers.
        real = HttpResponse(id=message.id, status_code=200, body=b"real", eof=True).SerializeToString()
        self.assertEqual(self.answer(self.as_client("POST", "/server/response", "token-lab", data=real))[0].code, 200)
        self.assertEqual(self.answer(user)[1], b"real")

    def test_token_file_is_reloaded(self):
        write(os.path.join(self.tmp, "clients"), "robot-a %s\n" % (token_hash("rotated"),))
        response, _ = self.answer(self.as_client("GET", "/server/request?server=robot-a", "token-a"))
        self.assertEqual(response.code, 403)
        self.polled("robot-a", "rotated")

    def test_broken_reload_keeps_previous_tokens(self):
        write(os.path.join(self.tmp, "clients"), "robot-a not-a-hash\n")
        self.polled("robot-a", "token-a")
        self.flushLoggedErrors()


class UserTokenTests(AuthTestCase):
    client_tokens = None
    user_tokens = "%s robot-1,lab-*\n%s robot-2\n" % (token_hash("alice"), token_hash("bob"))

    def test_no_token_is_401_with_challenge(self):
        self.known("robot-1")
        response, _ = self.answer(self.relay.get("/client/robot-1/x"))
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders(b"www-authenticate"), [b'Bearer realm="relay"'])
        self.assertEqual(self.relay.broker.requests, {})

    def test_token_for_other_backend_is_403(self):
        self.known("robot-1")
        response, _ = self.answer(self.relay.get("/client/robot-1/x", headers={b"Authorization": [b"Bearer bob"]}))
        self.assertEqual(response.code, 403)
        # Even for names nobody serves: no 503 that would reveal which exist.
        response, _ = self.answer(self.relay.get("/client/ghost/x", headers={b"Authorization": [b"Bearer bob"]}))
        self.assertEqual(response.code, 403)

    def test_bearer_token_is_consumed(self):
        user, message = self.relayed("/client/lab-3/x", name="lab-3", headers={b"Authorization": [b"Bearer alice"]})
        self.assertNotIn("Authorization", [h.name for h in message.header])
        self.respond_with(message.id, 200, b"hi")
        self.assertEqual(self.answer(user)[1], b"hi")

    def test_x_relay_token_leaves_authorization_for_the_backend(self):
        user, message = self.relayed(
            "/client/robot-2/x",
            name="robot-2",
            headers={b"X-Relay-Token": [b"bob"], b"Authorization": [b"Basic dXNlcjpwdw=="]},
        )
        headers = [(h.name, h.value) for h in message.header]
        self.assertIn(("Authorization", "Basic dXNlcjpwdw=="), headers)
        self.assertNotIn("X-Relay-Token", [h.name for h in message.header])
        self.respond_with(message.id, 200)
        self.assertEqual(self.answer(user)[0].code, 200)


class TrustedHeaderTests(AuthTestCase):
    client_tokens = None
    trusted_user_header = "X-Forwarded-User"

    def test_requests_need_the_proxy_header(self):
        self.known()
        response, _ = self.answer(self.relay.get("/client/robot/x"))
        self.assertEqual(response.code, 401)
        user, message = self.relayed("/client/robot/x", headers={b"X-Forwarded-User": [b"alice@example.com"]})
        self.respond_with(message.id, 200)
        self.assertEqual(self.answer(user)[0].code, 200)


@pytest.mark.process
class HashCommandTests(unittest.TestCase):
    def test_hash_of_stdin(self):
        from tests.support.process import ROOT

        env = dict(os.environ, PYTHONPATH=ROOT)
        out = subprocess.run(
            [sys.executable, "-m", "relay.server.auth", "hash"],
            input=b"s3cret\n",
            capture_output=True,
            check=True,
            env=env,
        ).stdout
        self.assertEqual(out.strip().decode(), token_hash("s3cret"))

    def test_from_the_checkout_without_twisted(self):
        """
        As with a system Python in the repository's root: no site-packages
        (-S), so no Twisted, and the checkout's twisted/ folder (the plugins)
        on the path instead. The hash needs neither.
        """
        from tests.support.process import ROOT

        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        run = subprocess.run(
            [sys.executable, "-S", "-m", "relay.server.auth", "hash"],
            input=b"s3cret\n", capture_output=True, cwd=ROOT, env=env,
        )
        self.assertEqual((run.returncode, run.stderr), (0, b""))
        self.assertEqual(run.stdout.strip().decode(), token_hash("s3cret"))


@pytest.mark.socket
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
        yield self.server.when(lambda: len(self.server.broker.requests) == 2)
        resp = yield treq.get(self.server.url("/client/busy/3"), pool=self.users)
        self.assertEqual(resp.code, 503)
        self.assertEqual(resp.headers.getRawHeaders(b"retry-after"), [b"1"])
        self.assertIn(b"Too many pending requests", (yield resp.content()))
        # Another backend is not affected.
        other = treq.get(self.server.url("/client/other/x"), pool=self.users)
        yield self.server.when(lambda: len(self.server.broker.requests) == 3)
        yield self.healthy()
        self.clock.advance(10)  # nobody picks them up: 503 each, state released
        for d in first + [other]:
            self.assertEqual((yield d).code, 503)
        self.assertEqual(self.server.broker.requests, {})

    @defer.inlineCallbacks
    def test_max_backends(self):
        self.start(max_backends=1)
        poll = self.relay_client.poll("one")
        yield self.server.polling("one")
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
        # Cut off within 5 s of the server's clock (a reactor turn after each step).
        yield run_clock_until(self.clock, proto.ended, step=0.05, limit=5.0)
        self.assertEqual(bytes(proto.data), b"")
        yield self.healthy()

    @defer.inlineCallbacks
    def test_long_poll_is_not_a_slow_header(self):
        self.start(header_timeout=0.2)
        poll = self.relay_client.poll("robot")
        yield self.server.polling("robot")
        # Past the header timeout, a reactor turn after each step of the clock.
        for _ in range(10):
            self.clock.advance(0.05)
            yield _tick(0)
        self.clock.advance(POLL_TIMEOUT - 0.5)
        self.assertEqual((yield poll)[0], 408)


@pytest.mark.socket
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


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
