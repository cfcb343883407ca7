"""
Streamed request bodies between our server and our relay-client
(docs/protocol.md, "Extension: streamed request bodies"), end to end over
loopback: a raw user uploads, the backend reads as the body comes, and
what each end notices is asserted.
"""

import json
import os

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from tests.support import RelayServer, head_and_body, stalled, started_client, tick
from tests.upload_support import UploadBackends, Uploader, pattern_sha256, upload_head

NAME = "robot"
MIB = 1024 * 1024


class Uploads(unittest.TestCase):
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
        """A backend that answers 413 before reading the body: the user gets the 413, and its connection closes after it."""
        user = yield self.upload(b"/early", 64 * MIB)
        upload = yield self.backend.next_upload()
        yield user.ended
        head, body = self.answer(user)
        self.assertTrue(head.startswith(b"HTTP/1.1 413"), head)
        self.assertIn(b"connection: close", head.lower())
        self.assertEqual(body, b"too large for me\n")
        self.assertLess(user.sent, 64 * MIB)
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
        self.assertTrue(bytes(user.data).startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"), bytes(user.data)[:200])

    @defer.inlineCallbacks
    def test_full_duplex_echo(self):
        """A backend that answers while the upload goes on: the echo streams back before the upload ends."""
        size = 8 * MIB
        user = yield self.upload(b"/echo", size, stop_after=2 * MIB)
        yield user.stopped
        yield user.wait_for(b"\r\n\r\n")
        from tests.support import dechunk

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
        from relay.server.upload import StreamedBody  # noqa: F401

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
        import hashlib

        self.assertEqual(hashlib.sha256(payload).hexdigest(), pattern_sha256(size, self.seed))
