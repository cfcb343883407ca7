"""
The broker: the relay server's state, with no HTTP in it.

It matches user requests to relay-clients' long polls, and relay-clients'
response messages to the user requests they answer. Everything that waits is
a L{Deferred} with a timer from the injected clock, so tests drive every
timeout with L{twisted.internet.task.Clock}; everything that flows is pushed
through small, bounded queues whose fullness is reported back as
back-pressure:

  - a relay-client's C{POST /server/response} is a L{Deferred} that fires
    only once its message has been handed to the user-client's connection
    while that connection is willing to take more (L{PendingRequest} is the
    L{IPushProducer} registered on it), so a slow reader holds the
    relay-client's POSTs rather than filling our memory;
  - bytes a user-client sends after a 101 wait in a L{StreamQueue} whose
    size pauses the user's transport.

The Go server's broker (C{broker.go}) is the model; where its behaviour is
observable on the wire (messages, status codes, timeouts) ours is the same.
"""

import os
from collections import deque
from typing import Callable, Deque, Dict, Iterator, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from relay.config import ServerConfig
from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse
from relay.server.metrics import RESULT_UNKNOWN_ID, UNKNOWN_BACKEND, RelayMetrics

log = Logger()

# Fixed by the protocol, as in the Go server.
POLL_TIMEOUT = 30.0
PICKUP_TIMEOUT = 10.0
STREAM_POLL_TIMEOUT = 30.0


class BrokerError(Exception):
    """Base of the errors the HTTP layer turns into status codes."""


class UnknownBackend(BrokerError):
    """No relay-client has polled for this backend name (or it was forgotten)."""

    def __init__(self, name: str):
        super().__init__(
            "Cannot reach the client %s. Check that it's turned on, set up, and "
            "connected to the internet. (unknown client)" % (_go_quote(name),)
        )


class BackendUnreachable(BrokerError):
    """The backend is known, but no poll took the request in time."""

    def __init__(self, name: str):
        super().__init__(
            "Cannot reach the client %s. Check that it's turned on, set up, and "
            "connected to the internet. (timeout waiting for relay client to "
            "accept request)" % (_go_quote(name),)
        )


class UnknownRequest(BrokerError):
    """An id that is not (or no longer) pending."""

    def __init__(self, request_id: str):
        super().__init__("Duplicate or invalid request ID %s" % (request_id,))


class RelayClientLost(BrokerError):
    """
    The connection that carried the request to its relay-client died
    before the relay-client showed that it had the request, and it cannot
    be shown that the request did not reach it (so it is not handed out
    again): 502 at once, rather than a 504 after the inactivity timeout.
    """

    status = 502

    def __init__(self, name: str):
        super().__init__(
            "Lost the connection to the relay client of %s before it took the request; "
            "it may not have received it" % (_go_quote(name),)
        )


class RequestExpired(BrokerError):
    """No activity on the request for the inactive-request timeout."""


class ServerStopping(BrokerError):
    """The server is shutting down."""


class Overloaded(BrokerError):
    """A limit on pending requests or on backends is reached (503, retry later)."""


