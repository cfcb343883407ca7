"""
The server's lean HTTP/1.1 engine: a channel that parses with C{httptools}
(llhttp, the parser of Node.js, in its strict mode) and a request object
with the part of twisted.web's C{IRequest} the relay's resources use.

Why: each relayed request is three HTTP exchanges in the server, and
twisted.web spends most of an exchange's instructions in its line-by-line
parser, its C{Request} and C{Headers} (docs/performance.md). Here llhttp
parses a request in C, one callback per piece; headers live in a plain dict;
a response head is built as one byte string and leaves with the first bytes
of the body in one write.

The relay's resource tree, broker, streaming and every rule of
L{relay.server.http1} are kept, and behave the same on either engine (the
tests run on both):

  - Host rules, absolute-form targets, C{414} for a request line over
    16 KiB, C{431} for a header line over 16 KiB (or a head that never
    ends), C{400} for more than C{--max_headers} headers or C{--max_header_bytes}
    bytes of head, and twisted.web's bare C{400 Bad Request} for anything
    llhttp refuses;
  - the body cap and the body budget while a body arrives (C{413}, C{503}),
    C{Expect: 100-continue} (never for a body that will be refused);
  - the header timeout (one timer per connection), keep-alive as
    twisted.web decides it (HTTP/1.1 without C{Connection: close}),
    pipelining (one request at a time: what arrives behind it is parsed
    and replayed after its answer, and reading pauses beyond 16 KiB), the
    drain's C{Connection: close};
  - HTTP/2 by preface or ALPN (handed to L{relay.server.h2}), the hand-over
    after a 101, trailers at the end of a chunked answer.

What it does not do, and why:

  - Methods llhttp does not know (it knows the 46 of RFC 9110, WebDAV and
    friends): such a request, when it starts a read (as a client that does
    not pipeline sends it), is handed to twisted.web's channel for the rest
    of the connection; elsewhere it is a C{400}.
  - An upgrade (or C{CONNECT}) request that carries a body: llhttp treats
    what follows the head as the new protocol's bytes. It is answered
    C{400} (no relay-client or browser sends one).
  - Resource trees other than the relay's (no C{route}): traversed with
    twisted.web's C{getResourceFor}; C{UnsupportedMethod} is a 500.
  - Sessions, cookies set through C{addCookie}, C{lastModified}/C{etag}:
    the relay uses none (the admin view, which does, keeps twisted.web).
"""

from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import unquote_to_bytes

from httptools import HttpParserUpgrade, HttpRequestParser
from httptools.parser.errors import HttpParserError, HttpParserInvalidMethodError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, parse_qs
from twisted.web.server import NOT_DONE_YET

from relay.config import ServerConfig
from relay.headers import origin_form, sanitize_value, valid_host, valid_trailer
from relay.lean_headers import LeanHeaders, canonical_name
from relay.logs import DebugInfoLogger
from relay.server.bodybuffer import BodyBuffer, too_large_text
from relay.server.h2 import PREFACE, RelayH2Connection
from relay.server.head_deadline import HeadDeadline
from relay.server.upload import LINGER, StreamedBody
from relay.server.upload import too_large_text as streamed_too_large_text

log = Logger()

# twisted.web's limits, which the relay's tests and clients know: a line of
# the head (LineReceiver.MAX_LENGTH), and what a pipelining client may send
# ahead before reading pauses (HTTPChannel._optimisticEagerReadSize).
MAX_LINE = 16384
PIPELINE_AHEAD = 0x4000
H2_IDLE_TIMEOUT = 12 * 60 * 60

_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\n\r\n"
_NO_BODY_CODES = (204, 304)
_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}

# Status lines and "Name: " prefixes of heads, as they were last written.
_status_lines: Dict[Tuple[bytes, int, bytes], bytes] = {}
_head_prefixes: Dict[bytes, bytes] = {}


class _LeanReader:
    """The user's side of a streamed body on the lean engine: its connection's reading, and 100 Continue."""

    def __init__(self, channel: "LeanChannel", request: "LeanRequest"):
        self.channel = channel
        self.request = request

    def pause_reading(self) -> None:
        self.channel.hold_reading(True)

    def resume_reading(self) -> None:
        self.channel.hold_reading(False)

    def send_continue(self) -> None:
        request = self.request
        if request._expects_continue and not request.startedWriting and not request.gone:
            request._expects_continue = False
            self.channel.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")


class _NoBody(BodyBuffer):
    """The body of a request that has none: read-only, shared."""

    def write(self, data: bytes) -> None:
        raise RuntimeError("a request without a body has no body to write to")


