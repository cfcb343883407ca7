"""
The relay client's HTTP/2 backend path (C{--force_http2}) without grpcio, so
that it is tested on PyPy too: the backend is twisted.web serving HTTP/2
(h2c with prior knowledge, or ALPN over TLS) through the relay's own site
classes, which can send trailers. And the user side over HTTP/2 with curl,
for the whole chain.
"""

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest
import treq
from twisted.internet import defer, reactor, ssl, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol, serverFromString
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from relay.client.backend import BackendTarget
from relay.client.keepalive import KeepAliveAgent
from relay.config import ClientConfig
from relay.outbound.connect import BackendError
from relay.outbound.endpoints import CachingEndpointFactory
from relay.outbound.h2 import STREAM_WINDOW, H2ClientConnection
from relay.outbound.tls import TrustPolicy, load_trust_root
from relay.proto.http_relay_pb2 import HttpRequest
from relay.server.h2 import offer_h2_over_tls
from relay.server.metrics import RelayMetrics
from tests.support import client_service, dechunk, e2e, head_and_body, polling, server_service, stalled, started_client
from tests.support.e2e import NAME, RawUser, Relay, temp_file
from tests.support.h2_peers import H2Backend, H2Client
from tests.support.tls import make_ca_and_server_cert


@pytest.mark.socket
class H2EndToEnd(unittest.TestCase):
    timeout = 60
    backend_scheme = "http"

    def setUp(self):
        self.backend = self.make_backend()
        self.addCleanup(self.backend.stop)
        self.relay = Relay()
        self.addCleanup(lambda: self.relay.stop())
        self.client = self.start_client()
        return self.relay.polling(NAME)

    def make_backend(self):
        return H2Backend()

    def start_client(self, **kw):
        kw.setdefault("backend_scheme", self.backend_scheme)
        kw.setdefault("backend_address", self.backend.address)
        return started_client(self, self.relay.base, NAME, force_http2=True, **kw)

    @defer.inlineCallbacks
    def h2_user(self):
        user = H2Client()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.port), user)
        self.addCleanup(lambda: (user.transport.loseConnection(), user.lost)[1])
        return user

    @defer.inlineCallbacks
    def raw_user(self, request: bytes):
        user = RawUser()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.port), user)
        self.addCleanup(user.transport.abortConnection)
        user.transport.write(request)
        return user

    def backend_window(self, request) -> int:
        """How much more the backend may send on this request's stream."""
        stream = request.channel
        return stream._conn.conn.local_flow_control_window(stream.streamID)

    # Requests.

    @defer.inlineCallbacks
    def test_request_goes_over_http2_whole(self):
        body = bytes(range(256)) * 4096  # 1 MiB: more than the backend's first window
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield treq.post(
            self.relay.base + "/client/%s/echo/a%%20b?x=1&x=2" % (NAME,),
            data=body,
            headers={"X-Multi": ["one", "two"], "TE": ["trailers"], "Content-Type": ["text/x"], "Host": ["robot:1"]},
            pool=pool,
        )
        self.assertEqual(response.code, 200)
        got = json.loads((yield response.content()))
        self.assertEqual((got["method"], got["uri"]), ("POST", "/echo/a%20b?x=1&x=2"))
        self.assertEqual(got["body"].encode("latin-1"), body)
        headers = [(k.lower(), v) for k, v in got["headers"]]
        self.assertEqual([v for k, v in headers if k == "x-multi"], ["one", "two"])
        self.assertIn(("te", "trailers"), headers)
        self.assertIn(("content-type", "text/x"), headers)
        self.assertIn(("content-length", str(len(body))), headers)
        self.assertEqual(got["host"], "robot:1")  # the user's Host became :authority
        self.assertEqual(self.backend.requests[-1].clientproto, b"HTTP/2")

    @defer.inlineCallbacks
    def test_response_trailers_reach_http2_and_http11_users(self):
        user = yield self.h2_user()
        _, state = user.request("POST", "/trailers", headers=[("x-server-name", NAME), ("te", "trailers")], body=b"x")
        yield state["done"]
        self.assertEqual(state["headers"]["content-type"], "application/grpc")
        self.assertEqual(state["data"], b"\x00\x00\x00\x00\x02hi")
        self.assertEqual(state["trailers"], {"grpc-status": "0", "x-checksum": "abc123"})
        # An HTTP/1.1 user gets them at the end of the chunked body.
        raw = yield self.raw_user(
            b"GET /client/%s/trailers HTTP/1.1\r\nHost: robot\r\nTE: trailers\r\n\r\n" % (NAME.encode(),)
        )
        yield raw.read_until(lambda d: dechunk(head_and_body(d)[1])[2])
        payload, trailers, _ = dechunk(head_and_body(raw.data)[1])
        self.assertEqual(payload, b"\x00\x00\x00\x00\x02hi")
        self.assertEqual(sorted(t.lower() for t in trailers), [b"grpc-status: 0", b"x-checksum: abc123"])

    @defer.inlineCallbacks
    def test_concurrent_requests_share_one_connection(self):
        user = yield self.h2_user()
        states = [user.request("GET", "/client/%s/echo/%d" % (NAME, i))[1] for i in range(8)]
        yield defer.gatherResults([s["done"] for s in states])
        self.assertEqual(sorted(json.loads(s["data"])["uri"] for s in states), ["/echo/%d" % i for i in range(8)])
        self.assertEqual(self.backend.connections_made, 1)

    @defer.inlineCallbacks
    def test_statuses_and_repeated_headers(self):
        user = yield self.h2_user()
        for code in (201, 202, 404, 503):
            _, state = user.request("GET", "/client/%s/status/%d" % (NAME, code))
            yield state["done"]
            self.assertEqual(state["headers"][":status"], str(code))
            self.assertEqual(state["data"], b"status %d" % code)
        # Repeated response headers stay repeated (HTTP/1.1 user: one line each).
        raw = yield self.raw_user(b"GET /client/%s/status/200 HTTP/1.1\r\nHost: robot\r\n\r\n" % (NAME.encode(),))
        yield raw.read_until(lambda d: b"status 200" in d)
        head, _ = head_and_body(raw.data)
        self.assertIn(b"\r\nX-Multi: one\r\nX-Multi: two\r\n", head)

    @defer.inlineCallbacks
    def test_big_download_byte_exact(self):
        size = 20 * 1024 * 1024
        user = yield self.h2_user()
        _, state = user.request("GET", "/client/%s/big?size=%d" % (NAME, size))
        yield state["done"]
        expected = b"".join(e2e.big_block(i, self.backend.pattern) for i in range(size // e2e.BIG_BLOCK))
        self.assertEqual(len(state["data"]), size)
        self.assertEqual(hashlib.sha256(state["data"]).digest(), hashlib.sha256(expected).digest())

    @defer.inlineCallbacks
    def test_malformed_response_is_500_and_the_next_request_reconnects(self):
        # Twisted's HTTP/2 server sends a 204 with the Content-Length of the
        # body it then drops, which the h2 library rejects.
        user = yield self.h2_user()
        _, state = user.request("GET", "/client/%s/status/204" % (NAME,))
        yield state["done"]
        self.assertEqual(state["headers"][":status"], "500")
        self.assertIn(b"http2: protocol error from server: InvalidBodyLengthError", state["data"])
        _, state = user.request("GET", "/client/%s/echo/after" % (NAME,))
        yield state["done"]
        self.assertEqual(json.loads(state["data"])["uri"], "/echo/after")
        self.assertEqual(self.backend.connections_made, 2)

    # Back-pressure.

    @defer.inlineCallbacks
    def test_slow_user_closes_the_backend_window(self):
        """
        A user who stops reading stops the backend: the relay client stops
        acknowledging DATA, the stream's flow-control window closes, and the
        backend can send no more until the user reads again.
        """
        user = yield self.raw_user(b"GET /client/%s/firehose HTTP/1.1\r\nHost: robot\r\n\r\n" % (NAME.encode(),))
        yield user.read_until(lambda d: b"ffff" in d)
        request = self.backend.requests[-1]
        self.assertEqual(request.clientproto, b"HTTP/2")
        user.transport.pauseProducing()
        (stream,) = self.client.pools[-1]._connection.streams.values()

        def held_by_us():
            # We hold the window shut (paused, not acknowledging) and the
            # backend has used all of it up.
            return stream.paused and stream.unacknowledged > 0 and self.backend_window(request) == 0

        # Wait for the backend to stall: no progress for half a second.
        stalled_at = yield stalled(lambda: self.backend.firehose_bytes, timeout=30)
        # It stalled because its window is shut, and shut by us.
        self.assertTrue(held_by_us(), (stream.paused, stream.unacknowledged, self.backend_window(request)))
        # What the user's socket buffers, the relay server, our chunker and
        # one stream window hold together.
        self.assertLess(stalled_at, 64 * 1024 * 1024)
        self.assertLessEqual(stream.unacknowledged, STREAM_WINDOW)
        user.transport.resumeProducing()
        yield self.backend.firehose_past(stalled_at + 8 * 1024 * 1024)

    @defer.inlineCallbacks
    def test_user_disconnect_resets_the_stream(self):
        user = yield self.raw_user(b"GET /client/%s/forever HTTP/1.1\r\nHost: robot\r\n\r\n" % (NAME.encode(),))
        yield user.read_until(lambda d: b"tick" in d)
        left = time.monotonic()
        user.transport.abortConnection()
        closed = yield self.backend.forever_closed
        self.assertLess(closed - left, 5.0)
        # The connection stays for other requests.
        user2 = yield self.h2_user()
        _, state = user2.request("GET", "/client/%s/echo" % (NAME,))
        yield state["done"]
        self.assertEqual(state["headers"][":status"], "200")
        self.assertEqual(self.backend.connections_made, 1)

    # Failures.

    @defer.inlineCallbacks
    def test_backend_down_is_500_then_reconnects(self):
        address = self.backend.address
        yield self.backend.stop()
        # The idle connection to the old backend goes with it.
        for connection in list(self.client.pools[-1]._all):
            yield connection.close()
        user = yield self.h2_user()
        _, state = user.request("GET", "/client/%s/echo" % (NAME,))
        yield state["done"]
        self.assertEqual(state["headers"][":status"], "500")
        self.assertIn(b"Backend request failed with error", state["data"])
        self.assertIn(b"connection refused", state["data"])
        self.assertIn(address.encode(), state["data"])


@pytest.mark.socket
class H2OverTLS(unittest.TestCase):
    """C{--backend_scheme=https --force_http2}: HTTP/2 chosen by ALPN."""

    timeout = 30

    def setUp(self):
        ca_pem, cert_pem, key_pem = make_ca_and_server_cert()
        self.trust_root = load_trust_root(temp_file(self, ca_pem.decode()))
        self.cert = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem)
        self.relay = Relay()
        self.addCleanup(lambda: self.relay.stop())

    def start_client(self, backend):
        backend.address = "localhost:%d" % (backend.port.getHost().port,)
        self.addCleanup(backend.stop)
        started_client(
            self,
            self.relay.base,
            NAME,
            backend.address,
            backend_scheme="https",
            trust_root=self.trust_root,
            force_http2=True,
        )
        return backend

    @defer.inlineCallbacks
    def get(self, path):
        yield self.relay.polling(NAME)
        raw = RawUser()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.port), raw)
        self.addCleanup(raw.transport.abortConnection)
        raw.transport.write(
            b"GET /client/%s%s HTTP/1.1\r\nHost: robot\r\nConnection: close\r\n\r\n" % (NAME.encode(), path)
        )
        yield raw.closed
        return head_and_body(raw.data)

    @defer.inlineCallbacks
    def test_alpn_h2(self):
        # twisted.web offers h2 and http/1.1 by ALPN.
        backend = self.start_client(H2Backend(tls=self.cert.options()))
        head, body = yield self.get(b"/trailers")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        payload, trailers, complete = dechunk(body)
        self.assertTrue(complete, body)
        self.assertIn(b"Grpc-Status: 0", trailers)
        self.assertEqual(backend.requests[-1].clientproto, b"HTTP/2")

    @defer.inlineCallbacks
    def test_backend_without_h2_is_500(self):
        # A TLS server that speaks HTTP/1.1 only: twisted.web's ALPN then
        # fails the handshake, as nothing overlaps with our "h2".
        self.start_client(e2e.Backend(tls=self.cert.options()))
        head, body = yield self.get(b"/echo")
        self.assertTrue(head.startswith(b"HTTP/1.1 500 "), head)
        self.assertIn(b'Backend request failed with error: Get "https://localhost:', body)

    def test_other_alpn_choice_is_refused(self):
        """A server that picks anything but h2 (or nothing) by ALPN is not spoken to."""
        request = BackendTarget(ClientConfig(backend_scheme="https", backend_address="localhost:1")).build(
            HttpRequest(method="GET", url="http://invalid/x")
        )
        for chosen, shown in ((b"http/1.1", b"http/1.1"), (None, b"")):
            connection = H2ClientConnection(reactor, request, tls=True)
            transport = StringTransport()
            transport.negotiatedProtocol = chosen
            connection.makeConnection(transport)
            connection.handshakeCompleted()
            self.assertEqual(transport.value(), b"")  # not even the preface
            self.assertTrue(transport.disconnecting)
            failure = self.failureResultOf(connection.ready, BackendError)
            self.assertEqual(
                str(failure.value),
                'Get "https://localhost:1/x": http2: unexpected ALPN protocol "%s"; want "h2"' % (shown.decode(),),
            )


