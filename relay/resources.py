"""
The relay server's resource tree: thin adapters between twisted.web and the
L{Broker}.

Routing follows the Go server's C{http.ServeMux}: C{/healthz}, C{/metrics}
and the three C{/server/...} paths match exactly; every other path is user
traffic for a backend, named by C{/client/{name}/} or by the
C{X-Server-Name} header. Status codes and bodies are the Go server's (its
errors come from C{http.Error}: C{text/plain; charset=utf-8},
C{X-Content-Type-Options: nosniff} and a trailing newline).

Rules that keep one peer from reaching another (docs/security.md):

  - Paths are cleaned as Go's ServeMux does, before any routing: when the
    percent-decoded path holds C{.} or C{..} segments or empty ones
    (C{//}), the answer is C{301} to the cleaned path and nothing is
    relayed. Decoding first means C{%2e%2e} is a dot segment too. An
    encoded slash (C{%2F}) stays part of its segment: it is relayed as it
    came, encoded, and is not a separator for the backend name either.
  - A backend name is at most L{MAX_NAME_BYTES} bytes (UTF-8): a longer
    poll gets 400, so the backend table, bounded by C{--max_backends},
    is bounded in bytes too.
  - With C{--client_tokens}, the name a response or a request-stream pull
    acts for is the pending request's own backend, never a prefix of its
    id: names may contain C{:}.
  - A relay-client's status is only used when it can be the final status
    of an HTTP response. No status, or one outside 100..999: 500 C{Received
    no header from relay client}, as before. An interim 1xx (100, 102,
    103, ...) as the final status: 502, on HTTP/1.1 and HTTP/2 alike; it
    would otherwise be written as an interim head followed by bytes the
    user reads as the answer to its next request. A 101 switches protocols
    only on HTTP/1.1, for a request that asked to upgrade (C{Connection:
    upgrade} and C{Upgrade}), to the protocol it asked for when the 101
    names one; otherwise 502, as Go's ReverseProxy answers a backend that
    switches protocols unasked.
"""

from typing import Dict, List, Optional, Tuple
from urllib.parse import quote, unquote, unquote_to_bytes

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from relay import wire
from relay.auth import AccessPolicy
from relay.broker import (
    Broker,
    BrokerError,
    Overloaded,
    PendingRequest,
    RequestExpired,
    UnknownBackend,
    UnknownRequest,
)
from relay.durations import format_duration
from relay.headers import HOP_BY_HOP, go_canonical, sanitize_value, valid_name
from relay.logs import Throttle, peer_text
from relay.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse
from relay.tunnel import Tunnel

log = Logger()

CLIENT_PREFIX = b"/client/"
REQUEST_CONTENT_TYPE = (
    b"application/vnd.google.protobuf;proto=cloudrobotics.http_relay.v1alpha1.HttpRequest"
)
TEXT_PLAIN = b"text/plain; charset=utf-8"
# Kubernetes names (which robot names are) have at most 253 characters.
MAX_NAME_BYTES = 256
# Request headers Go's server does not put into Request.Header.
_NOT_RELAYED = frozenset([b"host", b"transfer-encoding"])
_HOP_BY_HOP_REQUEST = frozenset(
    [b"keep-alive", b"proxy-connection", b"proxy-authorization", b"proxy-authenticate", b"trailer"]
)


def http_error(request, code: int, message: str) -> bytes:
    """Go's C{http.Error}: the body for C{render} to return."""
    request.setResponseCode(code)
    request.responseHeaders.setRawHeaders(b"content-type", [TEXT_PLAIN])
    request.responseHeaders.setRawHeaders(b"x-content-type-options", [b"nosniff"])
    return (message + "\n").encode("utf-8")


def _plain(request, code: int, message: str) -> bytes:
    """A body written without C{http.Error} (no newline), as Go does in places."""
    request.setResponseCode(code)
    request.responseHeaders.setRawHeaders(b"content-type", [TEXT_PLAIN])
    return message.encode("utf-8")


def _restarting(request) -> bytes:
    """
    A poll while the server drains: 503, which Go's relay-client (and ours)
    answers by backing off (0.1 s growing 1.5 times), where a 408 would make
    it poll again at once. Not logged: a drain must stay quiet.
    """
    request.responseHeaders.setRawHeaders(b"retry-after", [b"1"])
    return http_error(request, 503, "Server is restarting")


