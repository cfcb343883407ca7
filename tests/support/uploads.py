"""
The two ends of a streamed upload, for tests/test_uploads.py (and the
gRPC-free HTTP/2 user too): a user that
sends a body as fast as its connection takes it (and can stop, or abort,
part-way), and a backend that reads a body as it comes (twisted.web would
buffer it whole) at a rate of its choosing, and says whether it arrived
complete or broken off.
"""

import hashlib
import json
from typing import List, Optional

from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from relay.compat import ChunkedTransferDecoder

BLOCK = 256 * 1024


def pattern_block(i: int, seed: bytes) -> bytes:
    """Block C{i} of an upload: numbered, so that a lost or repeated block changes the hash."""
    return i.to_bytes(8, "big") + seed[8:]


def pattern_sha256(size: int, seed: bytes) -> str:
    digest = hashlib.sha256()
    i = 0
    while size > 0:
        block = pattern_block(i, seed)[:size]
        digest.update(block)
        size -= len(block)
        i += 1
    return digest.hexdigest()


# The backend.


class Upload:
    """One request as the backend received it."""

    def __init__(self, head: bytes):
        lines = head.split(b"\r\n")
        self.method, self.target, _ = lines[0].split(b" ", 2)
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers.setdefault(name.strip().lower(), []).append(value.strip())
        self.digest = hashlib.sha256()
        self.received = 0
        self.complete = False
        self.broken = False
        # Fires when the body ended, complete or broken off.
        self.ended: defer.Deferred = defer.Deferred()

    @property
    def sha256(self) -> str:
        return self.digest.hexdigest()

    def header(self, name: bytes) -> Optional[bytes]:
        values = self.headers.get(name.lower())
        return values[0] if values else None


