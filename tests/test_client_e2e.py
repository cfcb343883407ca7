"""
End to end over loopback: a user-client talks to our relay server, which our
relay client serves from a real twisted.web backend. Everything runs in this
process on 127.0.0.1 sockets; assertions are about what the user (or the
backend) notices. C{TLSBackend} runs every case again with the backend
behind TLS.
"""

import base64
import hashlib
import json
import os
import time

import pytest
import treq
from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from relay.outbound.tls import load_trust_root
from relay.server.auth import AccessPolicy, ClientTokens
from tests.support import Recorder, stalled, started_client
from tests.support.e2e import (
    BIG_BLOCK,
    NAME,
    WS_GUID,
    Backend,
    Collect,
    RawUser,
    Relay,
    big_block,
    make_frame,
    open_websocket,
    parse_frame,
    temp_file,
)
from tests.support.engines import on_each_engine
from tests.support.tls import make_ca_and_server_cert

pytestmark = pytest.mark.socket


class EndToEnd(unittest.TestCase):
    timeout = 60
    backend_scheme = "http"
    trust_root = None

    def setUp(self):
        self.backend = Backend()
        self.addCleanup(self.backend.stop)
        self.relay = Relay()
        self.addCleanup(lambda: self.relay.stop())
        self.users = HTTPConnectionPool(reactor, persistent=False)
        self.client = self.start_client()
        return self.relay.polling(NAME)

    def start_client(self, **kw):
        kw.setdefault("backend_scheme", self.backend_scheme)
        kw.setdefault("trust_root", self.trust_root)
        kw.setdefault("backend_address", self.backend.address)
        return started_client(self, self.relay.base, NAME, **kw)

    def url(self, path):
        return self.relay.base + "/client/" + NAME + path

    def request(self, method, path, **kw):
        kw.setdefault("allow_redirects", False)
        return treq.request(method, self.url(path), pool=self.users, **kw)

    @defer.inlineCallbacks
    def echo(self, method="GET", path="/echo", **kw):
        response = yield self.request(method, path, **kw)
        self.assertEqual(response.code, 200)
        body = yield response.content()
        return json.loads(body)

    # Requests.

    @defer.inlineCallbacks
    def test_methods_bodies_and_query(self):
        got = yield self.echo("GET", "/echo/a%20b/c?x=1&y=%2F&x=2")
        self.assertEqual((got["method"], got["uri"], got["body"]), ("GET", "/echo/a%20b/c?x=1&y=%2F&x=2", ""))
        body = bytes(range(256)) * 10
        got = yield self.echo("POST", "/echo/post", data=body)
        self.assertEqual((got["method"], got["body"].encode("latin-1")), ("POST", body))
        got = yield self.echo("PUT", "/echo/put?q", data=b"put body")
        self.assertEqual((got["method"], got["uri"], got["body"]), ("PUT", "/echo/put?q", "put body"))
        got = yield self.echo("DELETE", "/echo/thing")
        self.assertEqual(got["method"], "DELETE")
        response = yield self.request("HEAD", "/status/200")
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.content()), b"")

    @defer.inlineCallbacks
    def test_repeated_headers_both_ways(self):
        got = yield self.echo(headers={"X-Multi": ["one", "two"], "Accept": ["text/plain"]})
        self.assertEqual([v for k, v in got["headers"] if k.lower() == "x-multi"], ["one", "two"])
        response = yield self.request("GET", "/status/200")
        yield response.content()
        self.assertEqual(response.headers.getRawHeaders(b"x-multi"), [b"one", b"two"])
        self.assertEqual(response.headers.getRawHeaders(b"set-cookie"), [b"a=1", b"b=2"])

    @defer.inlineCallbacks
    def test_host_is_preserved(self):
        got = yield self.echo(headers={"Host": ["robot.example.com:8443"]})
        self.assertEqual(got["host"], "robot.example.com:8443")

    @defer.inlineCallbacks
    def test_host_is_backend_address_without_preserve_host(self):
        yield self.client.stopService()
        yield self.relay.stop()
        self.relay = Relay()
        self.start_client(preserve_host=False)
        yield self.relay.polling(NAME)
        got = yield self.echo(headers={"Host": ["robot.example.com:8443"]})
        self.assertEqual(got["host"], self.backend.address)

    @defer.inlineCallbacks
    def test_authentication_token_file_is_read_per_request(self):
        path = temp_file(self, "first-token\n")
        yield self.client.stopService()
        self.start_client(authentication_token_file=path)
        yield self.relay.polling(NAME)
        got = yield self.echo(headers={"Authorization": ["Basic user-credentials"]})
        self.assertEqual([v for k, v in got["headers"] if k.lower() == "authorization"], ["Bearer first-token"])
        with open(path, "w") as f:
            f.write("second-token")
        got = yield self.echo()
        self.assertEqual([v for k, v in got["headers"] if k.lower() == "authorization"], ["Bearer second-token"])
        os.remove(path)
        response = yield self.request("GET", "/echo")
        self.assertEqual(response.code, 500)
        self.assertIn(b"Failed to read authentication token", (yield response.content()))

    @defer.inlineCallbacks
    def test_every_status_class_and_redirects_not_followed(self):
        for code in (200, 201, 202, 204, 301, 302, 304, 400, 404, 418, 500, 503):
            response = yield self.request("GET", "/status/%d" % code)
            body = yield response.content()
            self.assertEqual(response.code, code)
            if code in (204, 304):
                self.assertEqual(body, b"")
            else:
                self.assertEqual(body, b"status %d" % code)
            if code in (301, 302):
                self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/echo/elsewhere"])
        # The backend saw each request once and never the redirect target.
        self.assertNotIn(b"/echo/elsewhere", [r.path for r in self.backend.requests])

    # Streaming.

    @defer.inlineCallbacks
    def test_100_mib_byte_exact(self):
        size = 100 * 1024 * 1024
        started = time.monotonic()
        agent = Agent(reactor, pool=self.users)
        response = yield agent.request(b"GET", self.url("/big?size=%d" % size).encode())
        self.assertEqual(response.code, 200)
        self.assertEqual(response.length, size)  # the Content-Length the backend sent
        collect = Collect(hash_only=True)
        response.deliverBody(collect)
        yield collect.done
        expected = hashlib.sha256()
        for i in range(size // BIG_BLOCK):
            expected.update(big_block(i, self.backend.pattern))
        self.assertEqual(collect.size, size)
        self.assertEqual(collect.sha.hexdigest(), expected.hexdigest())
        self.assertLess(time.monotonic() - started, 45)

    @defer.inlineCallbacks
    def test_trickle_arrives_in_pieces(self):
        agent = Agent(reactor, pool=self.users)
        response = yield agent.request(b"GET", self.url("/trickle").encode())
        collect = Collect()
        response.deliverBody(collect)
        yield collect.done
        self.assertEqual(b"".join(collect.pieces), b"".join(b"piece %d\n" % i for i in range(5)))
        # The first piece reached the user before the backend wrote the last.
        self.assertLess(collect.times[0], self.backend.trickle_sent[-1])
        self.assertGreaterEqual(len(collect.pieces), 4)

    @defer.inlineCallbacks
    def test_websocket_echo(self):
        user = yield open_websocket(self, self.relay.port, NAME)
        for message in (b"hello", b"x" * 70000, b"bye"):
            user.transport.write(make_frame(2, message, mask=True))
            yield user.read_until(lambda d: parse_frame(d) is not None)
            opcode, payload, used = parse_frame(user.data)
            user.data = user.data[used:]
            self.assertEqual((opcode, payload), (2, message))
        user.transport.write(make_frame(8, b"\x03\xe8", mask=True))
        yield user.read_until(lambda d: parse_frame(d) is not None)
        self.assertEqual(parse_frame(user.data)[0], 8)
        yield user.closed

    @defer.inlineCallbacks
    def test_user_disconnect_closes_backend_connection(self):
        user = RawUser()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.port), user)
        user.transport.write(b"GET /client/" + NAME.encode() + b"/forever HTTP/1.1\r\nHost: robot\r\n\r\n")
        yield user.read_until(lambda d: b"tick" in d)
        left = time.monotonic()
        user.transport.abortConnection()
        closed = yield self.backend.forever_closed
        self.assertLess(closed - left, 5.0)

    @defer.inlineCallbacks
    def test_slow_user_slows_the_backend(self):
        """
        A user who stops reading must stop the backend too, after buffers
        of a few MiB, rather than have the relay client (or server) soak up
        an endless stream.
        """
        user = RawUser()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.port), user)
        user.transport.write(b"GET /client/" + NAME.encode() + b"/firehose HTTP/1.1\r\nHost: robot\r\n\r\n")
        yield user.read_until(lambda d: b"ffff" in d)
        user.transport.pauseProducing()
        # Wait for the backend to stall: no progress for half a second.
        last = yield stalled(lambda: self.backend.firehose_bytes, timeout=20)
        self.assertLess(self.backend.firehose_bytes, 64 * 1024 * 1024)
        # Reading again lets it go on.
        user.transport.resumeProducing()
        yield self.backend.firehose_past(last + 8 * 1024 * 1024)
        user.transport.abortConnection()

    # Failures.

    @defer.inlineCallbacks
    def test_backend_down_is_500_with_message(self):
        yield self.backend.stop()
        response = yield self.request("GET", "/echo")
        body = yield response.content()
        self.assertEqual(response.code, 500)
        self.assertIn(b"Backend request failed with error", body)
        self.assertIn(b"connection refused", body)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/plain"])

    @defer.inlineCallbacks
    def test_relay_server_restart(self):
        port = self.relay.port
        yield self.relay.stop()
        self.relay = Relay(port)
        yield self.relay.polling(NAME)
        got = yield self.echo("POST", "/echo/again", data=b"after restart")
        self.assertEqual(got["body"], "after restart")

    @defer.inlineCallbacks
    def test_concurrent_requests(self):
        """A slow request does not hold up others, even with one poll."""
        agent = Agent(reactor, pool=self.users)
        slow = yield agent.request(b"GET", self.url("/trickle").encode())
        collect = Collect()
        slow.deliverBody(collect)
        results = yield defer.gatherResults([self.echo("GET", "/echo/%d" % i) for i in range(5)])
        self.assertEqual(sorted(r["uri"] for r in results), ["/echo/%d" % i for i in range(5)])
        self.assertFalse(collect.done.called, "the fast ones finished while the slow one still runs")
        yield collect.done


