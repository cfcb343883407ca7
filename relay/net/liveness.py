"""
Dead peers: keepalive and C{TCP_USER_TIMEOUT} on a connection's socket, and
what its death left behind.

A robot on Wi-Fi or LTE can vanish without a FIN or a RST: a dead zone, a
NAT that forgot its mapping, a hand-over to another network. Without help
the kernel keeps such a connection for hours (an idle one forever, one with
unacknowledged data for about 15 minutes of retransmissions), and the relay
keeps the long polls on it, and hands requests to them.

  - C{SO_KEEPALIVE} with C{TCP_KEEPIDLE} = C{TCP_KEEPINTVL} = the
    interval, and C{TCP_KEEPCNT} chosen so that an idle connection whose
    peer stopped answering ends after about the dead-connection timeout;
  - C{TCP_USER_TIMEOUT} = the dead-connection timeout, so that a
    connection whose sent data stays unacknowledged that long is aborted
    (the kernel ends it with C{ETIMEDOUT}).

Options the platform lacks are skipped: the C{TCP_KEEP*} and
C{TCP_USER_TIMEOUT} options are Linux's (macOS and the BSDs have some under
other names, and keep their defaults here).

When such a connection dies, two facts are worth keeping, and both are gone
once Twisted has handled the death, which is why L{watch} records them on
the way:

  - the error that ended it (C{ETIMEDOUT}: the peer stopped answering;
    C{ECONNRESET}: something reset it). Twisted's C{doRead} turns every
    read error into one C{ConnectionLost}, and the read consumes the
    socket's pending error, so the read is done here, keeping the errno;
  - how many bytes written on it were never acknowledged: the kernel's
    send queue (C{SIOCOUTQ}, which Linux still reports after the
    connection was aborted by a timeout or a reset) plus what Twisted had
    not yet handed to the kernel. Read just before Twisted closes the
    socket. More than zero proves that the peer did not receive
    everything that was written (see docs/protocol.md, "When a
    relay-client's connection dies").
"""

import errno
import fcntl
import socket
import struct
from typing import Optional

from twisted.internet import error

from relay.compat import read_socket, unread_socket, unwritten_bytes
from relay.net.transport import own_transport

SIOCOUTQ: Optional[int]
try:  # Linux: TIOCOUTQ and SIOCOUTQ are the same request.
    from termios import TIOCOUTQ as SIOCOUTQ
except ImportError:  # pragma: no cover - not Linux
    SIOCOUTQ = None

# What ended a connection, as L{Death.reason} says it.
CLOSED = "closed"  # an orderly close (FIN), from either side
ABORTED = "aborted"  # we aborted it (a timeout of ours, a drain)
TIMEOUT = "timeout"  # the kernel gave up on the peer: ETIMEDOUT
RESET = "reset"  # any other error: a reset by the peer or a middlebox


class Death:
    """
    How a connection ended.

    @ivar reason: L{CLOSED}, L{ABORTED}, L{TIMEOUT} or L{RESET}.
    @ivar unsent: bytes written on it that the peer never acknowledged;
        None when that cannot be known (no C{SIOCOUTQ}, no socket).
    """

    __slots__ = ("reason", "unsent")

    def __init__(self, reason: str, unsent: Optional[int] = None):
        self.reason = reason
        self.unsent = unsent

    @property
    def orderly(self) -> bool:
        """Closed with a FIN: a peer closes a connection it has read to the end."""
        return self.reason == CLOSED

    @property
    def dead(self) -> bool:
        """Ended by an error: the peer vanished or reset it."""
        return self.reason in (TIMEOUT, RESET)

    def __repr__(self) -> str:
        return "Death(%r, unsent=%r)" % (self.reason, self.unsent)


def reason_of(failure, errno_: Optional[int] = None) -> str:
    """The L{Death.reason} for a C{connectionLost} failure (and the errno, if kept)."""
    if failure is not None and failure.check(error.ConnectionAborted):
        return ABORTED
    if failure is None or failure.check(error.ConnectionDone):
        return CLOSED
    if errno_ == errno.ETIMEDOUT:
        return TIMEOUT
    return RESET


