"""
What the admin view knows: per-backend statistics and the last finished
requests, kept beside the L{Broker}, in memory that is bounded per backend
and capped overall.

L{AdminStats} watches the broker (L{relay.server.events.IBrokerEvents}),
which it is added to only when C{--admin_port} is given, so a server
without the view pays one test of an empty tuple per event. Of the events
it keeps:

  - C{poll_from} for each long poll (who polls, from where);
  - C{request_queued} when a user request is queued (its method, its
    path with the query cut off, its body size);
  - C{request_finished} when the broker forgets a request, for whatever
    reason (its outcome, duration and bytes);
  - C{request_refused} / C{unknown_backend} for user requests that
    never became a pending request (503 overloaded, unknown backend);
  - C{backend_forgotten}, to show the backend as gone for a while.

Each event is a handful of attribute updates and deque appends: no
allocation grows with traffic. Everything that can be computed later is:
in-flight requests, open polls and byte counts are read from the broker's
own objects when C{/api/status} asks (see L{relay.server.admin.status}), never
tracked per event.

Bounds:

  - per backend: C{SERIES} time buckets of C{BUCKET} seconds (request
    counts, bytes, errors, a sparse log-scale latency histogram), the
    last C{ring} finished requests, the last C{error_ring} failed ones,
    and at most C{MAX_PEERS} relay-client addresses;
  - overall: at most C{total} finished-request records across all
    backends (the oldest go first, whichever backend they belong to), at
    most the broker's C{max_backends} known backends plus C{FORGOTTEN}
    forgotten ones, and C{UNKNOWN_RING} requests for unknown backends.

Time comes from the injected clock (the broker's), so tests step through
buckets with L{twisted.internet.task.Clock}.
"""

import math
from collections import OrderedDict, deque
from typing import Deque, Dict, List, Optional, Tuple

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from relay.server.events import IBrokerEvents, Outcome

log = Logger()

# Width of a time bucket, and how many are kept: the sparklines show the
# last SERIES * BUCKET seconds, the "last minute" figures sum the buckets
# of the last 60 s.
BUCKET = 10.0
SERIES = 30
LAST_MINUTE = 60.0

# Latency histogram: bucket i holds durations up to LAT_BASE * LAT_RATIO**i;
# 20 % wide buckets are precise enough for a p99 on a dashboard, and a
# sparse dict of them costs a few entries per time bucket.
LAT_BASE = 0.0005
LAT_RATIO = 1.2
_LOG_RATIO = math.log(LAT_RATIO)

DEFAULT_RING = 50
DEFAULT_ERROR_RING = 20
DEFAULT_TOTAL = 20000
MAX_PEERS = 8
FORGOTTEN = 1000
UNKNOWN_RING = 50
# Stored paths and header values are cut to this many characters: a request
# line may be 16 KiB, and the overall cap is on records, not bytes.
MAX_TEXT = 256
MAX_HEADERS = 64

# Headers whose values are never shown, whatever --inspect_headers says:
# any whose name contains one of these words. A fixed list of names let
# every credential it did not know of (Private-Token, X-Vault-Token,
# X-Amz-Security-Token, X-Goog-IAP-JWT-Assertion, ...) show in clear, and
# backends invent such headers all the time. Matching parts of words, not
# whole words, catches run-together names (X-Apikey, X-Authtoken); the
# price is a few harmless headers shown as redacted (Sec-WebSocket-Key is a
# nonce, WWW-Authenticate a challenge), which is the side to err on.
# Keep-Alive contains no "key".
SECRET_WORDS = (
    "token",
    "secret",
    "key",
    "auth",
    "password",
    "passwd",
    "session",
    "cookie",
    "signature",
    "credential",
    "jwt",
)
REDACTED = "<redacted>"

# Outcomes of finished requests. The error kinds are what an operator
# looks for first: the relay could not reach the robot (503), the robot
# did not answer in time (504), the relay-client reported a backend error
# or sent nothing usable (500), or the answer was cut short (truncated).
OK = "ok"
CANCELLED = "cancelled"
ERROR_KINDS = ("503", "504", "500", "truncated")


def redact_path(url: str) -> str:
    """
    The path of a relayed URL (C{http://invalid/path?query}) with its
    query replaced by C{?<redacted>}: queries carry tokens and signatures
    as often as headers do. Cut to L{MAX_TEXT} characters.
    """
    if url.startswith("http://invalid"):
        url = url[14:]
    path, question, _ = url.partition("?")
    if len(path) > MAX_TEXT:
        path = path[:MAX_TEXT] + "…"
    return path + "?" + REDACTED if question else path