_NO_BODY = _NoBody()


class LeanRequest:
    """
    One HTTP/1.1 request and its answer: what the relay's resources, its
    answers (L{relay.server.response}), the tunnel and the forwarders ask of
    twisted.web's request, with its semantics, and the additions of
    L{relay.server.http1.RelayRequest} (body cap, body budget, trailers,
    the drain's close).
    """

    _log = DebugInfoLogger()

    defaultContentType = None
    method = b"GET"
    uri = b""
    path = b""
    clientproto = b"HTTP/1.1"
    code = 200
    code_message = b"OK"
    finished = False
    startedWriting = False
    chunked = False
    sentLength = 0
    producer = None
    queued = 0

    gone = False
    _no_body = False
    # notifyFinish's Deferreds and when_gone's callbacks, in their order.
    _notifications: Optional[List[object]] = None

    # The body, when it streams to our relay-client (relay.server.upload):
    # the request is then processed once its head has arrived.
    streamed_body: Optional[StreamedBody] = None
    _expects_continue = False

    body_too_large = False
    _body_received = 0
    _refused = False
    _charged = 0

    # Until a request has them: no query, no trailers, no body (a
    # read-only empty one), routed on its whole path.
    args: Mapping[bytes, List[bytes]] = MappingProxyType({})
    trailers: List[Tuple[bytes, bytes]] = []  # shared, empty: add_trailer makes the request's own
    prepath: Sequence[bytes] = ()
    postpath: Sequence[bytes] = ()

    def __init__(self, channel: "LeanChannel"):
        self.channel = channel
        self.site = channel.site
        self.requestHeaders = LeanHeaders()
        self.responseHeaders = LeanHeaders()
        self.content: BodyBuffer = _NO_BODY

    # The body as it arrives: capped, and charged to the site's budget.

    @property
    def max_body(self) -> int:
        return getattr(self.site, "max_request_body", ServerConfig.max_request_body)

    def handleContentChunk(self, data: bytes) -> None:
        if self.streamed_body is not None:
            self.streamed_body.received_data(data)
            return
        if self.body_too_large:
            return
        self._body_received += len(data)
        if self._body_received > self.site.max_request_body:
            self.body_too_large = True
            self.content = _NO_BODY
            self.refuse_body()
            return
        budget = self.site.body_budget
        if budget is not None:
            if not budget.take(len(data)):
                self.body_too_large = True
                self.content = _NO_BODY
                self._give_back()
                self.refuse_body(
                    503,
                    b"Service Unavailable",
                    "Too many request bodies buffered at once; try again later\n",
                )
                return
            self._charged += len(data)
        content = self.content
        if content is _NO_BODY:
            content = self.content = BodyBuffer()
        content.write(data)

    def take_body(self) -> Tuple[bytes, int]:
        """The whole body and its charge against the budget, which the caller now owns."""
        body = self.content.getvalue() if self.content is not None else b""
        self.content = _NO_BODY
        charged, self._charged = self._charged, 0
        return body, charged

    def _give_back(self) -> None:
        if self._charged:
            budget = self.site.body_budget
            if budget is not None:
                budget.give(self._charged)
            self._charged = 0

    def refuse_body(
        self, code: int = 413, phrase: bytes = b"Request Entity Too Large", text: Optional[str] = None
    ) -> None:
        """Answer 413 (or C{code}) at once and close: the client may still be sending."""
        if self._refused:
            return
        self._refused = True
        if text is None:
            text = too_large_text(self.max_body)
        body = text.encode("ascii")
        self.channel.transport.write(
            b"HTTP/1.1 %d %s\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"X-Content-Type-Options: nosniff\r\n"
            b"Connection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (code, phrase, len(body), body)
        )
        self.channel.refused()

    # A body that streams (as RelayRequest's, in relay.server.http1).

    def stream_body(self, reader, length: Optional[int], limit: int, target: bytes) -> None:
        """Process this request now, its head complete, with its body to stream as it arrives."""
        self.streamed_body = StreamedBody(reader, length, limit, self._streamed_too_large)
        self._received(self.method, target, self.clientproto)

    def _streamed_too_large(self) -> None:
        if self.startedWriting:
            self.channel.transport.abortConnection()
            return
        self.refuse_body(text=streamed_too_large_text(self.site.max_streamed_request_body))

    # Processing.

    def _received(self, method: bytes, target: bytes, version: bytes) -> None:
        """The whole request is here: route it and render."""
        if self.finished or self._refused:
            return
        if self.content is not _NO_BODY:
            self.content.seek(0, 0)
        self.method = method
        self.clientproto = version
        if target[:1] != b"/":
            target = self._origin_form(target)
        self.uri = target
        self.path, question, query = target.partition(b"?")
        if question:
            self.args = _query_args(query)
        site = self.site
        self.responseHeaders[b"date"] = [site.http_date()]
        try:
            route = self.channel.route
            if route is not None:
                resource = route(self)
            else:
                self.prepath = []
                self.postpath = [unquote_to_bytes(s) for s in self.path[1:].split(b"/")]
                resource = site.getResourceFor(self)
            # render(), inlined: once per request.
            body = resource.render(self)
            if body is NOT_DONE_YET:
                return
            self._rendered(resource, body)
        except BaseException:
            self.processingFailed(Failure())

    def _rendered(self, resource, body) -> None:
        if not isinstance(body, bytes):
            raise TypeError("%r rendered %r, not bytes" % (resource, type(body)))
        if self.method == b"HEAD":
            if body:
                self.responseHeaders[b"content-length"] = [b"%d" % len(body)]
            self.write(b"")
        else:
            self.responseHeaders[b"content-length"] = [b"%d" % len(body)]
            self.write(body)
        self.finish()

    def _origin_form(self, target: bytes) -> bytes:
        """The path and query of an absolute-form target; its authority is the Host."""
        path, authority = origin_form(target)
        if authority:
            self.requestHeaders[b"host"] = [authority]
        return path

    def render(self, resource) -> None:
        body = resource.render(self)
        if body is not NOT_DONE_YET:
            self._rendered(resource, body)

    def processingFailed(self, reason: Failure) -> None:
        """twisted.web's answer to a resource that raised (without a traceback)."""
        log.failure("", failure=reason)
        if self.finished or self.gone:
            return
        if self.startedWriting:
            self.channel.transport.abortConnection()
            return
        body = (
            b"<html><head><title>Processing Failed</title></head><body>"
            b"<b>Processing Failed</b></body></html>"
        )
        self.setResponseCode(500)
        self.responseHeaders[b"content-type"] = [b"text/html"]
        self.responseHeaders[b"content-length"] = [b"%d" % len(body)]
        self.write(body)
        self.finish()

    # IRequest, the part the relay uses.

    def setResponseCode(self, code: int, message: Optional[bytes] = None) -> None:
        if not isinstance(code, int):
            raise TypeError("HTTP response code must be int or long")
        self.code = code
        self.code_message = message if message else RESPONSES.get(code, b"Unknown Status")

    def setHeader(self, name, value) -> None:
        self.responseHeaders.setRawHeaders(name, [value])

    def getHeader(self, name):
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values is not None else None

    def getAllHeaders(self) -> Dict[bytes, bytes]:
        return {k: v[-1] for k, v in self.requestHeaders.items()}

    def getCookie(self, key: bytes) -> Optional[bytes]:
        for header in self.requestHeaders.getRawHeaders(b"cookie", []):
            for pair in header.split(b";"):
                name, eq, value = pair.strip().partition(b"=")
                if eq and name == key:
                    return value
        return None

    def getClientAddress(self):
        return self.channel.peer()

    getClientIP = None  # deprecated in twisted.web; not offered

    def getHost(self):
        return self.channel.getHost()

    def isSecure(self) -> bool:
        return self.channel.isSecure()

    def getRequestHostname(self) -> bytes:
        host = self.getHeader(b"host")
        if host:
            return host.split(b":", 1)[0] if host[:1] != b"[" else host.split(b"]", 1)[0] + b"]"
        return self.getHost().host.encode("ascii")

    def notifyFinish(self) -> Deferred:
        d: Deferred = Deferred()
        if self._notifications is None:
            self._notifications = []
        self._notifications.append(d)
        return d

    def when_gone(self, callback: Callable[[], object]) -> None:
        """
        C{callback()} if the connection goes before the answer is finished:
        what C{notifyFinish().addErrback(...)} does, without a Deferred (the
        relay asks it on every exchange; L{relay.server.response.on_disconnect}).
        """
        if self._notifications is None:
            self._notifications = []
        self._notifications.append(callback)

    def registerProducer(self, producer, streaming: bool) -> None:
        if self.producer is not None:
            raise ValueError(
                "registering producer %s before previous one (%s) was unregistered" % (producer, self.producer)
            )
        self.producer = producer
        if self.gone:
            producer.stopProducing()
            return
        self.channel.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self.producer is None:
            return
        self.producer = None
        if not self.gone and self.channel is not None:
            self.channel.transport.unregisterProducer()

    def write(self, data: bytes) -> None:
        if self.finished:
            raise RuntimeError("Request.write called on a request after Request.finish was called.")
        if self.gone:
            return
        if not self.startedWriting:
            self._write_head(data)
            return
        if self._no_body or not data:
            return
        self.sentLength += len(data)
        if self.chunked:
            self.channel.transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.channel.transport.write(data)

    def _write_head(self, data: bytes) -> None:
        """The status line and headers as one string, sent with the body's first bytes."""
        self.startedWriting = True
        channel = self.channel
        site = self.site
        if site.draining and site.closes_after(self):
            self.responseHeaders[b"connection"] = [b"close"]
            channel.persistent = False
        body = self.streamed_body
        if body is not None and not body.ended:
            # Answered while the body still comes: whether all of it will
            # be read is not known, so this answer is the connection's last.
            self.responseHeaders[b"connection"] = [b"close"]
            channel.persistent = False
        raw = self.responseHeaders
        version = self.clientproto
        code = self.code
        if (
            version == b"HTTP/1.1"
            and b"content-length" not in raw
            and self.method != b"HEAD"
            and code not in _NO_BODY_CODES
        ):
            raw[b"transfer-encoding"] = [b"chunked"]
            self.chunked = True
        # Built by joining pieces: bytes formatting (%) costs more than the
        # rest of a head.
        key = (version, code, self.code_message)
        status = _status_lines.get(key)
        if status is None:
            status = b"%s %d %s\r\n" % key
            if len(_status_lines) < 1000:
                _status_lines[key] = status
        head = [status]
        prefixes = _head_prefixes
        for name, values in raw.items():
            prefix = prefixes.get(name)
            if prefix is None:
                prefix = canonical_name(name) + b": "
                if len(prefixes) < 10000:  # names are the peers' to choose
                    prefixes[name] = prefix
            for value in values:
                head += (prefix, value, b"\r\n")
        head.append(b"\r\n")
        if self.method == b"HEAD" or code in _NO_BODY_CODES:
            self._no_body = True
            data = b""
        self.sentLength += len(data)
        if data and self.chunked:
            head.append(b"%x\r\n" % len(data))
            head.append(data)
            head.append(b"\r\n")
        elif data:
            head.append(data)
        channel.transport.write(b"".join(head))

    def add_trailer(self, name: str, value: str) -> None:
        if valid_trailer(name):
            if not self.trailers:
                self.trailers = []  # not the class's shared one
            self.trailers.append((name.encode("latin-1"), sanitize_value(value)))

    def finish(self) -> None:
        if self.gone:
            raise RuntimeError(
                "Request.finish called on a request after its connection was lost; "
                "use Request.notifyFinish to keep track of this."
            )
        if self.finished:
            return
        if not self.startedWriting:
            self.write(b"")
        if self.chunked:
            if self.trailers:
                lines = b"".join(b"%s: %s\r\n" % t for t in self.trailers)
                self.channel.transport.write(b"0\r\n" + lines + b"\r\n")
            else:
                self.channel.transport.write(b"0\r\n\r\n")
        self.finished = True
        if self._charged:
            self._give_back()
        if self.producer is not None:
            log.warn("Producer was not unregistered for {uri}", uri=self.uri)
            self.unregisterProducer()
        self.channel.request_done(self)
        notifications, self._notifications = self._notifications, None
        for d in notifications or ():
            if type(d) is Deferred:
                d.callback(None)

    def connectionLost(self, reason) -> None:
        if self.gone:
            return
        self.gone = True
        self._give_back()
        self.producer = None
        if self.streamed_body is not None:
            self.streamed_body.user_gone()
        notifications, self._notifications = self._notifications, None
        if self.finished:
            return
        for d in notifications or ():
            if type(d) is Deferred:
                d.errback(reason)
                continue
            try:
                d()  # type: ignore[operator]  # a when_gone callback
            except Exception:
                log.failure("Unexpected error after a peer went away", Failure())