def _go_quote(text: str) -> str:
    """Go's C{%q} for the printable strings backend names are."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x10000:
            out.append("\\x%02x" % ord(ch) if ord(ch) < 0x80 else "\\u%04x" % ord(ch))
        else:
            out.append("\\U%08x" % ord(ch))
    out.append('"')
    return "".join(out)


class RequestIds:
    """
    C{{name}:} and 32 lowercase hex digits from 16 random bytes.

    The bytes come from C{os.urandom} 4 KiB at a time: on PyPy each call
    opens, reads and closes C{/dev/urandom}, five system calls per request.
    The bytes are as unguessable either way, and each is used once.

    With several replicas (docs/scaling.md), the first byte is the index of
    the replica that issues the id instead (C{replica}), so that a call
    about the request can be passed to the replica that holds it, whichever
    replica it reaches. The wire format stays the same, and 120 random bits
    remain.
    """

    def __init__(self, batch: int = 4096, replica: Optional[int] = None):
        if replica is not None and not 0 <= replica <= 255:
            raise ValueError("a replica index is 0 to 255, not %r" % (replica,))
        self._batch = batch
        self._pool = b""
        self._offset = 0
        self._prefix = None if replica is None else "%02x" % (replica,)

    def __call__(self, backend: str) -> str:
        if self._offset + 16 > len(self._pool):
            self._pool = os.urandom(self._batch)
            self._offset = 0
        start = self._offset
        self._offset = start + 16
        if self._prefix is None:
            return backend + ":" + self._pool[start : start + 16].hex()
        return backend + ":" + self._prefix + self._pool[start + 1 : start + 16].hex()


def issuing_replica(request_id: str) -> Optional[int]:
    """The replica index an id of L{RequestIds} carries; None if it is not one of ours."""
    _, sep, tail = request_id.rpartition(":")
    if not sep or len(tail) != 32 or tail.strip("0123456789abcdef"):
        return None
    return int(tail[:2], 16)



class ResponseSink:
    """
    What a L{PendingRequest} hands its messages to: the user-client's side,
    implemented by the HTTP layer. Documented here as the contract.
    """

    def deliver(self, message: HttpResponse, body: Optional[List[bytes]] = None) -> None:
        """
        Take one response message, in order. Called only while the sink's
        producer is not paused. After a message with C{eof}, nothing more
        comes. C{body}, when given, is the message's body as pieces, kept
        out of C{message} (see L{relay.wire.parse_pieces}).
        """
        raise NotImplementedError

    def fail(self, reason: BrokerError) -> None:
        """
        The request ended without C{eof}: L{BackendUnreachable},
        L{RequestExpired}, L{ServerStopping} or L{UnknownRequest} (the
        relay-client's first message was unusable). A sink that has begun a
        response must end it so that it cannot look complete.
        """
        raise NotImplementedError


class BodyBudget:
    """
    Bytes of request bodies the server holds at once, across all requests:
    from their first byte until a relay-client picks them up (or the request
    ends). Each body is capped by --max_request_body; this caps their sum, so
    that many large uploads at once cannot exhaust memory.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)


class Waiters:
    """
    Deferreds waiting in line, each with a deadline on the clock: a
    backend's long polls, an upgraded request's stream reads. Stream reads
    are served oldest first (L{pop}), so that bytes go out in order; long
    polls newest first (L{pop_newest}, see L{Broker.relay}). One that
    times out leaves the line before C{on_timeout} fires it; one that is
    cancelled (its peer went away) leaves the line and takes its timer
    with it.
    """

    def __init__(self, clock: IReactorTime, timeout: float, on_timeout: Callable[[Deferred], None]):
        self._clock = clock
        self._timeout = timeout
        self._on_timeout = on_timeout
        self._line: Deque[Tuple[Deferred, IDelayedCall]] = deque()

    def __len__(self) -> int:
        return len(self._line)

    def __iter__(self) -> Iterator[Deferred]:
        return (d for d, _ in self._line)

    def wait(self) -> Deferred:
        """A new place at the end of the line."""
        d = Deferred(self._leave)
        timer = self._clock.callLater(self._timeout, self._expire, d)
        self._line.append((d, timer))
        return d

    def pop(self) -> Deferred:
        """The oldest waiter, out of the line and with no timer, to fire."""
        d, timer = self._line.popleft()
        timer.cancel()
        return d

    def pop_newest(self) -> Deferred:
        """The newest waiter, out of the line and with no timer, to fire."""
        d, timer = self._line.pop()
        timer.cancel()
        return d

    def fire_all(self, result) -> None:
        """Everyone in line gets C{result}: the wait is over for good."""
        line, self._line = self._line, deque()
        for d, timer in line:
            timer.cancel()
            d.callback(result)

    def _remove(self, d: Deferred) -> Optional[IDelayedCall]:
        for entry in self._line:
            if entry[0] is d:
                self._line.remove(entry)
                return entry[1]
        return None

    def _leave(self, d: Deferred) -> None:
        timer = self._remove(d)
        if timer is not None:
            timer.cancel()

    def _expire(self, d: Deferred) -> None:
        self._remove(d)
        self._on_timeout(d)