class RelayTokens(unittest.TestCase):
    """--relay_token_file against a relay server that checks relay-client tokens."""

    timeout = 30

    def setUp(self):
        self.backend = Backend()
        self.addCleanup(self.backend.stop)
        token_hash = hashlib.sha256(b"robot-secret").hexdigest()
        tokens = temp_file(self, "%s %s\n" % (NAME, token_hash))
        self.relay = Relay(policy=AccessPolicy(client_tokens=ClientTokens(tokens)))
        self.addCleanup(self.relay.stop)

    def start_client(self, token):
        self.fatal = Recorder()
        return started_client(
            self,
            self.relay.base,
            NAME,
            self.backend.address,
            relay_token_file=temp_file(self, token + "\n"),
            on_fatal=self.fatal,
        )

    @defer.inlineCallbacks
    def test_accepted_token_serves(self):
        self.start_client("robot-secret")
        yield self.relay.polling(NAME)
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield treq.post(self.relay.base + "/client/robot/echo", data=b"hi", pool=pool)
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads((yield response.content()))["body"], "hi")

    @defer.inlineCallbacks
    def test_refused_token_is_fatal(self):
        self.start_client("wrong")
        yield self.fatal.called()
        self.assertIn("failed to authenticate", self.fatal[0])
        self.assertFalse(self.relay.polled_by(NAME))