def _version(parser, reading: Optional[LeanRequest]) -> bytes:
    """
    The HTTP version of the request C{reading}. Kept alive without a
    Connection header, it is HTTP/1.1 (llhttp keeps HTTP/1.0 alive only when
    asked to), which spares formatting the version as a string (httptools'
    only way to give it).
    """
    if reading is not None and parser.should_keep_alive() and b"connection" not in reading.requestHeaders:
        return b"HTTP/1.1"
    text = parser.get_http_version()
    return _VERSIONS.get(text) or b"HTTP/" + text.encode("ascii")


def _query_args(query: bytes) -> Dict[bytes, List[bytes]]:
    """twisted.web's C{parse_qs(query, 1)}, without its work when nothing is escaped."""
    if query.find(b"%") >= 0 or query.find(b"+") >= 0 or query.find(b";") >= 0:
        return parse_qs(query, 1)
    args: Dict[bytes, List[bytes]] = {}
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        values = args.get(name)
        if values is None:
            args[name] = [value]
        else:
            values.append(value)
    return args


class _Stop(Exception):
    """Raised from a parser callback: nothing more is parsed on this connection."""


class LeanChannel(HeadDeadline, Protocol):
    """
    An HTTP/1.1 server connection parsed by llhttp. Set up by the site's
    C{buildProtocol} as twisted.web's channel is (C{site}, C{factory},
    C{callLater}, C{timeOut}).
    """

    _log = DebugInfoLogger()

    # Set by the site's buildProtocol, as on twisted.web's channel; the
    # transport is TCP, TLS or a test's.
    site: Any = None
    factory: Any = None
    callLater: Any = None
    timeOut: Optional[float] = None
    transport: Any
    persistent = True
    _switched: Any = None
    # Set by the site: the socket's watch (relay.net.liveness), and the
    # record of answers in transit whose delivery the next head proves.
    socket_watch = None
    poll_connection = None
    _sniffing = True
    _sniffed = b""
    # llhttp's parser, None once nothing more is parsed.
    _parser: Any = None
    # The request whose head or body is being read, and the one being
    # answered (the same one, once it is whole); the parser's callbacks run
    # only while one is being read.
    _reading: Any = None
    _current: Optional[LeanRequest] = None
    # Parser events of requests behind the current one, replayed after it.
    _queue: Optional[List[Tuple[Callable, tuple]]] = None
    _queued_bytes = 0
    _reading_paused = False
    # Bytes after an upgrade request, held until it is answered.
    _held: Optional[List[bytes]] = None
    _upgrade_done = False
    _closed = False
    _replaying = False
    _fallback = False
    # Messages whose end llhttp has seen (whether answered yet or not).
    _completed = 0
    _url = b""
    route = None
    _headers_left = 0
    _head_left = 0
    _fed_in_head = 0
    _content_length: Optional[int] = None
    _peer = None
    _host = None
    _secure: Optional[bool] = None

    # Connection set-up and end.

    def connectionMade(self) -> None:
        site = self.site
        self._max_headers = site.max_headers
        self._max_head_bytes = site.max_header_bytes
        self._parser = HttpRequestParser(self)
        # The relay's tree routes on the whole path (RootResource.route).
        self.route = getattr(site.resource, "route", None)
        site.connection_made(self)
        self._arm_header_timer()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._stop_header_timer()
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        switched, self._switched = self._switched, None
        if self._fallback:
            # twisted.web's channel took the connection, and reports its end.
            switched.connectionLost(reason)
            return
        if switched is not None:
            switched.connectionLost(reason)
        for request in (self._current, self._reading):
            if request is not None:
                request.connectionLost(reason)
        self._current = self._reading = None
        self._queue = None
        self.site.connection_lost(self, reason, switched)

    def peer(self):
        if self._peer is None:
            self._peer = self.transport.getPeer()
        return self._peer

    def getHost(self):
        if self._host is None:
            self._host = self.transport.getHost()
        return self._host

    def isSecure(self) -> bool:
        if self._secure is None:
            self._secure = ISSLTransport(self.transport, None) is not None
        return self._secure

    # Bytes in.

    def dataReceived(self, data: bytes) -> None:
        if self._switched is not None or self._sniffing or self._held is not None:
            self._unusual(data)
            return
        parser = self._parser
        if parser is None:
            return
        starting = self._reading is None and self._queue is None and self._current is None
        completed = self._completed
        try:
            parser.feed_data(data)
        except HttpParserUpgrade as e:
            # llhttp stops after an upgrade request: what follows is held
            # (and more as it comes) until the request is answered.
            self._held = [data[e.args[0]:]]
            self._event(LeanChannel._upgrade_over, ())
            return
        except HttpParserInvalidMethodError:
            if starting and completed == self._completed and self._fall_back(data):
                return
            self._event(LeanChannel._bad_request, ())
            return
        except _Stop:
            return
        except HttpParserError as e:
            if isinstance(e.__context__, _Stop):
                return
            if e.__context__ is not None:
                log.failure("Unexpected error parsing a request", Failure(e.__context__))
            self._event(LeanChannel._bad_request, ())
            return
        if self._reading is not None and self._in_head:
            # A head still incomplete: llhttp holds its current line, so
            # count what it was given (a line that never ends).
            self._fed_in_head += len(data)
            if self._fed_in_head > self._max_head_bytes + MAX_LINE:
                self._refuse_head(431, b"Request Header Fields Too Large")
        if self._queue is not None and not self._reading_paused:
            self._queued_bytes += len(data)
            if self._queued_bytes > PIPELINE_AHEAD:
                self._reading_paused = True
                self.transport.pauseProducing()

    # What is fed to llhttp, once the connection is plain HTTP/1.1.
    _feed = dataReceived

    def _unusual(self, data: bytes) -> None:
        """Bytes for another protocol, the first ones (HTTP/2 or not?), or held after an upgrade request."""
        if self._switched is not None:
            self._switched.dataReceived(data)
            return
        if self._sniffing:
            sniffed = self._sniff(data)
            if sniffed is None:
                return
            data = sniffed
        if self._held is not None:
            self._held.append(data)
            return
        self._feed(data)

    _in_head = False

    def _event(self, handler, args) -> None:
        """Run a parse event now, or after the request being answered."""
        if self._current is not None:
            self._queue_event(handler, args)
            return
        handler(self, *args)

    def _queue_event(self, handler, args) -> None:
        if self._queue is None:
            self._queue = []
        self._queue.append((handler, args))

    # Parser callbacks (llhttp calls them during feed_data).

    # Each callback runs at once, or, while a request is being answered,
    # is queued to run (with the same arguments) after it: twisted.web
    # parses nothing behind a request until it is answered either.

    def on_message_begin(self) -> None:
        if self._closed:
            raise _Stop()
        if self._current is not None:
            self._queue_event(LeanChannel.on_message_begin, ())
            return
        self._reading = LeanRequest(self)
        self._url = b""
        # What the head may still hold: header lines, and bytes of them and
        # of the request line (twisted.web's limits, counted the same way).
        self._headers_left = self._max_headers
        self._head_left = self._max_head_bytes
        self._fed_in_head = 0
        self._in_head = True
        self._content_length = None

    def on_url(self, url: bytes) -> None:
        if self._current is not None:
            self._queue_event(LeanChannel.on_url, (url,))
            return
        self._head_left -= len(url)
        url = self._url + url
        self._url = url
        if len(url) > MAX_LINE - 14:  # the method, the version, blanks
            self._refuse_head(414, b"URI Too Long")
            raise _Stop()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._current is not None:
            self._queue_event(LeanChannel.on_header, (name, value))
            return
        line = len(name) + len(value) + 2
        left = self._head_left - line
        self._head_left = left
        count = self._headers_left - 1
        self._headers_left = count
        if line > MAX_LINE or left < 0 or count < 0:
            if line > MAX_LINE:
                self._refuse_head(431, b"Request Header Fields Too Large")
            else:
                self._bad_request()
            raise _Stop()
        value = value.strip(b" \t")
        lower = name.lower()
        headers = self._reading.requestHeaders
        values = headers.get(lower)
        if values is None:
            headers[lower] = [value]
        else:
            values.append(value)
        if lower == b"content-length":
            if not value.isdigit():
                self._bad_request()
                raise _Stop()
            self._content_length = int(value)

    def on_headers_complete(self) -> None:
        parser = self._parser
        # (Behind a request being answered, this head's headers are still
        # queued: the version is asked for as it is.)
        reading = self._reading if self._current is None else None
        args = (parser.get_method(), _version(parser, reading), parser.should_upgrade())
        if self._current is not None:
            self._queue_event(LeanChannel._headers_complete, args)
        elif not self._headers_complete(*args):
            raise _Stop()

    def _headers_complete(self, method: bytes, version: bytes, upgrade: bool) -> bool:
        """What twisted.web and RelayChannel do once a head is in; False if refused."""
        self._in_head = False
        self._head_deadline = None
        request = self._reading
        request.method = method
        request.clientproto = version
        if self.poll_connection is not None and self.poll_connection.in_transit:
            self.poll_connection.delivered()
        headers = request.requestHeaders
        hosts = headers.get(b"host")
        bad_host = None
        if hosts is None:
            if version == b"HTTP/1.1" and method != b"CONNECT":
                bad_host = b": missing required Host header"
        elif len(hosts) > 1:
            bad_host = b""
        elif not valid_host(hosts[0]):
            bad_host = b": malformed Host header"
        if bad_host is not None:
            self._refuse_head(400, b"Bad Request", bad_host)
            return False
        if upgrade and (self._content_length or b"transfer-encoding" in headers):
            self._bad_request()
            return False
        connection = headers.get(b"connection")
        if version != b"HTTP/1.1":
            self.persistent = False
        elif connection is not None and b"close" in [t.lower() for t in connection[0].split(b" ")]:
            request.responseHeaders[b"connection"] = [b"close"]
            self.persistent = False
        length = self._content_length
        if (length or (length is None and b"transfer-encoding" in headers)) and self._streams_body(request):
            # Relayed now, its body following as it comes; 100 Continue
            # waits for the relay-client to fetch it.
            expect = headers.get(b"expect")
            request._expects_continue = (
                expect is not None and expect[0].lower() == b"100-continue" and version == b"HTTP/1.1"
            )
            request.stream_body(_LeanReader(self, request), length, self.site.max_streamed_request_body, self._url)
            return not self._closed
        if length is not None and length > self.site.max_request_body:
            request.body_too_large = True
            request.refuse_body()
            return False
        expect = headers.get(b"expect")
        if expect is not None and expect[0].lower() == b"100-continue" and version == b"HTTP/1.1":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def on_body(self, data: bytes) -> None:
        if self._current is not None:
            self._queue_event(LeanChannel.on_body, (data,))
            return
        request = self._reading
        request.handleContentChunk(data)
        if request._refused:
            raise _Stop()

    def on_message_complete(self) -> None:
        self._completed += 1
        if self._current is not None:
            self._queue_event(LeanChannel._message_complete, ())
            return
        # _message_complete, inlined: once per request.
        request = self._reading
        if request is None or request._refused:
            return
        if request.streamed_body is not None:
            self._streamed_end(request)
            return
        self._reading = None
        self._current = request
        request._received(request.method, self._url, request.clientproto)

    def _message_complete(self) -> None:
        request = self._reading
        if request is None or request._refused:
            return
        if request.streamed_body is not None:
            self._streamed_end(request)
            return
        self._reading = None
        self._current = request
        request._received(request.method, self._url, request.clientproto)

    def _upgrade_over(self) -> None:
        """
        The upgrade request was handed on: what follows it is held until it
        is answered (a 101 hands it over; any other answer parses on).
        """
        self._upgrade_done = True
        if self._current is None:
            self._resume_after_upgrade()

    def _resume_after_upgrade(self) -> None:
        """An upgrade request was answered without a switch: parse on."""
        held, self._held = self._held, None
        self._upgrade_done = False
        self._parser = HttpRequestParser(self)
        data = b"".join(held or ())
        if data:
            self._feed(data)

    # Streamed bodies.

    def _streams_body(self, request: LeanRequest) -> bool:
        """Whether the site streams this request's body (it asks once the head is complete)."""
        decide = getattr(self.site, "streams_body", None)
        return decide is not None and decide(request, self._url.partition(b"?")[0])

    def _streamed_end(self, request: LeanRequest) -> None:
        """The end of a streamed body: the request, processed at its head, is now whole."""
        self._reading = None
        body = request.streamed_body
        if body is not None:
            body.end()
        if request.finished:
            # Answered already; its answer closed the connection.
            return
        self._current = request

    _body_held = False
    _linger_call = None

    def _linger(self) -> None:
        """Our FIN after the answer; what the client still sends is dropped for LINGER seconds, then abort."""
        transport = self.transport
        if not getattr(transport, "connected", False) or not hasattr(transport, "loseWriteConnection"):
            transport.loseConnection()
            return
        self._body_held = False
        transport.resumeProducing()
        transport.loseWriteConnection()
        self._linger_call = self.callLater(LINGER, transport.abortConnection)

    def hold_reading(self, held: bool) -> None:
        """Stop (or start again) reading the user, for a streamed body waiting on the relay-client."""
        if held == self._body_held or self._closed:
            return
        self._body_held = held
        if held:
            self.transport.pauseProducing()
        elif not self._reading_paused:
            self.transport.resumeProducing()

    # Answers done; errors.

    def request_done(self, request: LeanRequest) -> None:
        if request is not self._current:
            if request is self._reading and request.streamed_body is not None:
                # Answered before its body ended: the rest is read and
                # dropped, and the connection ends with the answer, as
                # RelayChannel.loseConnection lingers.
                self._reading = None
                self._queue = None
                self._parser = None
                self._closed = True
                self._linger()
            return
        self._current = None
        if not self.persistent:
            self._queue = None
            self.transport.loseConnection()
            self._closed = True
            return
        site = self.site
        timeout = site.header_timeout
        if timeout:
            # _arm_header_timer, inlined: once per request.
            self._head_deadline = site.clock.seconds() + timeout
            if self._header_timer is None:
                self._header_timer = self.callLater(timeout, self._check_header_deadline)
        if not self._replaying and (self._queue is not None or self._upgrade_done):
            self._after_answer()

    def _after_answer(self) -> None:
        if self._queue is not None:
            self._replay()
        if self._current is None and self._upgrade_done and not self._closed:
            self._resume_after_upgrade()

    def _replay(self) -> None:
        """Parse events that came behind the request just answered, up to the next whole request."""
        queue = self._queue
        self._replaying = True
        try:
            while queue and self._current is None and not self._closed:
                handler, args = queue.pop(0)
                try:
                    ok = handler(self, *args)
                except _Stop:
                    ok = False
                if ok is False:
                    self._closed = True
                    queue.clear()
        finally:
            self._replaying = False
        if not queue and self._queue is queue:
            self._queue = None
            self._queued_bytes = 0
            if self._reading_paused and not self._closed:
                self._reading_paused = False
                if not self._body_held:
                    self.transport.resumeProducing()

    def _bad_request(self) -> None:
        """twisted.web's answer to what it cannot parse: a bare 400, then close."""
        self.transport.write(_BAD_REQUEST)
        self.refused()

    def _refuse_head(self, code: int, phrase: bytes, detail: bytes = b"") -> None:
        """Go's answer to a request it cannot parse, then close."""
        status = b"%d %s%s" % (code, phrase, detail)
        self.transport.write(
            b"HTTP/1.1 %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Connection: close\r\n\r\n%s" % (status, status)
        )
        self.refused()

    def refused(self) -> None:
        """An error was answered: close once it is sent, and read no more."""
        if self._reading is not None:
            self._reading._refused = True
        self._closed = True
        self._parser = None
        self._queue = None
        self._held = None
        self.transport.loseConnection()

    def _fall_back(self, data: bytes) -> bool:
        """
        A method llhttp does not know, at the start of a read: hand the
        connection to twisted.web's channel (the site's fallback), which
        takes any token as a method.
        """
        factory = getattr(self.site, "fallback_channel", None)
        if factory is None:
            return False
        self._reading = None
        self._parser = None
        self._stop_header_timer()
        self._fallback = True
        channel = factory()
        channel.factory = self.factory
        channel.site = self.site
        channel.requestFactory = self.site.requestFactory
        channel.callLater = self.callLater
        channel.timeOut = None
        channel.poll_connection = self.poll_connection
        channel._sniffing = False
        self._switched = channel
        # It counts as the connection now: the site tunes and watches the
        # socket again (no harm) and hears of its end from it.
        self.site.connection_closed(self)
        self.socket_watch = None
        channel.makeConnection(self.transport)
        channel.dataReceived(data)
        return True

    # Hand-overs.

    def _sniff(self, data: bytes) -> Optional[bytes]:
        """HTTP/2 by ALPN or preface goes to RelayH2Connection; None if it went, or is undecided."""
        if getattr(self.transport, "negotiatedProtocol", None) == b"h2":
            self._sniffing = False
            self._start_h2(data)
            return None
        sniffed = self._sniffed + data
        if PREFACE.startswith(sniffed[: len(PREFACE)]):
            if len(sniffed) < len(PREFACE):
                self._sniffed = sniffed
                return None
            self._sniffing = False
            self._sniffed = b""
            self._start_h2(sniffed)
            return None
        self._sniffing = False
        self._sniffed = b""
        return sniffed

    def _start_h2(self, data: bytes) -> None:
        h2 = RelayH2Connection(getattr(self.site, "reactor", None))
        h2.requestFactory = self.site.requestFactory
        h2.site = self.site
        h2.factory = self.factory
        h2.timeOut = H2_IDLE_TIMEOUT
        h2.callLater = self.callLater  # type: ignore[method-assign]
        self._stop_header_timer()
        self._parser = None
        self._switched = h2
        h2.makeConnection(self.transport)
        self.transport.registerProducer(h2, True)
        h2.dataReceived(data)

    def switch_protocol(self, protocol, head: bytes) -> None:
        """Write C{head} (a 101) and hand the connection to C{protocol}, with what followed the request."""
        self._stop_header_timer()
        held, self._held = self._held, None
        self._parser = None
        self._queue = None
        self._switched = protocol
        self.transport.write(head)
        protocol.makeConnection(self.transport)
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        buffered = b"".join(held) if held else b""
        if buffered:
            protocol.dataReceived(buffered)
