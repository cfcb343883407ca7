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

What the user gets back, and the rules for it, are in L{relay.server.response}.

With several replicas (C{--peers}, docs/scaling.md) a L{Routing} is passed
in: once a call's name or id is known and its caller checked, a call for
another replica is forwarded there, and a user request for a name no
relay-client polls for yet waits for the name's first poll.
"""

from typing import List, Optional
from urllib.parse import quote, unquote, unquote_to_bytes

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from relay import wire
from relay.compat import request_gone
from relay.headers import HOP_BY_HOP_REQUEST, NOT_RELAYED, as_bytes, go_canonical
from relay.logs import Throttle, peer_text
from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse
from relay.server.auth import AccessPolicy
from relay.server.broker import Broker, BrokerError, Overloaded, UnknownBackend, UnknownRequest
from relay.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from relay.server.routing import Routing
from relay.server.site import poll_connection
from relay.server.response import UserResponse, http_error, plain, proto_text

log = Logger()

CLIENT_PREFIX = b"/client/"
REQUEST_CONTENT_TYPE = (
    b"application/vnd.google.protobuf;proto=cloudrobotics.http_relay.v1alpha1.HttpRequest"
)
# Kubernetes names (which robot names are) have at most 253 characters.
MAX_NAME_BYTES = 256
_NOT_RELAYED = as_bytes(NOT_RELAYED)
_HOP_BY_HOP_REQUEST = as_bytes(HOP_BY_HOP_REQUEST)


def _restarting(request) -> bytes:
    """
    A poll while the server drains: 503, which Go's relay-client (and ours)
    answers by backing off, where a 408 would make
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

    def __init__(self, broker: Broker, metrics_body, policy: AccessPolicy = None, routing: Optional[Routing] = None):
        super().__init__()
        policy = policy if policy is not None else AccessPolicy()
        self.client = ClientResource(broker, policy, routing)
        server = ServerResource(broker, policy, routing)
        self._exact = {
            b"/healthz": HealthResource(broker),
            b"/metrics": MetricsResource(metrics_body),
            b"/server/request": server,
            b"/server/response": server,
            b"/server/requeststream": server,
        }

    def route(self, request) -> Resource:
        """The resource for C{request}, chosen by its whole path."""
        redirect = _redirect_if_unclean(request)
        if redirect is not None:
            return redirect
        return self._exact.get(request.path, self.client)

    def getChildWithDefault(self, name, request):
        # Only for a request class other than RelayRequest, which calls
        # route() itself and sets no Server header.
        request.responseHeaders.removeHeader(b"server")
        return self.route(request)

    def render(self, request):
        request.responseHeaders.removeHeader(b"server")
        return self.route(request).render(request)


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


class _BrokerResource(Resource):
    """
    A leaf over the broker, the access policy and, with several replicas,
    the routing: where calls for other replicas' names go (and, for user
    requests, whether a name with no relay-client waits for its poll).
    """

    isLeaf = True

    def __init__(self, broker: Broker, policy: AccessPolicy = None, routing: Optional[Routing] = None):
        super().__init__()
        self.broker = broker
        self.policy = policy if policy is not None else AccessPolicy()
        self.routing = routing


class ServerResource(_BrokerResource):
    """The relay-client's endpoints: poll, post responses, pull streams."""

    def __init__(self, broker: Broker, policy: AccessPolicy = None, routing: Optional[Routing] = None):
        super().__init__(broker, policy, routing)
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
        peer = self.routing.owner(request, server, self.broker.stopping) if self.routing is not None else None
        if peer is not None:
            return self.routing.forward(request, peer)
        if self.broker.stopping:
            return _restarting(request)
        try:
            d = self.broker.get_request(server, poll_connection(request))
        except Overloaded as e:
            return _overloaded(request, e)
        self.broker.poll_from(server, request.getClientAddress())
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
        connection = poll_connection(request)
        if connection is not None:
            # Before the answer is written: on HTTP/1.1 a pipelined next
            # request could be read (and prove delivery) while it is.
            self.broker.sent(message, connection)
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
            return http_error(request, 400, "Duplicate or invalid request ID %s" % (proto_text(message.id),))
        name = self._acting_for(message.id)
        if not self.policy.relay_client_allowed(request, name):
            return self._forbidden(request, name)
        peer = self.routing.issuer(request, message.id) if self.routing is not None else None
        if peer is not None:
            return self.routing.forward(request, peer)
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
        peer = self.routing.issuer(request, request_id) if self.routing is not None else None
        if peer is not None:
            return self.routing.forward(request, peer)
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
        _answer_whole(request, body)
        return None

    d.addBoth(answer)
    d.addErrback(lambda f: log.failure("Unexpected error answering a relay client", f))
    return NOT_DONE_YET


