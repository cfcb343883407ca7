"""
Streamed request bodies between our server and our relay-client
(docs/protocol.md, "Extension: streamed request bodies"), end to end over
loopback: a raw user uploads, the backend reads as the body comes, and
what each end notices is asserted.
"""

import hashlib
import json
import os
import platform

import pytest
import treq
from twisted.internet import defer, reactor, tcp
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from relay.compat import unwritten_bytes
from relay.proto.http_relay_pb2 import HttpRequest
from tests.support import RelayServer, dechunk, head_and_body, rss_peak_kib, stalled, started_client, tick
from tests.support.engines import on_each_engine
from tests.support.go import GO_CLIENT, GO_SERVER, go_binary
from tests.support.ports import reserve_port, reserve_ports
from tests.support.process import ChildProcess, TwistdProcess
from tests.support.ring import name_owned_by
from tests.support.uploads import H2Uploader, UploadBackends, Uploader, pattern_sha256, upload_head

NAME = "robot"
MIB = 1024 * 1024


class UploadCase(unittest.TestCase):
    """Our server and our relay-client, in this process, before an upload backend."""

    timeout = 20

    def setUp(self):
        self.seed = os.urandom(256 * 1024)
        self.backend = UploadBackends()
        self.addCleanup(self.backend.stop)
        self.relay = self.start_relay()
        self.addCleanup(lambda: self.relay.stop())
        self.client = started_client(self, self.relay.base, NAME, backend_address=self.backend.address)
        return self.relay.polling(NAME)

    def start_relay(self, **kwargs):
        return RelayServer(**kwargs)

    @defer.inlineCallbacks
    def upload(self, path: bytes, size: int, **kwargs):
        chunked = kwargs.get("chunked", False)
        extra = kwargs.pop("extra", b"")
        head = upload_head(b"/client/" + NAME.encode() + path, size, chunked=chunked, extra=extra)
        user = Uploader(head, size, self.seed, **kwargs)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.port), user)
        self.addCleanup(lambda: user.transport.abortConnection() if user.transport is not None else None)
        return user

    def answer(self, user):
        head, body = head_and_body(bytes(user.data))
        return head, body


