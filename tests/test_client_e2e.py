"""
End to end over loopback: a user-client talks to our relay server, which our
relay client serves from a real twisted.web backend. Everything runs in this
process on 127.0.0.1 sockets; assertions are about what the user (or the
backend) notices.
"""

import base64
import hashlib
import json
import os
import shutil
import struct
import tempfile
import time

import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest
from twisted.web import http, resource, server
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone

from relay.server.auth import AccessPolicy, ClientTokens

from tests.support import Changes, on_each_engine, Recorder, RelayServer, stalled, started_client

NAME = "robot"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
BIG_BLOCK = 1024 * 1024


# The backend.


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


# The user side.


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


# The relay server and client.


Relay = RelayServer



class EndToEnd(unittest.TestCase):
    timeout = 60
    backend_scheme = "http"
    trust_root = None

    def setUp(self):
        self.backend = Backend()
        self.addCleanup(self.backend.stop)
        self.relay = Relay()
        self.addCleanup(lambda: self.relay.stop())
        self.users = HTTPConnectionPool(reactor, persistent=False)
        self.client = self.start_client()
        return self.relay.polling(NAME)

    def start_client(self, **kw):
        kw.setdefault("backend_scheme", self.backend_scheme)
        kw.setdefault("trust_root", self.trust_root)
        kw.setdefault("backend_address", self.backend.address)
        return started_client(self, self.relay.base, NAME, **kw)

    def url(self, path):
        return self.relay.base + "/client/" + NAME + path

    def request(self, method, path, **kw):
        kw.setdefault("allow_redirects", False)
        return treq.request(method, self.url(path), pool=self.users, **kw)

    @defer.inlineCallbacks
    def echo(self, method="GET", path="/echo", **kw):
        response = yield self.request(method, path, **kw)
        self.assertEqual(response.code, 200)
        body = yield response.content()
        return json.loads(body)

    # Requests.

    @defer.inlineCallbacks
    def test_methods_bodies_and_query(self):
        got = yield self.echo("GET", "/echo/a%20b/c?x=1&y=%2F&x=2")
        self.assertEqual((got["method"], got["uri"], got["body"]), ("GET", "/echo/a%20b/c?x=1&y=%2F&x=2", ""))
        body = bytes(range(256)) * 10
        got = yield self.echo("POST", "/echo/post", data=body)
        self.assertEqual((got["method"], got["body"].encode("latin-1")), ("POST", body))
        got = yield self.echo("PUT", "/echo/put?q", data=b"put body")
        self.assertEqual((got["method"], got["uri"], got["body"]), ("PUT", "/echo/put?q", "put body"))
        got = yield self.echo("DELETE", "/echo/thing")
        self.assertEqual(got["method"], "DELETE")
        response = yield self.request("HEAD", "/status/200")
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.content()), b"")

    @defer.inlineCallbacks
    def test_repeated_headers_both_ways(self):
        got = yield self.echo(headers={"X-Multi": ["one", "two"], "Accept": ["text/plain"]})
        self.assertEqual([v for k, v in got["headers"] if k.lower() == "x-multi"], ["one", "two"])
        response = yield self.request("GET", "/status/200")
        yield response.content()
        self.assertEqual(response.headers.getRawHeaders(b"x-multi"), [b"one", b"two"])
        self.assertEqual(response.headers.getRawHeaders(b"set-cookie"), [b"a=1", b"b=2"])

    @defer.inlineCallbacks
    def test_host_is_preserved(self):
        got = yield self.echo(headers={"Host": ["robot.example.com:8443"]})
        self.assertEqual(got["host"], "robot.example.com:8443")

    @defer.inlineCallbacks
    def test_host_is_backend_address_without_preserve_host(self):
        yield self.client.stopService()
        yield self.relay.stop()
        self.relay = Relay()
        self.start_client(preserve_host=False)
        yield self.relay.polling(NAME)
        got = yield self.echo(headers={"Host": ["robot.example.com:8443"]})
        self.assertEqual(got["host"], self.backend.address)

    @defer.inlineCallbacks
    def test_authentication_token_file_is_read_per_request(self):
        path = temp_file(self, "first-token\n")
        yield self.client.stopService()
        self.start_client(authentication_token_file=path)
        yield self.relay.polling(NAME)
        got = yield self.echo(headers={"Authorization": ["Basic user-credentials"]})
        self.assertEqual([v for k, v in got["headers"] if k.lower() == "authorization"], ["Bearer first-token"])
        with open(path, "w") as f:
            f.write("second-token")
        got = yield self.echo()
        self.assertEqual([v for k, v in got["headers"] if k.lower() == "authorization"], ["Bearer second-token"])
        os.remove(path)
        response = yield self.request("GET", "/echo")
        self.assertEqual(response.code, 500)
        self.assertIn(b"Failed to read authentication token", (yield response.content()))

    @defer.inlineCallbacks
    def test_every_status_class_and_redirects_not_followed(self):
        for code in (200, 201, 202, 204, 301, 302, 304, 400, 404, 418, 500, 503):
            response = yield self.request("GET", "/status/%d" % code)
            body = yield response.content()
            self.assertEqual(response.code, code)
            if code in (204, 304):
                self.assertEqual(body, b"")
            else:
                self.assertEqual(body, b"status %d" % code)
            if code in (301, 302):
                self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/echo/elsewhere"])
        # The backend saw each request once and never the redirect target.
        self.assertNotIn(b"/echo/elsewhere", [r.path for r in self.backend.requests])

    # Streaming.

    @defer.inlineCallbacks
    def test_100_mib_byte_exact(self):
        size = 100 * 1024 * 1024
        started = time.monotonic()
        agent = Agent(reactor, pool=self.users)
        response = yield agent.request(b"GET", self.url("/big?size=%d" % size).encode())
        self.assertEqual(response.code, 200)
        self.assertEqual(response.length, size)  # the Content-Length the backend sent
        collect = Collect(hash_only=True)
        response.deliverBody(collect)
        yield collect.done
        expected = hashlib.sha256()
        for i in range(size // BIG_BLOCK):
            expected.update(big_block(i, self.backend.pattern))
        self.assertEqual(collect.size, size)
        self.assertEqual(collect.sha.hexdigest(), expected.hexdigest())
        self.assertLess(time.monotonic() - started, 45)

    @defer.inlineCallbacks
    def test_trickle_arrives_in_pieces(self):
        agent = Agent(reactor, pool=self.users)
        response = yield agent.request(b"GET", self.url("/trickle").encode())
        collect = Collect()
        response.deliverBody(collect)
        yield collect.done
        self.assertEqual(b"".join(collect.pieces), b"".join(b"piece %d\n" % i for i in range(5)))
        # The first piece reached the user before the backend wrote the last.
        self.assertLess(collect.times[0], self.backend.trickle_sent[-1])
        self.assertGreaterEqual(len(collect.pieces), 4)

    @defer.inlineCallbacks
    def test_websocket_echo(self):
        user = yield open_websocket(self, self.relay.port, NAME)
        for message in (b"hello", b"x" * 70000, b"bye"):
            user.transport.write(make_frame(2, message, mask=True))
            yield user.read_until(lambda d: parse_frame(d) is not None)
            opcode, payload, used = parse_frame(user.data)
            user.data = user.data[used:]
            self.assertEqual((opcode, payload), (2, message))
        user.transport.write(make_frame(8, b"\x03\xe8", mask=True))
        yield user.read_until(lambda d: parse_frame(d) is not None)
        self.assertEqual(parse_frame(user.data)[0], 8)
        yield user.closed

    @defer.inlineCallbacks
    def test_user_disconnect_closes_backend_connection(self):
        user = RawUser()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.port), user)
        user.transport.write(b"GET /client/" + NAME.encode() + b"/forever HTTP/1.1\r\nHost: robot\r\n\r\n")
        yield user.read_until(lambda d: b"tick" in d)
        left = time.monotonic()
        user.transport.abortConnection()
        closed = yield self.backend.forever_closed
        self.assertLess(closed - left, 5.0)

    @defer.inlineCallbacks
    def test_slow_user_slows_the_backend(self):
        """
        A user who stops reading must stop the backend too, after buffers
        of a few MiB, rather than have the relay client (or server) soak up
        an endless stream.
        """
        user = RawUser()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.port), user)
        user.transport.write(b"GET /client/" + NAME.encode() + b"/firehose HTTP/1.1\r\nHost: robot\r\n\r\n")
        yield user.read_until(lambda d: b"ffff" in d)
        user.transport.pauseProducing()
        # Wait for the backend to stall: no progress for half a second.
        last = yield stalled(lambda: self.backend.firehose_bytes, timeout=20)
        self.assertLess(self.backend.firehose_bytes, 64 * 1024 * 1024)
        # Reading again lets it go on.
        user.transport.resumeProducing()
        yield self.backend.firehose_past(last + 8 * 1024 * 1024)
        user.transport.abortConnection()

    # Failures.

    @defer.inlineCallbacks
    def test_backend_down_is_500_with_message(self):
        yield self.backend.stop()
        response = yield self.request("GET", "/echo")
        body = yield response.content()
        self.assertEqual(response.code, 500)
        self.assertIn(b"Backend request failed with error", body)
        self.assertIn(b"connection refused", body)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/plain"])

    @defer.inlineCallbacks
    def test_relay_server_restart(self):
        port = self.relay.port
        yield self.relay.stop()
        self.relay = Relay(port)
        yield self.relay.polling(NAME)
        got = yield self.echo("POST", "/echo/again", data=b"after restart")
        self.assertEqual(got["body"], "after restart")

    @defer.inlineCallbacks
    def test_concurrent_requests(self):
        """A slow request does not hold up others, even with one poll."""
        agent = Agent(reactor, pool=self.users)
        slow = yield agent.request(b"GET", self.url("/trickle").encode())
        collect = Collect()
        slow.deliverBody(collect)
        results = yield defer.gatherResults([self.echo("GET", "/echo/%d" % i) for i in range(5)])
        self.assertEqual(sorted(r["uri"] for r in results), ["/echo/%d" % i for i in range(5)])
        self.assertFalse(collect.done.called, "the fast ones finished while the slow one still runs")
        yield collect.done


