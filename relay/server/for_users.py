"""
The relay as its users see it: every path that is not one of the server's
own is user traffic for a backend, named by C{/client/{name}/} or by the
C{X-Server-Name} header, wrapped into an L{HttpRequest} for the
relay-client that polls for that name.

Named for who calls it (L{relay.server.for_relay_clients} is the other
side): the Go code calls this side "client", which inside the server
is easily read as the relay-client.

What the user gets back, and the rules for it, are in
L{relay.server.response}. With several replicas (C{--peers},
docs/scaling.md) a L{Routing} is passed in: a request for another
replica's name is forwarded there, and a request for a name no
relay-client polls for yet waits for the name's first poll.
"""

from typing import Optional
from urllib.parse import unquote

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from relay.compat import request_gone
from relay.headers import HOP_BY_HOP_REQUEST, NOT_RELAYED, as_bytes, go_canonical
from relay.proto.http_relay_pb2 import HttpRequest
from relay.server.auth import AccessPolicy
from relay.server.broker import Broker, BrokerError, Overloaded, UnknownBackend
from relay.server.response import UserResponse, answer_whole, http_error, on_disconnect, overloaded, plain
from relay.server.routing import Routing

log = Logger()

CLIENT_PREFIX = b"/client/"
_NOT_RELAYED = as_bytes(NOT_RELAYED)
_HOP_BY_HOP_REQUEST = as_bytes(HOP_BY_HOP_REQUEST)


class ClientResource(Resource):
    """
    User traffic: wrap the request into an L{HttpRequest} and relay it. A
    leaf over the broker, the access policy and, with several replicas,
    the routing: where requests for other replicas' names go, and whether
    a name with no relay-client waits for its poll.
    """

    isLeaf = True
    # relay.tracing.Tracing when tracing is on (chosen once, at start-up).
    tracer = None

    def __init__(self, broker: Broker, policy: Optional[AccessPolicy] = None, routing: Optional[Routing] = None):
        super().__init__()
        self.broker = broker
        self.policy = policy if policy is not None else AccessPolicy()
        self.routing = routing

    def streams_body(self, request, path: bytes) -> bool:
        """
        Whether the body of a user request for C{path} streams: not an
        upgrade, and for a backend here whose newest poll said it fetches
        bodies (our relay-client), or for one another replica owns (the
        body streams to that replica, which decides in turn).
        """
        if _upgrade_requested(request) is not None:
            return False
        backend = _backend_name(request, path)
        if not backend:
            return False
        if self.routing is not None and self.routing.owner(request, backend, self.broker.stopping) is not None:
            return True
        return self.broker.streams_bodies(backend)

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
        streamed = getattr(request, "streamed_body", None)
        if streamed is not None:
            # It follows, fetched by the relay-client.
            body, charge = b"", 0
        else:
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
            response.pending = self.broker.relay(
                backend, message, response, charge, body=getattr(request, "streamed_body", None)
            )
        except UnknownBackend as e:
            self.broker.bodies.give(charge)
            return plain(request, 503, str(e))
        except Overloaded as e:
            self.broker.bodies.give(charge)
            return overloaded(request, e)
        except BrokerError as e:
            self.broker.bodies.give(charge)
            return http_error(request, 503, str(e))
        if response.trace is not None:
            response.trace.scheduled(response, response.pending.id)
        request.registerProducer(response.pending, True)
        on_disconnect(request, response.user_gone)
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
            return overloaded(request, e)
        on_disconnect(request, d.cancel)

        def arrived(_):
            if request_gone(request):
                self.broker.bodies.give(charge)
                return
            body = self._relay(request, backend, response, message, charge, wait=False)
            if body is not NOT_DONE_YET:
                answer_whole(request, body)

        def gone(failure):
            self.broker.bodies.give(charge)
            failure.trap(CancelledError)

        d.addCallbacks(arrived, gone)
        d.addErrback(lambda f: log.failure("Unexpected error relaying a waiting request", f))
        return NOT_DONE_YET


def _backend_name(request, path: bytes) -> str:
    """The backend a user request for C{path} goes to, as L{ClientResource.render} reads it; "" for none."""
    if path.startswith(CLIENT_PREFIX):
        name_part = path[len(CLIENT_PREFIX) :].partition(b"/")[0]
        return unquote(name_part.decode("latin-1"), encoding="utf-8", errors="replace")
    names = request.requestHeaders.getRawHeaders(b"x-server-name")
    return names[0].decode("utf-8", "replace") if names else ""


def _connection_tokens(headers) -> frozenset:
    values = headers.getRawHeaders(b"connection")
    if not values:
        return _NO_TOKENS  # most requests: no set to build
    return frozenset(token.strip().lower() for value in values for token in value.split(b","))


_NO_TOKENS: frozenset = frozenset()


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
            values = [b"trailers"] if any(v.lower().find(b"trailers") >= 0 for v in values) else []
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


def _backend_url(path: bytes, uri: bytes) -> str:
    _, question, query = uri.partition(b"?")
    url = b"http://invalid" + path
    if query:
        url += b"?" + query
    return url.decode("utf-8", "replace")