def _arg(request, name: bytes) -> str:
    values = request.args.get(name)
    return values[0].decode("utf-8", "replace") if values else ""


def _on_disconnect(request, callback) -> None:
    """Run C{callback} if the peer goes away before we answered."""
    request.notifyFinish().addErrback(lambda _: callback())


class RootResource(Resource):
    """Dispatches exact paths; everything else goes to the backends."""

    def __init__(self, broker: Broker, metrics_body, policy: AccessPolicy = None):
        super().__init__()
        policy = policy if policy is not None else AccessPolicy()
        self.client = ClientResource(broker, policy)
        server = ServerResource(broker, policy)
        self._exact = {
            b"/healthz": HealthResource(broker),
            b"/metrics": MetricsResource(metrics_body),
            b"/server/request": server,
            b"/server/response": server,
            b"/server/requeststream": server,
        }

    def getChildWithDefault(self, name, request):
        request.responseHeaders.removeHeader(b"server")
        redirect = _redirect_if_unclean(request)
        if redirect is not None:
            return redirect
        return self._exact.get(request.path, self.client)

    def render(self, request):
        request.responseHeaders.removeHeader(b"server")
        redirect = _redirect_if_unclean(request)
        if redirect is not None:
            return redirect.render(request)
        return self.client.render(request)


def clean_path(path: bytes) -> bytes:
    """
    Go's C{cleanPath} (net/http): C{path.Clean}, keeping a trailing slash.
    """
    if not path:
        return b"/"
    if not path.startswith(b"/"):
        path = b"/" + path
    out: List[bytes] = []
    for segment in path.split(b"/"):
        if segment in (b"", b"."):
            continue
        if segment == b"..":
            if out:
                out.pop()
            continue
        out.append(segment)
    cleaned = b"/" + b"/".join(out)
    if path.endswith(b"/") and cleaned != b"/":
        cleaned += b"/"
    return cleaned


def _redirect_if_unclean(request) -> Optional[Resource]:
    """A 301 to the cleaned path, when the decoded path is not clean."""
    path = request.path
    if request.method == b"CONNECT" or not path.startswith(b"/"):
        return None
    decoded = unquote_to_bytes(path)
    cleaned = clean_path(decoded)
    if cleaned == decoded:
        return None
    location = quote(cleaned, safe="/!$&'()*+,;=:@~").encode("ascii")
    _, question, query = request.uri.partition(b"?")
    if question:
        location += b"?" + query
    return _Redirect(location)


class _Redirect(Resource):
    """Go's C{http.Redirect} with 301."""

    isLeaf = True

    def __init__(self, location: bytes):
        super().__init__()
        self.location = location

    def render(self, request):
        request.setResponseCode(301)
        request.responseHeaders.setRawHeaders(b"location", [self.location])
        if request.method in (b"GET", b"HEAD"):
            request.responseHeaders.setRawHeaders(b"content-type", [b"text/html; charset=utf-8"])
            href = self.location.replace(b"&", b"&amp;").replace(b"<", b"&lt;").replace(b">", b"&gt;")
            href = href.replace(b'"', b"&#34;").replace(b"'", b"&#39;")
            return b'<a href="%s">Moved Permanently</a>.\n\n' % (href,)
        return b""


class HealthResource(Resource):
    isLeaf = True

    def __init__(self, broker: Broker):
        super().__init__()
        self.broker = broker

    def render(self, request):
        if self.broker.stopping:
            return http_error(request, 503, "Server is shutting down")
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain"])
        return b"ok"


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, render_metrics):
        super().__init__()
        self.render_metrics = render_metrics

    def render(self, request):
        request.responseHeaders.setRawHeaders(b"content-type", [METRICS_CONTENT_TYPE])
        return self.render_metrics()


