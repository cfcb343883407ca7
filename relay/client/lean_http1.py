"""
The relay-client's lean HTTP/1.1 engine: a client protocol for
L{relay.client.keepalive.KeepAliveAgent} that parses answers with
C{httptools} (llhttp, the parser of Node.js) and writes each request, head
and in-memory body, in one write.

Why: each relayed request is three HTTP exchanges in the relay-client (its
poll, the backend request, the posted answer), and Twisted's
C{HTTP11ClientProtocol} spends most of an exchange's instructions in its
state machines, its line parser, C{Headers} and the Deferreds and
Failures of its bookkeeping (docs/performance.md).

It keeps what the relay-client relies on from Twisted's protocol, with the
same types, so that callers cannot tell the engines apart:

  - the same request bytes: C{METHOD path HTTP/1.1}, C{Content-Length}
    (C{0} for a C{POST} or C{PUT} without a body), then the caller's headers
    in their order, in twisted.web's case;
  - a response with C{code}, C{phrase}, C{version}, C{headers} (without
    the connection's own headers: C{Content-Length}, C{Connection},
    C{Transfer-Encoding}, ...), C{length} and C{deliverBody}, whose protocol
    gets C{ResponseDone}, C{PotentialDataLoss} (a body that ends with the
    connection) or C{ResponseFailed};
  - C{ResponseNeverReceived} when the connection ends (or the call is
    cancelled) before an answer, C{RequestNotSent} on a busy connection;
    informational (1xx) answers skipped; trailers ignored;
  - keep-alive as Twisted decides it (HTTP/1.1 without C{Connection:
    close}), the agent told when the connection is free again.

An answer's head reaches the caller once the read it came in is parsed
(Twisted's, as soon as it is parsed): a small body that came with it is
then read at once, with no wait chained in between.

A body producer other than the in-memory one is written as Twisted would
(C{Content-Length} when its length is known, else chunked). An answer to
C{HEAD} has no body whatever its headers say; llhttp cannot be told so, and
a fresh parser takes over after it. A C{101} ends the connection.
"""

import re
from typing import Any, List, Optional

from httptools import HttpParserUpgrade, HttpResponseParser
from httptools.parser.errors import HttpParserError
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

from relay.compat import RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived
from relay.lean_headers import LeanHeaders, canonical_name, canonical_names

# What Twisted's client keeps out of a response's headers (they describe
# the connection, not the answer).
_CONNECTION_HEADERS = frozenset(
    [
        b"content-length",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    ]
)
_VALID_METHOD = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VALID_URI = re.compile(rb"\A[\x21-\x7e]+\Z")
_HTTP11 = (b"HTTP", 1, 1)
_VERSIONS = {"1.1": _HTTP11, "1.0": (b"HTTP", 1, 0)}
# One Failure for every body that ended well, as Twisted shares
# connectionDone: making one per answer (its type's qualified name, its
# frames) cost more than the rest of the answer's end.
_RESPONSE_DONE = Failure(ResponseDone())
_POTENTIAL_DATA_LOSS = Failure(PotentialDataLoss())
_CONNECTION_DONE = Failure(ConnectionDone())
# A response's body protocol once whole_body took the body.
_TAKEN = object()


