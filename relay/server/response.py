"""
What the user gets back: Go's error bodies, and L{UserResponse}, which
turns the relay-client's messages into the user's HTTP response.

A relay-client's status is only used when it can be the final status
of an HTTP response. No status, or one outside 100..999: 500 C{Received
no header from relay client}, as before. An interim 1xx (100, 102,
103, ...) as the final status: 502, on HTTP/1.1 and HTTP/2 alike; it
would otherwise be written as an interim head followed by bytes the
user reads as the answer to its next request. A 101 switches protocols
only on HTTP/1.1, for a request that asked to upgrade (C{Connection:
upgrade} and C{Upgrade}), to the protocol it asked for when the 101
names one; otherwise 502, as Go's ReverseProxy answers a backend that
switches protocols unasked.

Its headers are checked before any is written (docs/security.md): invalid
names are dropped, values lose CR and LF, hop-by-hop headers are dropped,
and a body that disagrees with its C{Content-Length} is cut short or aborts
the connection, since it would otherwise confuse the user's connection.

A message with our C{Relay-Error} trailer says that the backend's answer
broke off (docs/protocol.md): an answer that had begun is aborted at once,
so that it cannot look complete, and one that had not is a 502 with the
reason. The trailer itself is never relayed. The request stays known until
the C{eof} the relay-client sends next (or the inactivity timeout), so that
that C{eof}, which only a server without the extension needs, gets its
C{200} like any other message.
"""

from typing import Any, Dict, List, Optional, Tuple

from twisted.logger import Logger

from relay.compat import request_gone
from relay.durations import format_duration
from relay.headers import HOP_BY_HOP, RELAY_ERROR, go_canonical, sanitize_value, valid_name
from relay.proto.http_relay_pb2 import HttpResponse
from relay.server.broker import Broker
from relay.server.errors import BrokerError, RelayClientLost, RequestExpired
from relay.server.events import Outcome
from relay.server.pending import PendingRequest, ResponseSink
from relay.server.tunnel import Tunnel

log = Logger()

TEXT_PLAIN = b"text/plain; charset=utf-8"
_RELAY_ERROR = RELAY_ERROR.lower()
# How much of a Relay-Error reason the user's 502 and our log show.
MAX_REASON = 300


def http_error(request, code: int, message: str) -> bytes:
    """Go's C{http.Error}: the body for C{render} to return."""
    request.setResponseCode(code)
    request.responseHeaders.setRawHeaders(b"content-type", [TEXT_PLAIN])
    request.responseHeaders.setRawHeaders(b"x-content-type-options", [b"nosniff"])
    return (message + "\n").encode("utf-8")


def plain(request, code: int, message: str) -> bytes:
    """A body written without C{http.Error} (no newline), as Go does in places."""
    request.setResponseCode(code)
    request.responseHeaders.setRawHeaders(b"content-type", [TEXT_PLAIN])
    return message.encode("utf-8")


def overloaded(request, error) -> bytes:
    """503 with C{Retry-After}: the broker refused more work for now."""
    request.responseHeaders.setRawHeaders(b"retry-after", [b"1"])
    return http_error(request, 503, str(error))


def on_disconnect(request, callback) -> None:
    """
    Run C{callback} if the peer goes away before we answered: through the
    request's C{when_gone} where it has one (the lean HTTP/1.1 engine's: a
    callback in a list, where a Deferred costs more than the rest of a
    small exchange's bookkeeping), else through C{notifyFinish}.
    """
    when_gone = getattr(request, "when_gone", None)
    if when_gone is not None:
        when_gone(callback)
        return
    request.notifyFinish().addErrback(lambda _: callback())


def answer_whole(request, body) -> None:
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


def proto_text(value) -> str:
    """A proto2 string field: str, or bytes when it was not valid UTF-8."""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def relay_error(message: HttpResponse) -> Optional[str]:
    """The reason of C{message}'s C{Relay-Error} trailer, if it has one."""
    for h in message.trailer:
        if proto_text(h.name).lower() == _RELAY_ERROR:
            return " ".join(proto_text(h.value).split())[:MAX_REASON] or "unknown error"
    return None