class ServerResource(Resource):
    """The relay-client's endpoints: poll, post responses, pull streams."""

    isLeaf = True

    def __init__(self, broker: Broker, policy: AccessPolicy = None):
        super().__init__()
        self.broker = broker
        self.policy = policy if policy is not None else AccessPolicy()
        self._refusals = Throttle(broker.clock)
        self._routes = {
            b"/server/request": self.poll,
            b"/server/response": self.response,
            b"/server/requeststream": self.request_stream,
        }

    def render(self, request):
        return self._routes[request.path](request)

    def poll(self, request):
        server = _arg(request, b"server")
        if not server:
            return http_error(request, 400, "Missing server query parameter")
        if len(server.encode("utf-8")) > MAX_NAME_BYTES:
            return http_error(request, 400, "Backend name longer than %d bytes" % (MAX_NAME_BYTES,))
        if not self.policy.relay_client_allowed(request, server):
            return self._forbidden(request, server)
        if self.broker.stopping:
            return _restarting(request)
        try:
            d = self.broker.get_request(server)
        except Overloaded as e:
            return _overloaded(request, e)
        if self.broker.stats is not None:
            self.broker.stats.polled(server, getattr(request.getClientAddress(), "host", None))
        return _answer_when(request, d, self._polled)

    def _forbidden(self, request, name: str) -> bytes:
        # Anyone can be refused as often as they like: one line per 10 s.
        if self._refusals.allow():
            log.warn(
                "Relay client refused",
                ServerName=name,
                Peer=peer_text(request.getClientAddress()),
                Suppressed=self._refusals.take_suppressed(),
            )
        return http_error(request, 403, "Forbidden: this relay-client may not act for %s" % (name,))

    def _polled(self, request, message: Optional[HttpRequest]) -> bytes:
        if message is None:
            if self.broker.stopping:
                return _restarting(request)
            text = "No request received within timeout"
            if self.broker.trace:
                log.debug("Relay client got no request", ID=_arg(request, b"server"), error=text)
            return http_error(request, 408, text)
        request.responseHeaders.setRawHeaders(b"content-type", [REQUEST_CONTENT_TYPE])
        if self.broker.trace:
            log.debug("Relay client accepted request", ID=message.id)
        return wire.serialize(message, "body")

    def response(self, request):
        message = HttpResponse()
        try:
            body = wire.parse_pieces(message, request.content.pieces(), "body")
        except Exception:
            return http_error(request, 400, "proto: cannot parse invalid wire-format data")
        if not message.HasField("id"):
            return http_error(request, 400, "HttpResponse without id")
        if not isinstance(message.id, str):
            # proto2 hands invalid UTF-8 back as bytes: no id of ours.
            return http_error(request, 400, "Duplicate or invalid request ID %s" % (_text(message.id),))
        name = self._acting_for(message.id)
        if not self.policy.relay_client_allowed(request, name):
            return self._forbidden(request, name)
        try:
            d = self.broker.send_response(message, body)
        except UnknownRequest as e:
            return http_error(request, 400, str(e))
        return _answer_when(request, d, self._answered, self._refused)

    def _acting_for(self, request_id: str) -> str:
        """
        The backend a post or pull for C{request_id} acts for: the pending
        request's own (names may contain C{:}, so the id's prefix is not
        it); for an id that is not pending, the id's prefix up to its last
        C{:} (nothing is acted on, the token check only picks 403 or 400).
        """
        pending = self.broker.requests.get(request_id)
        if pending is not None:
            return pending.backend
        return request_id.rpartition(":")[0]

    def _answered(self, request, _) -> bytes:
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain"])
        if self.broker.trace:
            log.debug("Relay client sent response", ID=_arg(request, b"id"))
        return b"ok"

    def _refused(self, request, failure: Failure) -> bytes:
        if failure.check(UnknownRequest):
            return http_error(request, 400, str(failure.value))
        return http_error(request, 500, "Internal error relaying the response")

    def request_stream(self, request):
        request_id = _arg(request, b"id")
        if not request_id:
            return http_error(request, 400, "Missing id query parameter")
        name = self._acting_for(request_id)
        if not self.policy.relay_client_allowed(request, name):
            return self._forbidden(request, name)
        try:
            d = self.broker.get_request_stream(request_id)
        except UnknownRequest:
            return self._streamed(request, None, request_id)
        return _answer_when(request, d, lambda r, data: self._streamed(r, data, request_id))

    def _streamed(self, request, data: Optional[bytes], request_id: str) -> bytes:
        if data is None:
            # 410 Gone tells the relay-client that the request has completed.
            return http_error(request, 410, "No ongoing request with id " + request_id)
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/octet-data"])
        if self.broker.trace:
            log.debug("Relay client pulled streamed request chunk", ID=request_id, Bytes=len(data))
        return data


