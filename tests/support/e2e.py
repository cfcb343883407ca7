"""
Pieces of the end-to-end tests over loopback: a real twisted.web backend
served by our relay-client, users that speak raw HTTP/1.1 and WebSocket
frames, and a relay server in this process.
"""

import base64
import hashlib
import json
import os
import shutil
import struct
import tempfile
import time

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.web import http, resource, server
from twisted.web.client import ResponseDone

from tests.support import Changes, RelayServer

NAME = "robot"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
BIG_BLOCK = 1024 * 1024


def temp_file(test, contents: str) -> str:
    """A file that goes away after C{test} (trial's mktemp litters pytest's cwd)."""
    directory = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, directory, True)
    path = os.path.join(directory, "file")
    with open(path, "w") as f:
        f.write(contents)
    return path


def big_block(i: int, pattern: bytes) -> bytes:
    """MiB number C{i} of the big download: numbered, so a lost or repeated block shows."""
    return struct.pack(">Q", i) + pattern[8:]


class BigProducer:
    """Writes the big body as fast as the connection takes it (a pull producer)."""

    def __init__(self, request, size: int, pattern: bytes):
        self.request = request
        self.left = size
        self.pattern = pattern
        self.block = 0
        self.offset = 0

    def resumeProducing(self):
        if self.left <= 0:
            return
        data = big_block(self.block, self.pattern)[self.offset : self.offset + 256 * 1024]
        data = data[: self.left]
        self.offset += len(data)
        if self.offset >= BIG_BLOCK:
            self.block += 1
            self.offset = 0
        self.left -= len(data)
        self.request.write(data)
        if self.left <= 0:
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self):
        self.left = 0


class BackendResource(resource.Resource):
    isLeaf = True

    def __init__(self, backend: "Backend"):
        super().__init__()
        self.backend = backend

    def render(self, request):
        path = request.path
        self.backend.requests.append(request)
        if path.startswith(b"/echo"):
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(
                {
                    "method": request.method.decode(),
                    "uri": request.uri.decode(),
                    "host": (request.getHeader(b"host") or b"").decode(),
                    "headers": [
                        [k.decode(), v.decode()]
                        for k, vs in request.requestHeaders.getAllRawHeaders()
                        for v in vs
                    ],
                    "body": request.content.read().decode("latin-1"),
                }
            ).encode()
        if path.startswith(b"/status/"):
            code = int(path.split(b"/")[2])
            request.setResponseCode(code)
            if code == 301 or code == 302:
                request.setHeader(b"location", b"/echo/elsewhere")
            request.responseHeaders.setRawHeaders(b"x-multi", [b"one", b"two"])
            request.responseHeaders.setRawHeaders(b"set-cookie", [b"a=1", b"b=2"])
            return b"status %d" % (code,)
        if path == b"/big":
            size = int(request.args[b"size"][0])
            request.setHeader(b"content-length", b"%d" % size)
            request.registerProducer(BigProducer(request, size, self.backend.pattern), False)
            return server.NOT_DONE_YET
        if path == b"/firehose":
            self.backend.firehose(request)
            return server.NOT_DONE_YET
        if path == b"/trickle":
            self.backend.trickle(request)
            return server.NOT_DONE_YET
        if path == b"/forever":
            self.backend.forever(request)
            return server.NOT_DONE_YET
        request.setResponseCode(404)
        return b"no such page"


class WebSocketEcho(protocol.Protocol):
    """Just enough RFC 6455 to echo frames back, unmasked."""

    def __init__(self, head: bytes):
        self.head = head
        self.buffer = b""

    def connectionMade(self):
        key = None
        for line in self.head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )

    def dataReceived(self, data):
        self.buffer += data
        while True:
            frame = parse_frame(self.buffer)
            if frame is None:
                return
            opcode, payload, used = frame
            self.buffer = self.buffer[used:]
            self.transport.write(make_frame(opcode, payload, mask=False))
            if opcode == 8:
                self.transport.loseConnection()
                return


