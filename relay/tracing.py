"""
Distributed tracing over OpenTelemetry, as the Go relay has it: the same
span names, W3C C{traceparent} and B3 propagation, parent-based sampling
with a small root ratio (docs/server.md and docs/client.md list the spans).

It is an optional extra (C{pip install 'relay[tracing]'}). Whether it is
on is decided once, at start-up (L{plan}): when it is off, or the extra is
missing, L{start_tracing} returns None, nothing of OpenTelemetry is
imported, and the request paths pay one C{is None} check. Importing this
module imports nothing of OpenTelemetry either; L{Tracing}, made only when
tracing is on, does.

The SDK is configured by the standard C{OTEL_*} variables (endpoint,
headers, service name, sampler, batch delays); it is never installed as
OpenTelemetry's global provider, so that nothing else in the process is
traced by accident.

One rule differs from Go, on purpose: the Go server writes its span's
context into every relayed request, sampled or not, so a backend behind it
sees a C{traceparent} on every request. We write one only when the trace
is sampled or the request came with a context of its own, so that a user's
request without trace headers reaches the backend without them (at the
default ratio, all but one in ten thousand).
"""

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional

from twisted.logger import Logger

from relay.headers import go_canonical

log = Logger()

# What either side removes from a request before writing its own context.
TRACE_HEADERS = frozenset(
    (
        "traceparent",
        "tracestate",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
        "b3",
    )
)
_TRACE_HEADERS_BYTES = frozenset(h.encode("ascii") for h in TRACE_HEADERS)
GCP_PACKAGE = "opentelemetry-exporter-gcp-trace"
SERVER_NAME = "http-relay-server"
CLIENT_NAME = "http-relay-client"


@dataclasses.dataclass(frozen=True)
class TracingPlan:
    """What the flags and the environment ask for, decided without OpenTelemetry."""

    enabled: bool
    ratio: float
    otlp: bool
    project_id: str
    # Why it is on or off, for the start-up line.
    reason: str


