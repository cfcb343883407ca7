"""
The relay's Site: which channel a connection gets, how long it lives, and
how the connections end when the server stops. The HTTP/1.1 framing itself
(body cap, trailers, hand-overs, header timeout, request-framing rules) is
in L{relay.server.http1}, which reads its limits and asks for these
decisions through the Site.

  - Connection lifetime: each socket is tuned and watched for a dead peer
    (L{relay.net.liveness}); when it ends, the broker is told how, with
    its record of the polls the connection carried (L{poll_connection}).
  - Drain policy: once a stop begins (C{draining}), every answer closes
    its connection, so that clients reconnect to another server, but a
    relay-client's 200 to a response chunk or a request-stream read: the
    request it belongs to is still in flight. HTTP/2 clients get a
    GOAWAY. L{RelaySite.close_connections} ends what is left.
  - Time: the header timer and the abort of connections that do not close
    run on the injected C{clock} (an C{IReactorTime}); the C{reactor}
    formats the C{Date} header and pumps HTTP/2 data.
"""

from typing import TYPE_CHECKING, Any, List, Optional, Set

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.web import http, server

from relay import http1_engine
from relay.config import ServerConfig
from relay.net import liveness
from relay.net.transport import tune
from relay.server.broker import PollConnection
from relay.server.h2 import RelayH2Connection, stream_connection
from relay.server.http1 import RelayChannel, RelayRequest

if TYPE_CHECKING:
    from relay.server.broker import Broker
    from relay.server.pending import BodyBudget

# A relay-client's answers that keep their connection during a drain: the
# request they belong to is still in flight, and its next chunk or read
# should not need a new connection.
_KEPT_WHILE_DRAINING = (b"/server/response", b"/server/requeststream")