class LeanClientRequest:
    """A request as the lean protocol writes it (what Agent's C{Request} holds)."""

    __slots__ = ("method", "uri", "headers", "bodyProducer", "persistent", "absoluteURI", "host")

    def __init__(self, method: bytes, uri: bytes, headers, body_producer, absolute_uri=None, host=None):
        if not _VALID_METHOD.match(method):
            raise ValueError("Invalid method %r" % (method,))
        if not _VALID_URI.match(uri):
            raise ValueError("Invalid URI %r" % (uri,))
        self.method = method
        self.uri = uri
        self.headers = headers
        self.bodyProducer = body_producer
        self.persistent = True
        self.absoluteURI = absolute_uri
        # A Host value to write after the headers (which have none).
        self.host = host

    def head(self, framing: Optional[bytes]) -> bytes:
        lines = [self.method, b" ", self.uri, b" HTTP/1.1\r\n"]
        if framing is not None:
            lines.append(framing)
        # Joined from pieces: bytes formatting (%) costs more than the rest.
        headers = self.headers
        if type(headers) is LeanHeaders:
            names = canonical_names
            for name, values in headers.items():
                name = names.get(name) or canonical_name(name)
                for value in values:
                    lines += (name, b": ", value, b"\r\n")
        else:
            for name, values in headers.getAllRawHeaders():
                for value in values:
                    lines += (name, b": ", value, b"\r\n")
        if self.host is not None:
            lines += (b"Host: ", self.host, b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)


class _BodyTransport:
    """What a response's body protocol sees as its transport: the connection, as a producer."""

    __slots__ = ("_transport",)

    def __init__(self, transport):
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        # The body is abandoned, and the connection with it: at once, even
        # paused, even under TLS (whose orderly close would wait on a peer
        # that is still sending).
        self._transport.abortConnection()

    def __getattr__(self, name):
        return getattr(self._transport, name)


class LeanResponse:
    """The part of L{twisted.web.iweb.IResponse} the relay-client reads."""

    request = None
    previousResponse = None
    _protocol: Any = None
    _end: Optional[Failure] = None

    def __init__(self, version, code: int, phrase: bytes, headers: LeanHeaders, length, transport):
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._transport = transport
        self._buffer: Optional[List[bytes]] = []

    def deliverBody(self, protocol) -> None:
        if self._protocol is not None:
            raise RuntimeError("Response already has a body protocol")
        self._protocol = protocol
        protocol.makeConnection(_BodyTransport(self._transport))
        buffered, self._buffer = self._buffer, None
        for data in buffered or ():
            protocol.dataReceived(data)
        if self._end is not None:
            end, self._end = self._end, None
            protocol.connectionLost(end)

    def whole_body(self) -> Optional[bytes]:
        """
        The body, when all of it has arrived and no protocol reads it yet (a
        small answer, which came with its head): the caller takes it at
        once, instead of through C{deliverBody}, which may not follow. None
        otherwise.
        """
        if self._protocol is not None or self._end is not _RESPONSE_DONE or self._buffer is None:
            return None
        body = b"".join(self._buffer)
        self._buffer = None
        self._end = None
        self._protocol = _TAKEN
        return body

    def _data(self, data: bytes) -> None:
        if self._buffer is None:
            self._protocol.dataReceived(data)
        else:
            self._buffer.append(data)

    def _finished(self, reason: Failure) -> None:
        if self._buffer is None and self._protocol is not None:
            self._protocol.connectionLost(reason)
        else:
            self._end = reason