@pytest.mark.socket
class Uploads(UploadCase):
    """HTTP/1.1 users."""

    @defer.inlineCallbacks
    def test_upload_arrives_whole(self):
        """A body with a Content-Length reaches the backend intact, streamed, and the user gets its answer."""
        size = 16 * MIB
        user = yield self.upload(b"/sink", size)
        upload = yield self.backend.next_upload()
        yield upload.ended
        self.assertTrue(upload.complete)
        self.assertEqual(upload.received, size)
        self.assertEqual(upload.sha256, pattern_sha256(size, self.seed))
        self.assertEqual(upload.header(b"content-length"), b"%d" % size)
        yield user.wait_for(b"}")
        head, body = self.answer(user)
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
        self.assertEqual(json.loads(body)["sha256"], pattern_sha256(size, self.seed))

    @defer.inlineCallbacks
    def test_chunked_upload(self):
        """A chunked body (no length) streams too, and reaches the backend chunked."""
        size = 5 * MIB + 123
        user = yield self.upload(b"/sink", size, chunked=True)
        upload = yield self.backend.next_upload()
        yield upload.ended
        self.assertTrue(upload.complete)
        self.assertEqual(upload.header(b"transfer-encoding"), b"chunked")
        self.assertEqual(upload.sha256, pattern_sha256(size, self.seed))
        yield user.wait_for(b"}")
        self.assertTrue(bytes(user.data).startswith(b"HTTP/1.1 200"))

    @defer.inlineCallbacks
    def test_backend_reads_before_the_body_ended(self):
        """The request reaches the backend at its head, and the body as it comes, not once it is whole."""
        user = yield self.upload(b"/sink", 8 * MIB, stop_after=3 * MIB)
        upload = yield self.backend.next_upload()
        yield user.stopped
        yield stalled(lambda: upload.received)
        self.assertEqual(upload.received, 3 * MIB)
        self.assertFalse(upload.ended.called)

    @defer.inlineCallbacks
    def test_user_abort_breaks_the_backend_body(self):
        """A user who aborts mid-upload aborts the backend request: its body ends broken, not complete."""
        user = yield self.upload(b"/sink", 8 * MIB, stop_after=2 * MIB)
        upload = yield self.backend.next_upload()
        yield user.stopped
        yield stalled(lambda: upload.received)
        user.transport.abortConnection()
        yield upload.ended
        self.assertTrue(upload.broken)
        self.assertFalse(upload.complete)
        self.assertEqual(upload.received, 2 * MIB)

    @defer.inlineCallbacks
    def test_chunked_user_abort_breaks_the_backend_body(self):
        """The same for a chunked upload: the backend never gets the last chunk."""
        user = yield self.upload(b"/sink", 8 * MIB, chunked=True, stop_after=2 * MIB)
        upload = yield self.backend.next_upload()
        yield user.stopped
        yield stalled(lambda: upload.received)
        user.transport.loseConnection()
        yield upload.ended
        self.assertTrue(upload.broken)
        self.assertFalse(upload.complete)

    @defer.inlineCallbacks
    def test_early_answer_is_delivered_and_the_rest_discarded(self):
        """
        A backend that answers 413 before reading the body: the user gets
        the 413, and its connection closes after it.
        """
        user = yield self.upload(b"/early", 64 * MIB)
        upload = yield self.backend.next_upload()
        yield user.ended
        head, body = self.answer(user)
        self.assertTrue(head.startswith(b"HTTP/1.1 413"), head)
        self.assertIn(b"connection: close", head.lower())
        self.assertEqual(body, b"too large for me\n")
        self.assertLess(user.sent, 64 * MIB)
        # Closed after the answer, not reset under a user still sending.
        self.assertTrue(user.clean)
        yield upload.ended
        self.assertFalse(upload.complete)

    @defer.inlineCallbacks
    def test_expect_continue_waits_for_the_relay_client(self):
        """100 Continue comes once the relay-client fetches the body, and the upload then goes through."""
        yield self.client.stopService()
        user = yield self.upload(b"/sink", MIB, extra=b"Expect: 100-continue\r\n", wait_for_continue=True)
        yield tick(0.3)
        self.assertEqual(bytes(user.data), b"")
        client = started_client(self, self.relay.base, NAME, backend_address=self.backend.address)
        self.addCleanup(client.stopService)
        upload = yield self.backend.next_upload()
        yield upload.ended
        self.assertTrue(upload.complete)
        yield user.wait_for(b"}")
        answer = bytes(user.data)
        self.assertTrue(answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"), answer[:200])

    @defer.inlineCallbacks
    def test_full_duplex_echo(self):
        """A backend that answers while the upload goes on: the echo streams back before the upload ends."""
        size = 8 * MIB
        user = yield self.upload(b"/echo", size, stop_after=2 * MIB)
        yield user.stopped
        yield user.wait_for(b"\r\n\r\n")

        def echoed():
            _, body = head_and_body(bytes(user.data))
            return len(dechunk(body)[0])

        # All that was sent comes back while the upload is still open.
        while echoed() < 2 * MIB:
            self.assertFalse(user.ended.called)
            yield tick(0.05)
        self.assertEqual(echoed(), 2 * MIB)
        user.stop_after = None
        user.done_sending = False
        user.start()

        @defer.inlineCallbacks
        def complete():
            while True:
                _, body = head_and_body(bytes(user.data))
                payload, _, done = dechunk(body)
                if done:
                    return payload
                yield tick(0.05)

        payload = yield complete()
        self.assertEqual(len(payload), size)
        self.assertEqual(hashlib.sha256(payload).hexdigest(), pattern_sha256(size, self.seed))

    @defer.inlineCallbacks
    def test_back_pressure_from_a_slow_backend(self):
        """
        A backend reading 1 MiB/s slows the user's upload, and neither the
        server nor the relay-client holds 8 MiB of the body meanwhile.
        """
        user = yield self.upload(b"/slow/%d" % MIB, 256 * MIB)
        upload = yield self.backend.next_upload()
        held_server, held_client = [], []
        for _ in range(40):
            yield tick(0.1)
            held_server.append(self.server_held())
            held_client.append(self.client_held())
        # Four seconds at 1 MiB/s: what the user sent is what the backend
        # read and what the sockets on the way buffer, not the upload.
        self.assertLess(upload.received, 8 * MIB)
        self.assertLess(user.sent, upload.received + 40 * MIB)
        self.assertLess(max(held_server), 8 * MIB)
        self.assertLess(max(held_client), 8 * MIB)

    def server_held(self) -> int:
        """Body bytes the server holds: waiting for the fetch, or unwritten in its connections."""
        held = 0
        for pending in self.relay.broker.requests.values():
            if pending.body is not None:
                held += pending.body._held_size
        for channel in self.relay.service.site.connections:
            held += unwritten_bytes(channel.transport)
        return held

    def client_held(self) -> int:
        """Bytes the relay-client holds unwritten towards the backend."""
        port = self.backend.listening.getHost().port
        transports = set(reactor.getReaders()) | set(reactor.getWriters())
        return sum(
            unwritten_bytes(t) for t in transports if isinstance(t, tcp.Client) and t.getPeer().port == port
        )

    @defer.inlineCallbacks
    def test_limit_on_streamed_bodies(self):
        """--max_streamed_request_body: past it the user gets 413 and the backend a broken body."""
        yield self.relay.stop()
        self.relay = RelayServer(port=self.relay.port, max_streamed_request_body=3 * MIB)
        yield self.relay.polling(NAME)
        user = yield self.upload(b"/sink", 8 * MIB)
        upload = yield self.backend.next_upload()
        yield user.ended
        self.assertTrue(bytes(user.data).startswith(b"HTTP/1.1 413"), bytes(user.data)[:100])
        self.assertIn(b"--max_streamed_request_body", bytes(user.data))
        yield upload.ended
        self.assertTrue(upload.broken)
        self.assertLessEqual(upload.received, 3 * MIB)


@pytest.mark.socket
class H2Uploads(UploadCase):
    """The same pair, the user on HTTP/2 (h2c): its flow control is the back-pressure."""

    @defer.inlineCallbacks
    def h2_upload(self, path: bytes, size: int, **kwargs):
        user = H2Uploader("/client/%s%s" % (NAME, path.decode()), size, self.seed, **kwargs)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.port), user)
        self.addCleanup(lambda: user.transport.abortConnection() if user.transport is not None else None)
        return user

    @defer.inlineCallbacks
    def test_h2_upload_streams_and_arrives_whole(self):
        """An HTTP/2 body reaches the backend as it comes (before END_STREAM), and whole."""
        size = 6 * MIB
        user = yield self.h2_upload(b"/sink", size, stop_after=2 * MIB)
        upload = yield self.backend.next_upload()
        yield user.stopped
        while upload.received < 2 * MIB:
            yield tick(0.05)
        self.assertFalse(upload.ended.called)
        user.go_on()
        yield upload.ended
        self.assertTrue(upload.complete)
        self.assertEqual(upload.sha256, pattern_sha256(size, self.seed))
        yield user.ended
        self.assertEqual(user.headers.get(":status"), "200")

    @defer.inlineCallbacks
    def test_h2_upload_without_length(self):
        """No content-length over HTTP/2: the backend gets a chunked body, whole."""
        size = 3 * MIB + 7
        user = yield self.h2_upload(b"/sink", size, length=False)
        upload = yield self.backend.next_upload()
        yield upload.ended
        self.assertTrue(upload.complete)
        self.assertEqual(upload.header(b"transfer-encoding"), b"chunked")
        self.assertEqual(upload.sha256, pattern_sha256(size, self.seed))
        yield user.ended

    @defer.inlineCallbacks
    def test_h2_user_reset_breaks_the_backend_body(self):
        """A user that resets its stream mid-upload: the backend's body breaks off."""
        user = yield self.h2_upload(b"/sink", 8 * MIB, stop_after=MIB)
        upload = yield self.backend.next_upload()
        yield user.stopped
        while upload.received < MIB:
            yield tick(0.05)
        user.reset()
        yield upload.ended
        self.assertTrue(upload.broken)

    @defer.inlineCallbacks
    def test_h2_expect_continue_waits_for_the_relay_client(self):
        """Over HTTP/2 too, the interim 100 comes once the relay-client fetches the body."""
        yield self.client.stopService()
        user = yield self.h2_upload(b"/sink", 64 * 1024, extra_headers=[("expect", "100-continue")])
        yield tick(0.3)
        self.assertEqual(user.informational, [])
        client = started_client(self, self.relay.base, NAME, backend_address=self.backend.address)
        self.addCleanup(client.stopService)
        upload = yield self.backend.next_upload()
        yield upload.ended
        yield user.ended
        self.assertEqual(user.informational, ["100"])
        self.assertEqual(user.headers.get(":status"), "200")

    @defer.inlineCallbacks
    def test_h2_early_answer(self):
        """An early 413 reaches an HTTP/2 user, whose stream is then reset with NO_ERROR."""
        user = yield self.h2_upload(b"/early", 64 * MIB)
        yield user.ended
        self.assertEqual(user.headers.get(":status"), "413")
        self.assertEqual(user.data, b"too large for me\n")
        self.assertIn(user.reset_code, (None, 0))