def _answer_when(request, d, on_result, on_failure=None):
    """
    Answer C{request} with the body C{on_result} makes of C{d}'s result (at
    once if it has one). A peer that goes away cancels C{d}, so that nothing
    is handed to a dead connection.
    """
    _on_disconnect(request, d.cancel)

    def answer(outcome):
        if isinstance(outcome, Failure):
            if outcome.check(CancelledError) or on_failure is None:
                return outcome if not outcome.check(CancelledError) else None
            body = on_failure(request, outcome)
        else:
            body = on_result(request, outcome)
        if request._disconnected:
            return None
        if isinstance(body, list):
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % sum(map(len, body))])
            for piece in body:
                request.write(piece)
        else:
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
            request.write(body)
        request.finish()
        return None

    d.addBoth(answer)
    d.addErrback(lambda f: log.failure("Unexpected error answering a relay client", f))
    return NOT_DONE_YET


class ClientResource(Resource):
    """User traffic: wrap the request into an L{HttpRequest} and relay it."""

    isLeaf = True

    def __init__(self, broker: Broker, policy: AccessPolicy = None):
        super().__init__()
        self.broker = broker
        self.policy = policy if policy is not None else AccessPolicy()

    def render(self, request):
        path = request.path
        if path.startswith(CLIENT_PREFIX):
            rest = path[len(CLIENT_PREFIX) :]
            name_part, slash, tail = rest.partition(b"/")
            backend = unquote(name_part.decode("latin-1"), encoding="utf-8", errors="replace")
            if not backend:
                return http_error(
                    request, 400, "Request path too short: missing remote server identifier"
                )
            backend_path = b"/" + tail
        else:
            names = request.requestHeaders.getRawHeaders(b"x-server-name")
            if not names:
                return http_error(request, 400, 'Request without required header: "X-Server-Name"')
            backend = names[0].decode("utf-8", "replace")
            backend_path = path

        refused = self.policy.check_user(request, backend)
        if refused is not None:
            code, text = refused
            if code == 401:
                request.responseHeaders.setRawHeaders(b"www-authenticate", [b'Bearer realm="relay"'])
            return http_error(request, code, text)

        message = HttpRequest(
            method=request.method.decode("latin-1"),
            host=(request.requestHeaders.getRawHeaders(b"host") or [b""])[0].decode("latin-1"),
            url=_backend_url(backend_path, request.uri),
        )
        body, charge = request.take_body()
        message.body = body
        del body
        _relayed_headers(request, message.header)

        response = UserResponse(self.broker, request)
        response.upgrade = _upgrade_requested(request)
        try:
            response.pending = self.broker.relay(backend, message, response, charge)
        except UnknownBackend as e:
            self.broker.bodies.give(charge)
            return _plain(request, 503, str(e))
        except Overloaded as e:
            self.broker.bodies.give(charge)
            return _overloaded(request, e)
        except BrokerError as e:
            self.broker.bodies.give(charge)
            return http_error(request, 503, str(e))
        request.registerProducer(response.pending, True)
        _on_disconnect(request, response.user_gone)
        return NOT_DONE_YET


def _connection_tokens(headers) -> set:
    return {
        token.strip().lower()
        for value in headers.getRawHeaders(b"connection", [])
        for token in value.split(b",")
    }


def _upgrade_requested(request) -> Optional[bytes]:
    """The protocol an upgrade request asks for (lower case), else None."""
    headers = request.requestHeaders
    upgrade = headers.getRawHeaders(b"upgrade")
    if upgrade and b"upgrade" in _connection_tokens(headers):
        return upgrade[0].strip().lower()
    return None


def _relayed_headers(request, out) -> None:
    """
    The user's headers as the backend should see them: one entry per value,
    Go-canonical names, without hop-by-hop headers (they describe the user's
    connection to us, not a request to the backend) except what an upgrade
    and gRPC need (C{Connection}/C{Upgrade} on upgrade requests, C{TE:
    trailers}), and with C{X-Forwarded-For}/C{-Proto} added.
    """
    headers = request.requestHeaders
    connection = _connection_tokens(headers)
    upgrading = b"upgrade" in connection and headers.hasHeader(b"upgrade")
    forwarded_for = None
    has_proto = False
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower in _NOT_RELAYED:
            continue
        if lower in (b"connection", b"upgrade"):
            if not upgrading:
                continue
        elif lower == b"te":
            values = [b"trailers"] if any(b"trailers" in v.lower() for v in values) else []
        elif lower in _HOP_BY_HOP_REQUEST or lower in connection:
            continue
        elif lower == b"x-forwarded-for":
            forwarded_for = b", ".join(values)
            continue
        elif lower == b"x-forwarded-proto":
            has_proto = True
        key = go_canonical(name.decode("latin-1"))
        for value in values:
            out.add(name=key, value=value.decode("utf-8", "replace"))
    peer = getattr(request.getClientAddress(), "host", None)
    if peer:
        chain = peer.encode("latin-1") if forwarded_for is None else forwarded_for + b", " + peer.encode("latin-1")
        out.add(name="X-Forwarded-For", value=chain.decode("utf-8", "replace"))
    if not has_proto:
        out.add(name="X-Forwarded-Proto", value="https" if request.isSecure() else "http")


