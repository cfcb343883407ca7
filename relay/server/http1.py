"""
HTTP/1.1 framing for the relay: a channel and a request class that add
the three things twisted.web lacks and a relay needs.

  - A cap on request bodies, enforced while they arrive: the protocol needs
    bodies whole, so they are buffered, and the cap keeps that bounded.
    Bodies are kept in memory (twisted.web spills bodies over 100 kB into a
    temporary file, which a relay that must put them into a protobuf anyway
    only pays for twice).
  - Trailers at the end of a chunked response, which the Go relay sends and
    gRPC-over-HTTP/1.1 tooling reads.
  - Handing a connection over to another protocol: to HTTP/2 when the
    client opens with the HTTP/2 preface (h2c, prior knowledge) or chose
    C{h2} by ALPN, and to a raw pipe after a 101 Switching Protocols. Both
    work the way twisted.web itself hands a connection to its HTTP/2
    implementation after ALPN: detach the HTTP/1.1 parser from the transport
    and pass on any bytes it had already read.

And a fourth, for bodies that stream to our relay-client instead
(L{relay.server.upload}, when the site says so): such a request is
processed as soon as its head is in, its body passed on read by read,
reading held while the relay-client has not taken it, C{100 Continue}
sent when the relay-client fetches it, and the connection closed (with a
linger) after an answer that came before the body ended.

It also holds the request-framing rules that protect the relay from its
users, as Go's C{net/http} server applies them (RFC 9112):

  - Host (section 3.2): an HTTP/1.1 request needs exactly one Host header,
    and a Host value must be a valid host (no blanks, no second value
    after a comma and a space); otherwise Go's C{400 Bad Request: missing
    required Host header}, C{400 Bad Request} (two or more) or C{400 Bad
    Request: malformed Host header}, and the connection closes.
  - Absolute-form targets (C{GET http://relay/client/x HTTP/1.1}, section
    3.2.2) are accepted and routed by their path and query; the target's
    authority is the request's host.
  - A request line over 16 KiB gets C{414 URI Too Long} and a header line
    over 16 KiB C{431 Request Header Fields Too Large} before the
    connection closes (twisted.web closed it without an answer).
  - A chunk size of more than 16 hex digits is refused with 400, as Go's
    C{parseHexUint} does, instead of waiting for an absurd chunk.
  - A client gets C{header_timeout} seconds to send a request's headers.

This layer knows nothing of the relay's endpoints, its broker or its stop:
it is the part another HTTP/1.1 engine would replace. What it needs from
the outside it reads from its factory, L{relay.server.site.RelaySite},
which decides everything else:

  - limits: C{max_request_body}, C{max_headers}, C{max_header_bytes},
    C{header_timeout}, and C{body_budget} (shared by all connections);
  - time: C{clock} (an C{IReactorTime}, for the header timer), and
    C{reactor} (for the HTTP/2 connection a channel hands over to);
  - lifetime: C{connection_made(channel)} and C{connection_lost(channel,
    reason, switched)}; while C{draining}, C{closes_after(request)} says
    whether an answer ends its connection;
  - C{http_date()} and C{resource}, whose C{route(request)}, if it has
    one, picks the resource from the whole path;
  - C{streams_body(request, path)}: whether a request whose head has
    arrived is processed at once, its body streaming as it comes
    (L{relay.server.upload}), with C{max_streamed_request_body}.
"""

from typing import TYPE_CHECKING, List, Optional, Tuple

from twisted.internet.interfaces import IProtocol, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http, server
from zope.interface import implementer

from relay.compat import (
    ChunkedTransferDecoder,
    MalformedChunkedDataError,
    bound_chunked_decoder,
    channel_network,
    chunk_line_buffer,
    detach_channel,
    reading_request_line,
    request_gone,
    request_line,
    request_target,
    set_channel_network,
)
from relay.config import ServerConfig
from relay.headers import origin_form, sanitize_value, valid_host, valid_trailer
from relay.logs import DebugInfoLogger
from relay.net.transport import corked
from relay.server.bodybuffer import BodyBuffer, too_large_text
from relay.server.h2 import PREFACE, RelayH2Connection, stream_connection
from relay.server.head_deadline import HeadDeadline
from relay.server.upload import LINGER, BodyReader, StreamedBody
from relay.server.upload import too_large_text as streamed_too_large_text