def is_secret_header(name: str, extra=()) -> bool:
    """
    Whether a header's value may be a credential, judged by its name (see
    L{SECRET_WORDS}); C{extra} holds more names, lower case, such as the
    trusted user header, whose value says who the user is.
    """
    lower = name.lower()
    return lower in extra or any(word in lower for word in SECRET_WORDS)


def redact_headers(pairs, extra=()) -> List[Tuple[str, str]]:
    """
    C{(name, value)} pairs for display: credentials (L{is_secret_header})
    replaced, values cut to L{MAX_TEXT}, at most L{MAX_HEADERS} pairs.
    """
    out: List[Tuple[str, str]] = []
    for name, value in pairs:
        if len(out) >= MAX_HEADERS:
            out.append(("…", "%d more" % (len(pairs) - MAX_HEADERS,)))
            break
        if isinstance(name, bytes):
            name = name.decode("latin-1")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if is_secret_header(name, extra):
            value = REDACTED
        elif len(value) > MAX_TEXT:
            value = value[:MAX_TEXT] + "…"
        out.append((name, value))
    return out


def latency_bucket(seconds: float) -> int:
    if seconds <= LAT_BASE:
        return 0
    return int(math.log(seconds / LAT_BASE) / _LOG_RATIO) + 1


def latency_of(bucket: int) -> float:
    """The upper bound of a latency bucket, which is what a quantile reports."""
    return LAT_BASE * LAT_RATIO ** bucket


def quantile(histogram: Dict[int, int], q: float) -> Optional[float]:
    total = sum(histogram.values())
    if not total:
        return None
    rank = q * total
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return latency_of(bucket)
    return latency_of(max(histogram))


class Bucket:
    """One C{BUCKET}-second slice of a backend's traffic."""

    __slots__ = ("index", "requests", "bytes", "errors", "latency")

    def __init__(self, index: int):
        self.index = index
        self.requests = 0
        self.bytes = 0
        self.errors = 0
        self.latency: Dict[int, int] = {}


class Finished:
    """
    One finished request, as the ring buffers keep it. The path is
    already redacted and cut; headers are only kept with
    C{--inspect_headers}.
    """

    __slots__ = (
        "backend",
        "id",
        "time",
        "method",
        "path",
        "status",
        "kind",
        "duration",
        "bytes_in",
        "bytes_out",
        "request_headers",
        "response_headers",
        "trace_id",
    )
    backend: str
    id: str
    time: float
    method: str
    path: str
    status: int
    kind: str
    duration: float
    bytes_in: int
    bytes_out: int
    request_headers: Optional[List[Tuple[str, str]]]
    response_headers: Optional[List[Tuple[str, str]]]
    trace_id: Optional[str]

    def as_json(self) -> dict:
        out = {
            "id": self.id,
            "time": self.time,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "kind": self.kind,
            "duration": self.duration,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }
        if self.trace_id is not None:
            out["trace_id"] = self.trace_id
        if self.request_headers is not None:
            out["request_headers"] = self.request_headers
            out["response_headers"] = self.response_headers
        return out