class LeanClientProtocol(Protocol):
    """
    One kept-alive connection to the relay server or the backend. C{state}
    is Twisted's name for the same thing: C{QUIESCENT} when a request may
    be sent.
    """

    state = "QUIESCENT"
    transport: Any  # TCP, TLS or a test's
    _finished: Optional[Deferred] = None
    _request: Optional[LeanClientRequest] = None
    _response: Optional[LeanResponse] = None
    _head_only = False
    # An answer's head, and the caller's Deferred, not yet handed over.
    _head = None
    _fresh_parser = False
    _producing = False
    _abort_waiters: Optional[List[Deferred]] = None

    def __init__(self, quiescent=None):
        self._quiescent = quiescent
        self._parser = None

    def connectionMade(self) -> None:
        self._parser = HttpResponseParser(self)

    # Requests.

    def request(self, request: LeanClientRequest) -> Deferred:
        if self.state != "QUIESCENT":
            return fail(RequestNotSent())
        self.state = "TRANSMITTING"
        self._request = request
        self._reset()
        self._finished = Deferred(self._cancel)
        finished = self._finished
        producer = request.bodyProducer
        if producer is None:
            framing = b"Content-Length: 0\r\n" if request.method in (b"PUT", b"POST") else None
            self.transport.write(request.head(framing))
        else:
            pieces = getattr(producer, "pieces", None)
            if pieces is not None:
                head = request.head(b"Content-Length: %d\r\n" % producer.length)
                self.transport.write(b"".join([head] + pieces) if pieces else head)
            else:
                self._produce(request, producer)
        self.state = "WAITING" if self.state == "TRANSMITTING" else self.state
        return finished

    def _produce(self, request: LeanClientRequest, producer) -> None:
        """
        A body that is not in memory: as Twisted writes it, paused while
        the connection is full (a streamed upload, L{relay.client.upload}).
        An answer that comes while it is written ends the connection with
        it (L{_complete}).
        """
        length = producer.length
        transport = self.transport
        if length is UNKNOWN_LENGTH:
            transport.write(request.head(b"Transfer-Encoding: chunked\r\n"))
            consumer: Any = _ChunkedWriter(transport)
        else:
            transport.write(request.head(b"Content-Length: %d\r\n" % length))
            consumer = transport
        self._producing = True
        transport.registerProducer(producer, True)

        def produced(_):
            self._producing = False
            transport.unregisterProducer()
            if length is UNKNOWN_LENGTH:
                transport.write(b"0\r\n\r\n")

        def failed(reason):
            self._producing = False
            transport.unregisterProducer()
            if self._finished is not None and not self._finished.called:
                finished, self._finished = self._finished, None
                finished.errback(Failure(RequestTransmissionFailed([reason])))
            elif self._response is not None:
                # The answer had begun: it cannot end well now.
                self._fail(Failure(RequestTransmissionFailed([reason])))
            transport.abortConnection()

        producer.startProducing(consumer).addCallbacks(produced, failed)

    def _cancel(self, _) -> None:
        """The caller gave up before the answer: drop the connection."""
        self._finished = None
        self.state = "CONNECTION_LOST"
        self.transport.abortConnection()
        _.errback(Failure(ResponseNeverReceived([Failure(CancelledError())])))

    def _reset(self) -> None:
        self._headers = LeanHeaders()
        self._length: Optional[bytes] = None
        self._chunked = False
        self._close = False
        self._connection_header = False
        self._phrase = b""
        self._head_only = self._request is not None and self._request.method == b"HEAD"

    # Parser callbacks.

    def on_status(self, status: bytes) -> None:
        self._phrase += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is not None:
            return  # a trailer: Twisted drops them too
        lower = name.lower()
        value = value.strip(b" \t")
        if lower in _CONNECTION_HEADERS and not (self._head_only and lower == b"content-length"):
            # (A HEAD's Content-Length describes the entity, as Twisted has it.)
            if lower == b"content-length":
                self._length = value
            elif lower == b"transfer-encoding":
                self._chunked = value.lower().find(b"chunked") >= 0
            elif lower == b"connection":
                self._connection_header = True
                self._close = self._close or b"close" in [t.strip().lower() for t in value.split(b",")]
            return
        headers = self._headers
        values = headers.get(lower)
        if values is None:
            headers[lower] = [value]
        else:
            values.append(value)

    def on_headers_complete(self) -> None:
        parser = self._parser
        code = parser.get_status_code()
        if 100 <= code < 200 and code != 101:
            # Informational: the answer follows.
            self._reset()
            return
        if parser.should_keep_alive() and not self._connection_header:
            # HTTP/1.1 (llhttp keeps 1.0 alive only when asked to): no
            # version formatted as a string, httptools' only way to give it.
            version = _HTTP11
        else:
            text = parser.get_http_version()
            version = _VERSIONS.get(text) or (b"HTTP", int(text[0]), int(text[2]))
        length: Any
        if self._head_only or code in (204, 304):
            length = 0
        elif self._chunked or self._length is None:
            length = UNKNOWN_LENGTH
        else:
            length = int(self._length)
        if version != _HTTP11 or code == 101:
            self._close = True
        response = LeanResponse(version, code, self._phrase, self._headers, length, self.transport)
        self._response = response
        finished, self._finished = self._finished, None
        if finished is not None:
            # Handed over once this read is parsed (or the answer is whole,
            # or the connection ends): a small body that came with its head
            # is then read at once, without a wait chained in between.
            self._head = (finished, response)
        if self._head_only:
            # llhttp would wait for a body a HEAD's answer never has.
            self._fresh_parser = True
            self._complete()

    def _deliver_head(self) -> None:
        head, self._head = self._head, None
        if head is not None:
            head[0].callback(head[1])

    def on_body(self, data: bytes) -> None:
        response = self._response
        if response is not None and not self._head_only:
            response._data(data)

    def on_message_complete(self) -> None:
        if self._response is None or self._head_only:
            return
        self._complete()

    def _complete(self) -> None:
        """The answer is whole: the connection is free again (or closes)."""
        response: Any = self._response
        self._response = None
        self._request = None
        if self._producing:
            # Answered before its body was written: the rest of the body
            # is not wanted, and the connection cannot carry another.
            self._close = True
        if self._close:
            self.state = "CONNECTION_LOST"
            self.transport.loseConnection()
        else:
            self.state = "QUIESCENT"
            if self._quiescent is not None:
                self._quiescent(self)
        response._finished(_RESPONSE_DONE)
        if self._head is not None:
            self._deliver_head()

    # Bytes in; the end.

    def dataReceived(self, data: bytes) -> None:
        if self.state == "QUIESCENT" or self._parser is None:
            # Nothing was asked: a server that speaks out of turn is dropped.
            self.state = "CONNECTION_LOST"
            self.transport.loseConnection()
            return
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade:
            if self._response is not None:
                self._close = True
                self._complete()
            self.transport.loseConnection()
        except HttpParserError as e:
            self._parse_failed(e)
            return
        if self._fresh_parser:
            self._fresh_parser = False
            self._parser = HttpResponseParser(self)
        if self._head is not None:
            self._deliver_head()

    def _parse_failed(self, error: Exception) -> None:
        reason = Failure(error)
        self.state = "CONNECTION_LOST"
        self._parser = None
        self.transport.loseConnection()
        self._fail(reason)
        self._deliver_head()

    def _fail(self, reason: Failure) -> None:
        finished, self._finished = self._finished, None
        if finished is not None:
            finished.errback(Failure(ResponseNeverReceived([reason])))
        response, self._response = self._response, None
        if response is not None:
            response._finished(Failure(ResponseFailed([reason])))

    def connectionLost(self, reason=_CONNECTION_DONE) -> None:
        self.state = "CONNECTION_LOST"
        self._parser = None
        response = self._response
        if response is not None and response.length is UNKNOWN_LENGTH and not self._chunked:
            # A body with no length ends with its connection, as HTTP/1.1 says.
            self._response = None
            response._finished(_POTENTIAL_DATA_LOSS)
        self._fail(reason)
        self._deliver_head()
        waiters, self._abort_waiters = self._abort_waiters, None
        for d in waiters or ():
            d.callback(None)

    def abort(self) -> Deferred:
        """Close the connection at once; fires once it is gone (Twisted's C{abort})."""
        if self.state == "CONNECTION_LOST" and self.transport is None:
            return succeed(None)
        d: Deferred = Deferred()
        if self._abort_waiters is None:
            self._abort_waiters = []
        self._abort_waiters.append(d)
        self.transport.abortConnection()
        return d


class _ChunkedWriter:
    """A consumer that frames what a producer writes as chunks."""

    def __init__(self, transport):
        self.transport = transport

    def write(self, data: bytes) -> None:
        if data:
            self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    def registerProducer(self, producer, streaming) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()


__all__ = ["LeanClientProtocol", "LeanClientRequest", "LeanResponse", "canonical_name"]
