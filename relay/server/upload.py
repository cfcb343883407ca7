"""
A user's request body streamed to our relay-client, as it arrives.

The protocol carries a body whole inside the C{HttpRequest}; between our
server and our relay-client it may follow instead (docs/protocol.md,
"Extension: streamed request bodies"). The request is relayed once its
head has arrived, and L{StreamedBody} holds its body on the way: a
little of it until the relay-client's fetch (C{POST
/server/requeststream} with C{Relay-Body: stream}) arrives, then nothing,
since every read goes straight into the fetch's answer.

Back-pressure is the producer/consumer pair twisted.web already has: a
StreamedBody is the push producer registered on the fetch's answer, so a
full send buffer towards the relay-client pauses it, and it stops reading
the user (L{BodyReader.pause_reading}), whose TCP window closes in turn.

Either end may go first:

  - the user goes away mid-body: the fetch's connection is aborted, so
    the relay-client sees a body that broke off, never a short one that
    looks complete;
  - the fetch's connection goes before the body ended: if no answer has
    begun, the relay-client is gone, and the user gets a 502 at once;
    otherwise the backend answered early and wants no more: the rest of
    the body is dropped, and the user's connection closes after the
    answer (the HTTP layer's part);
  - the request ends (its answer is complete, or it failed): the fetch
    ends with it, broken off if the body had not.

Nothing here knows HTTP/1.1 from HTTP/2: the HTTP layer passes in a
L{BodyReader}, the few things it can do to the user's side.
"""

from collections import deque
from typing import Callable, Deque, Optional

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import Interface, implementer

from relay.compat import request_gone

log = Logger()

# Body bytes held before a relay-client fetches them; reading stops beyond.
HOLD_BEFORE_FETCH = 64 * 1024
# How long a connection whose answer came before the request's body ended
# still reads (and drops) what the client sends after our FIN, before it
# is aborted (the HTTP layers' close).
LINGER = 2.0


def too_large_text(limit: int) -> str:
    """The 413's text for a streamed body over C{limit} bytes (either HTTP/1.1 engine)."""
    return "Request body too large: this relay streams at most %d bytes (--max_streamed_request_body)\n" % (limit,)
FETCH_CONTENT_TYPE = b"application/octet-stream"


class BodyReader(Interface):
    """The user's side of a streamed body, as the HTTP layer provides it."""

    def pause_reading() -> None:
        """Read no more of the body for now."""

    def resume_reading() -> None:
        """Read on."""

    def send_continue() -> None:
        """Send the interim C{100 Continue} if the user asked for it and nothing was answered yet."""


class BodySink(Interface):
    """Where a streamed body goes: the relay-client's fetch, or a call to the replica that owns its name."""

    def begin(length: Optional[int]) -> None:
        """The body starts (C{length}: the user's, or None); the sink may now pause and resume the body."""

    def write(data: bytes) -> None:
        """The next bytes of the body."""

    def finish() -> None:
        """The body is complete."""

    def abort() -> None:
        """The body broke off: end so that it cannot look complete."""


@implementer(BodySink)
class _FetchAnswer:
    """The answer to our relay-client's fetch (a twisted.web request): the body itself."""

    def __init__(self, fetch, body: "StreamedBody"):
        self.fetch = fetch
        self.body = body

    def begin(self, length: Optional[int]) -> None:
        fetch = self.fetch
        fetch.setResponseCode(200)
        fetch.responseHeaders.setRawHeaders(b"content-type", [FETCH_CONTENT_TYPE])
        if length is not None:
            fetch.responseHeaders.setRawHeaders(b"content-length", [b"%d" % (length,)])
        fetch.notifyFinish().addErrback(lambda _: self.body._fetch_lost())
        fetch.registerProducer(self.body, True)

    def write(self, data: bytes) -> None:
        self.fetch.write(data)

    def finish(self) -> None:
        fetch = self.fetch
        if request_gone(fetch):
            return
        fetch.unregisterProducer()
        fetch.finish()

    def abort(self) -> None:
        fetch = self.fetch
        if request_gone(fetch) or fetch.finished:
            return
        fetch.unregisterProducer()
        # Imported here: the HTTP layer's abort knows HTTP/1.1 from HTTP/2.
        from relay.server.response import abort_answer

        abort_answer(fetch)


