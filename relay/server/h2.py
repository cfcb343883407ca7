"""
HTTP/2 for the relay server: prior knowledge (h2c) and ALPN on the same port
as HTTP/1.1, with trailers.

gRPC user-clients talk to the relay over HTTP/2, usually without TLS, and
need the backend's trailers (C{grpc-status}) to arrive. Twisted serves
HTTP/2 through C{twisted.web._http2.H2Connection}, which turns every stream
into an ordinary twisted.web request on the same Site and Resources, with
HTTP/2 flow control wired into the producer/consumer interfaces: exactly
what the relay's streaming and back-pressure already rely on. What it lacks
is small, so we extend it rather than write a second HTTP/2 server:

  - It is only reached through ALPN on TLS. L{RelayChannel} (in
    C{relay.server.http1}) also recognises the HTTP/2 connection preface on a plain
    connection and hands the connection over, the same way Twisted's own
    generic channel does after ALPN picks C{h2}.
  - It cannot end a stream with trailers. L{TrailerH2Connection} is the
    C{h2} library's connection with one change: when Twisted ends a stream
    that has trailers waiting, the trailers go out as the final HEADERS frame
    (with END_STREAM) instead of an empty DATA frame.
  - Twisted's C{ssl:} endpoint strings do not offer ALPN;
    L{offer_h2_over_tls} adds it to such an endpoint's TLS context.

Two rules keep one hostile peer from hurting others on the connection or
the server:

  - Trailers never make the stack raise. A relay-client's trailers are
    filtered (C{relay.headers.valid_trailer}) before they get here, and
    L{TrailerH2Connection.end_stream} drops any connection-specific name
    that is left; should C{h2} still refuse them, the stream is reset. An
    exception there used to end Twisted's sending loop, which froze every
    other stream of the user's connection.
  - The slowloris guard (C{--header_timeout}) covers HTTP/2 too: a header
    block (HEADERS without END_HEADERS, or a frame still arriving) must be
    complete within the limit, and a connection with no open stream is
    closed (GOAWAY) after the limit. Only a complete request resets the
    clock: PING, SETTINGS or WINDOW_UPDATE frames do not.

A drain tells HTTP/2 clients to go elsewhere, as C{Connection: close} tells
HTTP/1.1 ones (L{RelayH2Connection.go_away}): a GOAWAY with NO_ERROR when it
begins, on every connection and on each one opened during it, and another
with the last stream id just before the connection closes. The first names
the highest possible stream id, as Go's server does: a client stops opening
streams, and no stream it opened before reading the frame is refused, so
none is retried elsewhere after the relay acted on it (an answer chunk
posted twice). C{h2}'s own C{close_connection} cannot serve the first: it
closes its state machine, and the streams in flight could send no more.
"""

from typing import Any, Callable, Dict, List, Optional, Tuple

import h2.connection
import h2.errors
import h2.exceptions
from hyperframe.frame import GoAwayFrame
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer

from relay.compat import (
    H2Connection,
    h2_header_block_pending,
    h2_stream_connection,
    set_ssl_context_factory,
    ssl_context_factory,
)
from relay.headers import CONNECTION_SPECIFIC, as_bytes
from relay.logs import DebugInfoLogger, peer_text

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_NOT_IN_H2_TRAILERS = as_bytes(CONNECTION_SPECIFIC)

# The highest stream id there can be: "every stream you opened is processed".
MAX_STREAM_ID = 2**31 - 1


class TrailerH2Connection(h2.connection.H2Connection):
    """An C{h2} connection whose C{end_stream} sends any pending trailers."""

    def __init__(self, config=None):
        super().__init__(config=config)
        self.pending_trailers: Dict[int, List[Tuple[bytes, bytes]]] = {}

    def end_stream(self, stream_id):
        trailers = self.pending_trailers.pop(stream_id, None)
        if trailers:
            trailers = [(k, v) for k, v in trailers if k not in _NOT_IN_H2_TRAILERS]
        # Twisted calls this from its sending loop, which an exception would
        # end for every stream of the connection: a stream h2 will not end
        # is reset instead, or left alone if even that is refused.
        try:
            if trailers:
                # Nothing is left for h2's validation to refuse (it would
                # run while the block is encoded, leaving the HPACK context
                # changed): what may still fail is a stream already reset.
                return self.send_headers(stream_id, trailers, end_stream=True)
            return super().end_stream(stream_id)
        except h2.exceptions.ProtocolError:
            try:
                return self.reset_stream(stream_id)
            except h2.exceptions.ProtocolError:
                return None