@pytest.mark.socket
class ThroughAnotherReplica(unittest.TestCase):
    """
    The user's upload reaches a replica that does not own the name: the
    body streams to the owner (over HTTP/2), and from there to our
    relay-client, never buffered whole on the way.
    """

    timeout = 30

    def setUp(self):
        self.seed = os.urandom(256 * 1024)
        self.backend = UploadBackends()
        self.addCleanup(self.backend.stop)
        clock = Clock()
        ports = reserve_ports(self, 2)
        peers = ["127.0.0.1:%d" % port for port in ports]
        self.owner, self.other = [
            RelayServer(port, peers=",".join(peers), peer_self=peer, clock=clock) for port, peer in zip(ports, peers)
        ]
        for server in (self.owner, self.other):
            self.addCleanup(server.stop)
        self.name = name_owned_by(peers, peers[0])
        self.client = started_client(self, self.owner.base, self.name, backend_address=self.backend.address)
        return self.owner.polling(self.name)

    @defer.inlineCallbacks
    def upload(self, size: int, **kwargs):
        head = upload_head(b"/client/%s/sink" % (self.name.encode(),), size)
        user = Uploader(head, size, self.seed, **kwargs)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.other.port), user)
        self.addCleanup(lambda: user.transport.abortConnection() if user.transport is not None else None)
        return user

    @defer.inlineCallbacks
    def test_the_body_streams_through_the_owner(self):
        size = 6 * MIB
        user = yield self.upload(size, stop_after=2 * MIB)
        upload = yield self.backend.next_upload()
        yield user.stopped
        while upload.received < 2 * MIB:
            yield tick(0.05)
        self.assertFalse(upload.ended.called)
        self.assertFalse(self.other.broker.requests)
        user.stop_after = None
        user.done_sending = False
        user.start()
        yield upload.ended
        self.assertTrue(upload.complete)
        self.assertEqual(upload.sha256, pattern_sha256(size, self.seed))
        yield user.wait_for(b"}")
        self.assertTrue(bytes(user.data).startswith(b"HTTP/1.1 200"), bytes(user.data)[:200])

    @defer.inlineCallbacks
    def test_a_go_relay_client_at_the_owner_gets_the_body_whole(self):
        """The owner buffers what streamed to it when its relay-client is Go's (its polls lack the header)."""
        yield self.client.stopService()
        pool = HTTPConnectionPool(reactor, persistent=False)
        polled = treq.get(self.owner.url("/server/request?server=" + self.name), pool=pool)
        owner = self.owner
        yield owner.when(lambda: not owner.broker.streams_bodies(self.name) and owner.polled_by(self.name))
        user = yield self.upload(3 * MIB)
        response = yield polled
        self.assertEqual(response.code, 200)
        self.assertIsNone(response.headers.getRawHeaders(b"relay-body"))
        message = HttpRequest.FromString((yield response.content()))
        self.assertEqual(hashlib.sha256(message.body).hexdigest(), pattern_sha256(3 * MIB, self.seed))
        self.assertFalse(user.ended.called)

    @defer.inlineCallbacks
    def test_a_user_abort_reaches_the_backend(self):
        user = yield self.upload(8 * MIB, stop_after=MIB)
        upload = yield self.backend.next_upload()
        yield user.stopped
        while upload.received < MIB:
            yield tick(0.05)
        user.transport.abortConnection()
        yield upload.ended
        self.assertTrue(upload.broken)


