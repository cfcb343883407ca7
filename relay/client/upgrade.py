"""
Requests that ask to switch protocols (WebSocket, C{kubectl exec}'s SPDY).

Agent cannot hand over a connection after a 101 Switching Protocols, so a
request with an C{Upgrade} header is made over a connection of its own: we
write the request line, the headers and the body ourselves and read the
answer's head with a small HTTP/1.1 parser. After a 101 the connection is a
raw two-way pipe: the backend's bytes become response chunks, and what the
user sends (read from the relay's request stream) is written to the backend.
When the backend declines (any other status) its answer is relayed like any
other and the connection is closed after it.
"""

from typing import TYPE_CHECKING, List, Optional, Tuple

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.compat import ChunkedTransferDecoder
from relay.headers import go_canonical, sanitize_raw, valid_raw_name
from relay.outbound.connect import BackendError, connect_own
from relay.outbound.request import OutboundRequest
from relay.outbound.tls import TrustPolicy
from relay.proto.http_relay_pb2 import HttpRequest

if TYPE_CHECKING:
    from relay.client.chunker import Chunker


MAX_HEAD_SIZE = 1024 * 1024
Header = Tuple[str, str]


def wants_upgrade(request: HttpRequest) -> bool:
    return any(h.name.lower() == "upgrade" and h.value.strip() for h in request.header)


def request_head(request: OutboundRequest) -> bytes:
    lines = [
        b"%s %s HTTP/1.1\r\n" % (request.method, request.target),
        b"Host: %s\r\n" % (sanitize_raw(request.host),),
    ]
    for name, value in request.headers:
        if valid_raw_name(name):
            lines.append(b"%s: %s\r\n" % (name, sanitize_raw(value)))
    if request.body or request.method.upper() in (b"POST", b"PUT", b"PATCH"):
        lines.append(b"Content-Length: %d\r\n" % (len(request.body),))
    lines.append(b"\r\n")
    return b"".join(lines)


def parse_head(head: bytes) -> Tuple[int, List[Header]]:
    """
    A response head (status line and header lines, without the blank line).

    @raise ValueError: it is not HTTP/1.x.
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError("malformed HTTP response %r" % (lines[0][:100],))
    headers: List[Header] = []
    for line in lines[1:]:
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and headers:
            # Obsolete line folding.
            folded_name, folded_value = headers[-1]
            headers[-1] = (folded_name, folded_value + " " + line.strip().decode("utf-8", "replace"))
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            raise ValueError("malformed MIME header line: %r" % (line[:100],))
        headers.append((go_canonical(name.strip().decode("latin-1")), value.strip().decode("utf-8", "replace")))
    return int(parts[1]), headers


def _header(headers: List[Header], name: str) -> Optional[str]:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


@implementer(IPushProducer)
class _ConnectionProducer:
    """The backend connection as the chunker's producer; stopping closes it."""

    def __init__(self, transport):
        self.transport = transport

    def pauseProducing(self):
        self.transport.pauseProducing()

    def resumeProducing(self):
        self.transport.resumeProducing()

    def stopProducing(self):
        self.transport.loseConnection()