if TYPE_CHECKING:
    from relay.net.liveness import Watch
    from relay.server.broker import PollConnection
    from relay.server.site import RelaySite

# HTTP/2 connections keep twisted.web's idle timeout (its Site default).
H2_IDLE_TIMEOUT = 12 * 60 * 60


class RelayRequest(server.Request):
    """
    A request whose body is capped and kept in memory, and whose chunked
    response can end with trailers.
    """

    _log = DebugInfoLogger()  # e.g. a HEAD body eaten, per request

    # Twisted types Request.content from its "= None" (documented as a
    # file); gotLength sets ours before any chunk.
    content: BodyBuffer  # type: ignore[assignment]
    channel: "RelayChannel"

    # The relay sends the backend's Content-Type, or none: never a guess.
    defaultContentType = None

    # The lean engine's cheaper notifyFinish().addErrback (relay.server.
    # response.on_disconnect) and its public "connection gone" flag
    # (relay.compat.request_gone); this class has neither, and says so
    # without the cost of a failed attribute lookup.
    when_gone = None
    gone = None
    body_too_large = False
    _body_received = 0
    _refused = False
    # Bytes of this body charged to the site's BodyBudget and not yet handed
    # on to a pending request.
    _charged = 0

    # The body, when it streams to our relay-client (relay.server.upload):
    # the request is then processed once its head has arrived.
    streamed_body: Optional[StreamedBody] = None
    # Whether the user asked for 100 Continue on a streamed body (sent when
    # the relay-client fetches it).
    _expects_continue = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trailers: List[Tuple[bytes, bytes]] = []

    @property
    def max_body(self) -> int:
        site = getattr(self.channel, "site", None)
        return getattr(site, "max_request_body", ServerConfig.max_request_body)

    def gotLength(self, length: Optional[int]) -> None:
        self.content = BodyBuffer()
        if length is not None and length > self.max_body:
            self.body_too_large = True

    def handleContentChunk(self, data: bytes) -> None:
        if self.streamed_body is not None:
            self.streamed_body.received_data(data)
            return
        if self.body_too_large:
            return
        self._body_received += len(data)
        if self._body_received > self.max_body:
            self.body_too_large = True
            self.content = BodyBuffer()
            self.refuse_body()
            return
        budget = getattr(getattr(self.channel, "site", None), "body_budget", None)
        if budget is not None:
            if not budget.take(len(data)):
                self.body_too_large = True
                self.content = BodyBuffer()
                self._give_back()
                self.refuse_body(
                    503,
                    b"Service Unavailable",
                    "Too many request bodies buffered at once; try again later\n",
                )
                return
            self._charged += len(data)
        self.content.write(data)

    def take_body(self) -> Tuple[bytes, int]:
        """
        The whole body, and its charge against the body budget, which the
        caller now owns; the request keeps neither (a 100 MiB upload should
        not stay in memory twice while its response streams).
        """
        body = self.content.getvalue() if self.content is not None else b""
        self.content = BodyBuffer()
        charged, self._charged = self._charged, 0
        return body, charged

    def _give_back(self) -> None:
        if self._charged:
            budget = getattr(getattr(self.channel, "site", None), "body_budget", None)
            if budget is not None:
                budget.give(self._charged)
            self._charged = 0

    def connectionLost(self, reason) -> None:
        self._give_back()
        if self.streamed_body is not None:
            self.streamed_body.user_gone()
        super().connectionLost(reason)

    def stream_body(self, reader, length: Optional[int], limit: int) -> None:
        """
        Process this request now, its head complete, with its body to
        stream as it arrives (L{relay.server.upload}) from C{reader} (a
        L{BodyReader}); on HTTP/1.1 an C{Expect: 100-continue} is answered
        when the relay-client fetches the body.
        """
        self.streamed_body = StreamedBody(reader, length, limit, self._streamed_too_large)
        self.process()

    def _streamed_too_large(self) -> None:
        if self.startedWriting:
            # Imported here: this layer knows nothing of the relay's answers
            # but how to end one that cannot be completed.
            from relay.server.response import abort_answer

            abort_answer(self)
            return
        self.refuse_body(text=streamed_too_large_text(self.channel.site.max_streamed_request_body))

    def _prepare(self, command: bytes, path: bytes, version: bytes) -> None:
        """The method, target and query of the request line, as C{requestReceived} sets them."""
        path = self._origin_form(path)
        self.method, self.uri = command, path
        self.clientproto = version
        self.path, question, query = path.partition(b"?")
        # twisted's parse_qs: bytes in, bytes out (urllib's chokes on %ff).
        self.args = http.parse_qs(query, 1) if question else {}

    def refuse_body(
        self, code: int = 413, phrase: bytes = b"Request Entity Too Large", text: Optional[str] = None
    ) -> None:
        """
        Answer 413 (or C{code}) at once and close: the client may still be
        sending, and the only way to stop it is to hang up once it has our
        answer. On HTTP/2 only the stream is reset, after the answer.
        """
        if self._refused:
            return
        self._refused = True
        if text is None:
            text = too_large_text(self.max_body)
        body = text.encode("ascii")
        conn, stream_id = stream_connection(self)
        if conn is not None:
            self.setResponseCode(code)
            self.responseHeaders.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
            self.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
            self.write(body)
            self.finish()
            return
        self.channel.transport.write(
            b"HTTP/1.1 %d %s\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"X-Content-Type-Options: nosniff\r\n"
            b"Connection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (code, phrase, len(body), body)
        )
        self.channel.loseConnection()

    def requestReceived(self, command, path, version):
        """
        What twisted.web does here, less its parsing of form bodies into
        C{args}: a relay passes bodies on untouched, and parsing them cost a
        sixth of the server's time (every relay-client POST carries a
        Content-Type) and could even refuse a malformed multipart body that
        is none of our business.
        """
        if self.streamed_body is not None:
            # Processed at its head already: this is the end of its body.
            self.streamed_body.end()
            return
        if self.finished or self._refused:
            return
        if self.body_too_large:
            # HTTP/1.1 answered from the headers already and is closing;
            # HTTP/2 (whose declared length only set the flag) answers now.
            self.refuse_body()
            return
        self.content.seek(0, 0)
        self._prepare(command, path, version)
        self.process()

    def process(self) -> None:
        """
        twisted.web's, less what a relay pays for on each of the three
        exchanges of every relayed request and never uses: a C{Server}
        header (Go sends none, so the resources removed it again), a C{Date}
        formatted anew each time (the site keeps one per second), and the
        path split and unquoted into C{postpath} segments (a resource with
        a C{route} method, as the relay's root, routes on the whole path).
        Any other resource tree, and C{OPTIONS *}, get twisted.web's own.
        """
        site = self.site = self.channel.site
        route = getattr(site.resource, "route", None)
        if route is None or self.path == b"*":
            super().process()
            return
        self.responseHeaders.setRawHeaders(b"date", [site.http_date()])
        self.prepath = []
        self.postpath = []
        try:
            self.render(route(self))
        except BaseException:
            self.processingFailed(Failure())

    def _origin_form(self, target: bytes) -> bytes:
        """The path and query of an absolute-form target, whose authority becomes the Host header."""
        path, authority = origin_form(target)
        if authority:
            self.requestHeaders.setRawHeaders(b"host", [authority])
        return path

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            site = getattr(self.channel, "site", None)
            if site is not None and site.draining and site.closes_after(self):
                self._close_after_answer()
            body = self.streamed_body
            if body is not None and not body.ended:
                # Answered while the body still comes: whether all of it
                # will be read is not known, so this answer is the
                # connection's last, as Go's server says.
                self._close_after_answer()
            # The head and the first bytes of the body leave as one.
            corked(self.channel.transport, super().write, data)
            return
        super().write(data)

    def _close_after_answer(self) -> None:
        """
        Tell an HTTP/1.1 client this connection ends with this answer, so
        that it reconnects (to another server, in a drain) instead of
        reusing it.
        """
        conn, _ = stream_connection(self)
        if conn is not None or not isinstance(self.channel, http.HTTPChannel):
            return  # HTTP/2 has no Connection header
        self.responseHeaders.setRawHeaders(b"connection", [b"close"])
        self.channel.persistent = False

    def add_trailer(self, name: str, value: str) -> None:
        if valid_trailer(name):
            self.trailers.append((name.encode("latin-1"), sanitize_value(value)))

    def finish(self) -> None:
        body = self.streamed_body
        if body is not None and not body.ended and not self.finished and not request_gone(self):
            # Answered before the body ended (the backend answered early,
            # or the relay-client is gone): the rest of the body is not
            # read, so the connection cannot carry another request.
            self._close_after_answer()
            if isinstance(self.channel, RelayChannel):
                self.channel.discard_input()
        if self.trailers and not self.finished and not request_gone(self):
            if not self.startedWriting:
                self.write(b"")
            conn, stream_id = stream_connection(self)
            if conn is not None:
                conn.set_trailers(stream_id, self.trailers)
            elif self.chunked:
                lines = b"".join(b"%s: %s\r\n" % t for t in self.trailers)
                self.channel.write(b"0\r\n" + lines + b"\r\n")
                # The closing chunk is written: don't let the base class
                # write another one.
                self.chunked = False
        self._give_back()
        super().finish()