@pytest.mark.socket
class GoHalves(unittest.TestCase):
    """The buffered path stays as it was when one half does not stream."""

    timeout = 20

    @defer.inlineCallbacks
    def test_poll_without_the_header_gets_the_body_inside(self):
        """A relay-client that does not say it fetches bodies (Go's) gets the whole body in the request, as before."""

        relay = RelayServer()
        self.addCleanup(relay.stop)
        pool = HTTPConnectionPool(reactor, persistent=False)
        polled = treq.get(relay.url("/server/request?server=" + NAME), pool=pool)
        yield relay.polling(NAME)
        seed = os.urandom(256 * 1024)
        head = upload_head(b"/client/" + NAME.encode() + b"/x", 3 * MIB)
        user = Uploader(head, 3 * MIB, seed)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", relay.port), user)
        self.addCleanup(user.transport.abortConnection)
        response = yield polled
        self.assertEqual(response.code, 200)
        self.assertIsNone(response.headers.getRawHeaders(b"relay-body"))
        message = HttpRequest.FromString((yield response.content()))
        self.assertEqual(len(message.body), 3 * MIB)
        self.assertEqual(hashlib.sha256(message.body).hexdigest(), pattern_sha256(3 * MIB, seed))


def spawn_client(relay_port: int, backend_address: str) -> TwistdProcess:
    return TwistdProcess.spawn(
        [
            "relay-client",
            "--relay_scheme=http",
            "--relay_address=127.0.0.1:%d" % relay_port,
            "--backend_scheme=http",
            "--backend_address=" + backend_address,
            "--server_name=" + NAME,
            "--disable_auth_for_remote",
        ]
    )


