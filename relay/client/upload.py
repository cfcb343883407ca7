"""
A user's request body that streams, on its way from the relay server to
the backend.

Our server tells our relay-client that a request's body follows instead of
riding in the C{HttpRequest} (docs/protocol.md, "Extension: streamed
request bodies"). The relay-client then fetches it with one
C{POST /server/requeststream?id=ID} whose answer is the body itself, and
writes it into the backend request as it comes: L{StreamedBody} is the
backend request's L{IBodyProducer}, and the fetch's connection is what it
pauses when the backend reads slowly, so that the server in turn stops
reading the user. Nothing is held here but what one read brought.

A body that breaks off (the user went away, the server's connection died)
fails the producer, and Twisted's client then leaves the backend request
unfinished (no last chunk, fewer bytes than its C{Content-Length}) and
closes its connection: the backend sees a broken body, never a short one
that looks complete.
"""

from typing import Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from relay.compat import body_consumer_transport


class BodyBrokenOff(Exception):
    """The user's body stopped before its end (the user or the server went away)."""


@implementer(IBodyProducer)
class StreamedBody:
    """
    The answer of a body fetch (an L{IResponse} whose body is the user's
    body), as a producer for the backend request.

    C{length} is the fetch's C{Content-Length} (the user's), or
    C{UNKNOWN_LENGTH}, which makes the backend request chunked.

    Twisted calls C{stopProducing} when the backend no longer takes the
    body (it answered early, or its connection went): the fetch is then
    paused, not closed, so that the relay server sees it end only once
    the answer is on its way (L{close}); a fetch that ends before an
    answer began tells the server that the relay-client is gone.
    """

    def __init__(self, fetch):
        self._fetch = fetch
        self.length = fetch.length if fetch.length is not UNKNOWN_LENGTH else UNKNOWN_LENGTH
        self._transport: Optional[IPushProducer] = None
        self._consumer = None
        self._backend = None
        self._delivered = False
        self._done: Optional[Deferred] = None
        self._paused = False
        self._stopped = False
        self._closed = False
        # Whether the whole body arrived, and how many bytes did.
        self.complete = False
        self.received = 0

    # IBodyProducer.

    def startProducing(self, consumer) -> Deferred:
        self._consumer = consumer
        # The backend's connection, to abort: under Twisted's client, found
        # through its consumer; the lean client's consumer is the
        # connection itself (or frames chunks onto it).
        backend = body_consumer_transport(consumer)
        if backend is None and hasattr(consumer, "abortConnection"):
            backend = consumer
        self._backend = backend
        done = self._done = Deferred(lambda _: self.close())
        # A body that is already whole ends within this call.
        self._deliver()
        return done

    def pauseProducing(self) -> None:
        self._paused = True
        if self._transport is not None:
            self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self._stopped:
            return
        self._paused = False
        if self._transport is not None:
            self._transport.resumeProducing()

    def stopProducing(self) -> None:
        self._stopped = True
        if not self.complete:
            self.pauseProducing()

    # The relay-client's handler.

    def close(self) -> None:
        """
        Stop fetching: the request is over (or its answer has begun and the
        backend wants no more of the body). Ends the fetch's connection if
        the body has not ended.
        """
        self._stopped = True
        if self._closed:
            return
        self._closed = True
        if self.complete:
            return
        if self._transport is not None:
            self._transport.stopProducing()
        else:
            # Never asked for (the backend could not be reached): taken
            # now, to be dropped with its connection at once.
            self._deliver()
        # The backend request cannot end either: without its body's end,
        # its connection would wait for it for ever.
        backend, self._backend = self._backend, None
        if backend is not None:
            backend.abortConnection()

    # From the fetch.

    def _deliver(self) -> None:
        if not self._delivered:
            self._delivered = True
            self._fetch.deliverBody(_Pump(self))

    def _connected(self, transport: IPushProducer) -> None:
        self._transport = transport
        if self._paused or self._stopped:
            transport.pauseProducing()
        if self._closed:
            transport.stopProducing()

    def _data(self, data: bytes) -> None:
        self.received += len(data)
        if not self._stopped and self._consumer is not None:
            self._consumer.write(data)

    def _ended(self, reason: Failure) -> None:
        self._transport = None
        done, self._done = self._done, None
        if reason.check(ResponseDone):
            self.complete = True
            if done is not None and not self._stopped:
                done.callback(None)
            return
        if done is not None and not self._stopped:
            done.errback(Failure(BodyBrokenOff("the request body broke off after %d bytes" % (self.received,))))


class _Pump(Protocol):
    def __init__(self, body: StreamedBody):
        self.body = body

    def connectionMade(self) -> None:
        # A response's body transport: it pauses and resumes the fetch.
        self.body._connected(self.transport)  # type: ignore[arg-type]

    def dataReceived(self, data: bytes) -> None:
        self.body._data(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.body._ended(reason)
