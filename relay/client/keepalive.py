"""
A lean L{IAgent}: Twisted's HTTP/1.1 client protocol over kept-alive
connections, without L{twisted.web.client.Agent}'s per-request layers.

Every relayed request costs the relay client three HTTP exchanges (its poll,
the backend request, the posted response). An exchange through C{Agent}
and C{HTTPConnectionPool} costs markedly more CPU than the same exchange on
an C{HTTP11ClientProtocol} used directly (docs/performance.md): the URL is
parsed again, a Host value and a pool key are computed again, every
connection put back gets its own idle timer (a heap insert and a cancel per
request), and each reused connection is wrapped anew for the
retry. The client talks to one relay server and one backend, so this agent
keeps what those cost once per origin (C{scheme://host:port}) and does the
rest as Agent does:

  - the same C{HTTP11ClientProtocol} writes and parses every message, so
    framing, persistence (C{Connection: close}, HTTP/1.0) and error types
    are Twisted's;
  - a request that fails on a reused connection before any answer came is
    retried once on a new connection, under Agent's rules (idempotent
    method, no body, not cancelled): the server may have closed the
    connection while it sat idle;
  - idle connections are kept up to C{max_idle_per_host} per origin, the
    most recently used first, and closed after C{idle_timeout} (one timer
    for the whole agent, not one per connection);
  - connection failures reach the caller as the endpoint reports them.

The protocol under it is the process's HTTP/1.1 engine
(L{relay.http1_engine}): Twisted's, or the lean one of
L{relay.client.lean_http1}, which writes and parses the same bytes.
"""

from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

from relay import http1_engine
from relay.compat import (
    HTTP11ClientProtocol,
    Request,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseNeverReceived,
    client_idle,
    client_request,
    client_response_head,
    client_response_lost,
)
from relay.net.transport import corked

