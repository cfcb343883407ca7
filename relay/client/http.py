"""
The client's HTTP helpers, for its calls to the relay server and to the
backend alike: bodies already in memory, whole answers, whether a failure
was a refusal, and back-off between retries.
"""

from typing import Callable, List, Union

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer


@implementer(IBodyProducer)
class BytesProducer:
    """A body that is already in memory (bytes, or a list of pieces), written in one go."""

    def __init__(self, body: Union[bytes, List[bytes]]):
        self.pieces = [body] if isinstance(body, bytes) else body
        self.length = sum(map(len, self.pieces))

    def startProducing(self, consumer):
        for piece in self.pieces:
            consumer.write(piece)
        return succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class _Collect(Protocol):
    def __init__(self, done: Deferred):
        self.done = done
        self.data: List[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # isinstance, not Failure.check: the same test here, without
        # building each type's qualified name on every answer.
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            self.done.callback(b"".join(self.data))
        else:
            self.done.errback(reason)


def read_all(response) -> Deferred:
    """A relay answer's whole body; cancelling drops the connection."""
    collector: _Collect

    def cancel(d: Deferred) -> None:
        transport = getattr(collector, "transport", None)
        if transport is not None:
            transport.stopProducing()

    d: Deferred = Deferred(cancel)
    collector = _Collect(d)
    response.deliverBody(collector)
    return d


def read_token(path: str) -> str:
    """A token file's contents, without the trailing newline editors add."""
    with open(path, "rb") as f:
        return f.read().decode("utf-8").strip()


def is_connection_refused(failure: Failure) -> bool:
    value = failure.value
    if isinstance(value, (ResponseFailed, ResponseNeverReceived)) and value.reasons:
        return any(is_connection_refused(r) for r in value.reasons)
    return isinstance(value, net_error.ConnectionRefusedError)


def backoff_delays(initial: float, multiplier: float, maximum: float) -> Callable[[], float]:
    """Successive back-off delays, growing to C{maximum}."""
    state = {"next": initial}

    def next_delay() -> float:
        value = state["next"]
        state["next"] = min(value * multiplier, maximum)
        return value

    return next_delay
