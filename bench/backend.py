"""
A fast in-memory HTTP/1.1 backend for the benchmark (Python stdlib only).

    python bench/backend.py --port 0

prints ``Backend listening {"Port": N}`` on stdout and serves

    GET /bytes/N   ->  200, N bytes (Content-Length, keep-alive)
    GET /          ->  200 "ok"
    PUT /sink      ->  reads the whole body (Content-Length), then 200 with
                       {"bytes": N, "sha256": HEX}: bench/upload.py's end
    any request with an Upgrade header
                   ->  101 Switching Protocols (a WebSocket-like handshake,
                       Sec-WebSocket-Accept included), then every byte
                       received is echoed back at once, unframed: the
                       interactive-latency cell of bench/run.py

from one preallocated buffer, sliced with memoryviews: a 1 GiB response
never holds more than the socket's write buffer in memory. It is a bare
asyncio Protocol (no HTTP library, no per-request objects beyond a few
bytes), so it stays far from being the bottleneck; the harness measures it
directly as well.
"""

import argparse
import asyncio
import base64
import hashlib
import json
import signal
import sys

CHUNK = 1 << 20  # bytes per transport.write for large bodies
BUF = memoryview(bytes(range(256)) * (CHUNK // 256))  # 1 MiB of data, reused
SMALL = 64 * 1024  # bodies up to this size are written with their head in one call

_cache = {}


def head(status: bytes, length: int, close: bool) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/octet-stream\r\nContent-Length: "
        + str(length).encode() + (b"\r\nConnection: close" if close else b"") + b"\r\n\r\n"
    )


def small_response(n: int) -> bytes:
    r = _cache.get(n)
    if r is None:
        r = head(b"200 OK", n, False) + BUF[:n].tobytes()
        if len(_cache) < 1024:
            _cache[n] = r
    return r


class Backend(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport
        self.t.set_write_buffer_limits(high=4 * CHUNK, low=CHUNK)
        self.buf = b""
        self.skip = 0  # request body bytes still to discard
        self.remaining = 0  # response body bytes still to write
        self.paused = False
        self.close_after = False
        self.echo = False
        self.sink = None  # a body being read whole: its hash
        self.sink_left = 0
        self.sink_bytes = 0
        sock = transport.get_extra_info("socket")
        if sock is not None:
            import socket

            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data):
        if self.echo:
            self.t.write(data)
            return
        if self.sink is not None:
            self.sunk(data)
            return
        if self.skip:
            d = min(self.skip, len(data))
            self.skip -= d
            data = data[d:]
        self.buf += data
        self.process()

    def process(self):
        while not self.remaining and not self.paused and not self.skip:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                if len(self.buf) > 65536:
                    self.t.close()
                return
            req = self.buf[:i]
            self.buf = self.buf[i + 4:]
            line, _, rest = req.partition(b"\r\n")
            parts = line.split(b" ")
            lower = rest.lower()
            close = b"connection: close" in lower or (len(parts) > 2 and parts[2] == b"HTTP/1.0")
            j = lower.find(b"content-length:")
            path = parts[1] if len(parts) > 1 else b"/"
            if j >= 0 and path.split(b"?", 1)[0] == b"/sink":
                self.sink = hashlib.sha256()
                self.sink_left = int(lower[j + 15:].split(b"\r\n", 1)[0])
                self.sink_bytes = 0
                rest, self.buf = self.buf, b""
                self.sunk(rest)
                return
            if j >= 0:
                length = int(lower[j + 15:].split(b"\r\n", 1)[0])
                d = min(length, len(self.buf))
                self.buf = self.buf[d:]
                self.skip = length - d
            path = parts[1] if len(parts) > 1 else b"/"
            if b"\nupgrade:" in b"\n" + lower:
                self.switch(rest)
                return
            self.respond(path.split(b"?", 1)[0], close)
            if close:
                self.close_after = True
                if not self.remaining:
                    self.t.close()
                return

    def sunk(self, data):
        """Hash a /sink body's bytes; answer at its end. What is left over belongs to the next request."""
        take = data[: self.sink_left]
        self.sink.update(take)
        self.sink_left -= len(take)
        self.sink_bytes += len(take)
        if self.sink_left:
            return
        body = json.dumps({"bytes": self.sink_bytes, "sha256": self.sink.hexdigest()}).encode()
        self.sink = None
        self.t.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        rest = data[len(take):]
        if rest:
            self.buf += rest
        self.process()

    def respond(self, path, close):
        if path.startswith(b"/bytes/"):
            try:
                n = int(path[7:])
            except ValueError:
                n = -1
            if n >= 0:
                if n <= SMALL:
                    if close:
                        self.t.write(head(b"200 OK", n, True) + BUF[:n].tobytes())
                    else:
                        self.t.write(small_response(n))
                    return
                self.t.write(head(b"200 OK", n, close))
                self.remaining = n
                self.push()
                return
        if path == b"/":
            self.t.write(head(b"200 OK", 2, close) + b"ok")
            return
        self.t.write(head(b"404 Not Found", 10, close) + b"not found\n")

    def switch(self, headers):
        """101, then echo: what came after the request head is echoed too."""
        upgrade, key = b"websocket", b""
        for line in headers.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"upgrade":
                upgrade = value.strip()
            elif name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        self.t.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: " + upgrade + b"\r\nConnection: Upgrade\r\n"
            + b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.echo = True
        rest, self.buf = self.buf, b""
        if rest:
            self.t.write(rest)

    def push(self):
        while self.remaining and not self.paused:
            k = min(self.remaining, CHUNK)
            self.t.write(BUF[:k])
            self.remaining -= k
        if not self.remaining:
            if self.close_after:
                self.t.close()
            elif self.buf:
                self.process()

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        if self.remaining:
            self.push()
        else:
            self.process()


async def main(host: str, port: int):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Backend, host, port, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    print("Backend listening " + json.dumps({"Port": port}), flush=True)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    await stop
    server.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args()
    asyncio.run(main(a.host, a.port))
    sys.exit(0)