class UploadBackend(protocol.Protocol):
    """
    One backend connection, one request. What it does with the body
    depends on the path:

      - C{/sink}: reads it all, then answers 200 with its size and sha256;
      - C{/slow/RATE}: the same, reading at most RATE bytes a second;
      - C{/early}: answers 413 at once and reads no more;
      - C{/echo}: answers 200 at once and echoes the body (chunked) as it
        reads it.
    """

    def __init__(self, uploads: "UploadBackends"):
        self.uploads = uploads
        self.buffer = b""
        self.upload: Optional[Upload] = None
        self.decoder = None
        self.left: Optional[int] = None
        self.mode = b""
        self.rate = 0
        self.allowance = 0.0
        self.last = 0.0
        self.resume_call = None

    def dataReceived(self, data: bytes) -> None:
        if self.upload is None:
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.buffer[:end], self.buffer[end + 4 :]
            self.buffer = b""
            self._head(head)
        if data and not self.upload.ended.called:
            self._body(data)

    def _head(self, head: bytes) -> None:
        self.upload = upload = Upload(head)
        self.uploads.arrived(upload)
        path = upload.target.split(b"?")[0]
        parts = path.split(b"/")
        self.mode = parts[1]
        if self.mode == b"slow":
            self.rate = int(parts[2])
            self.last = reactor.seconds()
        if upload.header(b"transfer-encoding") == b"chunked":
            self.decoder = ChunkedTransferDecoder(self._piece, self._end)
        else:
            self.left = int(upload.header(b"content-length") or b"0")
        if self.mode == b"early":
            # As Go's server answers an upload it will not read: the
            # answer, then whatever comes is read and dropped for a moment
            # (a close with unread bytes would reset the connection, and
            # could lose the answer), then the connection closes.
            body = b"too large for me\n"
            self.transport.write(
                b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: text/plain\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            self.resume_call = reactor.callLater(0.5, self.transport.loseConnection)
        elif self.mode == b"echo":
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
        if self.left == 0 and self.decoder is None:
            self._end(b"")

    def _body(self, data: bytes) -> None:
        if self.mode == b"early":
            self.upload.received += len(data)
            return
        if self.decoder is not None:
            self.decoder.dataReceived(data)
        else:
            self._piece(data[: self.left])
            self.left -= min(len(data), self.left)
            if self.left == 0:
                self._end(b"")
        if self.rate:
            self._throttle(len(data))

    def _piece(self, data: bytes) -> None:
        upload = self.upload
        upload.digest.update(data)
        upload.received += len(data)
        self.uploads.progress()
        if self.mode == b"echo" and data:
            self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _end(self, rest: bytes) -> None:
        upload = self.upload
        if upload.ended.called:
            return
        upload.complete = True
        if self.mode == b"echo":
            self.transport.write(b"0\r\n\r\n")
        elif self.mode != b"early":
            body = json.dumps({"bytes": upload.received, "sha256": upload.sha256}).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        upload.ended.callback(upload)

    def _throttle(self, n: int) -> None:
        # Read no faster than the rate: pause for as long as this read
        # is ahead of it.
        self.allowance += n
        now = reactor.seconds()
        ahead = self.allowance / self.rate - (now - self.last)
        if ahead > 0.01 and self.resume_call is None:
            self.transport.pauseProducing()
            self.resume_call = reactor.callLater(ahead, self._resume)

    def _resume(self) -> None:
        self.resume_call = None
        if self.transport is not None:
            self.transport.resumeProducing()

    def connectionLost(self, reason) -> None:
        if self.resume_call is not None and self.resume_call.active():
            self.resume_call.cancel()
        upload = self.upload
        if upload is not None and not upload.ended.called:
            upload.broken = True
            upload.ended.callback(upload)


class UploadBackends(protocol.Factory):
    """The backend: every request it received, in order."""

    def __init__(self):
        self.uploads: List[Upload] = []
        self._arrivals: List[defer.Deferred] = []
        self.listening = reactor.listenTCP(0, self, interface="127.0.0.1")
        self.address = "127.0.0.1:%d" % (self.listening.getHost().port,)
        self.connections: List[UploadBackend] = []

    def buildProtocol(self, addr):
        p = UploadBackend(self)
        self.connections.append(p)
        return p

    def arrived(self, upload: Upload) -> None:
        self.uploads.append(upload)
        waiting, self._arrivals = self._arrivals, []
        for d in waiting:
            d.callback(upload)

    def progress(self) -> None:
        pass

    def next_upload(self) -> defer.Deferred:
        d = defer.Deferred()
        self._arrivals.append(d)
        return d

    def stop(self):
        for p in self.connections:
            if p.transport is not None:
                p.transport.abortConnection()
        return self.listening.stopListening()


# The user.


@implementer(IPushProducer)
class Uploader(protocol.Protocol):
    """
    A user that sends a request head, then C{size} bytes of body (a
    pattern from C{seed}) as fast as its connection takes them, chunked or
    with a Content-Length; it can stop after C{stop_after} bytes. It
    collects the raw answer.
    """

    def __init__(
        self,
        head: bytes,
        size: int,
        seed: bytes,
        chunked: bool = False,
        stop_after: Optional[int] = None,
        wait_for_continue: bool = False,
    ):
        self.head = head
        self.size = size
        self.seed = seed
        self.chunked = chunked
        self.stop_after = stop_after
        self.wait_for_continue = wait_for_continue
        self.sent = 0
        self.block = 0
        self.paused = False
        self.sending = False
        self.done_sending = False
        self.data = bytearray()
        self.ended: defer.Deferred = defer.Deferred()
        self.stopped: defer.Deferred = defer.Deferred()  # fires at stop_after
        self.clean = None
        self._watch: Optional[defer.Deferred] = None
        self._watch_for = b""

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.transport.write(self.head)
        if not self.wait_for_continue:
            self.start()

    def start(self) -> None:
        self.sending = True
        reactor.callLater(0, self._send)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.wait_for_continue and not self.sending and b"100 Continue" in self.data:
            self.start()
        if self._watch is not None and self._watch_for in self.data:
            d, self._watch = self._watch, None
            d.callback(None)

    def wait_for(self, pattern: bytes) -> defer.Deferred:
        if pattern in self.data:
            return defer.succeed(None)
        self._watch_for = pattern
        self._watch = defer.Deferred()
        return self._watch

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            if self.sending:
                reactor.callLater(0, self._send)

    def stopProducing(self) -> None:
        self.paused = True
        self.done_sending = True

    def _send(self) -> None:
        while not self.paused and not self.done_sending and self.transport is not None:
            limit = self.size if self.stop_after is None else min(self.size, self.stop_after)
            left = limit - self.sent
            if left <= 0:
                self._sent_all(limit)
                return
            data = pattern_block(self.block, self.seed)[:left]
            self.block += 1
            self.sent += len(data)
            if self.chunked:
                self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                self.transport.write(data)

    def _sent_all(self, limit: int) -> None:
        self.done_sending = True
        if limit < self.size:
            if not self.stopped.called:
                self.stopped.callback(self.sent)
            return
        if self.chunked:
            self.transport.write(b"0\r\n\r\n")

    def connectionLost(self, reason) -> None:
        from twisted.internet.error import ConnectionDone

        self.done_sending = True
        self.clean = reason.check(ConnectionDone) is not None
        if self._watch is not None:
            d, self._watch = self._watch, None
            d.callback(None)
        self.ended.callback(None)


def upload_head(path: bytes, size: int, chunked: bool = False, extra: bytes = b"") -> bytes:
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % (size,)
    return b"PUT %s HTTP/1.1\r\nHost: relay\r\n%s%s\r\n" % (path, framing, extra)


class H2Uploader(protocol.Protocol):
    """
    A user on HTTP/2 (prior knowledge) that uploads C{size} bytes on one
    stream as the flow-control windows allow, optionally stopping after
    C{stop_after}; it collects the answer and how the stream ended.
    """

    def __init__(
        self,
        path: str,
        size: int,
        seed: bytes,
        length: bool = True,
        stop_after: Optional[int] = None,
        extra_headers=(),
    ):
        import h2.config
        import h2.connection

        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.path = path
        self.size = size
        self.seed = seed
        self.length = length
        self.stop_after = stop_after
        self.sent = 0
        self.block = 0
        self.pending = b""
        self.all_sent = False
        self.stream_id = None
        self.headers = None
        self.data = b""
        self.reset_code = None
        self.extra_headers = list(extra_headers)
        # Interim (1xx) statuses, as they came.
        self.informational: List[str] = []
        self.ended: defer.Deferred = defer.Deferred()
        self.stopped: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.conn.initiate_connection()
        self.stream_id = self.conn.get_next_available_stream_id()
        headers = [(":method", "PUT"), (":path", self.path), (":scheme", "http"), (":authority", "relay")]
        if self.length:
            headers.append(("content-length", str(self.size)))
        headers += self.extra_headers
        self.conn.send_headers(self.stream_id, headers)
        self._send()

    def _send(self) -> None:
        import h2.exceptions

        limit = self.size if self.stop_after is None else min(self.size, self.stop_after)
        try:
            while self.sent < limit or self.pending:
                if not self.pending:
                    self.pending = pattern_block(self.block, self.seed)[: limit - self.sent]
                    self.block += 1
                window = min(self.conn.local_flow_control_window(self.stream_id), self.conn.max_outbound_frame_size)
                if window <= 0:
                    break
                piece, self.pending = self.pending[:window], self.pending[window:]
                self.conn.send_data(self.stream_id, piece)
                self.sent += len(piece)
            if self.sent >= limit and not self.pending:
                if limit == self.size:
                    if not self.all_sent:
                        self.all_sent = True
                        self.conn.end_stream(self.stream_id)
                elif not self.stopped.called:
                    self.stopped.callback(self.sent)
        except h2.exceptions.StreamClosedError:
            pass
        self.transport.write(self.conn.data_to_send())

    def go_on(self) -> None:
        self.stop_after = None
        self._send()

    def reset(self) -> None:
        from h2.errors import ErrorCodes

        self.conn.reset_stream(self.stream_id, ErrorCodes.CANCEL)
        self.transport.write(self.conn.data_to_send())

    def dataReceived(self, data: bytes) -> None:
        import h2.events

        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.InformationalResponseReceived):
                self.informational.append(dict(event.headers).get(":status"))
            elif isinstance(event, h2.events.ResponseReceived):
                self.headers = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                self.data += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                if not self.ended.called:
                    self.ended.callback(None)
            elif isinstance(event, h2.events.StreamReset):
                self.reset_code = event.error_code
                if not self.ended.called:
                    self.ended.callback(None)
            elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                pass
        self._send()

    def connectionLost(self, reason) -> None:
        if not self.ended.called:
            self.ended.callback(None)
