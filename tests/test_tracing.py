"""
Distributed tracing (relay/tracing.py), as an operator sees it: real
C{twistd} processes export over OTLP/HTTP to a receiver in this test,
which decodes the protobuf with C{opentelemetry-proto}; nothing of the SDK
is mocked. One trace spans user -> server -> relay-client -> backend with
the right parent links, for our pair, for each side paired with the Go
binary, and through two replicas; the backend sees the trace's context,
and only when there is a trace to join.
"""

import gzip
import os
import subprocess
import sys
import uuid
from collections import Counter
from typing import Dict, List

import pytest
import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from relay.config import ClientConfig, ServerConfig
from relay.tracing import plan
from tests.support.engines import on_each_engine
from tests.support.go import GO_CLIENT, GO_SERVER, go_binary
from tests.support.ports import reserve_port, reserve_ports
from tests.support.process import ROOT, TwistdProcess
from tests.support.ring import name_owned_by

pytestmark = pytest.mark.process


SERVER, CLIENT, INTERNAL = 2, 3, 1
SERVER_STEPS = [
    "Read request body",
    "Schedule request for pickup",
    "Waiting for first response",
    "Forwarding backend response to user-client",
]
CLIENT_STEPS = [
    "Creating response (proto marshaling)",
    "Building (chunked) response channel",
    "Sending response from channel",
]
TRACE_HEADER_NAMES = (b"traceparent", b"tracestate", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-sampled", b"b3")


class Span:
    def __init__(self, service: str, span):
        self.service = service
        self.name = span.name
        self.trace_id = span.trace_id.hex()
        self.span_id = span.span_id.hex()
        self.parent = span.parent_span_id.hex()
        self.kind = span.kind
        self.attributes = {a.key: _value(a.value) for a in span.attributes}

    def __repr__(self):
        return "<%s %r %s<-%s>" % (self.service, self.name, self.span_id, self.parent)


def _value(v):
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


class Receiver(Resource):
    """An OTLP/HTTP trace receiver: C{POST /v1/traces}, protobuf."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.spans: List[Span] = []
        self._waiters = []

    def render_POST(self, request):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        if request.path != b"/v1/traces":
            request.setResponseCode(404)
            return b""
        body = request.content.read()
        if request.getHeader(b"content-encoding") == b"gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest.FromString(body)
        for resource_spans in message.resource_spans:
            service = {a.key: _value(a.value) for a in resource_spans.resource.attributes}.get("service.name")
            for scope in resource_spans.scope_spans:
                self.spans.extend(Span(service, s) for s in scope.spans)
        for waiter in list(self._waiters):
            self._check(waiter)
        request.setHeader(b"content-type", b"application/x-protobuf")
        return ExportTraceServiceResponse().SerializeToString()

    def _check(self, waiter):
        trace_id, names, d = waiter
        spans = [s for s in self.spans if s.trace_id == trace_id]
        have = Counter(s.name for s in spans)
        if all(have[n] >= count for n, count in Counter(names).items()):
            self._waiters.remove(waiter)
            d.callback({(s.service, s.name): s for s in spans})

    def trace(self, trace_id: str, names, timeout: float = 30.0) -> Deferred:
        """
        Fires with C{{(service, name): span}} once spans of every name
        arrived in C{trace_id} (a name given twice: two such spans).
        """
        d: Deferred = Deferred()
        waiter = (trace_id, list(names), d)
        self._waiters.append(waiter)
        self._check(waiter)

        def late(failure):
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            got = sorted((s.service, s.name) for s in self.spans if s.trace_id == trace_id)
            raise AssertionError("spans of %s within %gs: %s; wanted %s" % (trace_id, timeout, got, names))

        return d.addTimeout(timeout, reactor).addErrback(late)


class BackendResource(Resource):
    """The backend: answers C{hello} and keeps each request's headers."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests: List[Dict[bytes, List[bytes]]] = []

    def render(self, request):
        self.requests.append({k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()})
        return b"hello"


class UpgradingBackend(protocol.Protocol):
    """Switches to protocol C{test}, says C{bye} and hangs up."""

    def dataReceived(self, data):
        self.factory.heads.append(data)
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: test\r\nConnection: Upgrade\r\n\r\nbye")
        self.transport.loseConnection()


class RawUser(protocol.Protocol):
    """Sends one request and keeps all it gets until the connection closes."""

    def __init__(self, request: bytes):
        self.request = request
        self.received = b""
        self.closed: Deferred = Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed.callback(self.received)


class LineProcess(TwistdProcess):
    """A Go binary, with the same line watching as a twistd child."""

    @classmethod
    def run(cls, argv):
        proc = cls()
        reactor.spawnProcess(proc, argv[0], list(argv), env=dict(os.environ))
        return proc


def ids():
    return uuid.uuid4().hex, uuid.uuid4().hex[:16]


class Tracing(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.receiver = Receiver()
        self.otlp = reactor.listenTCP(0, Site(self.receiver), interface="127.0.0.1")
        self.addCleanup(self.otlp.stopListening)
        self.backend = BackendResource()
        backend_port = reactor.listenTCP(0, Site(self.backend), interface="127.0.0.1")
        self.addCleanup(backend_port.stopListening)
        self.backend_address = "127.0.0.1:%d" % (backend_port.getHost().port,)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:%d" % (self.otlp.getHost().port,),
            # Batches go out fast, so that the test's wait is short.
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }

    def twistd(self, args):
        proc = TwistdProcess.spawn(args, env=self.env)
        self.addCleanup(proc.terminate)
        return proc

    def go(self, argv):
        proc = LineProcess.run(argv)
        self.addCleanup(proc.terminate)
        return proc

    def our_server(self, *extra, port=0):
        return self.twistd(["relay", "--port=tcp:%d:interface=127.0.0.1" % (port,), "--drain_grace=0"] + list(extra))

    def our_client(self, relay_port: int, name: str = "robot"):
        return self.twistd([
            "relay-client", "--relay_scheme=http", "--relay_address=127.0.0.1:%d" % (relay_port,),
            "--backend_scheme=http", "--backend_address=" + self.backend_address,
            "--server_name=" + name, "--disable_auth_for_remote",
        ])

    def go_client(self, relay_port: int):
        return self.go([
            GO_CLIENT, "--backend_scheme=http", "--relay_scheme=http", "--disable_auth_for_remote",
            "--server_name=robot", "--backend_address=" + self.backend_address,
            "--relay_address=127.0.0.1:%d" % (relay_port,),
        ])

    @defer.inlineCallbacks
    def get(self, port: int, path: str, headers=None):
        response = yield treq.get("http://127.0.0.1:%d%s" % (port, path), headers=headers or {}, pool=self.pool)
        body = yield response.content()
        self.assertEqual((response.code, body), (200, b"hello"))

    def backend_saw(self, index: int = -1) -> Dict[bytes, List[bytes]]:
        return {k: v for k, v in self.backend.requests[index].items() if k in TRACE_HEADER_NAMES}

    def assert_server_spans(self, spans, path: str, parent: str, service="http-relay-server"):
        """Our server's spans for C{path} under C{parent}; the C{Received ...} span."""
        http = spans[(service, path)]
        self.assertEqual((http.kind, http.parent), (SERVER, parent))
        self.assertEqual(http.attributes["http.request.method"], "GET")
        self.assertEqual(http.attributes["http.response.status_code"], 200)
        self.assertEqual(http.attributes["url.path"], path)
        self.assertEqual(http.attributes["relay.backend"], path.split("/")[2])
        received = spans[(service, "Received user client request " + path)]
        self.assertEqual(received.parent, http.span_id)
        for name in SERVER_STEPS:
            self.assertEqual(spans[(service, name)].parent, received.span_id, name)
        self.assertEqual(spans[(service, "Forwarding backend response to user-client")]
                         .attributes["http.response.body.size"], 5)
        self.assertTrue(received.attributes["relay.request_id"])
        return received

    def assert_client_spans(self, spans, path: str, parent: str, trace_id: str):
        """Our relay-client's spans under C{parent}; the backend got C{Sent}'s context."""
        recv = spans[("http-relay-client", "Recv." + path)]
        sent = spans[("http-relay-client", "Sent." + path)]
        self.assertEqual((recv.kind, recv.parent), (SERVER, parent))
        self.assertEqual((sent.kind, sent.parent), (CLIENT, recv.span_id))
        self.assertEqual(sent.attributes["http.response.status_code"], 200)
        self.assertEqual(sent.attributes["http.response.body.size"], 5)
        for name in CLIENT_STEPS:
            self.assertEqual(spans[("http-relay-client", name)].parent, recv.span_id, name)
        seen = self.backend_saw()
        self.assertEqual(seen[b"traceparent"], [("00-%s-%s-01" % (trace_id, sent.span_id)).encode()])
        self.assertEqual(seen[b"x-b3-traceid"], [trace_id.encode()])
        self.assertEqual(seen[b"x-b3-spanid"], [sent.span_id.encode()])

    @defer.inlineCallbacks
    def test_our_pair(self):
        admin = reserve_port(self)
        server = self.our_server("--admin_port=%d" % (admin,))
        port = yield server.listening_port()
        self.our_client(port)
        yield server.wait_for("Relay client connected")

        # A sampled trace from the user goes all the way to the backend.
        trace_id, parent = ids()
        yield self.get(port, "/client/robot/hello", {"traceparent": "00-%s-%s-01" % (trace_id, parent)})
        path = "/client/robot/hello"
        spans = yield self.receiver.trace(trace_id, [path, "Sent./hello"] + SERVER_STEPS + CLIENT_STEPS)
        received = self.assert_server_spans(spans, path, parent)
        self.assert_client_spans(spans, "/hello", received.span_id, trace_id)
        first_trace = trace_id

        # B3 from the user joins the same way.
        trace_id, parent = ids()
        yield self.get(port, "/client/robot/b3", {"X-B3-TraceId": trace_id, "X-B3-SpanId": parent,
                                                   "X-B3-Sampled": "1"})
        spans = yield self.receiver.trace(trace_id, ["/client/robot/b3", "Sent./b3"])
        self.assertEqual(spans[("http-relay-server", "/client/robot/b3")].parent, parent)

        # No trace headers, at the default ratio: none reach the backend
        # (a root is sampled once in ten thousand).
        yield self.get(port, "/client/robot/plain")
        self.assertEqual(self.backend_saw(), {})
        # A bad traceparent is no parent: passed on as it came, nothing added.
        yield self.get(port, "/client/robot/bad", {"traceparent": "00-xyz-0000000000000000-01"})
        self.assertEqual(self.backend_saw(), {b"traceparent": [b"00-xyz-0000000000000000-01"]})

        # The admin view shows the trace id of a sampled request only.
        response = yield treq.get("http://127.0.0.1:%d/api/status" % (admin,), pool=self.pool)
        status = yield response.json()
        [robot] = [b for b in status["backends"]["items"] if b["name"] == "robot"]
        shown = {r["path"]: r.get("trace_id") for r in robot["recent"]}
        self.assertEqual(shown["/hello"], first_trace)
        self.assertIsNone(shown["/plain"])

    @defer.inlineCallbacks
    def test_an_upgraded_request_ends_its_trace_when_the_tunnel_closes(self):
        factory = protocol.ServerFactory.forProtocol(UpgradingBackend)
        factory.heads = []
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.backend_address = "127.0.0.1:%d" % (listening.getHost().port,)
        server = self.our_server()
        port = yield server.listening_port()
        self.our_client(port)
        yield server.wait_for("Relay client connected")
        trace_id, parent = ids()
        user = RawUser(
            b"GET /client/robot/up HTTP/1.1\r\nHost: relay\r\nConnection: Upgrade\r\nUpgrade: test\r\n"
            b"traceparent: 00-%s-%s-01\r\n\r\n" % (trace_id.encode(), parent.encode())
        )
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), user)
        answer = yield user.closed.addTimeout(30, reactor)
        self.assertTrue(answer.startswith(b"HTTP/1.1 101 "), answer)
        self.assertTrue(answer.endswith(b"bye"), answer)
        self.assertIn(b"traceparent: 00-" + trace_id.encode(), factory.heads[0].lower())
        spans = yield self.receiver.trace(trace_id, ["/client/robot/up", "Waiting for first response", "Recv./up"])
        http = spans[("http-relay-server", "/client/robot/up")]
        self.assertEqual((http.parent, http.attributes["http.response.status_code"]), (parent, 101))
        waiting = spans[("http-relay-server", "Waiting for first response")]
        self.assertEqual(waiting.attributes["notes"], "Received 101 switching protocols.")

    @defer.inlineCallbacks
    def test_roots_sampled_at_ratio_1_and_bad_values_ignored(self):
        server = self.our_server("--trace_sampling_ratio=1")
        port = yield server.listening_port()
        self.our_client(port)
        yield server.wait_for("Relay client connected")
        yield self.get(port, "/client/robot/root", {"traceparent": "00-bad", "X-B3-TraceId": "nothex",
                                                     "X-B3-SpanId": "1"})
        seen = self.backend_saw()
        trace_id = seen[b"traceparent"][0].decode().split("-")[1]
        spans = yield self.receiver.trace(trace_id, ["/client/robot/root", "Sent./root"])
        # The bad values were ignored: the trace begins at our server.
        self.assertEqual(spans[("http-relay-server", "/client/robot/root")].parent, "")
        received = spans[("http-relay-server", "Received user client request /client/robot/root")]
        self.assertEqual(spans[("http-relay-client", "Recv./root")].parent, received.span_id)

    @defer.inlineCallbacks
    def test_our_server_with_the_go_client(self):
        go_binary(GO_CLIENT)
        server = self.our_server()
        port = yield server.listening_port()
        self.go_client(port)
        yield server.wait_for("Relay client connected")
        trace_id, parent = ids()
        yield self.get(port, "/client/robot/go", {"traceparent": "00-%s-%s-01" % (trace_id, parent)})
        spans = yield self.receiver.trace(trace_id, ["/client/robot/go"] + SERVER_STEPS)
        received = self.assert_server_spans(spans, "/client/robot/go", parent)
        # The Go client's own spans are inert; what it relayed carries our
        # server's context, in the same trace.
        self.assertEqual(self.backend_saw()[b"traceparent"],
                         [("00-%s-%s-01" % (trace_id, received.span_id)).encode()])

    @defer.inlineCallbacks
    def test_the_go_server_with_our_client(self):
        go_binary(GO_SERVER)
        port = reserve_port(self)
        server = self.go([GO_SERVER, "--port=%d" % (port,)])
        yield server.wait_for("Relay server listening")
        self.our_client(port)
        yield server.wait_for("Relay client connected")
        trace_id, parent = ids()
        yield self.get(port, "/client/robot/fromgo", {"traceparent": "00-%s-%s-01" % (trace_id, parent)})
        spans = yield self.receiver.trace(trace_id, ["Recv./fromgo", "Sent./fromgo"] + CLIENT_STEPS)
        # Under the Go server's own (unexported) span, in the user's trace.
        recv = spans[("http-relay-client", "Recv./fromgo")]
        self.assertTrue(recv.parent)
        self.assert_client_spans(spans, "/fromgo", recv.parent, trace_id)

    @defer.inlineCallbacks
    def test_through_two_replicas(self):
        ports = reserve_ports(self, 2)
        peers = ["127.0.0.1:%d" % (p,) for p in ports]
        replicas = [
            self.our_server("--peers=" + ",".join(peers), "--peer_self=" + peer, port=p)
            for p, peer in zip(ports, peers)
        ]
        for r in replicas:
            yield r.listening_port()
        name = name_owned_by(peers, peers[1])
        self.our_client(ports[1], name)
        yield replicas[1].wait_for("Relay client connected")
        trace_id, parent = ids()
        path = "/client/%s/far" % (name,)
        # To the replica that does not own the name: forwarded to the owner.
        yield self.get(ports[0], path, {"traceparent": "00-%s-%s-01" % (trace_id, parent)})
        received_name = "Received user client request " + path
        spans = yield self.receiver.trace(
            trace_id, ["Forward to replica", "Sent./far", path, path, received_name, received_name] + SERVER_STEPS
        )
        by_parent = {}
        for s in [s for s in self.receiver.spans if s.trace_id == trace_id]:
            by_parent.setdefault(s.parent, []).append(s)
        [entry] = [s for s in self.receiver.spans if s.trace_id == trace_id and s.parent == parent]
        self.assertEqual((entry.name, entry.attributes["relay.replica"]), (path, peers[1]))
        [received] = by_parent[entry.span_id]
        forward = spans[("http-relay-server", "Forward to replica")]
        self.assertEqual((forward.kind, forward.parent), (CLIENT, received.span_id))
        [owner] = [s for s in self.receiver.spans if s.trace_id == trace_id and s.parent == forward.span_id]
        self.assertEqual((owner.name, owner.kind), (path, SERVER))
        owner_received = [s for s in by_parent[owner.span_id] if s.name.startswith("Received")][0]
        self.assert_client_spans(spans, "/far", owner_received.span_id, trace_id)