@pytest.mark.process
class Processes(unittest.TestCase):
    """Where the process is the point: a relay-client killed mid-upload, and the server's memory during one."""

    timeout = 120
    # The processes choose their engine as deployed (auto).
    http1_engine = None

    def setUp(self):
        self.seed = os.urandom(256 * 1024)
        self.backend = UploadBackends()
        self.addCleanup(self.backend.stop)

    @defer.inlineCallbacks
    def upload(self, port: int, path: bytes, size: int) -> Uploader:
        head = upload_head(b"/client/" + NAME.encode() + path, size)
        user = Uploader(head, size, self.seed)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), user)
        self.addCleanup(lambda: user.transport.abortConnection() if user.transport is not None else None)
        return user

    @defer.inlineCallbacks
    def test_relay_client_killed_mid_upload_is_a_502(self):
        """The relay-client dies while the body streams: the user gets a 502 at once, not a timeout."""
        relay = RelayServer()
        self.addCleanup(relay.stop)
        client = spawn_client(relay.port, self.backend.address)
        self.addCleanup(client.terminate)
        yield relay.polling(NAME)
        user = yield self.upload(relay.port, b"/slow/%d" % MIB, 64 * MIB)
        upload = yield self.backend.next_upload()
        while upload.received < MIB:
            yield tick(0.05)
        client.transport.signalProcess("KILL")
        yield client.exited
        yield user.ended
        self.assertTrue(bytes(user.data).startswith(b"HTTP/1.1 502"), bytes(user.data)[:200])
        self.assertIn(b"Lost the connection to the relay client", bytes(user.data))
        yield upload.ended
        self.assertFalse(upload.complete)

    @defer.inlineCallbacks
    def test_256_mib_upload_through_twistd_with_bounded_memory(self):
        """
        256 MiB through real twistd processes arrive intact, and neither
        process's peak RSS grows by the body (on CPython both stay under
        100 MiB).
        """
        server = TwistdProcess.spawn(["relay", "--port=0"])
        self.addCleanup(server.terminate)
        port = yield server.listening_port()
        client = spawn_client(port, self.backend.address)
        self.addCleanup(client.terminate)
        yield server.wait_for("Relay client connected")
        server_before, client_before = rss_peak_kib(server.pid), rss_peak_kib(client.pid)
        size = 256 * MIB
        user = yield self.upload(port, b"/sink", size)
        upload = yield self.backend.next_upload()
        yield upload.ended
        self.assertTrue(upload.complete)
        self.assertEqual(upload.sha256, pattern_sha256(size, self.seed))
        yield user.wait_for(b"}")
        self.assertTrue(bytes(user.data).startswith(b"HTTP/1.1 200"))
        server_peak, client_peak = rss_peak_kib(server.pid), rss_peak_kib(client.pid)
        # What the body cost each process: far less than the body.
        for who, before, peak in (("server", server_before, server_peak), ("relay-client", client_before, client_peak)):
            self.assertLess(peak - before, 64 * 1024, "%s peak RSS grew by %d KiB" % (who, peak - before))
        if platform.python_implementation() == "CPython":
            # The goal's bound, which PyPy's larger heap starts above.
            self.assertLess(server_peak, 100 * 1024, "server peak RSS %d KiB" % server_peak)
            self.assertLess(client_peak, 100 * 1024, "relay-client peak RSS %d KiB" % client_peak)


