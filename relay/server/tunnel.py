"""
The user-client's side of an upgraded (101 Switching Protocols) request.

After the 101 the connection is a raw two-way pipe: what the user-client
sends goes into the request's L{relay.server.pending.StreamQueue}, which
relay-clients drain with C{POST /server/requeststream}; what the
relay-client posts as response bodies is written to the connection. Both directions are flow-controlled: the queue
pauses this transport when it holds too much, and the transport pauses the
request's response producer when its send buffer is full. Either side ending
ends both.
"""

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.net.transport import IStreamTransport
from relay.server.broker import Broker
from relay.server.pending import PendingRequest

log = Logger()


class Tunnel(Protocol):
    transport: IStreamTransport  # the user's connection, handed over after the 101

    def __init__(self, broker: Broker, pending: PendingRequest):
        self.broker = broker
        self.pending = pending
        self.stream = pending.open_stream()
        self.bytes_in = 0
        # Fires when the user's connection is gone (the tunnel's end, for
        # tracing: an upgraded request never finishes as a request does).
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.registerProducer(self.pending, True)
        self.stream.set_producer(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.stream.put(data)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self, clean: bool) -> None:
        """The relay-client's side ended: clean (eof) or not."""
        self.transport.unregisterProducer()
        if clean:
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.broker.trace:
            log.debug("End of bidi-stream stream (closed socket)", ID=self.pending.id)
        self.stream.close()
        self.broker.cancel(self.pending)
        self.lost.callback(None)
