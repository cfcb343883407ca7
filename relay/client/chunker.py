"""
When the backend's bytes go up to the relay, and in what pieces.

Every message is a C{POST /server/response}, so sending each read as it comes
would cost a round trip per few kilobytes, while waiting for the whole body
would break streaming (C{kubectl logs -f}, server-sent events) and use
unbounded memory. The rule, like Nagle's algorithm:

  - when no message is in flight, what the backend sent goes at once: at
    the end of the reactor turn in which it arrived (a zero-delay timer, so
    that the reads of one turn, and the status and headers with the start
    of the body, share a message). The first keystroke echo on a WebSocket
    or the first event of a stream after a quiet spell does not wait;
  - while a message is in flight, up to C{max_chunk_size} bytes are
    gathered; they go as soon as the relay has taken that message. With
    that much gathered the backend is paused until then (back-pressure:
    the relay server holds a POST while its user is slow to read, and that
    must slow the backend down rather than fill our memory);
  - a full piece of C{max_chunk_size} bytes goes at once (or as soon as the
    one in flight is taken);
  - when nothing at all has been sent for C{keepalive_interval} (3 s), an
    empty message tells the relay server that the request is still alive,
    so that it does not drop it as inactive;
  - messages go one at a time and in order;
  - when the backend's body breaks off (L{Chunker.fail}), the answer must
    not look complete: if nothing has gone yet the user gets a 502 with the
    reason; otherwise the rest of what was read goes with a C{Relay-Error}
    trailer and no C{eof}, which makes our relay server abort the user's
    answer, and then an empty C{eof}, which a relay server that does not
    know the trailer (Go's) needs to end the answer at once rather than
    after its inactivity timeout (docs/protocol.md). No keep-alive follows.

The Go client instead holds anything short of a full piece up to 100 ms
after its first byte, for every response, so that a keystroke's echo
through it may wait that long. We keep that gathering delay
(C{flush_delay}) only for a response whose length the backend announced
(C{Content-Length}): nobody can use part of such a body, it goes as one
message as soon as it is complete, and holding an incomplete one keeps big
bodies in few POSTs. Upgraded (101) connections and streaming answers
(chunked, or ended by closing) follow the rule above.

The policy is pure logic over an injected L{IReactorTime}, so that it can be
pinned down with L{twisted.internet.task.Clock}.
"""

from collections import deque
from typing import Callable, Deque, Iterable, List, Optional, Tuple

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure

from relay.headers import RELAY_ERROR
from relay.proto.http_relay_pb2 import HttpResponse

FLUSH_DELAY = 0.1
KEEPALIVE_INTERVAL = 3.0
# A Relay-Error reason is for a person reading a log or a 502: one line.
MAX_REASON = 300


def error_response(request_id: str, status: int, text: str) -> HttpResponse:
    """A whole answer of our own (status, plain text, C{eof}) for the user."""
    response = HttpResponse(id=request_id, status_code=status, body=text.encode("utf-8"), eof=True)
    response.header.add(name="Content-Type", value="text/plain")
    return response