@implementer(BodyReader)
class _UserReader:
    """The user's side of a streamed body on HTTP/1.1: its channel's reading, and 100 Continue."""

    def __init__(self, request: RelayRequest):
        self.request = request

    def pause_reading(self) -> None:
        self.request.channel.hold_reading(True)

    def resume_reading(self) -> None:
        self.request.channel.hold_reading(False)

    def send_continue(self) -> None:
        request = self.request
        if request._expects_continue and not request.startedWriting and not request_gone(request):
            request._expects_continue = False
            request.channel.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")


class _ReadGate:
    """
    A channel's network producer, kept paused while a streamed body waits
    for the relay-client as well as whenever twisted.web pauses it: a
    resume of either kind must not undo the other's pause.
    """

    def __init__(self, network):
        self.network = network
        self.paused = False
        self.held = False

    def pauseProducing(self) -> None:
        self.paused = True
        self.network.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if not self.held:
            self.network.resumeProducing()

    def hold(self, held: bool) -> None:
        if held == self.held:
            return
        self.held = held
        if held:
            self.network.pauseProducing()
        elif not self.paused:
            self.network.resumeProducing()

    def stopProducing(self) -> None:
        self.network.stopProducing()

    def registerProducer(self, producer, streaming) -> None:
        self.network.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.network.unregisterProducer()