def _text(value) -> str:
    """A proto2 string field: str, or bytes when it was not valid UTF-8."""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _overloaded(request, error) -> bytes:
    request.responseHeaders.setRawHeaders(b"retry-after", [b"1"])
    return http_error(request, 503, str(error))


def _backend_url(path: bytes, uri: bytes) -> str:
    _, question, query = uri.partition(b"?")
    url = b"http://invalid" + path
    if query:
        url += b"?" + query
    return url.decode("utf-8", "replace")


class UserResponse:
    """
    The L{ResponseSink} for one user request: turns the relay-client's
    messages into the user-client's response.
    """

    def __init__(self, broker: Broker, request):
        self.broker = broker
        self.request = request
        self.pending: Optional[PendingRequest] = None
        self.started = False
        self.done = False
        self.tunnel: Optional[Tunnel] = None
        # What the user's request asked to upgrade to, if it did.
        self.upgrade: Optional[bytes] = None
        self.grpc_headers: List[Tuple[str, str]] = []
        self.bytes = 0
        # The Content-Length the backend declared, when the body must match it.
        self.expected: Optional[int] = None
        # The answer was cut off part-way (for the admin view's counts).
        self.truncated = False

    def user_gone(self) -> None:
        self.done = True
        if self.pending is not None:
            self.broker.cancel(self.pending)

    def deliver(self, message: HttpResponse, body: Optional[List[bytes]] = None) -> None:
        if self.done:
            return
        if not self.started:
            if not self._start(message):
                return
        for piece in (message.body,) if body is None else body:
            overflow = self.expected is not None and self.bytes + len(piece) > self.expected
            if overflow:
                # More than declared would be read as the start of another
                # response on a keep-alive connection: never write it (Go's
                # ResponseWriter refuses it too).
                log.warn("Dropping body bytes beyond Content-Length", ID=self.pending.id)
                piece = piece[: self.expected - self.bytes]
            if piece:
                self.bytes += len(piece)
                if self.tunnel is not None:
                    self.tunnel.write(piece)
                else:
                    self.request.write(piece)
            if overflow:
                break
        for h in message.trailer:
            self.request.add_trailer(_text(h.name), _text(h.value))
        if message.eof:
            self._finish()

    def _start(self, message: HttpResponse) -> bool:
        """The first message: status and headers. False if unusable."""
        self.started = True
        request = self.request
        metrics = self.broker.metrics
        pending = self.pending
        if not message.HasField("status_code") or not 100 <= message.status_code <= 999:
            metrics.responses.labels("client", "missing_header", pending.backend).inc()
            self._answer_error(500, "Received no header from relay client")
            self.broker.reject(pending)
            return False
        status = message.status_code
        refused = self._refuse_status(message)
        if refused is not None:
            metrics.responses.labels("client", "invalid_status", pending.backend).inc()
            log.warn("Refusing status from relay client", ID=pending.id, Status=status)
            self._answer_error(*refused)
            self.broker.reject(pending)
            return False
        if status == 101:
            self._switch(message)
            return True
        request.setResponseCode(status)
        grouped: Dict[bytes, List[bytes]] = {}
        for h in message.header:
            name, value = _text(h.name), _text(h.value)
            if not valid_name(name):
                log.warn("Dropping invalid header name from relay client", ID=pending.id, Name=name)
                continue
            if name.lower() in HOP_BY_HOP:
                continue
            if name[:5].lower() == "grpc-":
                self.grpc_headers.append((name, value))
            grouped.setdefault(name.lower().encode("latin-1"), []).append(sanitize_value(value))
        lengths = grouped.get(b"content-length")
        if lengths is not None and status == 204:
            # A 204 has no body and no length (RFC 9110 8.6): a client that
            # believed one would read the next response as its body.
            del grouped[b"content-length"]
        elif lengths is not None:
            if len(set(lengths)) == 1 and lengths[0].isdigit():
                if request.method != b"HEAD" and status not in (204, 304):
                    self.expected = int(lengths[0])
                grouped[b"content-length"] = lengths[:1]
            else:
                # Conflicting or malformed: let the framing be chunked.
                del grouped[b"content-length"]
        for name, values in grouped.items():
            request.responseHeaders.setRawHeaders(name, values)
        return True

    def _refuse_status(self, message: HttpResponse) -> Optional[Tuple[int, str]]:
        """
        Why C{message}'s 1xx status cannot be this response's final status,
        as C{(code, text)} for the user; None when it can.
        """
        status = message.status_code
        if status >= 200:
            return None
        if status != 101:
            return 502, "Backend returned interim status %d as its final response" % (status,)
        if not hasattr(self.request.channel, "switch_protocol"):
            # HTTP/2 has no 101 (Go answers the same way).
            return 500, "Backend returned 101 Switching Protocols, which is not supported by the relay server"
        if self.upgrade is None:
            return 502, "Backend switched protocols for a request that did not ask to upgrade"
        offered = [_text(h.value).strip().lower().encode("latin-1", "replace") for h in message.header
                   if _text(h.name).lower() == "upgrade"]
        if offered and offered[0] != self.upgrade:
            return 502, "Backend switched to a protocol the request did not ask for"
        return None

    def _switch(self, message: HttpResponse) -> None:
        request = self.request
        lines = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        for h in message.header:
            name = _text(h.name)
            if valid_name(name):
                lines.append(b"%s: %s\r\n" % (go_canonical(name).encode("latin-1"), sanitize_value(_text(h.value))))
        lines.append(b"\r\n")
        request.unregisterProducer()
        self.tunnel = Tunnel(self.broker, self.pending)
        if self.broker.trace:
            log.debug("Switched protocols", ID=self.pending.id)
        request.channel.switch_protocol(self.tunnel, b"".join(lines))

    def _finish(self) -> None:
        self.done = True
        if self.broker.trace:
            log.debug("Wrote response chunk to request", ID=self.pending.id, Bytes=self.bytes)
        if self.tunnel is not None:
            self.tunnel.close(clean=True)
            return
        request = self.request
        if self.expected is not None and self.bytes < self.expected:
            # Finishing would leave the user waiting for the rest, or worse,
            # reading our next response as its body: the answer is cut short.
            self.done = False
            self.fail(RequestExpired("body shorter than its Content-Length"))
            return
        for name, value in self.grpc_headers:
            request.add_trailer(name, value)
        request.unregisterProducer()
        if not request._disconnected:
            request.finish()

    def _answer_error(self, code: int, text: str, go_error: bool = False) -> None:
        self.done = True
        request = self.request
        request.unregisterProducer()
        if request._disconnected:
            return
        body = _plain(request, code, text)
        if go_error:
            request.responseHeaders.setRawHeaders(b"x-content-type-options", [b"nosniff"])
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        request.write(body)
        request.finish()

    def fail(self, reason: BrokerError) -> None:
        if self.done:
            return
        pending = self.pending
        if not self.started:
            if isinstance(reason, RequestExpired):
                self.broker.metrics.responses.labels("client", "missing_message", pending.backend).inc()
                self._answer_error(
                    504,
                    "Timeout after %s, indicating that the backend request took too long"
                    % (format_duration(self.broker.inactive_request_timeout),),
                )
            else:
                # Go answers these with http.Error (a newline, nosniff).
                self._answer_error(503, (str(reason) or "Server is restarting") + "\n", go_error=True)
            return
        # A response has begun and will not be completed: it must not look
        # complete, so the connection is aborted rather than finished.
        self.done = True
        self.truncated = True
        log.warn("Response ended early, aborting user connection", ID=pending.id, reason=type(reason).__name__)
        if self.tunnel is not None:
            self.tunnel.close(clean=False)
            return
        request = self.request
        request.unregisterProducer()
        channel = request.channel
        if channel is None:
            return
        if hasattr(channel, "abortConnection"):
            channel.abortConnection()  # HTTP/2: reset just this stream
        else:
            channel.transport.abortConnection()