class Plan(unittest.SynchronousTestCase):
    """When tracing is on, decided without OpenTelemetry."""

    def test_on_by_itself_with_an_endpoint(self):
        endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
        for config in (ServerConfig(), ClientConfig()):
            self.assertFalse(plan(config, {}).enabled)
            self.assertTrue(plan(config, endpoint).enabled)
            self.assertTrue(plan(config, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c/v1/traces"}).enabled)
            self.assertFalse(plan(config, dict(endpoint, OTEL_SDK_DISABLED="true")).enabled)
            self.assertEqual(plan(config, {}).ratio, 1e-4)
        self.assertFalse(plan(ServerConfig(tracing="false"), endpoint).enabled)
        self.assertTrue(plan(ServerConfig(tracing="true"), {}).otlp)
        stackdriver = plan(ServerConfig(trace_stackdriver_project_id="p"), {})
        self.assertEqual((stackdriver.enabled, stackdriver.otlp, stackdriver.project_id), (True, False, "p"))

    def test_off_imports_nothing_of_opentelemetry(self):
        """With tracing off, both sides run without loading the SDK."""
        code = (
            "import sys\n"
            "from twisted.internet.testing import MemoryReactorClock\n"
            "from relay.server import tap as s\n"
            "from relay.client import tap as c\n"
            "for tap, argv in ((s, []), (c, ['--disable_auth_for_remote'])):\n"
            "    o = tap.Options(); o.parseOptions(argv)\n"
            "    tap.makeService(o, reactor=MemoryReactorClock())\n"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env["PYTHONPATH"] = ROOT
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60, cwd=ROOT)
        self.assertEqual(out.stdout.decode().strip(), "[]", out.stderr.decode())


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
