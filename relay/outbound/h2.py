"""
An HTTP/2 client: the relay-client's requests to a gRPC backend
(C{--force_http2}), and a server replica's calls passed to the replica that
owns them (L{relay.server.forward}).

Why this module exists: gRPC servers speak HTTP/2 only and answer with
trailers (C{grpc-status}, C{grpc-message}), and Twisted has an HTTP/2
I{server} but no HTTP/2 I{client}: C{Agent} speaks HTTP/1.1, which a gRPC
server does not accept and which drops trailers anyway. So this is a small
HTTP/2 client protocol of its own. The C{h2} library does the protocol work
for us: framing, HPACK, the stream state machines, header validation,
SETTINGS and PING answers, and the flow-control bookkeeping (our windows and
the peer's). What is left here is the I/O and the policy:

  - One connection per peer, opened on the first request and shared by
    all of them (streams are multiplexed); a new one is opened when it
    closes, is refused by GOAWAY, or has sat idle. With C{http} it is
    cleartext HTTP/2 with prior knowledge (h2c), as gRPC expects; with
    C{https} it is TLS that must choose C{h2} by ALPN.
  - The request (an L{OutboundRequest}, bytes throughout): pseudo-headers
    from it, its headers without the HTTP/1.1 connection-specific ones
    (C{te: trailers} is kept: gRPC servers require it), and the body, which
    arrives whole, sent as the peer's flow-control windows allow.
  - The response goes to a sink (the relay-client's
    L{relay.client.chunker.Chunker}, or the user's request when a replica
    forwards): status and headers first, DATA as it comes, and the
    trailers at the end. Back-pressure is HTTP/2's own flow control: while
    the sink pauses us we do not acknowledge what we received, so the
    stream's window closes and the peer stops sending. Each stream can
    therefore hold at most its window (L{STREAM_WINDOW}) of unread data
    beyond what the sink holds, however big the answer.
"""

from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.headers import H2_BACKEND_DROPS, as_bytes, go_canonical, sanitize_raw, valid_raw_name
from relay.outbound import IDLE_CONNECTION_TIMEOUT
from relay.outbound.connect import BackendError, connect_error, connect_own
from relay.outbound.request import OutboundRequest, RawHeader
from relay.outbound.tls import TrustPolicy

Header = Tuple[str, str]
_DROPS = as_bytes(H2_BACKEND_DROPS)

# What each stream may have in flight towards us before we read it (Go's
# HTTP/2 transport uses 4 MiB). The connection's window is made so large
# that only the streams' windows limit anything, as Go does, so that one
# paused stream cannot hold up the others.
STREAM_WINDOW = 1024 * 1024
CONNECTION_WINDOW = 1 << 30


def request_headers(request: OutboundRequest) -> List[RawHeader]:
    """The HEADERS of C{request}: pseudo-headers first, names lower case."""
    headers = [
        (b":method", request.method),
        (b":scheme", request.scheme.encode("ascii")),
        (b":authority", request.host),
        (b":path", request.target),
    ]
    for name, value in request.headers:
        lower = name.lower()
        if lower in _DROPS or not valid_raw_name(name):
            continue
        if lower == b"te" and value.strip().lower() != b"trailers":
            continue  # The only TE that HTTP/2 allows.
        headers.append((lower, sanitize_raw(value)))
    if request.body or request.method.upper() in (b"POST", b"PUT", b"PATCH"):
        headers.append((b"content-length", b"%d" % (len(request.body),)))
    return headers


def _raw(headers) -> List[RawHeader]:
    return [(name, value) for name, value in headers if not name.startswith(b":")]


def _decode(headers: List[RawHeader]) -> List[Header]:
    """Headers as the relay-client's protocol carries them: Go's names, text values."""
    return [(go_canonical(name.decode("latin-1")), value.decode("utf-8", "replace")) for name, value in headers]


@implementer(IPushProducer)
class _StreamProducer:
    """A response stream as the chunker's producer."""

    def __init__(self, stream: "_Stream"):
        self.stream = stream

    def pauseProducing(self) -> None:
        self.stream.paused = True

    def resumeProducing(self) -> None:
        self.stream.paused = False
        self.stream.acknowledge()

    def stopProducing(self) -> None:
        self.stream.cancel()


