"""
One user request while the broker holds it, and the lines things wait in.

A L{PendingRequest} is the push producer of its user's response: a
relay-client's C{POST /server/response} fires only once its message was
handed to the user's connection while that connection is willing to take
more, so a slow reader holds the relay-client's POSTs rather than filling
our memory. Bytes a user sends after a 101 wait in a L{StreamQueue} whose
size pauses the user's transport. L{Waiters} is the line of Deferreds, each
with a deadline on the injected clock, that long polls, stream reads and
requests for a moving backend wait in.

The rules (who gets which request, when one ends) are the broker's
(L{relay.server.broker}); this module keeps the state of one request.
"""

from collections import deque
from typing import TYPE_CHECKING, Callable, Deque, Iterator, List, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse
from relay.server.errors import BrokerError, UnknownRequest

if TYPE_CHECKING:
    from relay.server.broker import Broker, PollConnection
    from relay.server.events import Outcome

log = Logger()

# Fixed by the protocol, as in the Go server.
STREAM_POLL_TIMEOUT = 30.0


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

    def outcome(self) -> "Outcome":
        """
        What the user got, once the request is over: asked only when
        someone watches the broker (L{relay.server.events}), which adds
        what it knows itself.
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
    polls newest first (L{pop_newest}, see L{relay.server.broker.Broker.relay}). One that
    times out leaves the line before C{on_timeout} fires it; one that is
    cancelled (its peer went away) leaves the line and takes its timer
    with it, and then C{on_leave}, if given, is called with it.
    """

    def __init__(
        self,
        clock: IReactorTime,
        timeout: float,
        on_timeout: Callable[[Deferred], None],
        on_leave: Optional[Callable[[Deferred], None]] = None,
    ):
        self._clock = clock
        self._timeout = timeout
        self._on_timeout = on_timeout
        self._on_leave = on_leave
        self._line: Deque[Tuple[Deferred, IDelayedCall]] = deque()

    def __len__(self) -> int:
        return len(self._line)

    def __iter__(self) -> Iterator[Deferred]:
        return (d for d, _ in self._line)

    def wait(self) -> Deferred:
        """A new place at the end of the line."""
        d: Deferred = Deferred(self._leave)
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
            if self._on_leave is not None:
                self._on_leave(d)

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

        d: Deferred = Deferred(withdraw)
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