def make_frame(opcode: int, payload: bytes, mask: bool) -> bytes:
    head = bytes([0x80 | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", n)
    if mask:
        key = os.urandom(4)
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        head += key
    return head + payload


def parse_frame(data: bytes):
    """(opcode, unmasked payload, bytes used), or None if incomplete."""
    if len(data) < 2:
        return None
    opcode = data[0] & 0x0F
    masked = data[1] & 0x80
    n = data[1] & 0x7F
    pos = 2
    if n == 126:
        if len(data) < 4:
            return None
        n = struct.unpack(">H", data[2:4])[0]
        pos = 4
    elif n == 127:
        if len(data) < 10:
            return None
        n = struct.unpack(">Q", data[2:10])[0]
        pos = 10
    key = b""
    if masked:
        key = data[pos : pos + 4]
        pos += 4
    if len(data) < pos + n:
        return None
    payload = data[pos : pos + n]
    if masked:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return opcode, payload, pos + n


class Sniffer(protocol.Protocol):
    """
    The backend's connections: WebSocket upgrades go to L{WebSocketEcho},
    everything else to twisted.web, so one address serves both as a real
    backend would.
    """

    def __init__(self, site, websocket=WebSocketEcho):
        self.site = site
        self.websocket = websocket
        self.buffer = b""
        self.inner = None

    def dataReceived(self, data):
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head, rest = self.buffer[:end], self.buffer[end + 4 :]
        if b"\r\nupgrade: websocket" in head.lower():
            self.inner = self.websocket(head)
            self.inner.makeConnection(self.transport)
            if rest:
                self.inner.dataReceived(rest)
        else:
            self.inner = self.site.buildProtocol(None)
            self.inner.makeConnection(self.transport)
            self.inner.dataReceived(self.buffer)
        self.buffer = b""

    def connectionLost(self, reason):
        if self.inner is not None:
            self.inner.connectionLost(reason)


class Backend:
    def __init__(self, tls=None, host="127.0.0.1"):
        self.pattern = os.urandom(BIG_BLOCK)
        self.requests = []
        self.trickle_sent = []
        self.firehose_bytes = 0
        self.firehose_changes = Changes()
        self.forever_closed = defer.Deferred()
        self.forever_started = defer.Deferred()
        factory = self.factory()
        if tls is None:
            self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        else:
            self.port = reactor.listenSSL(0, factory, tls, interface="127.0.0.1")
        self.address = "%s:%d" % (host, self.port.getHost().port)

    def factory(self):
        """What listens: twisted.web's Site, behind a sniffer of the first bytes."""
        self.site = server.Site(BackendResource(self))
        return protocol.Factory.forProtocol(lambda: Sniffer(self.site))

    def trickle(self, request, pieces=5, interval=0.3):
        def send(i):
            if request._disconnected:
                return
            request.write(b"piece %d\n" % i)
            self.trickle_sent.append(time.monotonic())
            if i + 1 < pieces:
                reactor.callLater(interval, send, i + 1)
            else:
                request.finish()

        send(0)

    def firehose(self, request):
        """Writes as fast as the connection lets it, counting what it wrote."""
        backend = self
        block = b"f" * 65536

        class Push:
            paused = False
            stopped = False

            def pauseProducing(self):
                self.paused = True

            def resumeProducing(self):
                self.paused = False
                reactor.callLater(0, self.run)

            def stopProducing(self):
                self.stopped = True

            def run(self):
                for _ in range(16):
                    if self.paused or self.stopped:
                        return
                    request.write(block)
                    backend.firehose_bytes += len(block)
                    backend.firehose_changes.changed()
                reactor.callLater(0, self.run)

        producer = Push()
        request.registerProducer(producer, True)
        request.notifyFinish().addBoth(lambda _: producer.stopProducing())
        producer.run()

    def firehose_past(self, count: int) -> defer.Deferred:
        """Fires once the firehose has written more than C{count} bytes."""
        return self.firehose_changes.when(lambda: self.firehose_bytes > count)

    def forever(self, request):
        call = [None]

        def tick():
            request.write(b"tick\n")
            call[0] = reactor.callLater(0.1, tick)

        def closed(_):
            if call[0] is not None and call[0].active():
                call[0].cancel()
            self.forever_closed.callback(time.monotonic())

        request.notifyFinish().addBoth(closed)
        tick()
        self.forever_started.callback(None)

    def stop(self):
        return self.port.stopListening()


class Collect(protocol.Protocol):
    """A response body, with when each piece arrived."""

    def __init__(self, hash_only=False):
        self.done = defer.Deferred()
        self.pieces = []
        self.times = []
        self.size = 0
        self.hash_only = hash_only
        self.sha = hashlib.sha256()

    def dataReceived(self, data):
        self.size += len(data)
        self.times.append(time.monotonic())
        if self.hash_only:
            self.sha.update(data)
        else:
            self.pieces.append(data)

    def connectionLost(self, reason):
        if reason.check(ResponseDone, http.PotentialDataLoss):
            self.done.callback(self)
        else:
            self.done.errback(reason)


class RawUser(protocol.Protocol):
    """A user-client on a plain socket, for WebSockets and walking away."""

    def __init__(self):
        self.data = b""
        self.waiting = []
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.data += data
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)

    def more(self):
        d = defer.Deferred()
        self.waiting.append(d)
        return d

    def connectionLost(self, reason):
        self.closed.callback(None)
        for d in self.waiting:
            d.callback(None)

    @defer.inlineCallbacks
    def read_until(self, predicate, timeout=10):
        deadline = time.monotonic() + timeout
        while not predicate(self.data):
            if time.monotonic() > deadline or self.closed.called:
                raise AssertionError("user did not receive what was expected: %r" % (self.data[:300],))
            d = self.more()
            d.addTimeout(max(0.01, deadline - time.monotonic()), reactor)
            try:
                yield d
            except defer.TimeoutError:
                pass


@defer.inlineCallbacks


def open_websocket(test, port: int, name: str, connect=connectProtocol):
    """
    A L{RawUser} whose WebSocket handshake through the relay at C{port} to
    C{name} succeeded (C{test} asserts the 101 and its accept key); what
    came after the head is left in its C{data}.
    """
    user = RawUser()
    yield connect(TCP4ClientEndpoint(reactor, "127.0.0.1", port), user)
    key = base64.b64encode(os.urandom(16))
    user.transport.write(
        b"GET /client/" + name.encode() + b"/ws HTTP/1.1\r\nHost: robot\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\n\r\n"
    )
    yield user.read_until(lambda d: b"\r\n\r\n" in d)
    head, _, user.data = user.data.partition(b"\r\n\r\n")
    test.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    test.assertIn(b"Sec-Websocket-Accept: " + accept, head)
    return user


Relay = RelayServer


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"


class RawBackend:
    """
    A backend that answers every request with C{answer}'s bytes and then
    holds the connection for the test to cut (or closes it at once with
    C{close_at_once}): the cut is exactly where the test wants it.
    """

    def __init__(self, answer: bytes, close_at_once: bool = False):
        self.answer = answer
        self.close_at_once = close_at_once
        self.connections = []
        self.port = reactor.listenTCP(0, protocol.Factory.forProtocol(lambda: _Answering(self)), interface="127.0.0.1")
        self.address = "127.0.0.1:%d" % (self.port.getHost().port,)

    def cut(self, abort: bool) -> None:
        """End the connection of the last request: a reset, or a clean close."""
        transport = self.connections[-1].transport
        if abort:
            transport.abortConnection()
        else:
            transport.loseConnection()

    def stop(self):
        for connection in self.connections:
            connection.transport.abortConnection()
        return self.port.stopListening()


class _Answering(protocol.Protocol):
    def __init__(self, backend: RawBackend):
        self.backend = backend
        self.head = b""

    def dataReceived(self, data: bytes) -> None:
        if self.head is None:
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.head = None
            self.backend.connections.append(self)
            self.transport.write(self.backend.answer)
            if self.backend.close_at_once:
                self.transport.loseConnection()