class StreamQueue:
    """
    Bytes a user-client sent after a 101, waiting for the relay-client's
    C{POST /server/requeststream}. Each poll takes up to C{block_size}
    bytes; when more than C{high_water} bytes wait, the producer (the user's
    transport) is paused until polls have drained them.
    """

    def __init__(self, clock: IReactorTime, block_size: int, high_water: int):
        self._clock = clock
        self._block_size = block_size
        self._high_water = high_water
        self._chunks: Deque[bytes] = deque()
        self._size = 0
        self._waiters = Waiters(clock, STREAM_POLL_TIMEOUT, lambda d: d.callback(b""))
        self._producer: Optional[IPushProducer] = None
        self._paused = False
        self.closed = False

    def set_producer(self, producer: Optional[IPushProducer]) -> None:
        self._producer = producer

    @property
    def buffered(self) -> int:
        return self._size

    def put(self, data: bytes) -> None:
        if self.closed or not data:
            return
        self._chunks.append(data)
        self._size += len(data)
        while self._waiters and self._size:
            self._waiters.pop().callback(self._take())
        if self._size > self._high_water and not self._paused and self._producer:
            self._paused = True
            self._producer.pauseProducing()

    def get(self) -> Deferred:
        """
        The next bytes (at most C{block_size}); C{b""} after
        L{STREAM_POLL_TIMEOUT} without any; C{None} once the request is over.
        """
        if self._size:
            return succeed(self._take())
        if self.closed:
            return succeed(None)
        return self._waiters.wait()

    def _take(self) -> bytes:
        out: List[bytes] = []
        room = self._block_size
        while self._chunks and room > 0:
            chunk = self._chunks.popleft()
            if len(chunk) > room:
                self._chunks.appendleft(chunk[room:])
                chunk = chunk[:room]
            out.append(chunk)
            room -= len(chunk)
        data = b"".join(out)
        self._size -= len(data)
        if self._paused and self._size <= self._high_water // 2 and self._producer:
            self._paused = False
            self._producer.resumeProducing()
        return data

    def close(self) -> None:
        """No more bytes will come; pending polls get C{None} (410)."""
        if self.closed:
            return
        self.closed = True
        self._chunks.clear()
        self._size = 0
        self._waiters.fire_all(None)
        self._producer = None


@implementer(IPushProducer)
class PendingRequest:
    """
    One user request, from its creation until its last message was handed on
    or it ended otherwise. It is the push producer of the user-client's
    response: the HTTP layer registers it on the user's connection, which
    pauses it when its send buffer is full.
    """

    def __init__(
        self,
        broker: "Broker",
        request_id: str,
        backend: str,
        message: HttpRequest,
        sink: ResponseSink,
    ):
        self.broker = broker
        self.id = request_id
        self.backend = backend
        self.message: Optional[HttpRequest] = message
        self.sink = sink
        self.start = self.last_activity = broker.clock.seconds()
        self.picked_up = False
        self.started = False
        # eof_received: later posts are refused; finished: nothing more
        # goes to the sink.
        self.eof_received = False
        self.finished = False
        self._pickup_timer: Optional[IDelayedCall] = None
        self._inbox: Deque[Tuple[HttpResponse, Deferred, Optional[List[bytes]]]] = deque()
        self._paused = False
        self._draining = False
        self.stream: Optional[StreamQueue] = None
        # Bytes of the body charged to the broker's BodyBudget, given back
        # once the message has been handed over (or dropped).
        self.charge = 0
        # For the admin view (relay.server.admin): what was asked, set only when
        # the view is on, since the message itself goes at pickup; and
        # whether the user went away first.
        self.info = None
        self.cancelled = False
        # While the answer of the poll that took it may still be on its way
        # to the relay-client: the connection it was written on (a
        # PollConnection), and the message, to hand out again if that
        # connection dies with the answer provably undelivered.
        self.carrier: Optional["PollConnection"] = None
        self.unreceived: Optional[HttpRequest] = None

    # IPushProducer, driven by the user-client's connection.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._drain()

    def stopProducing(self) -> None:
        self.broker.cancel(self)

    def open_stream(self) -> StreamQueue:
        """
        The queue for the user-client's bytes after a 101. It exists as soon
        as either side asks: the Go relay-client may start pulling it just
        before it posts the 101.
        """
        if self.stream is None:
            size = self.broker.block_size
            self.stream = StreamQueue(self.broker.clock, size, high_water=max(4 * size, 65536))
        return self.stream

    def _release_body(self) -> None:
        self.message = None
        if self.charge:
            self.broker.bodies.give(self.charge)
            self.charge = 0

    def _post(self, message: HttpResponse, body: Optional[List[bytes]] = None) -> Deferred:
        def withdraw(d: Deferred) -> None:
            # The relay-client gave up on this POST (and will retry it):
            # a message not yet handed on must not be handed on twice.
            for entry in self._inbox:
                if entry[1] is d:
                    self._inbox.remove(entry)
                    if message.eof:
                        self.eof_received = False
                    return

        d = Deferred(withdraw)
        self._inbox.append((message, d, body))
        self._drain()
        return d

    def _drain(self) -> None:
        # Re-entrancy guard: a sink's write may pause or resume us, or end
        # the request, while we are delivering.
        if self._draining:
            return
        self._draining = True
        try:
            while self._inbox and not self._paused and not self.finished:
                message, d, body = self._inbox.popleft()
                self.started = True
                if message.eof:
                    self.finished = True
                try:
                    self.sink.deliver(message, body)
                except Exception:
                    # A bug, not bad input: answer the POST with an error,
                    # end the user's response honestly, keep serving others.
                    log.failure("Handing a response message on failed", ID=self.id)
                    d.errback()
                    self.finished = False
                    self.broker._forget(self, BrokerError("internal error"))
                    return
                d.callback(None)
                if message.eof:
                    self.broker._forget(self, None)
        finally:
            self._draining = False

    def _end(self, reason: Optional[BrokerError]) -> None:
        """Forget everything; tell the sink when the end was not an eof."""
        if self._pickup_timer is not None and self._pickup_timer.active():
            self._pickup_timer.cancel()
        self._pickup_timer = None
        self._release_body()
        if self.carrier is not None:
            self.carrier.received(self)
        inbox, self._inbox = self._inbox, deque()
        for _, d, _ in inbox:
            d.errback(UnknownRequest(self.id))
        if self.stream is not None:
            self.stream.close()
        if reason is not None and not self.finished:
            self.finished = True
            self.sink.fail(reason)


