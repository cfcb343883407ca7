"""
Every private Twisted (and C{h2}) API the relay touches, in one place.

The relay runs on two Twisted majors (PyPy stays on 25.5), and a private
name may change in either without notice. Each use is wrapped here, so that
the rest of the code reads as if it used public APIs, and
C{tests/test_compat.py} has one test per entry that fails loudly, naming
the entry, when a Twisted release changes it. Methods our subclasses
override are listed in L{OVERRIDDEN} for the same reason: renamed upstream,
an override would silently stop being called.
"""

from errno import EINTR, EWOULDBLOCK

from twisted.internet import main
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web._http2 import H2Connection, H2Stream
from twisted.web._newclient import (
    HTTP11ClientProtocol,
    Request,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)

__all__ = [
    "ChunkedTransferDecoder",
    "H2Connection",
    "HTTP11ClientProtocol",
    "MalformedChunkedDataError",
    "OVERRIDDEN",
    "RequestNotSent",
    "RequestTransmissionFailed",
    "ResponseNeverReceived",
    "bound_chunked_decoder",
    "channel_network",
    "request_target",
    "set_channel_network",
    "chunk_line_buffer",
    "client_idle",
    "client_request",
    "client_response_head",
    "client_response_lost",
    "body_consumer_transport",
    "detach_channel",
    "dispatch_directly",
    "h2_header_block_pending",
    "h2_stream_connection",
    "h2_stream_request",
    "nothing_to_write",
    "read_socket",
    "reactor_poller",
    "reading_request_line",
    "request_gone",
    "request_line",
    "set_reactor_poller",
    "ssl_context_factory",
    "set_ssl_context_factory",
    "unread_socket",
    "unwritten_bytes",
]

# twisted.web.http: the chunked decoder, which the server bounds (http1.py)
# and the client's upgrade path reuses to read a backend's chunked answer.
ChunkedTransferDecoder = http._ChunkedTransferDecoder
MalformedChunkedDataError = http._MalformedChunkedDataError

# Methods of Twisted classes that our subclasses override.
OVERRIDDEN = (
    # http1.RelayChannel: swaps in the bounded chunked decoder.
    (http.HTTPChannel, "_maybeChooseTransferDecoder"),
    # site._BoundedChunkedDecoder: refuses absurd chunk sizes.
    (http._ChunkedTransferDecoder, "_dataReceived_CHUNK_LENGTH"),
    # h2.RelayH2Connection: re-arms the header deadline after each stream.
    (H2Connection, "_requestDone"),
    # h2.RelayH2Connection: keeps h2's refusal from its callers.
    (H2Connection, "abortRequest"),
    # h2.RelayH2Connection: passes Twisted's private _cancelTimeouts on.
    (H2Connection, "connectionLost"),
    # h2.RelayH2Connection: relays a request whose body streams at its head.
    (H2Connection, "_requestReceived"),
    # h2.RelayH2Connection: holds 100 Continue until a streamed body is fetched.
    (H2Connection, "_send100Continue"),
)


def chunk_line_buffer(decoder) -> bytes:
    """The bytes a chunked decoder holds that it has not parsed yet."""
    return decoder._buffer


def bound_chunked_decoder(channel, decoder_class) -> None:
    """
    Make the channel's chunked decoder (if the request has one) a
    C{decoder_class}, a subclass of L{ChunkedTransferDecoder}.
    """
    if type(channel._transferDecoder) is ChunkedTransferDecoder:
        channel._transferDecoder.__class__ = decoder_class


def reading_request_line(channel) -> bool:
    """Whether an L{http.HTTPChannel} is still reading a request line (not a header)."""
    return bool(channel._HTTPChannel__first_line)


def request_line(channel):
    """The method and version of the request an L{http.HTTPChannel} is reading."""
    return channel._command, channel._version


def request_target(channel) -> bytes:
    """The request-target of the request an L{http.HTTPChannel} is reading (its head is complete)."""
    return channel._path


def channel_network(channel):
    """The producer an L{http.HTTPChannel} pauses and resumes to stop and start reading."""
    return channel._networkProducer


def set_channel_network(channel, producer) -> None:
    """Put C{producer} (a wrapper of L{channel_network}'s) in its place."""
    channel._networkProducer = producer


def detach_channel(channel):
    """
    Take an L{http.HTTPChannel}'s transport away from its parser: its
    network producer (unregistered, to be resumed by whoever takes over)
    and the bytes it had read but not parsed.
    """
    network = channel._networkProducer
    network.unregisterProducer()
    buffered = b"".join(channel._dataBuffer)
    channel._dataBuffer = []
    return network, buffered


def request_gone(request) -> bool:
    """
    Whether a request's connection is gone (nothing may be written): the
    lean engine's request says so in C{gone}, twisted.web's in a private flag.
    """
    gone = getattr(request, "gone", None)
    if gone is not None:
        return gone
    return request._disconnected


def h2_stream_connection(channel):
    """The L{H2Connection} an L{H2Stream} belongs to; None for any other channel."""
    if isinstance(channel, H2Stream):
        return channel._conn
    return None


def h2_stream_request(stream):
    """The twisted.web request an L{H2Stream} feeds."""
    return stream._request