class TLSBackend(EndToEnd):
    """Every end-to-end test again, with the backend behind TLS."""

    backend_scheme = "https"

    def setUp(self):
        ca_pem, cert_pem, key_pem = make_ca_and_server_cert()
        self.ca_file = temp_file(self, ca_pem.decode())
        tls = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem).options()
        self.backend = Backend(tls=tls, host="localhost")
        self.addCleanup(self.backend.stop)
        self.relay = Relay()
        self.addCleanup(lambda: self.relay.stop())
        from twisted.web.client import HTTPConnectionPool

        self.users = HTTPConnectionPool(reactor, persistent=False)
        self.trust_root = load_trust_root(self.ca_file)
        self.client = self.start_client()
        return self.relay.polling(NAME)

    @defer.inlineCallbacks
    def test_verified_with_root_ca_file(self):
        got = yield self.echo("POST", "/echo/tls?q=1", data=b"secret")
        self.assertEqual((got["uri"], got["body"]), ("/echo/tls?q=1", "secret"))

    @defer.inlineCallbacks
    def test_untrusted_certificate_is_500(self):
        yield self.client.stopService()
        self.start_client(trust_root=None)  # the system's CAs only
        yield self.relay.polling(NAME)
        response = yield self.request("GET", "/echo")
        body = yield response.content()
        self.assertEqual(response.code, 500)
        self.assertIn(b"Backend request failed with error", body)
        self.assertIn(b"https://" + self.backend.address.encode(), body)
        self.assertIn(b"tls: certificate verify failed", body)

    @defer.inlineCallbacks
    def test_websocket_over_tls(self):
        user = RawUser()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.port), user)
        key = base64.b64encode(os.urandom(16))
        user.transport.write(
            b"GET /client/" + NAME.encode() + b"/ws HTTP/1.1\r\nHost: robot\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
        )
        yield user.read_until(lambda d: b"\r\n\r\n" in d)
        head, _, user.data = user.data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        self.assertIn(base64.b64encode(hashlib.sha1(key + WS_GUID).digest()), head)
        user.transport.write(make_frame(1, b"over tls", mask=True))
        yield user.read_until(lambda d: parse_frame(d) is not None)
        self.assertEqual(parse_frame(user.data)[:2], (1, b"over tls"))
        user.transport.abortConnection()


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
