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
    while that connection is willing to take more (L{relay.server.pending.PendingRequest} is
    the L{IPushProducer} registered on it), so a slow reader holds the
    relay-client's POSTs rather than filling our memory;
  - bytes a user-client sends after a 101 wait in a L{relay.server.pending.StreamQueue} whose
    size pauses the user's transport.

The request ids are L{relay.server.ids}'s, the state of one request and the
lines things wait in are L{relay.server.pending}'s; this module keeps the
rules. Those who watch the broker (the admin view, the tests) implement
L{relay.server.events.IBrokerEvents} and are told of each event; with no
one watching, an event costs one test of an empty tuple.

The Go server's broker (C{broker.go}) is the model; where its behaviour is
observable on the wire (messages, status codes, timeouts) ours is the same.
"""

from collections import deque
from typing import Callable, Deque, Dict, Iterable, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from relay.config import ServerConfig
from relay.proto.http_relay_pb2 import HttpRequest, HttpResponse
from relay.server.errors import (
    BackendUnreachable,
    BrokerError,
    Overloaded,
    RelayClientLost,
    RequestExpired,
    ServerStopping,
    UnknownBackend,
    UnknownRequest,
)
from relay.server.events import IBrokerEvents
from relay.server.ids import RequestIds
from relay.server.metrics import RESULT_UNKNOWN_ID, UNKNOWN_BACKEND, RelayMetrics
from relay.server.pending import BodyBudget, PendingRequest, ResponseSink, Waiters

log = Logger()

# Fixed by the protocol, as in the Go server.
POLL_TIMEOUT = 30.0
PICKUP_TIMEOUT = 10.0


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
    @param observers: those told of its events (L{IBrokerEvents}); more
        with L{add_observer}.
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
        observers: Iterable[IBrokerEvents] = (),
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
        # Those told of each event (IBrokerEvents): a tuple, tested once per
        # event, so that an event with no one watching costs that test.
        self.observers: Tuple[IBrokerEvents, ...] = tuple(observers)

    def add_observer(self, observer: IBrokerEvents) -> None:
        """Tell C{observer} of every event from now on."""
        self.observers = self.observers + (observer,)

    def remove_observer(self, observer: IBrokerEvents) -> None:
        self.observers = tuple(o for o in self.observers if o is not observer)

    def poll_from(self, backend: str, address) -> None:
        """
        The poll for C{backend} just taken (L{get_request}) came from
        C{address} (an L{IAddress}): for those who show where relay-clients
        poll from.
        """
        if self.observers:
            peer = getattr(address, "host", None)
            for o in self.observers:
                o.poll_from(backend, peer)

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
            for o in self.observers:
                o.unknown_backend(backend, message)
            raise UnknownBackend(backend)
        if len(b.active) >= self.max_pending_per_backend:
            for o in self.observers:
                o.request_refused(backend, 503)
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
        self.requests[request_id] = pending
        b.active.add(request_id)
        if self.trace:
            log.debug("Enqueuing request", ID=request_id)
        self.metrics.requests.labels("client", backend).inc()
        if self.observers:
            for o in self.observers:
                o.request_queued(pending, message)
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

        d.addBoth(leave)
        for o in self.observers:
            o.backend_awaited(backend)
        return d

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
        if self.observers:
            for o in self.observers:
                o.request_picked_up(pending)

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
        if current and self.observers:
            # After _end: the user's side has written its last answer.
            outcome = pending.sink.outcome()
            outcome.reason = reason
            outcome.cancelled = pending.cancelled
            outcome.started = pending.started
            for o in self.observers:
                o.request_finished(pending, outcome)

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
            polls = Waiters(
                self.clock, POLL_TIMEOUT, lambda d: self._poll_timeout(new, d), lambda d: self._poll_left(new)
            )
            b = new = self.backends[backend] = Backend(backend, now, polls)
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
            d: Deferred = Deferred()
            self._hand_over(b, b.queue.popleft(), d)
            return d
        d = b.polls.wait()
        if self.observers:
            for o in self.observers:
                o.poll_waiting(backend)
        return d

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
        self._poll_left(b)

    def _poll_left(self, b: Backend) -> None:
        for o in self.observers:
            o.poll_ended(b.name)

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
        d = pending._post(message, body)
        if self.observers:
            for o in self.observers:
                o.response_posted(pending, message)
        return d

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
        L{relay.server.pending.StreamQueue.get}).

        @raise UnknownRequest: the request is over (410).
        """
        pending = self.requests.get(request_id)
        if pending is None:
            raise UnknownRequest(request_id)
        if pending.carrier is not None or not pending.picked_up:
            self._received(pending)
        pending.last_activity = self.clock.seconds()
        d = pending.open_stream().get()
        for o in self.observers:
            o.stream_polled(pending)
        return d

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
            for o in self.observers:
                o.backend_forgotten(b.name)

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