class _BoundedChunkedDecoder(ChunkedTransferDecoder):
    """
    Twisted's chunked decoder, refusing a chunk size of more than 16 hex
    digits as Go does (C{http chunk length too large}): it would otherwise
    wait for an absurd chunk.
    """

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        buffer = chunk_line_buffer(self)
        eol = buffer.find(b"\r\n")
        line = buffer if eol == -1 else buffer[:eol]
        size = line.split(b";", 1)[0]
        if len(size) > 16 and (eol != -1 or b";" in line):
            raise MalformedChunkedDataError("http chunk length too large")
        return super()._dataReceived_CHUNK_LENGTH()


class RelayChannel(HeadDeadline, http.HTTPChannel):
    """
    An HTTP/1.1 channel that can give its connection to another protocol:
    HTTP/2 when the connection starts with the HTTP/2 preface (or TLS chose
    C{h2}), a raw pipe after a 101.
    """

    _log = DebugInfoLogger()  # e.g. "Timing out client: IPv4Address(...)"

    _switched: Optional[IProtocol] = None
    transport: ITCPTransport
    site: "RelaySite"
    # Set by the site: the socket's watch (relay.net.liveness), and a
    # record of answers in transit on this connection, whose delivery the
    # next request's headers prove (the relay's broker makes one at the
    # connection's first poll; relay.server.site.poll_connection).
    socket_watch: Optional["Watch"] = None
    poll_connection: Optional["PollConnection"] = None
    _sniffing = True
    _sniffed = b""
    def requestDone(self, request) -> None:
        self._arm_header_timer()
        super().requestDone(request)

    def lineLengthExceeded(self, line: bytes) -> None:
        # twisted.web hangs up without a word; Go answers (431 for both,
        # its limit being on the whole head). The request line gets 414.
        if reading_request_line(self):
            self._refuse_head(414, b"URI Too Long")
        else:
            self._refuse_head(431, b"Request Header Fields Too Large")

    def _refuse_head(self, code: int, phrase: bytes, detail: bytes = b"") -> None:
        """Go's answer to a request it cannot parse, then close."""
        # Go puts the detail in the status line too.
        status = b"%d %s%s" % (code, phrase, detail)
        self.transport.write(
            b"HTTP/1.1 %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Connection: close\r\n\r\n%s" % (status, status)
        )
        if self.requests:
            self.requests[-1]._refused = True
        self.loseConnection()
        # Nothing more from this connection is parsed: this instance's bytes go nowhere.
        self.dataReceived = lambda data: None  # type: ignore[method-assign]

    def _maybeChooseTransferDecoder(self, header, data):
        ok = super()._maybeChooseTransferDecoder(header, data)
        # Called for every header line; only this one (twisted.web
        # canonicalises its name) can choose the chunked decoder.
        if header == b"Transfer-Encoding":
            bound_chunked_decoder(self, _BoundedChunkedDecoder)
        return ok

    def _bad_host(self, request) -> Optional[bytes]:
        """Go's complaint about the request's Host headers, if any."""
        hosts = request.requestHeaders.getRawHeaders(b"host") or []
        if len(hosts) > 1:
            return b""  # Go says no more than this
        if not hosts:
            command, version = request_line(self)
            if version == b"HTTP/1.1" and command != b"CONNECT":
                return b": missing required Host header"
            return None
        if not valid_host(hosts[0]):
            return b": malformed Host header"
        return None

    def allHeadersReceived(self) -> None:
        self._head_deadline = None
        if self.poll_connection is not None and self.poll_connection.in_transit:
            # An HTTP/1.1 client sends its next request only after reading
            # the whole answer before it (neither relay-client pipelines).
            self.poll_connection.delivered()
        request = self.requests[-1]
        bad_host = self._bad_host(request)
        if bad_host is not None:
            self._refuse_head(400, b"Bad Request", bad_host)
            return
        if self.length != 0 and self._streams_body(request):
            # Relayed now, its body following as it comes; 100 Continue
            # waits for the relay-client to fetch it.
            request._expects_continue = _expects_continue(request)
            request.requestHeaders.removeHeader(b"expect")
            super().allHeadersReceived()
            request.stream_body(_UserReader(request), self.length, self.site.max_streamed_request_body)
            return
        if self.length is not None and self.length > self.site.max_request_body:
            # Answer with the final 413, not an interim 100 Continue that
            # would invite the body.
            request.requestHeaders.removeHeader(b"expect")
        super().allHeadersReceived()
        if getattr(request, "body_too_large", False):
            request.refuse_body()

    def _streams_body(self, request) -> bool:
        """Whether the site streams this request's body (it asks once the head is complete)."""
        decide = getattr(self.site, "streams_body", None)
        if decide is None or not isinstance(request, RelayRequest):
            return False
        target = request_target(self)
        # Cheap for the many bodies that never stream (relay-clients' posts).
        if not decide(request, target.partition(b"?")[0]):
            return False
        command, version = request_line(self)
        request._prepare(command, target, version)
        return True

    _gate: Optional[_ReadGate] = None

    def hold_reading(self, held: bool) -> None:
        """Stop (or start again) reading the user, for a streamed body waiting on the relay-client."""
        gate = self._gate
        if gate is None:
            if not held:
                return
            # Put in at the first hold, so that connections that never
            # stream a body pay nothing for it.
            gate = self._gate = _ReadGate(channel_network(self))
            set_channel_network(self, gate)
        gate.hold(held)

    def discard_input(self) -> None:
        """
        Nothing more from this connection is wanted: read on, and drop it,
        until it closes; its close lingers (L{loseConnection}).
        """
        if self._gate is not None:
            self._gate.hold(False)
        self.dataReceived = lambda data: None  # type: ignore[method-assign]
        self._lingering = True

    _lingering = False
    _linger_call = None

    def loseConnection(self) -> None:
        """
        After an answer to a request whose body was still coming, close as
        Go's server (and nginx's lingering close) does: our side is shut
        (the answer, then FIN) while what the client still sends is read
        and dropped, for up to L{LINGER} seconds, then the connection is
        aborted. Closing with unread bytes would send a reset at once, and
        a client still sending could lose the answer to it.
        """
        transport = self.transport
        if (
            not self._lingering
            or self._linger_call is not None
            or not getattr(transport, "connected", False)
            or getattr(transport, "disconnecting", False)
            or not hasattr(transport, "loseWriteConnection")
        ):
            super().loseConnection()
            return
        channel_network(self).unregisterProducer()
        transport.resumeProducing()  # type: ignore[attr-defined]
        transport.loseWriteConnection()
        self._linger_call = self.callLater(LINGER, transport.abortConnection)

    def switch_protocol(self, protocol: IProtocol, head: bytes) -> None:
        """
        Write C{head} (a 101 response) and hand the connection to
        C{protocol}, with whatever the client sent after its request.
        """
        self.setTimeout(None)
        self._stop_header_timer()
        network, buffered = detach_channel(self)
        self._switched = protocol
        self.transport.write(head)
        protocol.makeConnection(self.transport)
        # The parser paused reading while it handled the request.
        network.resumeProducing()
        if buffered:
            protocol.dataReceived(buffered)

    _host = None

    def getHost(self):
        # Every request asks (twisted.web's Request.__init__): one
        # getsockname() per connection is enough.
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def connectionMade(self) -> None:
        self.maxHeaders = self.site.max_headers
        self.totalHeadersSize = self.site.max_header_bytes
        self.site.connection_made(self)
        super().connectionMade()
        self._arm_header_timer()

    def dataReceived(self, data: bytes) -> None:
        if self._switched is not None:
            self._switched.dataReceived(data)
            return
        if self._sniffing:
            if getattr(self.transport, "negotiatedProtocol", None) == b"h2":
                self._sniffing = False
                self._start_h2(data)
                return
            sniffed = self._sniffed + data
            if PREFACE.startswith(sniffed[: len(PREFACE)]):
                if len(sniffed) < len(PREFACE):
                    self._sniffed = sniffed  # wait for the rest of the preface
                    return
                self._sniffing = False
                self._sniffed = b""
                self._start_h2(sniffed)
                return
            # Not HTTP/2 (or a garbled preface, which HTTP/1.1 then rejects).
            self._sniffing = False
            self._sniffed = b""
            data = sniffed
        super().dataReceived(data)

    def _start_h2(self, data: bytes) -> None:
        h2 = RelayH2Connection(getattr(self.site, "reactor", None))
        h2.requestFactory = self.requestFactory
        h2.site = self.site
        h2.factory = self.factory
        h2.timeOut = H2_IDLE_TIMEOUT
        # TimeoutMixin's documented way to put its timer on another clock.
        h2.callLater = self.callLater  # type: ignore[method-assign]
        self.setTimeout(None)
        self._stop_header_timer()
        # Sniffing happens before the parser sees a byte: it has none buffered.
        network, _ = detach_channel(self)
        self._switched = h2
        h2.makeConnection(self.transport)
        network.registerProducer(h2, True)
        h2.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_header_timer()
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        switched = self._switched
        if switched is not None:
            self._switched = None
            switched.connectionLost(reason)
        super().connectionLost(reason)
        self.site.connection_lost(self, reason, switched)


def _expects_continue(request) -> bool:
    expect = request.requestHeaders.getRawHeaders(b"expect")
    return bool(expect) and expect[0].lower() == b"100-continue" and request.clientproto == b"HTTP/1.1"
