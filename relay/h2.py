"""
HTTP/2 for the relay server: prior knowledge (h2c) and ALPN on the same port
as HTTP/1.1, with trailers.

gRPC user-clients talk to the relay over HTTP/2, usually without TLS, and
need the backend's trailers (C{grpc-status}) to arrive. Twisted serves
HTTP/2 through L{twisted.web._http2.H2Connection}, which turns every stream
into an ordinary twisted.web request on the same Site and Resources, with
HTTP/2 flow control wired into the producer/consumer interfaces: exactly
what the relay's streaming and back-pressure already rely on. What it lacks
is small, so we extend it rather than write a second HTTP/2 server:

  - It is only reached through ALPN on TLS. L{RelayChannel} (in
    C{relay.site}) also recognises the HTTP/2 connection preface on a plain
    connection and hands the connection over, the same way Twisted's own
    generic channel does after ALPN picks C{h2}.
  - It cannot end a stream with trailers. L{TrailerH2Connection} is the
    C{h2} library's connection with one change: when Twisted ends a stream
    that has trailers waiting, the trailers go out as the final HEADERS frame
    (with END_STREAM) instead of an empty DATA frame.
  - Twisted's C{ssl:} endpoint strings do not offer ALPN;
    L{offer_h2_over_tls} adds it to such an endpoint's TLS context.
"""

from typing import Dict, List, Tuple

import h2.connection
from zope.interface import implementer
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.web._http2 import H2Connection

from relay.logs import DebugInfoLogger

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class TrailerH2Connection(h2.connection.H2Connection):
    """An C{h2} connection whose C{end_stream} sends any pending trailers."""

    def __init__(self, config=None):
        super().__init__(config=config)
        self.pending_trailers: Dict[int, List[Tuple[bytes, bytes]]] = {}

    def end_stream(self, stream_id):
        trailers = self.pending_trailers.pop(stream_id, None)
        if trailers:
            return self.send_headers(stream_id, trailers, end_stream=True)
        return super().end_stream(stream_id)


class RelayH2Connection(H2Connection):
    """Twisted's HTTP/2 server connection, able to send trailers."""

    _log = DebugInfoLogger()  # e.g. "Timing out client IPv4Address(...)"

    def __init__(self, reactor=None):
        super().__init__(reactor)
        self.conn = TrailerH2Connection(config=self.conn.config)

    def set_trailers(self, stream_id: int, trailers: List[Tuple[bytes, bytes]]) -> None:
        """Send C{trailers} when the stream's response ends."""
        self.conn.pending_trailers[stream_id] = [(k.lower(), v) for k, v in trailers]

    def connectionLost(self, reason, _cancelTimeouts=True):
        self.conn.pending_trailers.clear()
        super().connectionLost(reason, _cancelTimeouts)


def stream_connection(request):
    """The L{RelayH2Connection} and stream id a request arrived on, if any."""
    channel = request.channel
    # H2Stream keeps its connection in _conn: the one place we look inside it.
    conn = getattr(channel, "_conn", None)
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
        endpoint._sslContextFactory = ALPNContextFactory(endpoint._sslContextFactory)
    return endpoint