class PollConnection:
    """
    What the broker remembers of one connection relay-clients poll on: the
    name it last polled for, and the requests whose poll answers were
    written on it and not yet shown to have arrived. The HTTP layer keeps
    one per connection (created at its first poll) and tells the broker
    when the connection dies (L{Broker.connection_lost}).

    A request shows that it arrived when the relay-client acts on it (a
    response message, a request-stream read), or, on HTTP/1.1, when the
    next request arrives on the same connection (L{delivered}): an
    HTTP/1.1 client sends it only after reading the whole answer.

    @ivar multiplexed: an HTTP/2 connection, whose unacknowledged bytes
        cannot be told apart between its streams.
    """

    __slots__ = ("name", "in_transit", "multiplexed")

    def __init__(self, multiplexed: bool = False):
        self.name: Optional[str] = None
        self.in_transit: Optional[Set[PendingRequest]] = None
        self.multiplexed = multiplexed

    def sent(self, pending: PendingRequest, message: HttpRequest) -> None:
        if self.in_transit is None:
            self.in_transit = set()
        self.in_transit.add(pending)
        pending.carrier = self
        pending.unreceived = message

    def received(self, pending: PendingRequest) -> None:
        """C{pending} reached its relay-client (or is over): forget it here."""
        pending.carrier = None
        pending.unreceived = None
        if self.in_transit is not None:
            self.in_transit.discard(pending)

    def delivered(self) -> None:
        """Everything written on this connection arrived (HTTP/1.1: a next request came)."""
        if self.in_transit:
            for pending in list(self.in_transit):
                self.received(pending)


class Backend:
    """
    A backend name some relay-client polls for, and the health of its
    relay-clients' connections (L{Broker.connection_lost}; docs/server.md,
    "Metrics").
    """

    __slots__ = (
        "name",
        "polls",
        "queue",
        "active",
        "last_activity",
        "last_poll",
        "connections",
        "dead_connections",
        "requeued",
        "lost",
    )

    def __init__(self, name: str, now: float, polls: Waiters):
        self.name = name
        self.polls = polls
        self.queue: Deque[PendingRequest] = deque()
        # Ids of this backend's requests that are not over yet.
        self.active: Set[str] = set()
        self.last_activity = now
        self.last_poll = now
        # Connections that polled for this name; each after the first is
        # a reconnect.
        self.connections = 0
        # Poll connections of this name that died (a timeout or a reset).
        self.dead_connections = 0
        # Requests whose poll answer provably never arrived, handed out
        # again; and those that failed (502) because it could not be shown.
        self.requeued = 0
        self.lost = 0

    @property
    def reconnects(self) -> int:
        return max(0, self.connections - 1)