class BackendStats:
    """What the view remembers of one backend name."""

    __slots__ = (
        "name",
        "first_poll",
        "last_poll",
        "peers",
        "requests",
        "bytes_in",
        "bytes_out",
        "errors",
        "cancelled",
        "series",
        "recent",
        "recent_errors",
        "forgotten_at",
        "summary",
    )

    def __init__(self, name: str, now: float, ring: int, error_ring: int):
        self.name = name
        self.first_poll = now
        self.last_poll = now
        # host -> last poll from it; most recent last.
        self.peers: "OrderedDict[str, float]" = OrderedDict()
        self.requests = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.cancelled = 0
        self.series: Deque[Bucket] = deque(maxlen=SERIES)
        self.recent: Deque[Finished] = deque(maxlen=ring)
        self.recent_errors: Deque[Finished] = deque(maxlen=error_ring)
        self.forgotten_at: Optional[float] = None
        # The last-minute summary of relay.server.admin.status, with what it was
        # computed from: a page polled every 2 s recomputes only backends
        # that had traffic since.
        self.summary: Optional[tuple] = None

    def bucket(self, index: int) -> Bucket:
        series = self.series
        if series and series[-1].index == index:
            return series[-1]
        b = Bucket(index)
        series.append(b)
        return b

    def window(self, now: float, seconds: float = LAST_MINUTE) -> List[Bucket]:
        """The buckets that overlap the last C{seconds}."""
        first = int((now - seconds) // BUCKET) + 1
        return [b for b in self.series if b.index >= first]


@implementer(IBrokerEvents)
class AdminStats:
    """
    The view's memory. One per server, created with the admin listener and
    added to the broker's observers.

    @param clock: the broker's clock.
    @param ring: finished requests kept per backend.
    @param error_ring: failed requests kept per backend, apart from
        C{ring} so that a burst of successes does not push the last
        errors out of sight.
    @param total: finished-request records kept across all backends.
    @param keep_headers: keep (redacted) request and response headers.
    @param redact: more header names to redact, lower case (the
        C{--trusted_user_header}, say).
    """

    def __init__(
        self,
        clock: IReactorTime,
        ring: int = DEFAULT_RING,
        error_ring: int = DEFAULT_ERROR_RING,
        total: int = DEFAULT_TOTAL,
        keep_headers: bool = False,
        redact=(),
    ):
        self.clock = clock
        self.started_at = clock.seconds()
        self.ring = ring
        self.error_ring = error_ring
        self.total = total
        self.inspect_headers = keep_headers
        self.redact = frozenset(n.lower() for n in redact)
        self.backends: Dict[str, BackendStats] = {}
        # Forgotten backends, oldest first, for the view's "gone" rows.
        self.forgotten: "OrderedDict[str, BackendStats]" = OrderedDict()
        # Every Finished record alive, oldest first: the overall cap.
        self.records: Deque[Finished] = deque()
        self.unknown_requests = 0
        self.unknown_recent: Deque[Tuple[float, str, str, str]] = deque(maxlen=UNKNOWN_RING)

    # IBrokerEvents.

    def backend(self, name: str) -> BackendStats:
        b = self.backends.get(name)
        if b is None:
            b = self.forgotten.pop(name, None)
            if b is None:
                b = BackendStats(name, self.clock.seconds(), self.ring, self.error_ring)
            else:
                b.forgotten_at = None
                b.first_poll = self.clock.seconds()
            self.backends[name] = b
        return b

    def poll_from(self, name: str, peer: Optional[str]) -> None:
        """A relay-client polls for C{name} from C{peer} (a host)."""
        b = self.backend(name)
        now = b.last_poll = self.clock.seconds()
        if peer is not None:
            peers = b.peers
            if peer in peers:
                peers.move_to_end(peer)
            elif len(peers) >= MAX_PEERS:
                peers.popitem(last=False)
            peers[peer] = now

    def backend_forgotten(self, name: str) -> None:
        """The broker forgot the backend: keep it a while as gone."""
        b = self.backends.pop(name, None)
        if b is None:
            return
        b.forgotten_at = self.clock.seconds()
        self.forgotten[name] = b
        while len(self.forgotten) > FORGOTTEN:
            _, old = self.forgotten.popitem(last=False)
            # Its records age out of self.records with everyone else's.

    def request_queued(self, pending, message) -> None:
        """A user request was queued: what it asked for, for the views."""
        try:
            headers = None
            if self.inspect_headers:
                headers = redact_headers([(h.name, h.value) for h in message.header], self.redact)
            pending.info = (message.method, redact_path(message.url), len(message.body), headers)
        except Exception:
            # A bug here must cost the view a row, never the user a request.
            log.failure("Admin view: recording a request failed")

    def request_finished(self, pending, outcome: Outcome) -> None:
        """The broker forgot C{pending}, which ended as C{outcome} says."""
        try:
            self._finished(pending, outcome)
        except Exception:
            log.failure("Admin view: recording a finished request failed")

    def _finished(self, pending, outcome: Outcome) -> None:
        now = self.clock.seconds()
        status, kind = classify(outcome)
        info = pending.info
        r = Finished()
        r.backend = pending.backend
        r.id = pending.id
        r.time = now
        r.duration = now - pending.start
        r.status = status
        r.kind = kind
        if info is None:
            r.method, r.path, r.bytes_in, headers = "", "", 0, None
        else:
            r.method, r.path, r.bytes_in, headers = info
        r.bytes_in += outcome.bytes_in
        r.bytes_out = outcome.bytes_out
        # Set when the request's trace was sampled (relay.tracing).
        r.trace_id = outcome.trace_id
        if self.inspect_headers:
            r.request_headers = headers or []
            r.response_headers = _response_headers(outcome.headers, self.redact)
        else:
            r.request_headers = r.response_headers = None
        b = self.backends.get(r.backend)
        if b is None:
            b = self.forgotten.get(r.backend)
            if b is None:
                return
        b.requests += 1
        b.bytes_in += r.bytes_in
        b.bytes_out += r.bytes_out
        bucket = b.bucket(int(now // BUCKET))
        bucket.requests += 1
        bucket.bytes += r.bytes_in + r.bytes_out
        if kind == OK:
            i = latency_bucket(r.duration)
            bucket.latency[i] = bucket.latency.get(i, 0) + 1
        elif kind == CANCELLED:
            b.cancelled += 1
        else:
            bucket.errors += 1
            b.errors[kind] += 1
            b.recent_errors.append(r)
        b.recent.append(r)
        self._keep(r)

    def request_refused(self, name: str, status: int) -> None:
        """A request for known backend C{name} was refused at once (503)."""
        b = self.backends.get(name)
        if b is None:
            return
        now = self.clock.seconds()
        r = Finished()
        r.backend, r.id, r.time, r.duration = name, "", now, 0.0
        r.method, r.path, r.bytes_in, r.bytes_out = "", "", 0, 0
        r.status, r.kind = status, str(status)
        r.request_headers = r.response_headers = r.trace_id = None
        b.requests += 1
        b.errors[r.kind] += 1
        bucket = b.bucket(int(now // BUCKET))
        bucket.requests += 1
        bucket.errors += 1
        b.recent.append(r)
        b.recent_errors.append(r)
        self._keep(r)

    def unknown_backend(self, name: str, message) -> None:
        """
        A user asked for a backend nobody polls for (503 unknown client).
        Counted for the whole server, with the last few names: made-up
        names must not grow the per-backend table.
        """
        self.unknown_requests += 1
        if len(name) > MAX_TEXT:
            name = name[:MAX_TEXT] + "…"
        self.unknown_recent.append((self.clock.seconds(), name, message.method, redact_path(message.url)))

    # The events the view has no use for.

    def poll_waiting(self, backend: str) -> None:
        pass

    def poll_ended(self, backend: str) -> None:
        pass

    def backend_awaited(self, backend: str) -> None:
        pass

    def request_picked_up(self, pending) -> None:
        pass

    def response_posted(self, pending, message) -> None:
        pass

    def stream_polled(self, pending) -> None:
        pass

    def _keep(self, r: Finished) -> None:
        """Count C{r} against the overall cap, dropping the oldest record."""
        records = self.records
        records.append(r)
        if len(records) > self.total:
            old = records.popleft()
            b = self.backends.get(old.backend) or self.forgotten.get(old.backend)
            if b is not None:
                # The rings are in time order, like self.records, so the
                # oldest record overall is at the front of its rings (if
                # their own bound has not dropped it already).
                if b.recent and b.recent[0] is old:
                    b.recent.popleft()
                if b.recent_errors and b.recent_errors[0] is old:
                    b.recent_errors.popleft()


def classify(outcome: Outcome) -> Tuple[int, str]:
    """
    The status the user got, and the kind of outcome: an error kind by
    that status (503, 504, any other 5xx as 500), C{truncated} for an
    answer aborted part-way whatever its status line said, C{cancelled}
    when the user went away first. An upgraded (101) connection that ends
    is a success: one side or the other closes it, normally.

    The status is what the user's side wrote, since only it knows; the
    broker's C{reason} is implied by it.
    """
    status = outcome.status
    if outcome.truncated:
        return status, "truncated"
    if status == 101:
        return status, OK
    if outcome.cancelled:
        return (status if outcome.started else 0), CANCELLED
    if status == 503 or status == 504:
        return status, str(status)
    if status >= 500:
        return status, "500"
    return status, OK


def _response_headers(headers, extra) -> List[Tuple[str, str]]:
    if headers is None:
        return []
    return redact_headers(
        [(name, value) for name, values in headers.getAllRawHeaders() for value in values],
        extra,
    )
