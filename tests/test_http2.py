"""
HTTP/2 on the relay's port: prior knowledge (h2c), ALPN over TLS, trailers,
and garbage where a preface should be. HTTP/1.1 keeps working beside it.
"""

import shutil
import subprocess
import tempfile

import pytest
from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.trial import unittest

from relay.proto.http_relay_pb2 import HttpResponse
from relay.server.h2 import offer_h2_over_tls
from relay.server.metrics import RelayMetrics
from tests.support import RelayServer, raw_connect, server_service
from tests.support.cases import ServerTestCase
from tests.support.engines import on_each_engine
from tests.support.h2_peers import H2Client
from tests.support.tls import make_certificate


@pytest.mark.process
class H2cTests(ServerTestCase):
    @defer.inlineCallbacks
    def h2_client(self):
        client = H2Client()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port), client)
        self.addCleanup(lambda: (client.transport.loseConnection(), client.lost)[1])
        return client

    @defer.inlineCallbacks
    def test_healthz_over_h2c(self):
        client = yield self.h2_client()
        _, state = client.request("GET", "/healthz")
        yield state["done"]
        self.assertEqual(state["headers"][":status"], "200")
        self.assertEqual(state["data"], b"ok")

    @defer.inlineCallbacks
    def test_grpc_style_call_with_trailers(self):
        client = yield self.h2_client()
        poll = self.relay_client.poll("robot")
        yield self.polling()
        _, state = client.request(
            "POST",
            "/pkg.Echo/Say",
            headers=[("x-server-name", "robot"), ("content-type", "application/grpc"), ("te", "trailers")],
            body=b"\x00\x00\x00\x00\x02hi",
        )
        code, message = yield poll
        self.assertEqual(message.url, "http://invalid/pkg.Echo/Say")
        self.assertEqual(message.body, b"\x00\x00\x00\x00\x02hi")
        headers = {(h.name, h.value) for h in message.header}
        self.assertIn(("Te", "trailers"), headers)
        self.assertEqual(message.host, "relay")
        yield self.relay_client.post(
            HttpResponse(
                id=message.id,
                status_code=200,
                header=[{"name": "Content-Type", "value": "application/grpc"}],
                body=b"\x00\x00\x00\x00\x03hey",
            )
        )
        yield self.relay_client.post(
            HttpResponse(
                id=message.id,
                eof=True,
                trailer=[{"name": "Grpc-Status", "value": "0"}, {"name": "Grpc-Message", "value": "fine"}],
            )
        )
        yield state["done"]
        self.assertEqual(state["headers"][":status"], "200")
        self.assertEqual(state["headers"]["content-type"], "application/grpc")
        self.assertEqual(state["data"], b"\x00\x00\x00\x00\x03hey")
        self.assertEqual(state["trailers"], {"grpc-status": "0", "grpc-message": "fine"})

    @defer.inlineCallbacks
    def test_trailers_only_reply(self):
        """Grpc-* headers of a body-less first message come back as trailers."""
        client = yield self.h2_client()
        poll = self.relay_client.poll("robot")
        yield self.polling()
        _, state = client.request("POST", "/pkg.Echo/Missing", headers=[("x-server-name", "robot")], body=b"x")
        code, message = yield poll
        yield self.relay_client.post(
            HttpResponse(
                id=message.id,
                status_code=200,
                header=[
                    {"name": "Content-Type", "value": "application/grpc"},
                    {"name": "Grpc-Status", "value": "12"},
                    {"name": "Grpc-Message", "value": "unknown method"},
                ],
                eof=True,
            )
        )
        yield state["done"]
        self.assertEqual(state["trailers"], {"grpc-status": "12", "grpc-message": "unknown method"})

    @defer.inlineCallbacks
    def test_streamed_h2_response_arrives_in_pieces(self):
        client = yield self.h2_client()
        poll = self.relay_client.poll("robot")
        yield self.polling()
        _, state = client.request("GET", "/client/robot/stream")
        code, message = yield poll
        state["got_data"] = defer.Deferred()
        yield self.relay_client.post(HttpResponse(id=message.id, status_code=200, body=b"one,"))
        yield state["got_data"]
        self.assertEqual(state["data"], b"one,")
        yield self.relay_client.post(HttpResponse(id=message.id, body=b"two", eof=True))
        yield state["done"]
        self.assertEqual(state["data"], b"one,two")

    @defer.inlineCallbacks
    def test_user_resetting_stream_cancels_request(self):
        client = yield self.h2_client()
        poll = self.relay_client.poll("robot")
        yield self.polling()
        stream_id, state = client.request("GET", "/client/robot/x")
        code, message = yield poll
        state["done"].addErrback(lambda f: None)
        client.conn.reset_stream(stream_id)
        client.transport.write(client.conn.data_to_send())
        yield self.server.when(lambda: not self.server.broker.requests)
        code, _ = yield self.relay_client.respond(message.id, 200)
        self.assertEqual(code, 400)

    @defer.inlineCallbacks
    def test_garbage_preface_is_rejected_and_others_unaffected(self):
        good = yield self.h2_client()
        for garbage in (
            b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",  # a garbled preface
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\x00\x00\x00\x00\x00\x00",  # then a bogus frame
        ):
            proto = yield raw_connect(self.server.port)
            proto.transport.write(garbage)
            yield proto.ended
            if proto.data:
                # HTTP/1.1 said 4xx/5xx, or HTTP/2 said GOAWAY: never a success.
                self.assertNotIn(b" 200 ", bytes(proto.data[:20]))
        truncated = yield raw_connect(self.server.port)
        truncated.transport.write(b"PRI * HTTP/2")
        truncated.transport.loseConnection()
        yield truncated.ended
        _, state = good.request("GET", "/healthz")
        yield state["done"]
        self.assertEqual(state["data"], b"ok")
        self.assertEqual(self.server.broker.requests, {})

    @defer.inlineCallbacks
    def test_curl_prior_knowledge(self):
        if shutil.which("curl") is None:
            raise unittest.SkipTest("curl not installed")
        out = yield threads.deferToThread(
            subprocess.check_output,
            ["curl", "-s", "--http2-prior-knowledge", "-w", " %{http_version}", self.server.url("/healthz")],
            timeout=20,
        )
        self.assertEqual(out, b"ok 2")