class Broker:
    """
    Backends by name, pending requests by id.

    @param clock: where time and timers come from.
    @param metrics: the metrics sink.
    @param config: the limits and timeouts (C{inactive_request_timeout}:
        seconds without a message from the relay-client after which a
        request is dropped, 504 when nothing was answered yet;
        C{inactive_backend_timeout}: seconds without a poll after which a
        backend is forgotten, 503 unknown client).
    """

    def __init__(
        self,
        clock: IReactorTime,
        config: ServerConfig,
        metrics: Optional[RelayMetrics] = None,
        new_id: Optional[Callable[[str], str]] = None,
    ):
        self.clock = clock
        self.metrics = metrics if metrics is not None else RelayMetrics(process=False)
        self.inactive_request_timeout = config.inactive_request_timeout
        self.inactive_backend_timeout = config.inactive_backend_timeout
        self._new_id = new_id if new_id is not None else RequestIds()
        self.max_pending_per_backend = config.max_pending_per_backend
        self.max_backends = config.max_backends
        self.move_wait = config.move_wait
        # Requests waiting for the first poll of a name no relay-client
        # polls for yet (L{arrival}), by name.
        self.arriving: Dict[str, Waiters] = {}
        self.block_size = config.block_size
        self.bodies = BodyBudget(config.max_buffered_bodies)
        # Per-request debug lines cost even when filtered out: only build
        # them when debug logging is on.
        self.trace = False
        self.backends: Dict[str, Backend] = {}
        self.requests: Dict[str, PendingRequest] = {}
        self.stopping = False
        # Accepted connections that died, by how (timeout, reset).
        self.dead_connections: Dict[str, int] = {}
        # The admin view's statistics (relay.server.admin.stats.AdminStats), or
        # None when the view is off: then each hook below costs one test.
        self.stats = None

    # The user-client's side.

    def relay(self, backend: str, message: HttpRequest, sink: ResponseSink, charge: int = 0) -> PendingRequest:
        """
        Hand C{message} (its id is set here) to a poll of C{backend}, now or
        within L{PICKUP_TIMEOUT}; answers go to C{sink}.

        @raise UnknownBackend: nobody polls for that name.
        @raise ServerStopping: the server is shutting down.
        """
        if self.stopping:
            raise ServerStopping("Server is restarting")
        b = self.backends.get(backend)
        if b is None:
            if self.stats is not None:
                self.stats.unknown(backend, message.method, message.url)
            raise UnknownBackend(backend)
        if len(b.active) >= self.max_pending_per_backend:
            if self.stats is not None:
                self.stats.refused(backend, 503)
            raise Overloaded(
                "Too many pending requests for %s (%d): try again later" % (backend, len(b.active))
            )
        request_id = self._new_id(backend)
        while request_id in self.requests:
            request_id = self._new_id(backend)
        message.id = request_id
        pending = PendingRequest(self, request_id, backend, message, sink)
        # From here the body's share of the budget is the pending request's.
        pending.charge = charge
        if self.stats is not None:
            self.stats.started(pending, message)
        self.requests[request_id] = pending
        b.active.add(request_id)
        if self.trace:
            log.debug("Enqueuing request", ID=request_id)
        self.metrics.requests.labels("client", backend).inc()
        if b.polls:
            # The newest poll, not the oldest: after a NAT rebinding or a
            # move to another network, the relay-client's old polls are
            # still here, on connections that are dead but not yet known
            # to be, while its newest poll came over the network that
            # works. The newest is the one most likely to be alive; the
            # old ones time out (408) or die unused.
            self._hand_over(b, pending, b.polls.pop_newest())
        else:
            pending._pickup_timer = self.clock.callLater(
                PICKUP_TIMEOUT, self._pickup_timeout, b, pending
            )
            b.queue.append(pending)
        return pending

    def arrival(self, backend: str) -> Deferred:
        """
        Fires (with None) at the first poll for C{backend}, at shutdown, or
        after C{move_wait} seconds, whichever comes first: a request for a
        name that is moving between replicas waits for its relay-client
        instead of failing at once (docs/scaling.md). Cancel it when the
        user goes away. A waiting request counts as pending for its name,
        and a name waited for counts as a backend, so the waits stay within
        the limits on both.

        @raise Overloaded: either limit is reached.
        """
        line = self.arriving.get(backend)
        if line is None:
            if len(self.backends) + len(self.arriving) >= self.max_backends:
                raise Overloaded("Too many relay clients (%d): try again later" % (len(self.backends),))
            line = self.arriving[backend] = Waiters(self.clock, self.move_wait, lambda d: d.callback(None))
        elif len(line) >= self.max_pending_per_backend:
            raise Overloaded("Too many pending requests for %s (%d): try again later" % (backend, len(line)))
        d = line.wait()

        def leave(result):
            if not line and self.arriving.get(backend) is line:
                del self.arriving[backend]
            return result

        return d.addBoth(leave)

    def _pickup_timeout(self, b: Backend, pending: PendingRequest) -> None:
        pending._pickup_timer = None
        if pending in b.queue:
            b.queue.remove(pending)
        self._forget(pending, BackendUnreachable(b.name))

    def _hand_over(self, b: Backend, pending: PendingRequest, d: Deferred) -> None:
        if pending._pickup_timer is not None:
            pending._pickup_timer.cancel()
            pending._pickup_timer = None
        message = pending.message
        pending._release_body()
        pending.picked_up = True
        pending.last_activity = self.clock.seconds()
        b.last_activity = pending.last_activity
        self.metrics.responses.labels("server_request", "ok", b.name).inc()
        d.callback(message)

    def cancel(self, pending: PendingRequest) -> None:
        """
        The user-client went away: forget the request (later posts get 400,
        which tells the relay-client to close its backend connection).
        """
        if self.requests.get(pending.id) is not pending:
            return
        b = self.backends.get(pending.backend)
        if b is not None and pending in b.queue:
            b.queue.remove(pending)
        pending.finished = True
        pending.cancelled = True
        self._forget(pending, None)

    def _forget(self, pending: PendingRequest, reason: Optional[BrokerError]) -> None:
        current = self.requests.get(pending.id) is pending
        if current:
            del self.requests[pending.id]
        b = self.backends.get(pending.backend)
        if b is not None:
            b.active.discard(pending.id)
        pending._end(reason)
        if current and self.stats is not None:
            # After _end: the user's side has written its last answer.
            self.stats.finished(pending, reason)

    # The relay-client's side.

    def get_request(self, backend: str, connection: Optional[PollConnection] = None) -> Deferred:
        """
        A long poll: fires with the next L{HttpRequest} for C{backend}, or
        with C{None} after L{POLL_TIMEOUT} (or at shutdown). The first poll
        makes a backend known, and only that one is logged (at info): a
        relay-client polls once per request, and Go's integration test
        waits for the line. Cancel the L{Deferred} when the poll's
        connection goes away, so that no request is handed to it.

        C{connection} is the connection the poll came on, for the
        connection health counts; pass it to L{sent} with the answer.
        """
        now = self.clock.seconds()
        b = self.backends.get(backend)
        arriving = None
        if b is None:
            if len(self.backends) >= self.max_backends:
                raise Overloaded("Too many relay clients (%d): try again later" % (len(self.backends),))
            polls = Waiters(self.clock, POLL_TIMEOUT, lambda d: self._poll_timeout(b, d))
            b = self.backends[backend] = Backend(backend, now, polls)
            log.info("Relay client connected", ServerName=backend)
            arriving = self.arriving.pop(backend, None)
        b.last_activity = b.last_poll = now
        if connection is not None and connection.name != backend:
            connection.name = backend
            b.connections += 1
        self.metrics.requests.labels("server_request", backend).inc()
        if self.stopping:
            return succeed(None)
        if arriving is not None:
            # The requests that waited for this name queue now; this poll
            # takes the first.
            arriving.fire_all(None)
        if b.queue:
            d = Deferred()
            self._hand_over(b, b.queue.popleft(), d)
            return d

        return b.polls.wait()

    def sent(self, message: HttpRequest, connection: PollConnection) -> None:
        """
        A poll's answer, C{message}, is being written on C{connection}:
        until it shows that it arrived, its request stays tied to the
        connection (L{connection_lost}).
        """
        pending = self.requests.get(message.id)
        if pending is not None and not pending.finished:
            connection.sent(pending, message)

    def connection_ended(self, death, *connections: Optional[PollConnection]) -> None:
        """
        An accepted connection is gone, as C{death} (a
        L{relay.net.liveness.Death}) says; C{connections} are its
        records of polls, if it carried any (L{connection_lost}).
        """
        if death.dead:
            self.metrics.dead_connections.labels(death.reason).inc()
            self.dead_connections[death.reason] = self.dead_connections.get(death.reason, 0) + 1
        for connection in connections:
            if connection is not None:
                self.connection_lost(connection, death)

    def connection_lost(self, connection: PollConnection, death) -> None:
        """
        A connection that carried polls is gone; C{death} (a
        L{relay.net.liveness.Death}) says how, and how many bytes
        written on it were never acknowledged. For each request whose
        poll answer was on it and has not shown that it arrived:

          - no unacknowledged bytes: the relay-client has the whole
            answer; it will answer, or the inactivity timeout ends it;
          - unacknowledged bytes on an HTTP/1.1 connection: the answer
            was the last thing written there, so its end never arrived,
            and a relay-client acts only on a whole answer. The request
            goes back to the front of the queue for the next poll, with
            its id (docs/protocol.md);
          - anything else (the bytes unknown, or HTTP/2, where they may
            belong to any stream): it cannot be shown either way, and the
            user gets a 502 at once (L{RelayClientLost}).

        An orderly close with the bytes unknown counts as arrived: a
        relay-client closes a connection it read to the end.
        """
        b = self.backends.get(connection.name) if connection.name is not None else None
        if b is not None and death.dead:
            b.dead_connections += 1
        in_transit, connection.in_transit = connection.in_transit, None
        if not in_transit:
            return
        for pending in in_transit:
            message, pending.unreceived = pending.unreceived, None
            pending.carrier = None
            if self.requests.get(pending.id) is not pending or pending.finished:
                continue
            unsent = death.unsent
            if unsent == 0 or (unsent is None and death.orderly):
                continue
            b = self.backends.get(pending.backend)
            if b is None:
                continue
            if self.stopping:
                self._forget(pending, ServerStopping("Server is restarting"))
            elif unsent is not None and not connection.multiplexed and message is not None:
                self._requeue(b, pending, message)
            else:
                b.lost += 1
                self._forget(pending, RelayClientLost(b.name))

    def _requeue(self, b: Backend, pending: PendingRequest, message: HttpRequest) -> None:
        """Hand C{pending} out again, before anything queued after it."""
        b.requeued += 1
        pending.message = message
        pending.picked_up = False
        if self.trace:
            log.debug("Requeuing request whose poll answer never arrived", ID=pending.id)
        if b.polls:
            self._hand_over(b, pending, b.polls.pop_newest())
        else:
            # Its wait for a poll ends with the inactivity timeout it was
            # promised (counted from its hand-over), if that comes first.
            left = pending.last_activity + self.inactive_request_timeout - self.clock.seconds()
            pending._pickup_timer = self.clock.callLater(
                max(0.0, min(PICKUP_TIMEOUT, left)), self._pickup_timeout, b, pending
            )
            b.queue.appendleft(pending)

    def _received(self, pending: PendingRequest) -> None:
        """The relay-client acted on C{pending}: it has the request."""
        if pending.carrier is not None:
            pending.carrier.received(pending)
        if not pending.picked_up:
            # Handed out again, and then the first relay-client spoke for
            # it after all: it has it, and no other poll needs it.
            b = self.backends.get(pending.backend)
            if b is not None and pending in b.queue:
                b.queue.remove(pending)
                if pending._pickup_timer is not None and pending._pickup_timer.active():
                    pending._pickup_timer.cancel()
                pending._pickup_timer = None
                pending.picked_up = True
                pending._release_body()

    def _poll_timeout(self, b: Backend, d: Deferred) -> None:
        b.last_activity = self.clock.seconds()
        self.metrics.responses.labels("server_request", "timeout", b.name).inc()
        d.callback(None)

    def send_response(self, message: HttpResponse, body: Optional[List[bytes]] = None) -> Deferred:
        """
        Hand one response message on towards its user-client. The result
        fires once it was written there (which waits while the user-client
        reads slowly), or fails with L{UnknownRequest} if the request ended
        before that.

        @raise UnknownRequest: unknown, finished or cancelled id.
        """
        request_id = message.id
        pending = self.requests.get(request_id)
        if pending is None or pending.eof_received:
            if pending is not None:
                backend = pending.backend
            else:
                # Only a name the broker knows gets a series of its own: a
                # caller posting made-up ids must not grow /metrics.
                backend = request_id.rpartition(":")[0]
                if backend not in self.backends:
                    backend = UNKNOWN_BACKEND
            self.metrics.responses.labels("server_response", RESULT_UNKNOWN_ID, backend).inc()
            raise UnknownRequest(request_id)
        if pending.carrier is not None or not pending.picked_up:
            self._received(pending)
        now = self.clock.seconds()
        pending.last_activity = now
        elapsed = now - pending.start
        labels = ("server_response", pending.backend)
        self.metrics.requests.labels(*labels).inc()
        self.metrics.response_durations.labels(*labels).observe(elapsed)
        if message.eof:
            # Like Go: the id is refused as soon as its eof arrives, so a
            # duplicate gets a 400 even while this one waits for the reader.
            pending.eof_received = True
            backend_duration = message.backend_duration_ms / 1000.0
            if backend_duration > 0:
                self.metrics.backend_durations.labels(*labels).observe(backend_duration)
                self.metrics.overhead_durations.labels(*labels).observe(elapsed - backend_duration)
        if self.trace:
            final = {"BackendDuration": backend_duration} if message.eof else {}
            log.debug(
                "Delivered final response to client" if message.eof else "Delivered response to client",
                ID=request_id,
                Bytes=_body_size(message, body),
                Elapsed=elapsed,
                **final
            )
        self.metrics.responses.labels("server_response", "ok", pending.backend).inc()
        return pending._post(message, body)

    def reject(self, pending: PendingRequest) -> None:
        """
        End a request whose relay-client sent something unusable (a first
        message without status): the sink has answered the user already.
        """
        pending.finished = True
        self._forget(pending, None)

    def get_request_stream(self, request_id: str) -> Deferred:
        """
        The next bytes the user-client sent after a 101 (see
        L{StreamQueue.get}).

        @raise UnknownRequest: the request is over (410).
        """
        pending = self.requests.get(request_id)
        if pending is None:
            raise UnknownRequest(request_id)
        if pending.carrier is not None or not pending.picked_up:
            self._received(pending)
        pending.last_activity = self.clock.seconds()
        return pending.open_stream().get()

    # Housekeeping.

    def reap(self) -> None:
        """
        Drop requests idle for longer than the inactive-request timeout and
        forget backends idle for longer than the inactive-backend timeout.
        Run every 10 s, as in Go.
        """
        now = self.clock.seconds()
        threshold = now - self.inactive_request_timeout
        for pending in [p for p in self.requests.values() if p.last_activity < threshold]:
            log.info("Timeout on inactive request", ID=pending.id)
            b = self.backends.get(pending.backend)
            if b is not None and pending in b.queue:
                b.queue.remove(pending)
            self._forget(pending, RequestExpired())
        threshold = now - self.inactive_backend_timeout
        for b in [b for b in self.backends.values() if b.last_activity < threshold and not b.polls and not b.active]:
            log.info("Forgetting inactive relay client", ServerName=b.name)
            del self.backends[b.name]
            self.metrics.forget_backend(b.name)
            if self.stats is not None:
                self.stats.forget(b.name)

    def stop(self) -> None:
        """
        Shutting down: end every long poll (with "Server is restarting") and
        refuse new requests; in-flight ones carry on.
        """
        self.stopping = True
        for line in list(self.arriving.values()):
            line.fire_all(None)
        self.arriving.clear()
        for b in self.backends.values():
            b.polls.fire_all(None)
            for pending in list(b.queue):
                b.queue.remove(pending)
                self._forget(pending, ServerStopping("Server is restarting"))

    def abort_all(self) -> None:
        """The grace period is over: end whatever is still in flight."""
        for pending in list(self.requests.values()):
            self._forget(pending, ServerStopping("Server is restarting"))


def _body_size(message: HttpResponse, body: Optional[List[bytes]]) -> int:
    return len(message.body) if body is None else sum(map(len, body))