# What a valid header name from the relay-client becomes, by name: its key
# (lower case, bytes) and whether it is gRPC's, or _HOP_BY_HOP. The same
# few names come with every answer; the cache is bounded, the names being
# the backend's to choose.
_HOP_BY_HOP = object()
_names: Dict[str, Any] = {}


def _name_rule(name: str) -> Any:
    lower = name.lower()
    rule = _HOP_BY_HOP if lower in HOP_BY_HOP else (lower.encode("latin-1"), lower[:5] == "grpc-")
    if len(_names) < 1000:
        _names[name] = rule
    return rule


class UserResponse(ResponseSink):
    """
    The L{relay.server.pending.ResponseSink} for one user request: turns the relay-client's
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
        # The relay-client reported that the backend's answer broke off: the
        # user's answer is over, the request waits for the client's eof.
        self.broke_off = False
        # relay.tracing.UserTrace when tracing is on, and the trace's id
        # when it is sampled (for the admin view).
        self.trace = None
        self.trace_id: Optional[str] = None

    def user_gone(self) -> None:
        self.done = True
        if self.pending is not None and not self.broke_off:
            self.broker.cancel(self.pending)

    def deliver(self, message: HttpResponse, body: Optional[List[bytes]] = None) -> None:
        if self.done:
            return
        error = relay_error(message) if len(message.trailer) else None
        if not self.started:
            if self.trace is not None:
                self.trace.first_response(message.status_code)
            if error is not None:
                self._broke_off(error)
                return
            if not self._start(message):
                return
        for piece in (message.body,) if body is None else body:
            expected = self.expected
            overflow = expected is not None and self.bytes + len(piece) > expected
            if overflow and expected is not None:
                # More than declared would be read as the start of another
                # response on a keep-alive connection: never write it (Go's
                # ResponseWriter refuses it too).
                log.warn("Dropping body bytes beyond Content-Length", ID=self.pending.id if self.pending else None)
                piece = piece[: expected - self.bytes]
            if piece:
                self.bytes += len(piece)
                if self.tunnel is not None:
                    self.tunnel.write(piece)
                else:
                    self.request.write(piece)
            if overflow:
                break
        if error is not None:
            self._broke_off(error)
            return
        for h in message.trailer:
            self.request.add_trailer(proto_text(h.name), proto_text(h.value))
        if message.eof:
            self._finish()

    def _broke_off(self, reason: str) -> None:
        """
        A C{Relay-Error}: the backend's answer broke off. A begun answer is
        aborted, one not begun is a 502; the request itself ends with the
        relay-client's next message, its C{eof}.
        """
        pending = self.pending
        assert pending is not None  # set when the broker took the request, before any message
        self.broke_off = True
        self.broker.metrics.responses.labels("client", "backend_error", pending.backend).inc()
        if not self.started:
            self.started = True
            self._answer_error(502, "Backend response failed with error: " + reason)
        else:
            self._abort("backend answer broke off: " + reason)
        # Nobody reads any more: whatever comes until the eof is dropped
        # at once, even if the user's connection had paused us.
        pending.resumeProducing()

    def _start(self, message: HttpResponse) -> bool:
        """The first message: status and headers. False if unusable."""
        self.started = True
        request = self.request
        metrics = self.broker.metrics
        pending = self.pending
        assert pending is not None  # set when the broker took the request, before any message
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
            name, value = proto_text(h.name), proto_text(h.value)
            known = _names.get(name)
            if known is None:
                if not valid_name(name):
                    log.warn("Dropping invalid header name from relay client", ID=pending.id, Name=name)
                    continue
                known = _name_rule(name)
            if known is _HOP_BY_HOP:
                continue
            key, grpc = known
            if grpc:
                self.grpc_headers.append((name, value))
            values = grouped.get(key)
            if values is None:
                grouped[key] = [sanitize_value(value)]
            else:
                values.append(sanitize_value(value))
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
        for raw_name, values in grouped.items():
            request.responseHeaders.setRawHeaders(raw_name, values)
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
        offered = [proto_text(h.value).strip().lower().encode("latin-1", "replace") for h in message.header
                   if proto_text(h.name).lower() == "upgrade"]
        if offered and offered[0] != self.upgrade:
            return 502, "Backend switched to a protocol the request did not ask for"
        return None

    def _switch(self, message: HttpResponse) -> None:
        request = self.request
        lines = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        for h in message.header:
            name = proto_text(h.name)
            if valid_name(name):
                lines.append(
                    b"%s: %s\r\n" % (go_canonical(name).encode("latin-1"), sanitize_value(proto_text(h.value)))
                )
        lines.append(b"\r\n")
        request.unregisterProducer()
        pending = self.pending
        assert pending is not None  # set when the broker took the request, before any message
        self.tunnel = Tunnel(self.broker, pending)
        if self.trace is not None:
            self.tunnel.lost.addCallback(self.trace.tunnel_over)
        if self.broker.trace:
            log.debug("Switched protocols", ID=pending.id)
        request.channel.switch_protocol(self.tunnel, b"".join(lines))

    def _finish(self) -> None:
        pending = self.pending
        assert pending is not None  # set when the broker took the request, before any message
        self.done = True
        if self.broker.trace:
            log.debug("Wrote response chunk to request", ID=pending.id, Bytes=self.bytes)
        if self.tunnel is not None:
            self.tunnel.close(clean=True)
            return
        request = self.request
        if self.expected is not None and self.bytes < self.expected:
            # Finishing would leave the user waiting for the rest, or worse,
            # reading our next response as its body: the answer is cut short
            # (the Go relay-client's way to say that the backend broke off).
            self.broker.metrics.responses.labels("client", "backend_error", pending.backend).inc()
            self._abort("body shorter than its Content-Length")
            return
        for name, value in self.grpc_headers:
            request.add_trailer(name, value)
        request.unregisterProducer()
        if not request_gone(request):
            request.finish()

    def _answer_error(self, code: int, text: str, go_error: bool = False) -> None:
        self.done = True
        request = self.request
        request.unregisterProducer()
        if request_gone(request):
            return
        body = plain(request, code, text)
        if go_error:
            request.responseHeaders.setRawHeaders(b"x-content-type-options", [b"nosniff"])
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        request.write(body)
        request.finish()

    def fail(self, reason: BrokerError) -> None:
        if self.done:
            return
        pending = self.pending
        assert pending is not None  # set when the broker took the request, before any message
        if not self.started:
            if isinstance(reason, RequestExpired):
                self.broker.metrics.responses.labels("client", "missing_message", pending.backend).inc()
                self._answer_error(
                    504,
                    "Timeout after %s, indicating that the backend request took too long"
                    % (format_duration(self.broker.inactive_request_timeout),),
                )
            elif isinstance(reason, RelayClientLost):
                self.broker.metrics.responses.labels("client", "relay_client_lost", pending.backend).inc()
                self._answer_error(reason.status, str(reason) + "\n", go_error=True)
            else:
                # Go answers these with http.Error (a newline, nosniff).
                self._answer_error(503, (str(reason) or "Server is restarting") + "\n", go_error=True)
            return
        self._abort(type(reason).__name__)

    def outcome(self) -> Outcome:
        """What the user got: L{relay.server.pending.ResponseSink.outcome}, for those who watch the broker."""
        tunnel = self.tunnel
        if tunnel is not None:
            return Outcome(101, self.truncated, tunnel.bytes_in, self.bytes, self.trace_id)
        return Outcome(
            self.request.code or 0, self.truncated, 0, self.bytes, self.trace_id, self.request.responseHeaders
        )

    def _abort(self, reason: str) -> None:
        """
        A response has begun and will not be completed: it must not look
        complete, so the connection (or HTTP/2 stream) is aborted rather
        than finished.
        """
        self.done = True
        self.truncated = True
        log.warn(
            "Response ended early, aborting user connection",
            ID=self.pending.id if self.pending is not None else None,
            reason=reason,
        )
        if self.tunnel is not None:
            self.tunnel.close(clean=False)
            return
        self.request.unregisterProducer()
        abort_answer(self.request)


def abort_answer(request) -> None:
    """
    End an answer that will not be completed so that it cannot look
    complete: reset its HTTP/2 stream, or abort its HTTP/1.1 connection.
    """
    channel = request.channel
    if channel is None:
        return
    if hasattr(channel, "abortConnection"):
        channel.abortConnection()  # HTTP/2: reset just this stream
    else:
        channel.transport.abortConnection()