@pytest.mark.process
class TLSTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_alpn_h2_and_http11_over_tls(self):
        if shutil.which("curl") is None:
            raise unittest.SkipTest("curl not installed")
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        key, cert = make_certificate(tmp)
        endpoint = offer_h2_over_tls(
            serverFromString(reactor, "ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s" % (key, cert))
        )
        service = server_service(endpoint, reactor, metrics=RelayMetrics(process=False))
        service.startService()
        self.addCleanup(service.stopService)
        url = "https://127.0.0.1:%d/healthz" % service.listening_port.getHost().port
        for flag, version in (("--http2", b"2"), ("--http1.1", b"1.1")):
            out = yield threads.deferToThread(
                subprocess.check_output,
                ["curl", "-s", "-k", flag, "-w", " %{http_version}", url],
                timeout=20,
            )
            self.assertEqual(out, b"ok " + version)


@pytest.mark.socket
class H2BodyLimitTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_oversized_body_over_h2_is_413(self):
        server = RelayServer(max_request_body=1024)
        self.addCleanup(server.stop)
        client = H2Client()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port), client)
        self.addCleanup(lambda: (client.transport.loseConnection(), client.lost)[1])
        for headers in ([("content-length", "2048")], []):
            _, state = client.request("POST", "/client/robot/x", headers=headers, body=b"x" * 2048)
            yield state["done"]
            self.assertEqual(state["headers"][":status"], "413")
            self.assertIn(b"--max_request_body", state["data"])
        self.assertEqual(server.broker.requests, {})


@pytest.mark.socket
class H2PollConnectionDies(ServerTestCase):
    """A poll answered over h2c whose connection dies with bytes unacknowledged."""

    @defer.inlineCallbacks
    def test_the_user_gets_a_502_at_once(self):
        from relay.net.liveness import RESET, Death

        class Dying:
            # The kernel's report for this connection, made up: on loopback
            # nothing stays unacknowledged.
            death = Death(RESET, unsent=100)

        self.server.service.site.watch = lambda transport, interval, timeout: Dying()
        client = H2Client()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port), client)
        _, poll = client.request("GET", "/server/request?server=robot")
        yield self.polling()
        answer = self.get("/client/robot/x")
        yield poll["done"]
        self.assertEqual(poll["headers"][":status"], "200")
        client.transport.abortConnection()
        yield client.lost
        response = yield answer
        self.assertEqual(response.code, 502)
        self.assertIn(b"before it took the request", (yield response.content()))
        self.assertEqual(self.server.broker.backends["robot"].lost, 1)


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
