"""
The relay's own connections, as both sides make and tune them.

Connecting without Twisted's C{Starting factory} lines per connection
(L{connect_quietly}), and per-connection settings for Twisted's TCP
transports, tuned for a relay that moves megabytes.

Twisted sends at most 128 KiB per C{send()} call, which suits many small
connections; here every relayed megabyte crosses two or three sockets in
each process, and each extra pass through the reactor loop costs more than
the copy it saves, so the send limit is raised (docs/performance.md, "What
made the difference"). Reads stay at Twisted's 64 KiB: larger ones gained
little and let PyPy's peak memory grow while streaming. Set on the transport
instance, not the class, so nothing else in the process changes.

Nagle's algorithm is turned off too (TCP_NODELAY), as Go does for every TCP
connection: a relay's small writes (a poll's answer, a chunk's tail) must
not wait for the peer's delayed ACK.

And a write goes to the socket at once when nothing is waiting to be sent
before it. Twisted buffers every write and sends it on the next pass
through the reactor, registering the socket for writability with epoll
and unregistering it after: two system calls and a loop pass for each of
the three answers of every relayed request, where the socket almost
always has room. What the socket does not take is buffered as before.
"""

from typing import Callable, List, Optional, TypeVar

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IProtocol,
    IPushProducer,
    IStreamClientEndpoint,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Factory

from relay.compat import nothing_to_write

SEND_LIMIT = 512 * 1024

T = TypeVar("T")


class IStreamTransport(ITCPTransport, IConsumer, IPushProducer):
    """
    A connected stream socket's transport, TCP or TLS: a consumer and a
    producer as well, which splicing two connections needs (for the type
    checker: Twisted's protocols only say ITransport).
    """


def own_transport(transport) -> Optional[FileDescriptor]:
    """
    The transport that owns the socket: C{transport} itself, or the TCP
    transport under a TLS wrapper (which passes attribute lookups through
    to it, so asking for its attributes is not enough). None if there is
    none (a test's memory transport).
    """
    for _ in range(3):
        if transport is None or isinstance(transport, FileDescriptor):
            return transport
        transport = getattr(transport, "transport", None)
    return None


def tune(transport) -> None:
    """Apply the settings to C{transport}, or to the TCP transport under a TLS wrapper."""
    transport = own_transport(transport)
    if transport is None:
        return
    transport.SEND_LIMIT = SEND_LIMIT
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass  # not TCP after all (a UNIX socket): nothing to turn off
    if getattr(transport, "socket", None) is not None:
        _write_eagerly(transport)


def _write_eagerly(transport) -> None:
    """Make C{transport}'s writes try the socket first."""
    transport._relay_writes = _EagerWrites(transport)


class _EagerWrites:
    """
    The write side of a tuned transport: straight to the socket when
    nothing waits before the data, else Twisted's own buffered write; and,
    inside L{corked}, held back to leave as one.
    """

    def __init__(self, transport):
        self.transport = transport
        self.buffered_write = transport.write
        self.send = transport.socket.send
        self.held: Optional[List[bytes]] = None
        transport.write = self.write
        transport.writeSequence = self.writeSequence

    def write(self, data: bytes) -> None:
        if self.held is not None:
            self.held.append(data)
            return
        if data and nothing_to_write(self.transport):
            try:
                sent = self.send(data)
            except OSError:
                # Full (EAGAIN) or broken: the reactor's next write meets
                # the same condition and handles it as always.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self.buffered_write(data)

    def writeSequence(self, iovec) -> None:
        self.write(b"".join(iovec))

    def release(self) -> None:
        held, self.held = self.held, None
        if held:
            self.write(b"".join(held))


def corked(transport: Optional[ITransport], action: Callable[..., T], *args) -> T:
    """
    C{action(*args)}, with what it writes to C{transport} sent in one piece
    when it returns: an HTTP head and the body written right after it (by
    twisted.web, or by the HTTP client and a body producer) are one packet
    and one wake-up of the peer, not two. Any transport that is not tuned,
    or a cork already in place, runs C{action} as it is.
    """
    writes = getattr(transport, "_relay_writes", None)
    if writes is None or writes.held is not None:
        return action(*args)
    writes.held = []
    try:
        return action(*args)
    finally:
        writes.release()


class _OneShotFactory(Factory):
    noisy = False  # no "Starting factory <…object at 0x…>" line per connection

    def __init__(self, protocol):
        self.protocol_instance = protocol

    def buildProtocol(self, addr):
        return self.protocol_instance


def connect_quietly(endpoint: IStreamClientEndpoint, protocol: IProtocol) -> Deferred:
    """
    L{twisted.internet.endpoints.connectProtocol}, without its factory's
    C{Starting factory} and C{Stopping factory} lines at info, which the
    relay-client would write for every WebSocket and HTTP/2 backend
    connection.
    """
    return endpoint.connect(_OneShotFactory(protocol))