class RelaySite(server.Site):
    """
    The relay's Site: the HTTP/1.1 channel and request classes of
    L{relay.server.http1}, with the limits, clock and decisions they ask
    their factory for, and no access log (the Go server writes none, and
    it costs a quarter of the throughput for small requests).
    """

    # HTTPFactory's type is that of its own factory (HTTP/2 negotiation behind
    # a proxy); Factory.protocol takes any protocol class, as here.
    protocol = RelayChannel  # type: ignore[assignment]
    # What the lean channel hands a connection to when llhttp cannot read
    # it (relay.server.lean_http1): twisted.web's channel.
    fallback_channel = RelayChannel
    requestFactory = RelayRequest
    noisy = False

    def __init__(self, resource, config: ServerConfig, clock: Optional[IReactorTime] = None, **kwargs):
        """
        C{clock} (the C{reactor} keyword, else the global reactor, by
        default) times the connections: the header timer, twisted.web's
        own timeouts and the abort at close. Tests pass a C{Clock}.
        """
        # No idle timer for HTTP/1.1 (twisted.web's is 12 hours, rearmed
        # around every request): the header timeout closes idle
        # connections, for a fraction of the cost.
        kwargs.setdefault("timeout", None)
        super().__init__(resource, **kwargs)
        self.clock = clock if clock is not None else self.reactor
        # The HTTP/1.1 engine (relay.http1_engine): llhttp's channel
        # (relay.server.lean_http1), or twisted.web's (relay.server.http1).
        self.http1_engine = http1_engine.resolve(config.http1_engine)
        if self.http1_engine == "httptools":
            from relay.server.lean_http1 import LeanChannel

            self.protocol = LeanChannel  # type: ignore[assignment]
        self.max_request_body = config.max_request_body
        self.max_streamed_request_body = config.max_streamed_request_body
        self.max_headers = config.max_headers
        self.max_header_bytes = config.max_header_bytes
        self.header_timeout = config.header_timeout
        self.tcp_keepalive_interval = config.tcp_keepalive_interval
        self.dead_connection_timeout = config.dead_connection_timeout
        # How each connection's socket is watched for a dead peer: tests
        # put in a double that reports a death of their choosing.
        self.watch = liveness.watch
        # Set by the service: the broker, told of every connection's end.
        self.broker: Optional["Broker"] = None
        # Set by the service: the broker's budget for buffered bodies.
        self.body_budget: Optional["BodyBudget"] = None
        self.connections: Set[RelayChannel] = set()
        self._all_closed: List[Deferred] = []
        # Set when a stop begins: every answer closes its connection.
        self.draining = False

    def log(self, request) -> None:
        pass

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        # twisted.web's timeouts, and our header timer, on our clock.
        channel.callLater = self.clock.callLater
        return channel

    def streams_body(self, request, path: bytes) -> bool:
        """
        Whether a request whose head has arrived, with a body to come, is
        processed at once with its body streaming: the resource tree
        decides (C{path} is the target's, undecoded).
        """
        decide = getattr(self.resource, "streams_body", None)
        return decide is not None and decide(request, path)

    def closes_after(self, request) -> bool:
        """
        While draining: whether C{request}'s answer closes its connection
        (all do, but a relay-client's 200s to answer chunks and stream
        reads).
        """
        return not (request.code == 200 and request.path in _KEPT_WHILE_DRAINING)

    def connection_made(self, channel: RelayChannel) -> None:
        """A connection begins: tune its socket, watch it for a dead peer, count it."""
        tune(channel.transport)
        watch = self.watch
        if watch is not None:
            channel.socket_watch = watch(channel.transport, self.tcp_keepalive_interval, self.dead_connection_timeout)
        self.connections.add(channel)

    def connection_lost(self, channel: RelayChannel, reason, switched) -> None:
        """
        A connection ended (C{switched}: the protocol it had been handed
        to, if any): tell the broker how, with the polls it carried.
        """
        self.connection_closed(channel)
        broker = self.broker
        if broker is not None:
            watch, channel.socket_watch = channel.socket_watch, None
            death = watch.death if watch is not None else None
            if death is None:
                death = liveness.Death(liveness.reason_of(reason))
            h2_polls = getattr(switched, "poll_connection", None)
            broker.connection_ended(death, channel.poll_connection, h2_polls)

    _date_second = None
    _date = b""

    def http_date(self) -> bytes:
        """The C{Date} header's value: formatted once a second, not per answer."""
        now = int(self.reactor.seconds())
        if now != self._date_second:
            self._date_second = now
            self._date = http.datetimeToString(now)
        return self._date

    def connection_closed(self, channel: "RelayChannel") -> None:
        self.connections.discard(channel)
        if not self.connections:
            waiters, self._all_closed = self._all_closed, []
            for d in waiters:
                d.callback(None)

    def go_away(self, final: bool = False) -> None:
        """Tell every HTTP/2 client to open no more streams (L{RelayH2Connection.go_away})."""
        for channel in list(self.connections):
            if isinstance(channel._switched, RelayH2Connection):
                channel._switched.go_away(final)

    def close_connections(self, abort_after: float = 5.0) -> Deferred:
        """
        Close every connection (at shutdown, once requests are drained, as
        Go's C{Server.Shutdown} closes idle ones); abort those that have not
        closed after C{abort_after} seconds (a peer that does not read).
        Fires when all are gone.
        """
        if not self.connections:
            return succeed(None)
        d: Deferred = Deferred()
        self._all_closed.append(d)
        self.go_away(final=True)
        for channel in list(self.connections):
            channel.transport.loseConnection()

        def abort():
            for channel in list(self.connections):
                channel.transport.abortConnection()

        timer = self.clock.callLater(abort_after, abort)

        def stop_timer(result):
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(stop_timer)
        return d


def poll_connection(request) -> Optional[PollConnection]:
    """
    The broker's record of the connection C{request} came on (its HTTP/1.1
    channel, or its HTTP/2 connection), made at its first poll; None on a
    channel of another kind.
    """
    conn, _ = stream_connection(request)
    owner = conn if conn is not None else request.channel
    # A channel of another kind has no such attribute: False, not None.
    record: Any = getattr(owner, "poll_connection", False)
    if record is None:
        made = owner.poll_connection = PollConnection(multiplexed=conn is not None)
        return made
    return record or None
