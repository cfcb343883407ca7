"""
The relay server's routes, status codes and bodies where only HTTP
semantics matter: in memory (treq over iosim, through the relay's own
Site), with the protocol's timeouts on a L{Clock}. Every exchange has
finished, or is known to be waiting, when a call returns, so nothing here
polls the reactor. tests/test_server.py keeps the cases where the socket is
the point (streaming, aborted connections, 101 pipes).
"""

import os

import pytest
from twisted.trial import unittest

from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse
from relay.server.broker import PICKUP_TIMEOUT, POLL_TIMEOUT
from tests.support.cases import RouteTestCase
from tests.support.engines import on_each_engine

pytestmark = pytest.mark.memory

GO_ERROR_HEADERS = {
    b"content-type": [b"text/plain; charset=utf-8"],
    b"x-content-type-options": [b"nosniff"],
}
REQUEST_CONTENT_TYPE = b"application/vnd.google.protobuf;proto=cloudrobotics.http_relay.v1alpha1.HttpRequest"


class OperationsTests(RouteTestCase):
    def test_healthz(self):
        response, body = self.answer(self.relay.get("/healthz"))
        self.assertEqual((response.code, body), (200, b"ok"))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/plain"])
        self.assertIsNone(response.headers.getRawHeaders(b"server"))

    def test_date_follows_the_clock(self):
        """Every answer has a Date, of the second it is sent (it is formatted once a second)."""
        site_clock = self.relay.site.reactor
        site_clock.advance(1_700_000_000)
        first, _ = self.answer(self.relay.get("/healthz"))
        site_clock.advance(0.5)
        same, _ = self.answer(self.relay.get("/healthz"))
        site_clock.advance(1)
        later, _ = self.answer(self.relay.get("/nowhere"))
        self.assertEqual(first.headers.getRawHeaders(b"date"), [b"Tue, 14 Nov 2023 22:13:20 GMT"])
        self.assertEqual(same.headers.getRawHeaders(b"date"), [b"Tue, 14 Nov 2023 22:13:20 GMT"])
        self.assertEqual(later.headers.getRawHeaders(b"date"), [b"Tue, 14 Nov 2023 22:13:21 GMT"])

    def test_metrics_have_go_names_and_labels(self):
        user, message = self.relayed("/client/robot/api/items/123456")
        self.respond(HttpResponse(id=message.id, status_code=200, body=b"x", eof=True, backend_duration_ms=5))
        self.answer(user)
        response, body = self.answer(self.relay.get("/metrics"))
        text = body.decode()
        self.assertEqual(response.code, 200)
        self.assertIn(b"text/plain; version=0.0.4", response.headers.getRawHeaders(b"content-type")[0])
        self.assertIn("# TYPE broker_requests counter", text)
        self.assertIn('broker_requests{backend="robot",method="client"} 1\n', text)
        self.assertIn('broker_responses{backend="robot",method="server_response",result="ok"} 1\n', text)
        self.assertIn('broker_responses{backend="robot",method="server_request",result="ok"} 1\n', text)
        for name in ("broker_responses_durations", "broker_backend_responses_durations", "broker_overhead_durations"):
            self.assertIn("# TYPE %s histogram" % name, text)
            self.assertIn(name + '_count{backend="robot",method="server_response"} 1\n', text)
        self.assertIn("relay_pending_requests 0\n", text)
        self.assertIn("relay_backends 1\n", text)
        self.assertNotIn("broker_requests_total", text)
        self.assertNotIn("request_path", text)
        self.assertNotIn("_created", text)


class UserRoutingTests(RouteTestCase):
    def test_client_prefix_builds_http_request(self):
        user, message = self.relayed(
            "/client/robot/some/path?a=1&b=two%20words",
            method="POST",
            data=b"request body",
            headers={b"X-Multi": [b"one", b"two"], b"Content-Type": [b"text/plain"]},
        )
        self.assertRegex(message.id, r"^robot:[0-9a-f]{32}$")
        self.assertEqual(message.method, "POST")
        self.assertEqual(message.url, "http://invalid/some/path?a=1&b=two%20words")
        self.assertEqual(message.host, "relay")
        self.assertEqual(message.body, b"request body")
        headers = [(h.name, h.value) for h in message.header]
        self.assertIn(("X-Multi", "one"), headers)
        self.assertIn(("X-Multi", "two"), headers)
        self.assertIn(("Content-Type", "text/plain"), headers)
        self.assertNotIn("Host", [h.name for h in message.header])
        self.respond_with(message.id, 204)
        self.assertEqual(self.successResultOf(user).code, 204)

    def test_name_only_path_becomes_slash(self):
        user, message = self.relayed("/client/robot")
        self.assertEqual(message.url, "http://invalid/")
        self.respond_with(message.id)
        self.assertEqual(self.answer(user)[0].code, 200)

    def test_x_server_name_keeps_path(self):
        user, message = self.relayed("/pkg.Service/Method", method="POST", headers={b"X-Server-Name": [b"robot"]})
        self.assertEqual(message.url, "http://invalid/pkg.Service/Method")
        self.respond_with(message.id)
        self.assertEqual(self.answer(user)[0].code, 200)

    def test_empty_name_is_400(self):
        response, body = self.answer(self.relay.get("/client/"))
        self.assertEqual(response.code, 400)
        self.assertEqual(body, b"Request path too short: missing remote server identifier\n")
        for k, v in GO_ERROR_HEADERS.items():
            self.assertEqual(response.headers.getRawHeaders(k), v)

    def test_no_prefix_no_header_is_400(self):
        response, body = self.answer(self.relay.get("/anything"))
        self.assertEqual((response.code, body), (400, b'Request without required header: "X-Server-Name"\n'))

    def test_exact_paths_only(self):
        """Like Go's ServeMux: /healthz/x is user traffic, not the health check."""
        response, _ = self.answer(self.relay.get("/healthz/x"))
        self.assertEqual(response.code, 400)

    def test_unknown_backend_is_503(self):
        response, body = self.answer(self.relay.get("/client/nobody/x"))
        self.assertEqual(response.code, 503)
        self.assertEqual(
            body,
            b'Cannot reach the client "nobody". Check that it\'s turned on, set up, and '
            b"connected to the internet. (unknown client)",
        )

    def test_known_backend_not_picking_up_is_503(self):
        self.known()
        user = self.relay.get("/client/robot/x")
        self.assertNoResult(user)
        self.relay.advance(PICKUP_TIMEOUT)
        response, body = self.answer(user)
        self.assertEqual(response.code, 503)
        self.assertIn(b"timeout waiting for relay client to accept request", body)
        self.assertEqual(self.relay.broker.requests, {})


