"""
What the broker tells those who watch it: the admin view's statistics and
the tests. They subscribe with L{relay.server.broker.Broker.add_observer}
and implement L{IBrokerEvents}; a broker nobody watches tests one empty
tuple per event and builds nothing.

Each method is called after the broker's state has changed, so an
observer may read the broker (and a test may check a condition over it).
An observer must not raise: the broker does not catch what it raises,
since a bug there would otherwise hide.

The Prometheus series are not an observer: the broker feeds
L{relay.server.metrics.RelayMetrics} directly, since they are always on.
"""

from typing import TYPE_CHECKING, Optional

from zope.interface import Interface

if TYPE_CHECKING:
    from relay.server.errors import BrokerError


class IBrokerEvents(Interface):
    """The events of a L{relay.server.broker.Broker}."""

    def poll_waiting(backend):
        """A relay-client's long poll for C{backend} (a name) waits for a request."""

    def poll_from(backend, peer):
        """
        A long poll for C{backend} came from C{peer} (a host, or None when
        the address has none). Told by the HTTP layer, which alone knows.
        """

    def poll_ended(backend):
        """A waiting poll for C{backend} ended without a request: timed out, or its connection went away."""

    def backend_awaited(backend):
        """A user request waits for the first poll of C{backend}, a name that may be moving between replicas."""

    def unknown_backend(backend, message):
        """A user request (C{message}, an C{HttpRequest}) for a name nobody polls for: refused with 503."""

    def request_refused(backend, status):
        """A user request for known C{backend} was refused at once with C{status} (503: too many pending)."""

    def request_queued(pending, message):
        """
        A user request became C{pending} (a L{relay.server.pending.PendingRequest}),
        asking C{message} (its C{HttpRequest}, which the broker lets go at pickup).
        """

    def request_picked_up(pending):
        """A relay-client's poll took C{pending}."""

    def response_posted(pending, message):
        """
        A relay-client posted C{message}, an C{HttpResponse} for C{pending},
        and it was handed on unless the user reads slowly: after
        L{request_finished} when it ended the request.
        """

    def stream_polled(pending):
        """A relay-client asked for the bytes a user sent after a 101 on C{pending}."""

    def request_finished(pending, outcome):
        """The broker forgot C{pending}; C{outcome} (an L{Outcome}) says how it ended for its user."""

    def backend_forgotten(backend):
        """No relay-client polled for C{backend} for the inactive-backend timeout: the broker forgot it."""


class Outcome:
    """
    How a request ended, as its user saw it. The user's side (the broker's
    L{relay.server.pending.ResponseSink}) states what it wrote; the broker
    adds what it knows.

    @ivar status: the status the user got: 101 for an upgraded connection,
        0 when nothing was written.
    @ivar truncated: an answer was cut off part-way, whatever its status
        line said.
    @ivar bytes_in: bytes the user sent after a 101 (the request body is
        the C{message} of L{IBrokerEvents.request_queued}).
    @ivar bytes_out: body bytes written to the user.
    @ivar trace_id: the id of the request's trace, when it was sampled.
    @ivar headers: the response headers written, as a
        L{twisted.web.http_headers.Headers}, or None.
    @ivar reason: why the broker ended it without an eof (a
        L{relay.server.errors.BrokerError}), or None.
    @ivar cancelled: the user went away first.
    @ivar started: a response message was handed to the user's side.
    """

    __slots__ = (
        "status",
        "truncated",
        "bytes_in",
        "bytes_out",
        "trace_id",
        "headers",
        "reason",
        "cancelled",
        "started",
    )

    def __init__(
        self,
        status: int = 0,
        truncated: bool = False,
        bytes_in: int = 0,
        bytes_out: int = 0,
        trace_id: Optional[str] = None,
        headers=None,
    ):
        self.status = status
        self.truncated = truncated
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        self.trace_id = trace_id
        self.headers = headers
        self.reason: Optional["BrokerError"] = None
        self.cancelled = False
        self.started = False

    def __repr__(self) -> str:
        return "<Outcome status=%r truncated=%r cancelled=%r reason=%r>" % (
            self.status,
            self.truncated,
            self.cancelled,
            self.reason,
        )