@pytest.mark.process
class CurlThroughRelay(unittest.TestCase):
    """
    curl as the user, over HTTP/2 (h2c, and ALPN over TLS) and HTTP/1.1 on
    the same port, to relayed paths that our client serves from an HTTP/2
    backend.
    """

    timeout = 60

    def setUp(self):
        if shutil.which("curl") is None:
            raise unittest.SkipTest("curl not installed")
        self.backend = H2Backend()
        self.addCleanup(self.backend.stop)

    @defer.inlineCallbacks
    def serve(self, endpoint, scheme, trust_root=None):
        service = server_service(endpoint, reactor, metrics=RelayMetrics(process=False))
        service.startService()
        self.addCleanup(service.stopService)
        port = service.listening_port.getHost().port
        host = "localhost" if scheme == "https" else "127.0.0.1"
        client = client_service(
            reactor,
            "%s://%s:%d" % (scheme, host, port),
            NAME,
            backend_scheme="http",
            backend_address=self.backend.address,
            force_http2=True,
        )
        if trust_root is not None:
            # Our client verifies the relay against the system's CAs; this
            # relay's certificate is from the test's own CA.
            client.api.agent = client.pools[0] = KeepAliveAgent(
                reactor, CachingEndpointFactory(reactor, TrustPolicy(trust_root))
            )
        client.startService()
        self.addCleanup(client.stopService)
        yield polling(service.broker, NAME)
        return "%s://127.0.0.1:%d" % (scheme, port)

    def curl(self, *args):
        return threads.deferToThread(
            subprocess.check_output,
            ["curl", "-s", "-S", "--max-time", "20", "-w", "\n%{http_code} %{http_version}"] + list(args),
            timeout=30,
        )

    def check(self, out, version):
        body, _, status = out.rpartition(b"\n")
        self.assertEqual(status, b"200 " + version)
        return json.loads(body)

    @defer.inlineCallbacks
    def test_h2c_prior_knowledge_and_http11_on_one_port(self):
        base = yield self.serve(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), "http")
        out = yield self.curl("--http2-prior-knowledge", "--data-binary", "hello", base + "/client/robot/echo/h2c?q=1")
        got = self.check(out, b"2")
        self.assertEqual((got["method"], got["uri"], got["body"]), ("POST", "/echo/h2c?q=1", "hello"))
        out = yield self.curl("--http2-prior-knowledge", "-H", "X-Server-Name: robot", base + "/echo/by-header")
        self.assertEqual(self.check(out, b"2")["uri"], "/echo/by-header")
        out = yield self.curl("--http1.1", base + "/client/robot/echo/h1")
        self.assertEqual(self.check(out, b"1.1")["uri"], "/echo/h1")
        out = yield self.curl("--http2-prior-knowledge", base + "/healthz")
        self.assertEqual(out, b"ok\n200 2")
        self.assertEqual({r.clientproto for r in self.backend.requests}, {b"HTTP/2"})

    @defer.inlineCallbacks
    def test_http2_over_tls_and_http11_on_one_port(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        ca_pem, cert_pem, key_pem = make_ca_and_server_cert()
        paths = {}
        for name, pem in (("ca", ca_pem), ("cert", cert_pem), ("key", key_pem)):
            paths[name] = os.path.join(directory, name + ".pem")
            with open(paths[name], "wb") as f:
                f.write(pem)
        endpoint = offer_h2_over_tls(
            serverFromString(
                reactor, "ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s" % (paths["key"], paths["cert"])
            )
        )
        base = yield self.serve(endpoint, "https", trust_root=load_trust_root(paths["ca"]))
        out = yield self.curl("-k", "--http2", "--data-binary", "over tls", base + "/client/robot/echo/tls")
        got = self.check(out, b"2")
        self.assertEqual((got["uri"], got["body"]), ("/echo/tls", "over tls"))
        out = yield self.curl("-k", "--http1.1", base + "/client/robot/echo/tls1")
        self.assertEqual(self.check(out, b"1.1")["uri"], "/echo/tls1")
        out = yield self.curl("-k", "--http2", base + "/healthz")
        self.assertEqual(out, b"ok\n200 2")