class RawResponse(Protocol):
    """
    One upgrade request's connection. C{head} fires with C{self} once the
    status and headers are in; then L{deliver} streams the rest.
    """

    # Set by connect_own before any other method runs (a TCP or TLS connection).
    transport: ITCPTransport

    def __init__(self, request: OutboundRequest):
        self.request = request
        self.head: Deferred = Deferred()
        self.status = 0
        self.headers: List[Header] = []
        self._buffer = b""
        self._sink: Optional["Chunker"] = None
        self._pending: List[bytes] = []
        self._ended = False
        self._remaining: Optional[int] = None  # bytes left of a Content-Length body
        self._decoder: Optional[ChunkedTransferDecoder] = None
        self._body_done = False
        self._broken: Optional[str] = None  # why a chunked body could not be read

    # Requests.

    def connectionMade(self) -> None:
        self.transport.write(request_head(self.request))
        if self.request.body:
            self.transport.write(self.request.body)

    def write(self, data: bytes) -> None:
        """Bytes from the user, after a 101."""
        if not self._ended:
            self.transport.write(data)

    def close(self) -> None:
        if not self._ended:
            self.transport.loseConnection()

    # Responses.

    def dataReceived(self, data: bytes) -> None:
        if self.head.called:
            self._body(data)
            return
        self._buffer += data
        while not self.head.called:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD_SIZE:
                    self._fail_head("response head too large")
                return
            head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
            try:
                status, headers = parse_head(head)
            except ValueError as e:
                self._fail_head(str(e))
                return
            if 100 <= status < 200 and status != 101:
                continue  # 100 Continue, 103 Early Hints: a final answer follows.
            self.status, self.headers = status, headers
            self._frame()
            rest, self._buffer = self._buffer, b""
            self.head.callback(self)
            if self._remaining == 0:
                self._end_body()
            elif rest:
                self._body(rest)

    def _frame(self) -> None:
        """How the body after this head ends."""
        if self.status == 101:
            return  # Until either side closes.
        if self.request.method.upper() == "HEAD" or self.status in (204, 304):
            self._remaining = 0
        elif "chunked" in (_header(self.headers, "transfer-encoding") or "").lower():
            self._decoder = ChunkedTransferDecoder(self._deliver, lambda extra: self._end_body())
            self.headers = [(n, v) for n, v in self.headers if n.lower() != "transfer-encoding"]
        else:
            length = _header(self.headers, "content-length")
            if length is not None and length.strip().isdigit():
                self._remaining = int(length)

    def _body(self, data: bytes) -> None:
        if self._body_done:
            return
        if self._decoder is not None:
            try:
                self._decoder.dataReceived(data)
            except Exception as e:
                # The handler warns, with this reason rather than the EOF.
                self._broken = str(e) or type(e).__name__
                self.transport.loseConnection()
            return
        if self._remaining is not None:
            data = data[: self._remaining]
            self._remaining -= len(data)
        self._deliver(data)
        if self._remaining == 0:
            self._end_body()

    def _end_body(self) -> None:
        self._body_done = True
        self.transport.loseConnection()

    def _deliver(self, data: bytes) -> None:
        if not data:
            return
        if self._sink is None:
            self._pending.append(data)
        else:
            self._sink.write(data)

    def deliver(self, sink: "Chunker") -> None:
        self._sink = sink
        sink.set_producer(_ConnectionProducer(self.transport))
        pending, self._pending = self._pending, []
        for data in pending:
            sink.write(data)
        if self._ended:
            self._end_sink()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._ended = True
        if not self.head.called:
            self._fail_head("EOF")
            return
        if self._sink is not None:
            self._end_sink()

    def _end_sink(self) -> None:
        """
        The connection is gone. After a 101, or for a body that runs until
        the close, that is the normal end; a chunked or C{Content-Length}
        body that had not ended broke off.
        """
        sink = self._sink
        assert sink is not None
        framed = self._decoder is not None or self._remaining is not None
        if framed and not self._body_done:
            sink.fail(self._broken or "unexpected EOF")
        else:
            sink.finish()

    def _fail_head(self, reason: str) -> None:
        if not self.head.called:
            self.head.errback(BackendError(self.request.describe(reason)))
        if not self._ended:
            self.transport.abortConnection()


class Upgrader:
    """Opens a connection of its own for each upgrade request."""

    def __init__(self, reactor, policy: TrustPolicy):
        self.reactor = reactor
        self.policy = policy

    async def open(self, request: OutboundRequest) -> RawResponse:
        protocol = RawResponse(request)
        await connect_own(self.reactor, self.policy, request, protocol)
        try:
            return await protocol.head
        except CancelledError:
            protocol.transport.abortConnection()
            raise