class ResponseTests(RouteTestCase):
    def test_status_headers_body_and_repeated_headers(self):
        user, message = self.relayed("/client/robot/x")
        self.respond_with(
            message.id,
            201,
            b"created",
            headers=[("Content-Type", "application/json"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")],
        )
        response, body = self.answer(user)
        self.assertEqual((response.code, body), (201, b"created"))
        self.assertEqual(response.headers.getRawHeaders(b"set-cookie"), [b"a=1", b"b=2"])
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])

    def test_first_message_without_status_is_500(self):
        user, message = self.relayed("/client/robot/x")
        self.respond(HttpResponse(id=message.id, body=b"no status"))
        response, body = self.answer(user)
        self.assertEqual((response.code, body), (500, b"Received no header from relay client"))
        later, _ = self.respond(HttpResponse(id=message.id, body=b"more"))
        self.assertEqual(later.code, 400)


class RelayClientEndpointTests(RouteTestCase):
    def test_poll_returns_request_with_content_type(self):
        self.known()
        user = self.relay.get("/client/robot/x")
        poll = self.relay.get("/server/request?server=robot")
        response, body = self.answer(poll)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [REQUEST_CONTENT_TYPE])
        message = HttpRequest()
        message.ParseFromString(body)
        self.assertEqual(message.url, "http://invalid/x")
        self.respond(HttpResponse(id=message.id, status_code=200, body=b"done", eof=True))
        self.assertEqual(self.answer(user)[1], b"done")

    def test_poll_timeout_is_408(self):
        poll = self.relay.get("/server/request?server=robot")
        self.assertNoResult(poll)
        self.relay.advance(POLL_TIMEOUT)
        response, body = self.answer(poll)
        self.assertEqual((response.code, body), (408, b"No request received within timeout\n"))

    def test_poll_without_server_is_400(self):
        for query in ("", "?server="):
            response, body = self.answer(self.relay.get("/server/request" + query))
            self.assertEqual((response.code, body), (400, b"Missing server query parameter\n"))
        self.assertEqual(self.relay.broker.backends, {})

    def test_response_ok_is_text_plain(self):
        user, message = self.relayed("/client/robot/x")
        response, body = self.respond(HttpResponse(id=message.id, status_code=200, eof=True))
        self.assertEqual((response.code, body), (200, b"ok"))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/plain"])
        self.assertEqual(self.answer(user)[0].code, 200)

    def test_response_for_unknown_id_is_400(self):
        response, body = self.respond(HttpResponse(id="robot:" + "0" * 32, status_code=200, eof=True))
        self.assertEqual(response.code, 400)
        self.assertEqual(body, b"Duplicate or invalid request ID robot:" + b"0" * 32 + b"\n")

    def test_duplicate_response_after_eof_is_400(self):
        user, message = self.relayed("/client/robot/x")
        once = self.respond(HttpResponse(id=message.id, status_code=200, body=b"once", eof=True))
        twice = self.respond(HttpResponse(id=message.id, status_code=200, body=b"twice", eof=True))
        self.assertEqual((once[0].code, twice[0].code), (200, 400))
        self.assertEqual(self.answer(user)[1], b"once")

    def test_requeststream_without_id_is_400(self):
        response, body = self.answer(self.relay.post("/server/requeststream"))
        self.assertEqual((response.code, body), (400, b"Missing id query parameter\n"))

    def test_requeststream_for_unknown_id_is_410(self):
        response, body = self.answer(self.relay.post("/server/requeststream?id=robot:abc"))
        self.assertEqual((response.code, body), (410, b"No ongoing request with id robot:abc\n"))


class TreqIsForTestsTests(unittest.SynchronousTestCase):
    def test_no_module_of_relay_imports_treq(self):
        root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "relay")
        importing = []
        for folder, _, files in os.walk(root):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(folder, name), encoding="utf-8") as f:
                        if any(line.split()[:2] in (["import", "treq"], ["from", "treq"]) for line in f):
                            importing.append(name)
        self.assertEqual(importing, [])


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