def h2_header_block_pending(conn) -> bool:
    """
    Whether an C{h2} connection has a header block partly received (HEADERS
    without END_HEADERS), or the start of a HEADERS or CONTINUATION frame
    whose rest has not arrived.
    """
    incoming = conn.incoming_buffer
    if getattr(incoming, "_headers_buffer", None):
        return True
    # The bytes of a frame still arriving (h2 4.x: _data; 3.x: data).
    data = getattr(incoming, "_data", None)
    if data is None:
        data = incoming.data
    return len(data) >= 4 and data[3] in (0x1, 0x9)


def ssl_context_factory(endpoint: SSL4ServerEndpoint):
    return endpoint._sslContextFactory


def set_ssl_context_factory(endpoint: SSL4ServerEndpoint, factory) -> None:
    endpoint._sslContextFactory = factory


def client_request(method: bytes, path: bytes, headers, body_producer, uri) -> Request:
    """
    A persistent L{Request} for L{HTTP11ClientProtocol}, with the checks of
    method and path that Agent's requests get (no CR, LF or spaces).
    """
    return Request._construct(method, path, headers, body_producer, persistent=True, parsedURI=uri)


def client_idle(protocol: HTTP11ClientProtocol) -> bool:
    """Whether a kept-alive client connection is free for the next request."""
    return protocol.state == "QUIESCENT"


def client_response_head(protocol: HTTP11ClientProtocol):
    """
    The Deferred of the request just sent on C{protocol} that fires with
    the response as soon as its head is parsed. C{request()}'s own waits
    until the request's body is written, so a backend that answers while
    a streamed upload goes on (a chunked echo, an early 413) would not be
    heard until the upload ended. Call it right after C{request()}.
    """
    return protocol._responseDeferred


def client_response_lost(protocol: HTTP11ClientProtocol, reason) -> None:
    """
    End the body of a response that arrived while its request was still
    being written, when the writing then failed: Twisted only fails the
    request's Deferred then, and the body would wait forever.
    """
    parser = protocol._parser
    if parser is not None and getattr(parser, "response", None) is not None:
        parser.connectionLost(reason)


def body_consumer_transport(consumer):
    """
    The connection under the consumer L{HTTP11ClientProtocol} gives a
    request's body producer (a chunked encoder, or a length-enforcing
    one), to abort a request whose body will never end: a transport with
    a paused producer registered never finishes closing.
    """
    transport = getattr(consumer, "transport", None)
    if transport is None:
        transport = getattr(consumer, "_consumer", None)
    return transport


def reactor_poller(reactor):
    """The epoll object of Twisted's epoll reactor; None on any other reactor."""
    poller = getattr(reactor, "_poller", None)
    if poller is None or not hasattr(poller, "poll") or not hasattr(reactor, "doPoll"):
        return None
    return poller


def set_reactor_poller(reactor, poller) -> None:
    reactor._poller = poller


# twisted.internet.epollreactor.EPollReactor.doPoll: the same loop, each
# event handed to the reactor's _doReadOrWrite without the legacy log
# context (relay.tuning.dispatch says why).
def dispatch_directly(reactor, on_error) -> bool:
    """
    Make the epoll reactor dispatch each event straight to its handler;
    C{on_error(failure)} gets what a handler raised (Twisted logs it and
    goes on). False, changing nothing, on any other reactor.
    """
    selectables = getattr(reactor, "_selectables", None)
    dispatch = getattr(reactor, "_doReadOrWrite", None)
    if reactor_poller(reactor) is None or not isinstance(selectables, dict) or dispatch is None:
        return False
    get = selectables.get

    def doPoll(timeout):
        if timeout is None:
            timeout = -1
        try:
            events = reactor._poller.poll(timeout, len(selectables))
        except OSError as e:
            if e.errno == EINTR:
                return
            raise
        for fd, event in events:
            selectable = get(fd)
            if selectable is not None:
                try:
                    dispatch(selectable, fd, event)
                except Exception:
                    on_error(Failure())

    reactor.doPoll = reactor.doIteration = doPoll
    return True


# twisted.internet.abstract.FileDescriptor: its write buffers. The
# transport tuning writes straight to the socket when they are empty.
def nothing_to_write(transport) -> bool:
    """
    Whether a TCP transport is open for writing with nothing waiting to
    be written: a byte sent now cannot overtake one written before. A
    transport that speaks TLS itself (C{connectSSL}, C{listenSSL}: its
    C{TLS} flag) never qualifies: its writes must go through the TLS engine.
    """
    return (
        transport.connected
        and not transport.TLS
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport._tempDataBuffer
        and (transport.producer is None or transport.streamingProducer)
        and len(transport.dataBuffer) == transport.offset
    )


def unwritten_bytes(transport) -> int:
    """Bytes a TCP transport holds that it has not handed to the kernel yet."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


# twisted.internet.tcp.Connection.doRead: the same read, keeping the errno
# that Twisted folds into one ConnectionLost (relay.net.liveness).
def read_socket(transport, on_error) -> None:
    """
    Make C{transport} (a L{tcp.Connection}) read as Twisted's C{doRead}
    does, calling C{on_error(errno)} with the error of a failed read before
    the connection is lost. An instance attribute, like Twisted's own
    method in cost: one call per read.
    """
    recv = transport.socket.recv
    received = transport._dataReceived

    def doRead():
        try:
            data = recv(transport.bufferSize)
        except OSError as e:
            if e.args[0] == EWOULDBLOCK:
                return None
            on_error(e.args[0])
            return main.CONNECTION_LOST
        return received(data)

    transport.doRead = doRead


def unread_socket(transport) -> None:
    """Undo L{read_socket} (at the connection's end: the closure holds the transport)."""
    transport.__dict__.pop("doRead", None)