@defer.inlineCallbacks
def said(proc: ChildProcess, text: bytes, timeout: float = 15.0):
    """Wait until a child process has written C{text}."""
    deadline = reactor.seconds() + timeout
    while text not in proc.output:
        if reactor.seconds() > deadline or proc.exited.called:
            raise AssertionError("never said %r: %r" % (text, proc.output[-2000:]))
        yield tick(0.05)


@pytest.mark.process
class GoHalvesBuffer(unittest.TestCase):
    """
    Either Go half keeps today's buffered bodies: the backend gets the
    request only once the whole body reached the server, and intact.
    """

    timeout = 60
    # Our half in this process takes each engine in the other classes.
    http1_engine = None

    def setUp(self):
        self.seed = os.urandom(256 * 1024)
        self.backend = UploadBackends()
        self.addCleanup(self.backend.stop)

    def go(self, path: str, args) -> ChildProcess:
        proc = ChildProcess.spawn([go_binary(path)] + list(args))
        self.addCleanup(proc.terminate)
        return proc

    @defer.inlineCallbacks
    def upload_buffered(self, port: int):
        size = 6 * MIB
        head = upload_head(b"/client/" + NAME.encode() + b"/sink", size)
        user = Uploader(head, size, self.seed, stop_after=2 * MIB)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), user)
        self.addCleanup(lambda: user.transport.abortConnection() if user.transport is not None else None)
        yield user.stopped
        yield tick(0.5)
        self.assertEqual(self.backend.uploads, [], "the backend was asked before the body was whole")
        user.stop_after = None
        user.done_sending = False
        user.start()
        upload = yield self.backend.next_upload()
        yield upload.ended
        self.assertTrue(upload.complete)
        self.assertEqual(upload.sha256, pattern_sha256(size, self.seed))
        yield user.wait_for(b"}")
        self.assertTrue(bytes(user.data).startswith(b"HTTP/1.1 200"), bytes(user.data)[:200])

    @defer.inlineCallbacks
    def test_go_relay_client_on_our_server(self):
        relay = RelayServer()
        self.addCleanup(relay.stop)
        self.go(
            GO_CLIENT,
            [
                "--backend_scheme=http",
                "--relay_scheme=http",
                "--disable_auth_for_remote",
                "--server_name=" + NAME,
                "--backend_address=" + self.backend.address,
                "--relay_address=127.0.0.1:%d" % (relay.port,),
            ],
        )
        yield relay.polling(NAME)
        yield self.upload_buffered(relay.port)

    @defer.inlineCallbacks
    def test_our_relay_client_on_the_go_server(self):
        port = reserve_port(self)
        server = self.go(GO_SERVER, ["--port=%d" % (port,)])
        yield said(server, b"Relay server listening")
        started_client(self, "http://127.0.0.1:%d" % (port,), NAME, backend_address=self.backend.address)
        yield said(server, b"Relay client connected")
        yield self.upload_buffered(port)


# Every in-process test above, on each HTTP/1.1 engine.
on_each_engine(globals())