def socket_transport(transport):
    """
    The transport that owns the socket under C{transport}
    (L{relay.net.transport.own_transport}), if it has a socket.
    """
    own = own_transport(transport)
    return own if own is not None and getattr(own, "socket", None) is not None else None


def keepalive_count(interval: float, timeout: float) -> int:
    """
    C{TCP_KEEPCNT}: unanswered probes, one per C{interval} after
    C{interval} of silence, until about C{timeout} has passed.
    """
    return max(1, int(round((timeout - interval) / interval)))


def set_options(sock, interval: float, timeout: float) -> None:
    """
    Keepalive every C{interval} seconds, dead after C{timeout} (see the
    module docstring); 0 turns either off. Options the platform lacks (or
    refuses, on a socket that is not TCP) are skipped.
    """
    settings = []
    if interval > 0:
        whole = max(1, int(round(interval)))
        settings.append((socket.SOL_SOCKET, getattr(socket, "SO_KEEPALIVE", None), 1))
        settings.append((socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), whole))
        settings.append((socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), whole))
        if timeout > 0:
            settings.append((socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), keepalive_count(whole, timeout)))
    if timeout > 0:
        settings.append((socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), int(timeout * 1000)))
    for level, option, value in settings:
        if option is None:
            continue
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            pass


def watch_socket_of(transport, interval: float, timeout: float) -> None:
    """
    L{set_options} on the socket under C{transport}, if it has one: for the
    relay-client's own connections, whose deaths its calls see as errors,
    with nothing to record.
    """
    own = socket_transport(transport)
    if own is not None:
        set_options(own.socket, interval, timeout)


def kernel_unsent(sock) -> Optional[int]:
    """Bytes in the socket's send queue not acknowledged by the peer (C{SIOCOUTQ}); None where unknown."""
    if SIOCOUTQ is None:
        return None
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return None


class Watch:
    """
    One connection's socket, watched: its options set, and its L{Death}
    recorded before Twisted closes it. Holds nothing per read or write: the
    read that keeps the errno replaces Twisted's, it does not wrap it.
    """

    __slots__ = ("death", "_errno", "_transport", "_lost")

    def __init__(self, transport, interval: float, timeout: float):
        self.death: Optional[Death] = None
        self._errno: Optional[int] = None
        self._transport = transport
        set_options(transport.socket, interval, timeout)
        self._lost = transport.connectionLost
        read_socket(transport, self._read_failed)
        # An instance attribute: the reactor calls the transport's
        # connectionLost through it, and ours runs first.
        transport.connectionLost = self._connection_lost

    def _read_failed(self, errno_: int) -> None:
        self._errno = errno_

    def _connection_lost(self, reason) -> None:
        transport = self._transport
        if self.death is None and getattr(transport, "socket", None) is not None:
            try:
                self.death = self._record(transport, reason)
            except Exception:
                self.death = Death(reason_of(reason, self._errno))
        self._transport = None
        lost, self._lost = self._lost, None
        # The replacements hold the transport: let it go with the connection.
        if transport is not None:
            unread_socket(transport)
            transport.__dict__.pop("connectionLost", None)
        if lost is not None:
            lost(reason)

    def _record(self, transport, reason) -> Death:
        sock = transport.socket
        errno_ = self._errno
        if errno_ is None and not reason.check(error.ConnectionDone, error.ConnectionAborted):
            # A failed write (Twisted keeps no errno there either) may have
            # left the error pending on the socket.
            try:
                errno_ = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or None
            except OSError:
                errno_ = None
        unsent = kernel_unsent(sock)
        if unsent is not None:
            unsent += unwritten_bytes(transport)
        return Death(reason_of(reason, errno_), unsent)


def watch(transport, interval: float, timeout: float) -> Optional[Watch]:
    """
    Watch the socket under C{transport} (see L{Watch}); None when there is
    none. With both settings 0 the death is still recorded.
    """
    own = socket_transport(transport)
    if own is None:
        return None
    return Watch(own, interval, timeout)