class _Stream:
    """One request on the connection, and its response."""

    def __init__(self, connection: "H2ClientConnection", request: OutboundRequest):
        self.connection = connection
        self.request = request
        self.stream_id: Optional[int] = None
        self.head: Deferred = Deferred(lambda d: self.cancel())
        self.status = 0
        # As the peer sent them, names lower case (HTTP/2's rule).
        self.raw_headers: List[RawHeader] = []
        self.raw_trailers: List[RawHeader] = []
        self.body_left = memoryview(request.body)
        self.body_done = False
        self.paused = False
        self.unacknowledged = 0  # flow-controlled bytes received, not yet read
        self.ended = False
        self.closed = False  # no more frames for this stream either way
        self._sink = None
        self._pending: List[bytes] = []
        self.error: Optional[str] = None  # why the stream failed, if it did

    # The response, with the face of the relay-client's HTTP/1.1 BackendResponse.

    @property
    def headers(self) -> List[Header]:
        return _decode(self.raw_headers)

    @property
    def trailers(self) -> List[Header]:
        return _decode(self.raw_trailers)

    def deliver(self, sink) -> None:
        self._sink = sink
        sink.set_producer(_StreamProducer(self))
        pending, self._pending = self._pending, []
        for data in pending:
            sink.write(data)
        if self.error is not None:
            sink.fail(self.error)
        elif self.ended:
            sink.finish(self.trailers)
        else:
            self.acknowledge()

    # Events from the connection.

    def response_received(self, status: int, headers: List[RawHeader]) -> None:
        self.status, self.raw_headers = status, headers
        if not self.head.called:
            self.head.callback(self)

    def data_received(self, data: bytes, flow_controlled_length: int) -> None:
        self.unacknowledged += flow_controlled_length
        if self._sink is None:
            self._pending.append(data)
            return
        self._sink.write(data)
        self.acknowledge()

    def stream_ended(self) -> None:
        self.ended = True
        # Nothing more can come on this stream, so what it still holds of
        # the connection's window can go back.
        self._release()
        if self._sink is not None:
            self._sink.finish(self.trailers)

    def failed(self, reason: str) -> None:
        """
        The stream was reset (even with NO_ERROR: before END_STREAM the
        answer is incomplete), or the connection lost or refused by GOAWAY:
        an answer that had begun broke off.
        """
        self.ended = True
        self.error = reason
        self._release()
        if not self.head.called:
            self.head.errback(BackendError(self.request.describe(reason)))
        elif self._sink is not None:
            # The handler warns, unless the reset was ours (the user went away).
            self._sink.fail(reason)

    # Flow control.

    def acknowledge(self) -> None:
        """Hand the window back for what we read, unless we are paused."""
        if self.paused or self.closed or self._sink is None:
            return
        self._release()

    def _release(self) -> None:
        size, self.unacknowledged = self.unacknowledged, 0
        if size and self.stream_id is not None:
            self.connection.acknowledge(self.stream_id, size)

    def cancel(self) -> None:
        """Nobody wants the answer any more: reset the stream."""
        self.connection.cancel(self)


