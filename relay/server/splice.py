"""
Upgrade requests (WebSockets, C{kubectl exec}) passed to the replica that
owns their name.

An upgraded connection is a raw two-way pipe, which cannot ride the HTTP/2
streams of L{relay.server.forward}. So each gets a TCP connection of its own
to the owner: the request's head is replayed there with
C{Relay-Forwarded-By}, and from then on the user's connection and the
owner's are spliced, byte for byte, whatever the owner answers (its 101 and
the pipe, or an error and whatever the user sends next). Each side is the
other's push producer, as in L{twisted.protocols.portforward}: a side that
reads slowly pauses the other, so nothing is buffered beyond one socket
read. A side that closes closes the other; one that is cut off (reset)
aborts the other, so that a cut-off stream never looks finished.
"""

from typing import Optional

from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.web.server import NOT_DONE_YET

from relay.compat import request_gone
from relay.headers import FORWARDED_BY
from relay.logs import Throttle
from relay.net.transport import IStreamTransport, connect_quietly
from relay.outbound.address import split_host_port
from relay.server.forward import peer_unreachable, proxied_headers

CONNECT_TIMEOUT = 5.0  # seconds; a peer that passes its health checks answers at once


class _End(Protocol):
    """One end of the splice: what it reads, the other end writes."""

    other: Optional["_End"] = None
    transport: IStreamTransport  # connected before any other method runs

    def dataReceived(self, data: bytes) -> None:
        if self.other is not None:
            self.other.transport.write(data)

    def connectionLost(self, reason=None) -> None:
        other, self.other = self.other, None
        if other is None:
            return
        other.other = None
        other.transport.unregisterProducer()
        if reason is None or reason.check(ConnectionDone):
            other.transport.loseConnection()
        else:
            other.transport.abortConnection()


def splice(a: _End, b: _End) -> None:
    """Join two connected ends, each the producer of the other's writes."""
    a.other, b.other = b, a
    a.transport.registerProducer(b.transport, True)
    b.transport.registerProducer(a.transport, True)


def request_head(request, myself: str) -> bytes:
    """C{request} as it came, for the owner: its line, its headers, our mark, its body."""
    body = request.content.read() if request.content is not None else b""
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method, request.uri)]
    for name, values in proxied_headers(request):
        if name.lower() in (b"content-length", b"transfer-encoding"):
            continue
        lines.extend(b"%s: %s\r\n" % (name, value) for value in values)
    lines.append(b"%s: %s\r\n" % (FORWARDED_BY.encode("ascii"), myself.encode("utf-8")))
    if body:
        lines.append(b"Content-Length: %d\r\n" % (len(body),))
    lines.append(b"\r\n")
    return b"".join(lines) + body


class UpgradeForwarder:
    """Splices upgrade requests onto connections to their owners, given as C{host:port}."""

    def __init__(self, reactor, myself: str):
        self.reactor = reactor
        self.myself = myself
        self._failures = Throttle(reactor)

    def forward(self, request, peer: str):
        """Answer C{request} (an HTTP/1.1 upgrade request) with C{peer}'s connection."""
        host, port = split_host_port(peer)
        endpoint = HostnameEndpoint(self.reactor, host, port, timeout=CONNECT_TIMEOUT)
        request.content.seek(0)
        head = request_head(request, self.myself)
        owner = _End()
        connecting = connect_quietly(endpoint, owner)

        def connected(_) -> None:
            if request.finished or request_gone(request):
                owner.transport.loseConnection()
                return
            user = _End()
            # Joined before the switch, which hands over bytes the user
            # sent after the head.
            user.other, owner.other = owner, user
            owner.transport.write(head)
            request.channel.switch_protocol(user, b"")
            splice(user, owner)

        def failed(failure) -> None:
            if failure.check(CancelledError) or request.finished or request_gone(request):
                return
            peer_unreachable(request, self._failures, peer, str(failure.value))

        connecting.addCallbacks(connected, failed)
        request.notifyFinish().addErrback(lambda _: connecting.cancel())
        return NOT_DONE_YET