class RelayH2Connection(H2Connection):
    """Twisted's HTTP/2 server connection, able to send trailers."""

    _deadline = None
    _gone = False
    _went_away = False
    # The broker's record of the polls this connection carried
    # (relay.server.site.poll_connection).
    poll_connection = None
    _log = DebugInfoLogger()  # e.g. "Timing out client IPv4Address(...)"
    # Set by the channel that negotiated HTTP/2 (relay.server.http1).
    # Twisted types H2Connection.site from its "= None".
    site: Optional[Any]  # type: ignore[assignment]
    requestFactory: Callable[..., Any]

    def __init__(self, reactor=None):
        super().__init__(reactor)
        self.conn = TrailerH2Connection(config=self.conn.config)

    def connectionMade(self):
        super().connectionMade()
        self._watch_headers()
        if getattr(getattr(self, "site", None), "draining", False):
            self.go_away()

    def go_away(self, final: bool = False) -> None:
        """
        Ask the client to open no more streams on this connection (GOAWAY,
        NO_ERROR), letting the open ones finish. Not C{final}: every stream
        the client opened so far is processed. C{final}, when the connection
        is about to close: only those up to the last one the relay saw were;
        the client may retry later ones elsewhere.
        """
        if self._gone or self.transport is None:
            return
        if final:
            last = self.conn.highest_inbound_stream_id
        elif self._went_away:
            return
        else:
            last = MAX_STREAM_ID
        self._went_away = True
        frame = GoAwayFrame(stream_id=0, last_stream_id=last, error_code=h2.errors.ErrorCodes.NO_ERROR)
        # Whatever h2 has queued goes first; its state machine stays open.
        self.transport.write(self.conn.data_to_send() + frame.serialize())

    def dataReceived(self, data):
        super().dataReceived(data)
        self._watch_headers()

    def _requestDone(self, streamID):
        super()._requestDone(streamID)
        self._watch_headers()

    def _awaiting_headers(self) -> bool:
        """No open stream, or a header block still arriving."""
        return not self.streams or h2_header_block_pending(self.conn)

    def _watch_headers(self) -> None:
        timeout = getattr(getattr(self, "site", None), "header_timeout", None)
        if not timeout or self._gone:
            return
        if self._awaiting_headers():
            if self._deadline is None:
                self._deadline = self.callLater(timeout, self._headers_timed_out)
        elif self._deadline is not None:
            self._cancel_deadline()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _headers_timed_out(self) -> None:
        self._deadline = None
        transport = self.transport
        assert transport is not None  # the timer runs only while connected
        self._log.info(
            "Closing HTTP/2 connection: no complete request headers in time",
            peer=peer_text(transport.getPeer()),
        )
        self.timeoutConnection()

    def abortRequest(self, streamID):
        """
        Reset one stream; on a connection that is already closing (after a
        GOAWAY, e.g. its idle timeout) there is nothing to reset, and h2's
        refusal must not reach the caller (the broker's reaper).
        """
        try:
            super().abortRequest(streamID)
        except h2.exceptions.ProtocolError:
            if streamID in self.streams:
                self._requestDone(streamID)

    def set_trailers(self, stream_id: int, trailers: List[Tuple[bytes, bytes]]) -> None:
        """Send C{trailers} when the stream's response ends."""
        self.conn.pending_trailers[stream_id] = [(k.lower(), v) for k, v in trailers]

    def connectionLost(self, reason, _cancelTimeouts=True):
        self._gone = True
        self._cancel_deadline()
        self.conn.pending_trailers.clear()
        super().connectionLost(reason, _cancelTimeouts)


def stream_connection(request):
    """The L{RelayH2Connection} and stream id a request arrived on, if any."""
    channel = request.channel
    conn = h2_stream_connection(channel)
    if isinstance(conn, RelayH2Connection):
        return conn, channel.streamID
    return None, None


@implementer(IOpenSSLContextFactory)
class ALPNContextFactory:
    """
    Wraps a TLS context factory so that the server offers C{h2} and
    C{http/1.1} by ALPN, preferring C{h2}.
    """

    def __init__(self, wrapped, protocols=(b"h2", b"http/1.1")):
        self.wrapped = wrapped
        self.protocols = list(protocols)
        self._configured = set()
        # Configure the (cached) context now, before any connection uses it.
        self.getContext()

    def _select(self, connection, offered):
        for protocol in self.protocols:
            if protocol in offered:
                return protocol
        return b""

    def getContext(self):
        context = self.wrapped.getContext()
        # The wrapped factory hands out one context, which cannot be changed
        # once a connection used it: configure it the first time only.
        if id(context) not in self._configured:
            context.set_alpn_select_callback(self._select)
            self._configured.add(id(context))
        return context


def offer_h2_over_tls(endpoint):
    """
    Make an C{ssl:} endpoint (from L{serverFromString}) offer HTTP/2 by
    ALPN; any other endpoint is returned as it is.
    """
    if isinstance(endpoint, SSL4ServerEndpoint):
        set_ssl_context_factory(endpoint, ALPNContextFactory(ssl_context_factory(endpoint)))
    return endpoint