class RelayTokens(unittest.TestCase):
    """--relay_token_file against a relay server that checks relay-client tokens."""

    timeout = 30

    def setUp(self):
        self.backend = Backend()
        self.addCleanup(self.backend.stop)
        token_hash = hashlib.sha256(b"robot-secret").hexdigest()
        tokens = temp_file(self, "%s %s\n" % (NAME, token_hash))
        self.relay = Relay(policy=AccessPolicy(client_tokens=ClientTokens(tokens)))
        self.addCleanup(self.relay.stop)

    def start_client(self, token):
        self.fatal = Recorder()
        return started_client(
            self, self.relay.base, NAME, self.backend.address, relay_token_file=temp_file(self, token + "\n"), on_fatal=self.fatal
        )

    @defer.inlineCallbacks
    def test_accepted_token_serves(self):
        self.start_client("robot-secret")
        yield self.relay.polling(NAME)
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield treq.post(self.relay.base + "/client/robot/echo", data=b"hi", pool=pool)
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads((yield response.content()))["body"], "hi")

    @defer.inlineCallbacks
    def test_refused_token_is_fatal(self):
        self.start_client("wrong")
        yield self.fatal.called()
        self.assertIn("failed to authenticate", self.fatal[0])
        self.assertFalse(self.relay.polled_by(NAME))


# Every test above, on each HTTP/1.1 engine.
on_each_engine(globals())