@implementer(IPushProducer)
class StreamedBody:
    """
    One user's body on its way to the relay-client's fetch.

    @param reader: the user's side (a L{BodyReader}).
    @param length: the user's C{Content-Length}; None for a chunked body.
    @param limit: the most bytes accepted (C{--max_streamed_request_body});
        0 for no limit.
    @param too_large: called once when the body goes over C{limit}.
    """

    def __init__(self, reader, length: Optional[int], limit: int = 0, too_large: Optional[Callable[[], None]] = None):
        self.reader = reader
        self.length = length
        self.limit = limit
        self._too_large = too_large
        self.received = 0
        self.ended = False
        # The user went away before the end.
        self.broken = False
        # The request is over; nothing more goes anywhere.
        self.closed = False
        self._held: Deque[bytes] = deque()
        self._held_size = 0
        # The fetch's request, from its arrival; and whether one came.
        self.fetch = None
        self.fetched = False
        self._fetch_paused = False
        self._reading_paused = False
        # Called when the fetch's connection goes before the body ended
        # (the broker decides what that means for the request).
        self.on_fetch_lost: Optional[Callable[[], None]] = None
        # Called as bytes arrive: a body on its way is activity.
        self.on_progress: Optional[Callable[[], None]] = None

    # From the user's side (the HTTP layer).

    def received_data(self, data: bytes) -> None:
        if self.closed or self.ended or not data:
            return
        self.received += len(data)
        if self.on_progress is not None:
            self.on_progress()
        if self.limit and self.received > self.limit:
            self.closed = True
            self._held.clear()
            self._held_size = 0
            self._abort_fetch()
            if self._too_large is not None:
                self._too_large()
            return
        fetch = self.fetch
        if fetch is not None and not self._held:
            fetch.write(data)
            return
        self._held.append(data)
        self._held_size += len(data)
        if self._held_size >= HOLD_BEFORE_FETCH or fetch is not None:
            self._pause_reading()

    def end(self) -> None:
        """The user's body is complete."""
        if self.closed or self.ended:
            return
        self.ended = True
        if self.fetch is not None and not self._held:
            self._finish_fetch()

    def user_gone(self) -> None:
        """The user's connection went before the body ended."""
        if self.ended or self.closed:
            return
        self.broken = True
        self.close()

    # From the relay-client's side.

    def attach(self, fetch) -> bool:
        """
        The relay-client's fetch arrived (a twisted.web request, not yet
        answered): answer it with the body, as it comes. False when the
        body was fetched already or is gone (the caller answers 410).
        """
        if self.fetched or self.closed:
            return False
        return self.attach_sink(_FetchAnswer(fetch, self))

    def attach_sink(self, sink) -> bool:
        """
        Send the body into C{sink} (a L{BodySink}) as it comes: the
        relay-client's fetch, or the call that passes the request on to
        the replica that owns its name. False when the body was taken
        already or is gone.
        """
        if self.fetched or self.closed:
            return False
        self.fetched = True
        self.fetch = sink
        sink.begin(self.length)
        self.reader.send_continue()
        self._flush()
        if self.ended and not self._held:
            self._finish_fetch()
        elif self.fetch is not None and not self._fetch_paused:
            self._resume_reading()
        return True

    def close(self) -> None:
        """
        The request is over (or the user went away): stop reading the
        user, and break off the fetch if the body had not ended.
        """
        if self.closed:
            return
        self.closed = True
        self._held.clear()
        self._held_size = 0
        # A fetch still open has not had the whole body.
        self._abort_fetch()

    # IPushProducer, for the fetch's answer.

    def pauseProducing(self) -> None:
        self._fetch_paused = True
        self._pause_reading()

    def resumeProducing(self) -> None:
        self._fetch_paused = False
        self._flush()
        if self.fetch is not None and not self._fetch_paused and not self.ended:
            self._resume_reading()

    def stopProducing(self) -> None:
        self._fetch_lost()

    # Inside.

    def _flush(self) -> None:
        while self._held and self.fetch is not None and not self._fetch_paused:
            data = self._held.popleft()
            self._held_size -= len(data)
            self.fetch.write(data)
        if not self._held and self.ended and self.fetch is not None:
            self._finish_fetch()

    def _finish_fetch(self) -> None:
        fetch, self.fetch = self.fetch, None
        if fetch is not None:
            fetch.finish()

    def _abort_fetch(self) -> None:
        fetch, self.fetch = self.fetch, None
        if fetch is not None:
            fetch.abort()

    def _fetch_lost(self) -> None:
        fetch, self.fetch = self.fetch, None
        if fetch is None:
            return
        if self.ended and not self._held:
            return
        self.closed = True
        self._held.clear()
        self._held_size = 0
        if self.on_fetch_lost is not None:
            self.on_fetch_lost()

    def _pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self.reader.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.reader.resume_reading()