_RETRYABLE_METHODS = frozenset([b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"])
_MAX_ORIGINS = 64


def _retryable(request: Request, failure) -> bool:
    """Agent's rule (C{_RetryingHTTP11ClientProtocol._shouldRetry})."""
    if request.method not in _RETRYABLE_METHODS or request.bodyProducer is not None:
        return False
    value = failure.value
    if not isinstance(value, (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived)):
        return False
    return not any(r.check(CancelledError) for r in getattr(value, "reasons", ()))


class _ConnectionFactory(Factory):
    noisy = False  # no "Starting factory" line per connection

    def __init__(self, quiescent, protocol=HTTP11ClientProtocol):
        self.quiescent = quiescent
        self.protocol = protocol

    def buildProtocol(self, addr):
        return self.protocol(self.quiescent)


class _Origin:
    """One C{scheme://host:port}: its endpoint, Host value and idle connections."""

    def __init__(self, agent: "KeepAliveAgent", uri: URI, endpoint):
        self.endpoint = endpoint
        self.host = agent._host_value(uri)
        self.uri = uri  # for Request.absoluteURI's sake, of the first request
        self.kept = False  # whether the agent keeps it, and so its idle connections
        self.idle: List[Tuple[HTTP11ClientProtocol, float]] = []
        self.factory = _ConnectionFactory(lambda protocol: agent._put(self, protocol), agent._protocol)


@implementer(IAgent)
class KeepAliveAgent:
    """
    @param endpoint_factory: an L{IAgentEndpointFactory}, asked once per
        origin.
    @param engine: the C{--http1_engine} value (L{relay.http1_engine}).
    """

    def __init__(
        self,
        clock: IReactorTime,
        endpoint_factory: IAgentEndpointFactory,
        max_idle_per_host: int = 2,
        idle_timeout: float = 240.0,
        engine: str = "twisted",
    ):
        self.clock = clock
        self.endpoint_factory = endpoint_factory
        self.max_idle_per_host = max_idle_per_host
        self.idle_timeout = idle_timeout
        self._origins: Dict[bytes, _Origin] = {}
        self._sweep: Optional[IDelayedCall] = None
        self.engine = http1_engine.resolve(engine)
        if self.engine == "httptools":
            from relay.client.lean_http1 import LeanClientProtocol, LeanClientRequest

            self._protocol: Any = LeanClientProtocol
            self._new_request: Any = _lean_requests(LeanClientRequest)
            # The lean protocol writes a request, head and body, in one
            # piece itself: no cork needed (send(protocol, request)).
            self._send: Any = LeanClientProtocol.request
            # It hands the answer over at its head already.
            self._send_duplex: Any = LeanClientProtocol.request
        else:
            self._protocol = HTTP11ClientProtocol
            self._new_request = _twisted_request
            self._send = _send
            self._send_duplex = _send_duplex

    # IAgent.

    def request(self, method: bytes, uri: bytes, headers=None, bodyProducer=None, duplex: bool = False) -> Deferred:
        """
        L{IAgent.request}; with C{duplex}, the result fires as soon as the
        response's head arrives, even while C{bodyProducer} is still
        writing (a streamed upload whose backend answers as it reads).
        """
        origin, path = self._origin(uri)
        if headers is None:
            headers = Headers()
        # Validates method and path as Agent's requests do (no CR, LF, spaces),
        # and adds the Host header last, unless the caller gave one.
        request = self._new_request(method, path, headers, bodyProducer, origin)
        send = self._send_duplex if duplex else self._send
        while origin.idle:
            protocol, _ = origin.idle.pop()
            if client_idle(protocol):
                return send(protocol, request).addErrback(self._retry, origin, request)
        return self._connect(origin).addCallback(send, request)

    # Connections.

    def _origin(self, uri: bytes) -> Tuple[_Origin, bytes]:
        """The origin of C{uri}, and the path (with query) to ask it for."""
        scheme_end = uri.find(b"://")
        path_start = uri.find(b"/", scheme_end + 3) if scheme_end > 0 else -1
        # find(), not in: a bytes "in" first tries its operand as an integer,
        # and the TypeError it raises and drops costs more than the search.
        if path_start < 0 or uri.find(b"#") >= 0 or uri.find(b"?", 0, path_start) >= 0:
            # Unusual: no path, or a fragment. Let URI say what it means.
            parsed = URI.fromBytes(uri)
            key = b"%s://%s:%d" % (parsed.scheme, parsed.host, parsed.port)
            path = parsed.originForm
        else:
            key = uri[:path_start]
            path = uri[path_start:]
        origin = self._origins.get(key)
        if origin is None:
            parsed = URI.fromBytes(uri)
            origin = _Origin(self, parsed, self.endpoint_factory.endpointForURI(parsed))
            if len(self._origins) < _MAX_ORIGINS:
                self._origins[key] = origin
                origin.kept = True
        return origin, path

    @staticmethod
    def _host_value(uri: URI) -> bytes:
        """Agent's C{_computeHostValue}: the port only when it is not the scheme's default."""
        host = uri.host
        if b":" in host:
            host = b"[" + host + b"]"
        if (uri.scheme, uri.port) in ((b"http", 80), (b"https", 443)):
            return host
        return b"%s:%d" % (host, uri.port)

    def _connect(self, origin: _Origin) -> Deferred:
        return origin.endpoint.connect(origin.factory)

    def _retry(self, failure, origin: _Origin, request: Request):
        if not _retryable(request, failure):
            return failure
        return self._connect(origin).addCallback(lambda protocol: protocol.request(request))

    def _put(self, origin: _Origin, protocol: HTTP11ClientProtocol) -> None:
        """A connection finished its exchange and may carry another."""
        if not origin.kept:
            _drop(protocol)
            return
        if len(origin.idle) >= self.max_idle_per_host:
            oldest, _ = origin.idle.pop(0)
            _drop(oldest)
        origin.idle.append((protocol, self.clock.seconds()))
        if self._sweep is None:
            self._sweep = self.clock.callLater(self.idle_timeout, self._close_stale)

    def _close_stale(self) -> None:
        """Close connections idle for longer than C{idle_timeout}; look again while any are left."""
        self._sweep = None
        cutoff = self.clock.seconds() - self.idle_timeout
        next_due = None
        for origin in self._origins.values():
            keep = []
            for protocol, since in origin.idle:
                if not client_idle(protocol):
                    continue
                if since <= cutoff:
                    _drop(protocol)
                else:
                    keep.append((protocol, since))
                    due = since + self.idle_timeout
                    next_due = due if next_due is None else min(next_due, due)
            origin.idle = keep
        if next_due is not None:
            self._sweep = self.clock.callLater(max(1.0, next_due - self.clock.seconds()), self._close_stale)

    def closeCachedConnections(self) -> Deferred:
        """Close every idle connection, as C{HTTPConnectionPool}'s method of the name does."""
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        closing = []
        for origin in self._origins.values():
            for protocol, _ in origin.idle:
                if client_idle(protocol):
                    closing.append(protocol.abort())
            origin.idle = []
        if not closing:
            return succeed(None)
        return DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)


def _twisted_request(method, path, headers, body_producer, origin: _Origin) -> Request:
    if not headers.hasHeader(b"host"):
        headers = headers.copy()
        headers.addRawHeader(b"host", origin.host)
    return client_request(method, path, headers, body_producer, origin.uri)


def _lean_requests(request_class):
    """The lean engine's request maker (C{request_class}: L{relay.client.lean_http1.LeanClientRequest})."""

    def new_request(method, path, headers, body_producer, origin: _Origin):
        # The lean request writes the Host header after the caller's, as
        # the copy Twisted's path makes would have it, without the copy.
        host = None if headers.hasHeader(b"host") else origin.host
        return request_class(method, path, headers, body_producer, origin.uri, host)

    return new_request


def _send(protocol, request) -> Deferred:
    """
    Send C{request} on C{protocol}'s connection: its head and a body
    written at once (a relay-client's posts) leave in one piece.
    """
    return corked(protocol.transport, protocol.request, request)


def _drop(protocol: HTTP11ClientProtocol) -> None:
    """Close a pooled connection: it has been connected, so it has its transport."""
    transport = protocol.transport
    assert transport is not None
    transport.loseConnection()


def _send_duplex(protocol, request) -> Deferred:
    """
    Send C{request}, whose body streams, and fire with the response at its
    head, whether or not the body has been written by then. A failure
    before the head (the request could not be written, the connection
    died) fails the result; one after it belongs to the response's body.
    """
    written = protocol.request(request)
    head = client_response_head(protocol)
    result: Deferred = Deferred(lambda _: written.cancel())

    def answered(response):
        if not result.called:
            result.callback(response)
        return response

    def ended(outcome):
        if not result.called:
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)
        elif isinstance(outcome, Failure):
            # The answer had begun: its body must not wait for an end
            # that Twisted will not report.
            client_response_lost(protocol, outcome)
        return None

    head.addCallback(answered)
    written.addBoth(ended)
    return result