@implementer(IHandshakeListener)
class H2ClientConnection(Protocol):
    """
    An HTTP/2 connection to the backend, for many requests at once.

    @ivar ready: fires with C{self} once requests can be made (at once for
        h2c; after the TLS handshake chose C{h2}), or fails with a
        L{BackendError}.
    """

    # Set by the connect before any other method runs.
    transport: ITransport

    def __init__(self, reactor, request: OutboundRequest, tls: bool):
        self.reactor = reactor
        self.tls = tls
        self._first = request  # for error messages about the connection
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.ready: Deferred = Deferred()
        self.lost: Deferred = Deferred()
        self.streams: Dict[int, _Stream] = {}
        self._waiting: Deque[_Stream] = deque()
        self.usable = True
        self._connected = False
        self._idle_timer = None

    # Setting up.

    def connectionMade(self) -> None:
        self._connected = True
        if not self.tls:
            self._start()

    def handshakeCompleted(self) -> None:
        protocol = getattr(self.transport, "negotiatedProtocol", None)
        if protocol != b"h2":
            self.usable = False
            if not self.ready.called:
                self.ready.errback(
                    BackendError(
                        self._first.describe(
                            'http2: unexpected ALPN protocol "%s"; want "h2"'
                            % ((protocol or b"").decode("ascii", "replace"),)
                        )
                    )
                )
            self.transport.loseConnection()
            return
        self._start()

    def _start(self) -> None:
        self.conn.initiate_connection()
        self.conn.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            }
        )
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - self.conn.inbound_flow_control_window)
        self._flush()
        self._arm_idle_timer()
        if not self.ready.called:
            self.ready.callback(self)

    # Requests.

    def request(self, request: OutboundRequest) -> Deferred:
        """Fires with the response (a L{_Stream}) once its headers came."""
        stream = _Stream(self, request)
        if not self.usable:
            stream.failed("http2: client connection lost")
            return stream.head
        self._cancel_idle_timer()
        self._waiting.append(stream)
        self._open_waiting()
        return stream.head

    def _open_waiting(self) -> None:
        limit = self.conn.remote_settings.max_concurrent_streams
        while self._waiting and self.conn.open_outbound_streams < limit:
            stream = self._waiting.popleft()
            if stream.head.called:
                continue  # cancelled while it waited
            stream_id = self.conn.get_next_available_stream_id()
            try:
                self.conn.send_headers(stream_id, request_headers(stream.request), end_stream=not stream.request.body)
            except h2.exceptions.ProtocolError as e:
                stream.failed("http2: invalid request: %s" % (e,))
                continue
            stream.stream_id = stream_id
            self.streams[stream_id] = stream
            if not stream.request.body:
                stream.body_done = True
            self._send_body(stream)
        self._flush()

    def _send_body(self, stream: _Stream) -> None:
        while not stream.body_done and stream.stream_id is not None:
            window = min(self.conn.local_flow_control_window(stream.stream_id), self.conn.max_outbound_frame_size)
            if window <= 0:
                return  # the rest when the backend opens the window
            piece = stream.body_left[:window]
            stream.body_left = stream.body_left[len(piece) :]
            last = not stream.body_left
            self.conn.send_data(stream.stream_id, piece.tobytes(), end_stream=last)
            stream.body_done = last

    def acknowledge(self, stream_id: int, size: int) -> None:
        if self._connected:
            self.conn.acknowledge_received_data(size, stream_id)
            self._flush()

    def cancel(self, stream: _Stream) -> None:
        if stream.stream_id is None:
            if stream in self._waiting:
                self._waiting.remove(stream)
            return
        if not stream.closed and self._connected:
            self._close_stream(stream)
            try:
                self.conn.reset_stream(stream.stream_id, ErrorCodes.CANCEL)
            except h2.exceptions.StreamClosedError:
                pass
            # Its unread bytes still count against the connection's window.
            stream._release()
            self._flush()
            self._open_waiting()

    def _close_stream(self, stream: _Stream) -> None:
        stream.closed = True
        if stream.stream_id is not None:
            self.streams.pop(stream.stream_id, None)
        self._arm_idle_timer()

    # Frames from the backend.

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            # Including a malformed response, such as a body that
            # contradicts its Content-Length: h2 raises it from
            # receive_data, for the whole connection. Every stream on it
            # ends; the next request opens a new connection.
            try:
                self.conn.close_connection(error_code=getattr(e, "error_code", ErrorCodes.PROTOCOL_ERROR))
            except h2.exceptions.ProtocolError:
                pass
            self._flush()
            self._fail_all("http2: protocol error from server: %s: %s" % (type(e).__name__, e))
            self.transport.loseConnection()
            return
        for event in events:
            self._event(event)
        self._flush()
        self._open_waiting()

    def _event(self, event) -> None:
        if isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            for waiting in list(self.streams.values()):
                self._send_body(waiting)
            return
        if isinstance(event, h2.events.ConnectionTerminated):
            self._goaway(event)
            return
        stream = self.streams.get(getattr(event, "stream_id", None) or -1)
        if stream is None:
            return
        if isinstance(event, h2.events.ResponseReceived):
            headers = dict(event.headers)
            try:
                status = int(headers.get(b":status", b""))
            except ValueError:
                status = 0
            stream.response_received(status, _raw(event.headers))
        elif isinstance(event, h2.events.DataReceived):
            stream.data_received(event.data, event.flow_controlled_length)
        elif isinstance(event, h2.events.TrailersReceived):
            stream.raw_trailers = _raw(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            if not stream.body_done:
                # The answer is complete before the request was: stop
                # sending it (RFC 9113 8.1), without an error.
                stream.body_done = True
                try:
                    self.conn.reset_stream(event.stream_id, ErrorCodes.NO_ERROR)
                except h2.exceptions.StreamClosedError:
                    pass
            self._close_stream(stream)
            stream.stream_ended()
        elif isinstance(event, h2.events.StreamReset):
            self._close_stream(stream)
            stream.failed("stream error: stream ID %d; %s" % (event.stream_id, _error_name(event.error_code)))

    def _goaway(self, event) -> None:
        """
        The backend closes the connection. The C{h2} library accepts no
        frames after a GOAWAY, so even the streams the backend promised to
        finish end here; the next request opens a new connection.
        """
        self._fail_all(
            "http2: server sent GOAWAY and closed the connection; LastStreamID=%d, ErrCode=%s"
            % (event.last_stream_id or 0, _error_name(event.error_code))
        )
        self.transport.loseConnection()

    # The connection.

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self._connected:
            self.transport.write(data)

    def _fail_all(self, reason: str) -> None:
        self.usable = False
        streams = list(self._waiting) + list(self.streams.values())
        self._waiting.clear()
        for stream in streams:
            self._close_stream(stream)
            stream.failed(reason)

    def _arm_idle_timer(self) -> None:
        if self.streams or self._waiting or self._idle_timer is not None or not self.usable:
            return
        self._idle_timer = self.reactor.callLater(IDLE_CONNECTION_TIMEOUT, self.close)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            if self._idle_timer.active():
                self._idle_timer.cancel()
            self._idle_timer = None

    def close(self) -> Deferred:
        """Say goodbye and close; fires once the connection is gone."""
        self._cancel_idle_timer()
        self.usable = False
        if not self._connected:
            return succeed(None)
        try:
            self.conn.close_connection()
        except h2.exceptions.ProtocolError:
            pass
        self._flush()
        self.transport.loseConnection()
        d: Deferred[None] = Deferred()
        self.lost.addBoth(lambda _: d.callback(None))
        return d

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._connected = False
        self.usable = False
        self._cancel_idle_timer()
        if not self.ready.called:
            self.ready.errback(BackendError(connect_error(self._first, reason)))
        self._fail_all("http2: client connection lost")
        self.lost.callback(None)


def _error_name(code) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return "unknown error code 0x%x" % (code,)


class H2Backend:
    """
    Plain (non-upgrade) requests over HTTP/2, to one peer; the same C{open}
    as the relay-client's HTTP/1.1 backend. Upgrades (WebSockets) still go
    over HTTP/1.1, on connections of their own.
    """

    def __init__(self, reactor, policy: TrustPolicy):
        self.reactor = reactor
        self.policy = policy
        self._connection: Optional[H2ClientConnection] = None
        self._dialing = False
        self._waiters: List[Deferred] = []
        self._all: List[H2ClientConnection] = []

    async def open(self, request: OutboundRequest) -> _Stream:
        connection = await self._connect(request)
        return await connection.request(request)

    async def _connect(self, request: OutboundRequest) -> H2ClientConnection:
        if self._connection is not None and self._connection.usable:
            return self._connection
        # Everyone waits for the same connection; a waiter that is cancelled
        # leaves the dial to the others.
        d: Deferred = Deferred()
        self._waiters.append(d)
        if not self._dialing:
            self._dialing = True
            Deferred.fromCoroutine(self._dial(request)).addBoth(self._dialed)
        return await d

    def _dialed(self, result) -> None:
        self._dialing = False
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if d.called:
                continue
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    async def _dial(self, request: OutboundRequest) -> H2ClientConnection:
        connection = H2ClientConnection(self.reactor, request, request.scheme == "https")
        await connect_own(self.reactor, self.policy, request, connection, alpn=[b"h2"])
        self._all.append(connection)
        connection.lost.addBoth(lambda _: self._all.remove(connection))
        await connection.ready
        self._connection = connection
        return connection

    def closeCachedConnections(self) -> Deferred:
        """Close every connection, as L{HTTPConnectionPool}'s does, at shutdown."""
        self._connection = None
        return gatherResults([c.close() for c in list(self._all)])
