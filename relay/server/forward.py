"""
Passing a call that reached the wrong replica to the replica that owns it.

With several replicas (docs/scaling.md) the ingress routes calls by backend
name, but not all of them: the Go relay-client's response POSTs carry the
name only inside their protobuf body, and while the ingress and the
replicas disagree about a dead peer, calls land on a replica that does not
own their name. Such a call is forwarded, and forwarding must keep every
promise the relay makes to a user: the answer streams (nothing is buffered
whole), a slow user slows the owner down, gRPC trailers arrive, and an
answer cut short never looks complete.

So calls go to the owner over cleartext HTTP/2, which every replica already
serves on its port: one connection per peer, multiplexed, with trailers and
per-stream flow control. That client is the one the relay-client uses for
gRPC backends (L{relay.outbound.h2}), which already does all of this. The
call's method, target and headers go to the owner as the bytes that came:
a header value that is not UTF-8 arrives as it was sent. A forwarded call carries C{Relay-Forwarded-By}, and a replica
never forwards such a call again, whatever its own view of the ring: two
replicas that disagree for a moment cannot bounce a call between them.

Request bodies arrive whole before the server routes a call (as in Go), so
they are passed on whole too. Upgrades (WebSockets) cannot ride HTTP/2
streams and are not forwarded here.
"""

from typing import Dict, List, Optional, Tuple

from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET

from relay.compat import request_gone
from relay.headers import FORWARDED_BY, HOP_BY_HOP, as_bytes
from relay.logs import Throttle
from relay.outbound.connect import BackendError
from relay.outbound.h2 import H2Backend, _Stream
from relay.outbound.request import OutboundRequest, RawHeader
from relay.outbound.tls import TrustPolicy
from relay.server.response import abort_answer

log = Logger()

_HOP_BY_HOP = as_bytes(HOP_BY_HOP)
_FORWARDED_BY = FORWARDED_BY.encode("ascii")

def forwarded(request) -> bool:
    """Whether another replica already passed this call on."""
    return request.requestHeaders.hasHeader(FORWARDED_BY.encode("ascii"))


def proxied_headers(request) -> List[Tuple[bytes, List[bytes]]]:
    """
    The request's headers for the owner, as a proxy passes them on: with
    the caller's address added to C{X-Forwarded-For} and C{X-Forwarded-Proto}
    set when absent, so that the backend learns who called as it would from
    the replica the call reached.
    """
    headers = [(n, v) for n, v in request.requestHeaders.getAllRawHeaders() if n.lower() != b"x-forwarded-for"]
    chain = request.requestHeaders.getRawHeaders(b"x-forwarded-for", [])
    caller = getattr(request.getClientAddress(), "host", None)
    if caller:
        chain = chain + [caller.encode("latin-1")]
    if chain:
        headers.append((b"X-Forwarded-For", [b", ".join(chain)]))
    if not request.requestHeaders.hasHeader(b"x-forwarded-proto"):
        headers.append((b"X-Forwarded-Proto", [b"https" if request.isSecure() else b"http"]))
    return headers


def peer_unreachable(request, throttle: Throttle, peer: str, reason: str) -> None:
    """
    The answer to a call the owner could not be reached for. Logged once per
    10 s: while a dead peer is still in the ring, every call for its names
    fails the same way.
    """
    if throttle.allow():
        log.warn("Could not forward to peer replica", peer=peer, error=reason, Suppressed=throttle.take_suppressed())
    body = b"Peer replica unreachable\n"
    request.setResponseCode(502)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % (len(body),))
    request.write(body)
    request.finish()


class _UserSink:
    """The owner's answer, written to the user's request as it comes."""

    def __init__(self, request):
        self.request = request
        self.producer = None

    def set_producer(self, producer) -> None:
        self.producer = producer
        if producer is not None:
            self.request.registerProducer(producer, True)

    def write(self, data: bytes) -> None:
        if not self.request.finished and not request_gone(self.request):
            self.request.write(data)

    def _over(self) -> bool:
        """Let go of the stream; True if the user's answer is over already."""
        request = self.request
        if self.producer is not None:
            request.unregisterProducer()
            self.producer = None
        return request.finished or request_gone(request)

    def fail(self, reason: str) -> None:
        """The owner's answer broke off: it must not look complete."""
        if self._over():
            return
        log.warn("Forwarded answer ended early, aborting user connection", error=reason)
        abort_answer(self.request)

    def finish(self, trailers=()) -> None:
        request = self.request
        if self._over():
            return
        add_trailer = getattr(request, "add_trailer", None)
        for name, value in trailers or ():
            if add_trailer is not None:
                add_trailer(name, value)
        request.finish()


class Forwarder:
    """
    Forwards calls to peer replicas, given as C{host:port}. C{myself} names
    this replica in C{Relay-Forwarded-By}, for the peer's logs and as the
    mark that stops a second hop.
    """

    def __init__(self, reactor, myself: str):
        self.reactor = reactor
        self.myself = myself
        self._peers: Dict[str, H2Backend] = {}
        self._failures = Throttle(reactor)

    def _backend(self, peer: str) -> H2Backend:
        backend = self._peers.get(peer)
        if backend is None:
            backend = self._peers[peer] = H2Backend(self.reactor, TrustPolicy())
        return backend

    def forward(self, request, peer: str):
        """Answer C{request} (a twisted.web request) with C{peer}'s answer."""
        headers: List[RawHeader] = []
        for name, values in proxied_headers(request):
            lower = name.lower()
            if lower in _HOP_BY_HOP and lower != b"te":
                continue
            headers.extend((name, value) for value in values)
        headers.append((_FORWARDED_BY, self.myself.encode("utf-8")))
        request.content.seek(0)
        call = OutboundRequest(
            method=request.method,
            scheme="http",
            address=peer,
            target=request.uri,
            host=request.getHeader(b"host") or peer.encode("ascii"),
            headers=headers,
            body=request.content.read(),
        )
        pending: Deferred = Deferred.fromCoroutine(self._backend(peer).open(call))
        state: Dict[str, Optional[_Stream]] = {"stream": None}

        def answered(stream) -> None:
            state["stream"] = stream
            if request.finished or request_gone(request):
                stream.cancel()
                return
            request.setResponseCode(stream.status)
            grouped: Dict[bytes, List[bytes]] = {}
            for name, value in stream.raw_headers:
                if name.lower() not in _HOP_BY_HOP:
                    grouped.setdefault(name, []).append(value)
            for raw_name, values in grouped.items():
                # Replaces twisted.web's own Date and Server: the owner's stand.
                request.responseHeaders.setRawHeaders(raw_name, values)
            stream.deliver(_UserSink(request))

        def failed(failure) -> None:
            if failure.check(CancelledError) or request.finished or request_gone(request):
                return
            reason = failure.value.args[0] if failure.check(BackendError) else str(failure.value)
            peer_unreachable(request, self._failures, peer, reason)

        def user_gone(_) -> None:
            stream = state["stream"]
            if stream is not None:
                stream.cancel()
            elif not pending.called:
                pending.cancel()

        pending.addCallbacks(answered, failed)
        request.notifyFinish().addErrback(user_gone)
        return NOT_DONE_YET

    def close(self) -> Deferred:
        """Close the connections to the peers (at shutdown)."""
        return gatherResults([b.closeCachedConnections() for b in self._peers.values()])