def _answer_whole(request, body) -> None:
    """Answer C{request} later with C{body} (bytes or a list of them), as render's return value would."""
    if request_gone(request):
        return
    if isinstance(body, list):
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % sum(map(len, body))])
        for piece in body:
            request.write(piece)
    else:
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        request.write(body)
    request.finish()


class ClientResource(_BrokerResource):
    """User traffic: wrap the request into an L{HttpRequest} and relay it."""

    # relay.tracing.Tracing when tracing is on (chosen once, at start-up).
    tracer = None

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

        peer = self.routing.owner(request, backend, self.broker.stopping) if self.routing is not None else None
        # Checked before forwarding, so that callers without a token cannot
        # make replicas work; the owner checks (and consumes) it again.
        refused = self.policy.check_user(request, backend, consume=peer is None)
        if refused is not None:
            code, text = refused
            if code == 401:
                request.responseHeaders.setRawHeaders(b"www-authenticate", [b'Bearer realm="relay"'])
            return http_error(request, code, text)
        trace = None
        if self.tracer is not None:
            trace = self.tracer.user_request(request, backend, path.decode("latin-1"))
        if peer is not None:
            if trace is not None:
                trace.forwarding(peer)
            return self.routing.forward(request, peer, upgrade=_upgrade_requested(request) is not None)

        message = HttpRequest(
            method=request.method.decode("latin-1"),
            host=(request.requestHeaders.getRawHeaders(b"host") or [b""])[0].decode("latin-1"),
            url=_backend_url(backend_path, request.uri),
        )
        body, charge = request.take_body()
        if trace is not None:
            # Before the headers are copied: the context replaces the user's.
            trace.read_body(len(body))
        message.body = body
        del body
        _relayed_headers(request, message.header)

        response = UserResponse(self.broker, request)
        response.upgrade = _upgrade_requested(request)
        response.trace = trace
        return self._relay(request, backend, response, message, charge, wait=self.routing is not None)

    def _relay(self, request, backend: str, response: UserResponse, message: HttpRequest, charge: int, wait: bool):
        if wait and backend not in self.broker.backends and not self.broker.stopping:
            return self._wait_for_poll(request, backend, response, message, charge)
        if response.trace is not None:
            response.trace.scheduling()
        try:
            response.pending = self.broker.relay(backend, message, response, charge)
        except UnknownBackend as e:
            self.broker.bodies.give(charge)
            return plain(request, 503, str(e))
        except Overloaded as e:
            self.broker.bodies.give(charge)
            return _overloaded(request, e)
        except BrokerError as e:
            self.broker.bodies.give(charge)
            return http_error(request, 503, str(e))
        if response.trace is not None:
            response.trace.scheduled(response, response.pending.id)
        request.registerProducer(response.pending, True)
        _on_disconnect(request, response.user_gone)
        return NOT_DONE_YET

    def _wait_for_poll(self, request, backend: str, response: UserResponse, message: HttpRequest, charge: int):
        """
        No relay-client polls for C{backend} here yet: with several
        replicas its name may be moving from a dead one, so wait for the
        first poll (L{Broker.arrival}), then relay once more, without
        waiting again.
        """
        try:
            d = self.broker.arrival(backend)
        except Overloaded as e:
            self.broker.bodies.give(charge)
            return _overloaded(request, e)
        _on_disconnect(request, d.cancel)

        def arrived(_):
            if request_gone(request):
                self.broker.bodies.give(charge)
                return
            body = self._relay(request, backend, response, message, charge, wait=False)
            if body is not NOT_DONE_YET:
                _answer_whole(request, body)

        def gone(failure):
            self.broker.bodies.give(charge)
            failure.trap(CancelledError)

        d.addCallbacks(arrived, gone)
        d.addErrback(lambda f: log.failure("Unexpected error relaying a waiting request", f))
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


def _overloaded(request, error) -> bytes:
    request.responseHeaders.setRawHeaders(b"retry-after", [b"1"])
    return http_error(request, 503, str(error))


def _backend_url(path: bytes, uri: bytes) -> str:
    _, question, query = uri.partition(b"?")
    url = b"http://invalid" + path
    if query:
        url += b"?" + query
    return url.decode("utf-8", "replace")