def plan(config, env: Mapping[str, str]) -> TracingPlan:
    """
    C{--tracing=auto} (the default) turns tracing on when the environment
    names an OTLP endpoint, as other instrumented services do, unless
    C{OTEL_SDK_DISABLED=true}; or when C{--trace-stackdriver-project-id}
    is set, as in Go. C{true} turns it on (OTLP to the SDK's default,
    C{localhost:4318}, when no variable names one), C{false} off.
    """
    project = config.trace_stackdriver_project_id
    named = [v for v in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT") if env.get(v)]
    disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    if config.tracing == "false":
        return TracingPlan(False, config.trace_sampling_ratio, False, "", "--tracing=false")
    if config.tracing == "true":
        return TracingPlan(True, config.trace_sampling_ratio, bool(named) or not project, project, "--tracing=true")
    if disabled:
        return TracingPlan(False, config.trace_sampling_ratio, False, "", "OTEL_SDK_DISABLED=true")
    if named or project:
        reason = named[0] if named else "--trace-stackdriver-project-id"
        return TracingPlan(True, config.trace_sampling_ratio, bool(named), project, reason)
    return TracingPlan(False, config.trace_sampling_ratio, False, "", "no OTEL_EXPORTER_OTLP_ENDPOINT")


def start_tracing(the_plan: TracingPlan, service_name: str, env: Mapping[str, str], say: Callable[..., None]):
    """
    The L{Tracing} of C{the_plan}, exporting; None when it is off or cannot
    export. C{say(level, text)} gets the start-up lines (one when on, one
    saying what to install when something is missing).
    """
    if not the_plan.enabled:
        return None
    try:
        from opentelemetry.sdk.trace import TracerProvider  # noqa: F401
    except ImportError:
        say("warn", "Tracing is asked for (%s) but OpenTelemetry is not installed: "
            "pip install 'relay[tracing]'; running without tracing" % (the_plan.reason,))
        return None
    exporters = []
    where = []
    if the_plan.project_id:
        try:
            from opentelemetry.exporter.cloud_trace import CloudTraceSpanExporter
        except ImportError:
            say("warn", "--trace-stackdriver-project-id=%s: exporting to Cloud Trace needs the %s package "
                "(pip install %s), or set OTEL_EXPORTER_OTLP_ENDPOINT to an OpenTelemetry Collector that "
                "exports to Cloud Trace; %s" % (
                    the_plan.project_id, GCP_PACKAGE, GCP_PACKAGE,
                    "traces go to the OTLP endpoint only" if the_plan.otlp else "running without tracing"))
        else:
            exporters.append(CloudTraceSpanExporter(project_id=the_plan.project_id))
            where.append("Cloud Trace project " + the_plan.project_id)
    if the_plan.otlp:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporters.append(OTLPSpanExporter())
        where.append("OTLP " + (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                                or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318"))
    if not exporters:
        return None
    tracing = Tracing(exporters, service_name, the_plan.ratio, env)
    say("info", "Tracing on (%s): spans to %s, %s" % (the_plan.reason, ", ".join(where), tracing.sampling))
    return tracing


class Tracing:
    """The SDK's provider and tracer for one process, and propagation both ways."""

    def __init__(self, exporters, service_name: str, ratio: float, env: Mapping[str, str]):
        from opentelemetry import trace
        from opentelemetry.propagators.b3 import B3MultiFormat
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.api = trace
        self.SpanKind = trace.SpanKind
        named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
        resource = Resource.create({} if named else {"service.name": service_name})
        if env.get("OTEL_TRACES_SAMPLER"):
            sampler = None  # the SDK reads OTEL_TRACES_SAMPLER(_ARG) itself
            self.sampling = "sampler from OTEL_TRACES_SAMPLER"
        else:
            sampler = ParentBased(TraceIdRatioBased(ratio))
            self.sampling = "parent-based, roots sampled at %g" % (ratio,)
        self.provider = TracerProvider(sampler=sampler, resource=resource)
        for exporter in exporters:
            self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("relay")
        self.w3c = TraceContextTextMapPropagator()
        self.b3 = B3MultiFormat()

    def shutdown(self) -> None:
        """Export what is left (the batch processor's queue), at the process's end."""
        self.provider.shutdown()

    def extract(self, headers: Dict[str, List[str]]):
        """The context of C{headers} (lower-case names): W3C wins over B3; bad values are ignored."""
        return self.w3c.extract(headers, context=self.b3.extract(headers))

    def start(self, name: str, parent, kind=None, attributes=None):
        """A span under C{parent} (a span, a context, or None: the extracted one)."""
        if parent is not None and not isinstance(parent, dict):
            parent = self.api.set_span_in_context(parent)
        return self.tracer.start_span(
            name, context=parent, kind=kind if kind is not None else self.SpanKind.INTERNAL, attributes=attributes
        )

    def headers_for(self, span, b3: bool) -> Dict[str, str]:
        """C{span}'s context as headers (lower-case names)."""
        carrier: Dict[str, str] = {}
        context = self.api.set_span_in_context(span)
        self.w3c.inject(carrier, context=context)
        if b3:
            self.b3.inject(carrier, context=context)
        return carrier

    def user_request(self, request, backend: str, path: str) -> "UserTrace":
        return UserTrace(self, request, backend, path)

    def relayed(self, message, backend_address: str) -> "RelayedTrace":
        return RelayedTrace(self, message, backend_address)


def trace_id_of(span) -> Optional[str]:
    """C{span}'s trace id in hex, when it is sampled (the admin view shows it)."""
    context = span.get_span_context()
    return "%032x" % (context.trace_id,) if context.trace_flags.sampled else None


def _propagates(parent_valid: bool, span) -> bool:
    """
    Whether C{span}'s context goes on: when the request brought a context,
    or the trace is sampled. A root that was not sampled still has a
    context; writing it would add headers the user never sent.
    """
    return parent_valid or span.get_span_context().trace_flags.sampled


def _twisted_trace_headers(headers) -> Dict[str, List[str]]:
    found: Dict[str, List[str]] = {}
    for name in _TRACE_HEADERS_BYTES:
        values = headers.getRawHeaders(name)
        if values:
            found[name.decode("ascii")] = [v.decode("latin-1") for v in values]
    return found


class UserTrace:
    """
    The server's spans for one user request, in Go's names: the HTTP
    handler's span (named by the URL path), C{Received user client request
    <path>} under it, and under that the steps of the relay. The context of
    the second one replaces the user's trace headers in what is relayed.
    """

    def __init__(self, tracing: Tracing, request, backend: str, path: str):
        self.tracing = tracing
        self.request = request
        headers = request.requestHeaders
        incoming = _twisted_trace_headers(headers)
        parent = tracing.extract(incoming) if incoming else None
        self.parent_valid = parent is not None and tracing.api.get_current_span(parent).get_span_context().is_valid
        host = (headers.getRawHeaders(b"host") or [b""])[0].decode("latin-1")
        address, _, port = host.rpartition(":") if host.rpartition(":")[2].isdigit() else (host, "", "")
        attributes = {
            "http.request.method": request.method.decode("latin-1"),
            "url.path": path,
            "url.scheme": "https" if request.isSecure() else "http",
            "network.protocol.version": request.clientproto.decode("latin-1").rpartition("/")[2],
            "relay.backend": backend,
        }
        if address:
            attributes["server.address"] = address
        if port:
            attributes["server.port"] = int(port)
        client = getattr(request.getClientAddress(), "host", None)
        if client:
            attributes["client.address"] = client
        agent = headers.getRawHeaders(b"user-agent")
        if agent:
            attributes["user_agent.original"] = agent[0].decode("latin-1")
        self.http = tracing.start(path, parent if self.parent_valid else None, tracing.SpanKind.SERVER, attributes)
        self.received = tracing.start("Received user client request " + path, self.http,
                                      attributes={"relay.backend": backend})
        # OpenTelemetry spans (the extra is untyped here), and the user's response.
        self.step: Any = None
        self.forward: Any = None
        self.response: Any = None
        self.ended = False
        request.notifyFinish().addBoth(self._finished)

    def _replace_headers(self, span) -> None:
        headers = self.request.requestHeaders
        for name in _TRACE_HEADERS_BYTES:
            headers.removeHeader(name)
        for key, value in self.tracing.headers_for(span, b3=False).items():
            headers.setRawHeaders(key.encode("ascii"), [value.encode("latin-1")])

    def read_body(self, size: int) -> None:
        """Go's C{Read request body}: here the body had arrived whole before routing."""
        self.http.set_attribute("http.request.body.size", size)
        span = self.tracing.start("Read request body", self.received, attributes={"http.request.body.size": size})
        span.end()
        if _propagates(self.parent_valid, self.received):
            self._replace_headers(self.received)

    def forwarding(self, peer: str) -> None:
        """The call goes to C{peer}, the replica that owns its backend."""
        self.http.set_attribute("relay.replica", peer)
        self.forward = self.tracing.start(
            "Forward to replica", self.received, self.tracing.SpanKind.CLIENT,
            {"relay.replica": peer, "server.address": peer.rpartition(":")[0] or peer},
        )
        if _propagates(self.parent_valid, self.forward):
            self._replace_headers(self.forward)

    def scheduling(self) -> None:
        self.step = self.tracing.start("Schedule request for pickup", self.received)

    def scheduled(self, response, request_id: Optional[str]) -> None:
        """After the broker took the request (C{request_id}) or refused it (None)."""
        self.step.end()
        self.step = None
        if request_id is None:
            return
        self.response = response
        response.trace = self
        response.trace_id = trace_id_of(self.http)
        for span in (self.http, self.received):
            span.set_attribute("relay.request_id", request_id)
        self.step = self.tracing.start("Waiting for first response", self.received)

    def first_response(self, status: int) -> None:
        """The relay-client's first message, with its status."""
        if self.step is not None:
            self.step.set_attribute("http.response.status_code", status)
            if status == 101:
                # As in Go, the wait lasts as long as the upgraded stream.
                self.step.set_attribute("notes", "Received 101 switching protocols.")
                return
            self.step.end()
        self.step = self.tracing.start("Forwarding backend response to user-client", self.received)

    def tunnel_over(self, _) -> None:
        """An upgraded connection ended: the request that never finishes as such is over."""
        tunnel = self.response.tunnel
        for span in (self.http, self.received):
            span.set_attribute("http.request.body.size", tunnel.bytes_in)
        self._finished(None, 101)

    def _finished(self, outcome, code: Optional[int] = None) -> None:
        if self.ended:
            return None
        self.ended = True
        try:
            code = self.request.code if code is None else code
            sent = self.response.bytes if self.response is not None else None
            if self.step is not None:
                if sent is not None:
                    self.step.set_attribute("http.response.body.size", sent)
                self.step.end()
            if self.forward is not None:
                self.forward.set_attribute("http.response.status_code", code)
                self.forward.end()
            for span in (self.received, self.http):
                span.set_attribute("http.response.status_code", code)
                if sent is not None:
                    span.set_attribute("http.response.body.size", sent)
                if code >= 500 or outcome is not None:
                    span.set_status(self.tracing.api.Status(self.tracing.api.StatusCode.ERROR))
                span.end()
        except Exception:
            log.failure("Tracing: ending a request's spans failed")
        return None


class RelayedTrace:
    """
    The relay-client's spans for one relayed request, in Go's names:
    C{Recv.<path>} on the context of the relayed request's headers,
    C{Sent.<path>} around the backend call (its context replaces the trace
    headers the backend gets), and the steps of the answer.
    """

    def __init__(self, tracing: Tracing, message, backend_address: str):
        self.tracing = tracing
        self.message = message
        incoming: Dict[str, List[str]] = {}
        for h in message.header:
            name = h.name.lower()
            if name in TRACE_HEADERS:
                incoming.setdefault(name, []).append(h.value)
        parent = tracing.extract(incoming) if incoming else None
        parent_valid = parent is not None and tracing.api.get_current_span(parent).get_span_context().is_valid
        url = message.url
        path = url[len("http://invalid"):] if url.startswith("http://invalid") else url
        path = path.partition("?")[0] or "/"
        attributes = {"relay.request_id": message.id, "http.request.method": message.method, "url.path": path,
                      "http.request.body.size": len(message.body)}
        self.recv = tracing.start("Recv." + path, parent if parent_valid else None, tracing.SpanKind.SERVER,
                                  attributes)
        host, _, port = backend_address.rpartition(":")
        sent_attributes = dict(attributes, **{"server.address": host or backend_address})
        if port.isdigit():
            sent_attributes["server.port"] = int(port)
        self.sent = tracing.start("Sent." + path, self.recv, tracing.SpanKind.CLIENT, sent_attributes)
        self.step: Any = None
        self.chunker: Any = None
        self.status: Optional[int] = None
        if _propagates(parent_valid, self.sent):
            kept = [h for h in message.header if h.name.lower() not in TRACE_HEADERS]
            del message.header[:]
            message.header.extend(kept)
            for name, value in tracing.headers_for(self.sent, b3=True).items():
                message.header.add(name=go_canonical(name), value=value)

    def failed(self, reason: str) -> None:
        """The backend could not be asked; the user gets a 500."""
        error = self.tracing.api.Status(self.tracing.api.StatusCode.ERROR, reason)
        self.sent.set_status(error)
        self.status = 500

    def answered(self, status: int) -> None:
        self.status = status
        self.sent.set_attribute("http.response.status_code", status)
        self.step = self.tracing.start("Creating response (proto marshaling)", self.recv)

    def chunking(self) -> None:
        self.step.end()
        self.step = self.tracing.start("Building (chunked) response channel", self.recv)

    def sending(self, chunker) -> None:
        self.step.end()
        self.chunker = chunker
        self.step = self.tracing.start("Sending response from channel", self.recv)

    def finished(self, result):
        try:
            sent = self.chunker.bytes_sent if self.chunker is not None else None
            broken = self.chunker.broken_off if self.chunker is not None else None
            if self.step is not None:
                if sent is not None:
                    self.step.set_attribute("http.response.body.size", sent)
                self.step.end()
            for span in (self.sent, self.recv):
                if self.status is not None:
                    span.set_attribute("http.response.status_code", self.status)
                if sent is not None:
                    span.set_attribute("http.response.body.size", sent)
                if broken is not None:
                    span.set_status(self.tracing.api.Status(self.tracing.api.StatusCode.ERROR, str(broken)))
                span.end()
        except Exception:
            log.failure("Tracing: ending a request's spans failed")
        return result


def tracing_for(reactor, config, service_name: str, env: Mapping[str, str], log):
    """
    The plan and the L{Tracing} (or None) of a side's C{config}, as its
    tap starts it: the start-up lines logged once the reactor runs (when
    twistd's log observer is in place), and the last spans exported at
    the process's end, after the services have stopped.
    """
    lines: List[tuple] = []
    the_plan = plan(config, env)
    tracing = start_tracing(the_plan, service_name, env, lambda level, text: lines.append((level, text)))
    if lines:
        reactor.callWhenRunning(_say, log, lines)
    if tracing is not None:
        reactor.addSystemEventTrigger("during", "shutdown", tracing.shutdown)
    return the_plan, tracing


def _say(log, lines) -> None:
    for level, text in lines:
        getattr(log, level)("{text}", text=text)