class Chunker:
    """
    Turns the backend's body into the stream of L{HttpResponse} messages for
    one request id.

    @ivar done: fires with None once the last message (C{eof}) was accepted,
        or fails with the error of the message that could not be delivered.
    @ivar first_sent: fires with True once the first message (status and
        headers) was accepted, or with False if it never will be: an upgraded
        request may only read its request stream after the relay server has
        its 101.
    """

    def __init__(
        self,
        first: HttpResponse,
        send: Callable[[HttpResponse, Optional[List[bytes]]], Deferred],
        clock: IReactorTime,
        max_chunk_size: int,
        flush_delay: float = FLUSH_DELAY,
        keepalive_interval: float = KEEPALIVE_INTERVAL,
        started: Optional[float] = None,
        send_first_now: bool = False,
        expected_length: Optional[int] = None,
    ):
        self._message = first
        self._id = first.id
        self._send = send
        self._clock = clock
        self._max = max(1, max_chunk_size)
        # Streaming answers (no length announced) and upgraded connections
        # go at the end of the turn; see the module's docstring.
        self._streaming = expected_length is None
        self._flush_delay = 0.0 if self._streaming else flush_delay
        self._keepalive_interval = keepalive_interval
        self._started = clock.seconds() if started is None else started
        # The body read but not yet sent, as the pieces the backend gave:
        # joined once per message (appending to one bytearray costs a copy
        # of all of it per read on PyPy).
        self._pieces: Deque[bytes] = deque()
        self._size = 0
        # With the body's length known, a full piece that is also the end
        # waits for finish() (which follows at once) and goes out as one
        # final message instead of a piece and an empty eof: a POST saved
        # on every response of exactly max_chunk_size or less.
        self._expected = expected_length
        self._received = 0
        self._header_pending = True
        self._flush_due = send_first_now
        self._flush_call: Optional[IDelayedCall] = None
        self._keepalive_call: Optional[IDelayedCall] = None
        self._sending: Optional[Deferred] = None
        self._eof = False
        self._trailers: Tuple[Tuple[str, str], ...] = ()
        # Why the backend's body broke off, until the Relay-Error went.
        self._error: Optional[str] = None
        self._stopped = False
        self._producer: Optional[IPushProducer] = None
        self._paused = False
        self.messages_sent = 0
        self.bytes_sent = 0
        # Why the backend's body broke off (L{fail}), for the one warning
        # the handler logs; None when it did not, or when we had given up
        # first and closed the backend ourselves.
        self.broken_off: Optional[str] = None
        self.done: Deferred = Deferred()
        self.first_sent: Deferred = Deferred()
        if not send_first_now:
            self._schedule_flush()
        self._pump()

    # The backend's side.

    def set_producer(self, producer: Optional[IPushProducer]) -> None:
        """What to pause when we are behind, and to stop when we give up."""
        self._producer = producer
        if self._stopped and producer is not None:
            producer.stopProducing()

    def write(self, data: bytes) -> None:
        if self._stopped or self._eof or not data:
            return
        if not self._size and self._flush_call is None and not self._flush_due:
            if self._streaming and self._sending is not None:
                # Gathered while a message is in flight: goes when it is taken.
                self._flush_due = True
            else:
                self._schedule_flush()
        self._pieces.append(data)
        self._size += len(data)
        self._received += len(data)
        self._pump()

    def finish(self, trailers: Iterable[Tuple[str, str]] = ()) -> None:
        """The backend's body is complete."""
        if self._stopped or self._eof:
            return
        self._eof = True
        self._trailers = tuple(trailers)
        self._pump()

    def fail(self, reason: str) -> None:
        """
        The backend's body broke off (a reset, a body shorter than its
        framing said): end the answer so that it cannot look complete, and
        close the backend connection.
        """
        if self._stopped or self._eof:
            return
        reason = " ".join(reason.split())[:MAX_REASON] or "unknown error"
        self.broken_off = reason
        self._eof = True
        if self._producer is not None:
            producer, self._producer = self._producer, None
            producer.stopProducing()
        if self._header_pending:
            # Nothing has gone: an honest error instead of part of a body.
            self._message = error_response(self._id, 502, "Backend response failed with error: " + reason)
            self._pieces.clear()
            self._size = 0
        else:
            self._error = reason
        self._pump()

    def abort(self, reason: Optional[Failure] = None) -> None:
        """Give up: stop the timers and the backend; C{done} fails."""
        self._stop(reason if reason is not None else Failure(CancelledError()))

    # Policy.

    def _pump(self) -> None:
        if self._stopped:
            return
        if self._sending is not None:
            # One message in flight; gather at most one more piece.
            if self._size >= self._max:
                self._pause()
            return
        if self._eof and self._size <= self._max:
            self._emit(final=True)
        elif (self._size >= self._max and not self._at_end()) or (
            self._flush_due and (self._size or self._header_pending)
        ):
            self._emit(final=False)
        else:
            self._flush_due = False
            self._resume()

    def _take(self, limit: int) -> List[bytes]:
        """
        Up to C{limit} bytes from the front of what is waiting, as the pieces
        the backend gave: the relay API splices them into the message's bytes
        as they are (L{relay.wire.serialize}), so joining them here would be
        a copy of every body for nothing.
        """
        pieces = self._pieces
        out = []
        room = limit
        while pieces and room > 0:
            piece = pieces.popleft()
            if len(piece) > room:
                pieces.appendleft(piece[room:])
                piece = piece[:room]
            out.append(piece)
            room -= len(piece)
        self._size -= limit - room
        return out

    def _at_end(self) -> bool:
        """All the body the backend announced is here, and fits one message."""
        return (
            self._expected is not None
            and self._received >= self._expected
            and self._size <= self._max
        )

    def _emit(self, final: bool) -> None:
        message = self._message
        self._message = HttpResponse(id=self._id)
        body = self._take(self._max)
        size = sum(map(len, body))
        if final and self._error is not None:
            message.trailer.add(name=RELAY_ERROR, value=self._error)
        elif final:
            message.eof = True
            for name, value in self._trailers:
                message.trailer.add(name=name, value=value)
            elapsed = self._clock.seconds() - self._started
            message.backend_duration_ms = int(max(0.0, elapsed) * 1000 + 1e-6)
        self._header_pending = False
        if self._size:
            if self._streaming:
                # The rest goes as soon as this message is taken.
                self._cancel_flush()
                self._flush_due = True
            elif not self._flush_due and self._flush_call is None:
                self._schedule_flush()
        else:
            self._flush_due = False
            self._cancel_flush()
        self._cancel_keepalive()
        self.messages_sent += 1
        self.bytes_sent += size
        d = self._sending = Deferred()
        d.addCallbacks(lambda _: self._sent(final), self._failed)
        self._send(message, body if size else None).chainDeferred(d)

    def _sent(self, final: bool) -> None:
        self._sending = None
        if not self.first_sent.called:
            self.first_sent.callback(True)
        if self._stopped:
            return
        if final and self._error is not None:
            self._error = None
            self._send_eof_after_error()
            return
        if final:
            self._stopped = True
            self._cancel_flush()
            if not self.done.called:
                self.done.callback(None)
            return
        self._schedule_keepalive()
        self._pump()
        if self._size < self._max:
            # Room for the next piece while this one (if any) is on its way.
            self._resume()

    def _send_eof_after_error(self) -> None:
        """
        The C{eof} after a C{Relay-Error}. Our relay server has aborted the
        user's answer already; a server that does not know the trailer
        would otherwise hold a short body open until its inactivity timeout
        and then end it cleanly all the same. Whatever the answer, the
        request is over for us.
        """
        self.messages_sent += 1
        d = self._sending = Deferred()
        d.addBoth(lambda _: self._sent(True))
        self._send(HttpResponse(id=self._id, eof=True), None).chainDeferred(d)

    def _failed(self, failure: Failure) -> None:
        self._sending = None
        self._stop(failure)

    def _stop(self, failure: Failure) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._cancel_flush()
        self._cancel_keepalive()
        if self._producer is not None:
            producer, self._producer = self._producer, None
            producer.stopProducing()
        if not self.first_sent.called:
            self.first_sent.callback(False)
        if not self.done.called:
            self.done.errback(failure)

    # Timers.

    def _schedule_flush(self) -> None:
        self._cancel_flush()
        self._flush_call = self._clock.callLater(self._flush_delay, self._flush_fired)

    def _flush_fired(self) -> None:
        self._flush_call = None
        self._flush_due = True
        self._pump()

    def _cancel_flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None

    def _schedule_keepalive(self) -> None:
        self._cancel_keepalive()
        self._keepalive_call = self._clock.callLater(self._keepalive_interval, self._keepalive_fired)

    def _keepalive_fired(self) -> None:
        self._keepalive_call = None
        if self._stopped or self._sending is not None:
            return
        if self._size or self._header_pending or self._eof:
            # Something real is about to go; it is the sign of life.
            self._pump()
            return
        self._emit(final=False)

    def _cancel_keepalive(self) -> None:
        if self._keepalive_call is not None and self._keepalive_call.active():
            self._keepalive_call.cancel()
        self._keepalive_call = None

    # Back-pressure.

    def _pause(self) -> None:
        if not self._paused and self._producer is not None:
            self._paused = True
            self._producer.pauseProducing()

    def _resume(self) -> None:
        if self._paused and self._producer is not None:
            self._paused = False
            self._producer.resumeProducing()
