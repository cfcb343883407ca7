"""
Thousands of simulated idle relay-clients, cheaply (Python stdlib only).

    python bench/idle_clients.py --relay 127.0.0.1:PORT --count 10000 --requests 200

Opens COUNT connections to the relay server, each long-polling
``GET /server/request?server=idle-N`` under its own name, as a relay-client
with ``--num_pending_requests=1`` would. Each poll that returns a request is
answered on the same connection with ``POST /server/response`` carrying one
minimal HttpResponse (status 200, body ``ok``, eof), and the poll is
re-opened; a 408 re-opens it at once. Protobuf is hand-encoded (field
numbers from docs/protocol.md), so this process needs nothing but asyncio.

Protocol with the harness, on stdout, one JSON object a line:
``{"event": "polling", "count": N, "seconds": S}`` once every poll is sent;
then it waits for a line on stdin, times REQUESTS user requests
``GET /client/idle-K/ping`` to random K (one after another, over one
keep-alive connection) and prints ``{"event": "timed", ...}`` with the
latencies in milliseconds; then it waits for stdin to close and exits.
"""

import argparse
import asyncio
import json
import random
import resource
import sys
import time


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- protobuf, by hand ------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(buf: bytes, i: int):
    shift = n = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i
        shift += 7


def request_id(msg: bytes) -> str:
    """Field 1 (id) of a serialized HttpRequest."""
    i = 0
    while i < len(msg):
        key, i = read_varint(msg, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = read_varint(msg, i)
        elif wire == 2:
            n, i = read_varint(msg, i)
            if field == 1:
                return msg[i:i + n].decode()
            i += n
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError("wire type %d" % wire)
    raise ValueError("no id")


def http_response(rid: str) -> bytes:
    """HttpResponse{status_code: 200, body: "ok", id: rid, eof: true}."""
    i = rid.encode()
    return b"\x08" + varint(200) + b"\x1a\x02ok" + b"\x22" + varint(len(i)) + i + b"\x28\x01"


# -- a minimal HTTP/1.1 client connection ------------------------------------


class Conn(asyncio.Protocol):
    """Sends requests one at a time; `responses` gets (status, body) tuples."""

    def __init__(self):
        self.buf = b""
        self.responses = asyncio.Queue()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, t):
        self.t = t

    def connection_lost(self, exc):
        if not self.closed.done():
            self.closed.set_result(exc)
        self.responses.put_nowait(None)

    def data_received(self, data):
        self.buf += data
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            head = self.buf[:i]
            status = int(head[9:12])
            lower = head.lower()
            j = lower.find(b"content-length:")
            if j >= 0:
                n = int(lower[j + 15:].split(b"\r\n", 1)[0])
                if len(self.buf) < i + 4 + n:
                    return
                body = self.buf[i + 4:i + 4 + n]
                self.buf = self.buf[i + 4 + n:]
            elif b"transfer-encoding: chunked" in lower:
                body, rest = dechunk(self.buf[i + 4:])
                if body is None:
                    return
                self.buf = rest
            else:  # no length: to close (not expected from a relay)
                body = self.buf[i + 4:]
                self.buf = b""
            self.responses.put_nowait((status, body))


def dechunk(data: bytes):
    body = []
    i = 0
    while True:
        j = data.find(b"\r\n", i)
        if j < 0:
            return None, data
        n = int(data[i:j].split(b";")[0], 16)
        if n == 0:
            k = data.find(b"\r\n\r\n", j)  # trailers end with an empty line
            if k < 0:
                return None, data
            return b"".join(body), data[k + 4:]
        if len(data) < j + 2 + n + 2:
            return None, data
        body.append(data[j + 2:j + 2 + n])
        i = j + 2 + n + 2


async def idle_client(host, port, name, stats, connected):
    loop = asyncio.get_running_loop()
    while True:
        try:
            _, c = await loop.create_connection(Conn, host, port)
            break
        except OSError:
            stats["connect_errors"] += 1
            await asyncio.sleep(0.05 + random.random() * 0.2)
    poll = ("GET /server/request?server=%s HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (name, host, port)).encode()
    c.t.write(poll)
    connected()
    while True:
        r = await c.responses.get()
        if r is None:
            stats["closed"] += 1
            return
        status, body = r
        if status == 200 and body:
            msg = http_response(request_id(body))
            c.t.write(
                b"POST /server/response HTTP/1.1\r\nHost: %s:%d\r\n"
                b"Content-Type: application/vnd.google.protobuf;"
                b"proto=cloudrobotics.http_relay.v1alpha1.HttpResponse\r\n"
                b"Content-Length: %d\r\n\r\n" % (host.encode(), port, len(msg)) + msg
            )
            r = await c.responses.get()
            if r is None:
                stats["closed"] += 1
                return
            stats["answered"] += 1
            if r[0] != 200:
                stats["post_errors"] += 1
        elif status == 408:
            stats["timeouts"] += 1
        else:
            stats["poll_errors"] += 1
            await asyncio.sleep(0.5)
        c.t.write(poll)


async def timed_requests(host, port, count, n, out):
    loop = asyncio.get_running_loop()
    _, c = await loop.create_connection(Conn, host, port)
    lat = []
    bad = 0
    for _ in range(n):
        k = random.randrange(count)
        t0 = time.perf_counter()
        c.t.write(("GET /client/idle-%d/ping HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (k, host, port)).encode())
        r = await c.responses.get()
        lat.append((time.perf_counter() - t0) * 1000)
        if r is None:
            bad += 1
            _, c = await loop.create_connection(Conn, host, port)
        elif r[0] != 200 or r[1] != b"ok":
            bad += 1
    c.t.close()
    lat.sort()
    out({
        "event": "timed",
        "requests": n,
        "errors": bad,
        "p50_ms": lat[len(lat) // 2],
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "max_ms": lat[-1],
        "mean_ms": sum(lat) / len(lat),
    })


async def main(a):
    host, _, port = a.relay.rpartition(":")
    port = int(port)
    limit = raise_nofile()
    if limit < a.count + 100:
        print("RLIMIT_NOFILE is %d, need %d" % (limit, a.count + 100), file=sys.stderr)
        sys.exit(2)

    def out(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    stats = dict(connect_errors=0, closed=0, answered=0, post_errors=0, timeouts=0, poll_errors=0)
    sem = asyncio.Semaphore(a.parallel_connects)
    done = [0]
    all_polling = asyncio.get_running_loop().create_future()

    def connected():
        sem.release()
        done[0] += 1
        if done[0] == a.count:
            all_polling.set_result(None)

    t0 = time.monotonic()
    tasks = []
    for i in range(a.count):
        await sem.acquire()
        tasks.append(asyncio.ensure_future(idle_client(host, port, "idle-%d" % i, stats, connected)))
    await all_polling
    out({"event": "polling", "count": a.count, "seconds": round(time.monotonic() - t0, 2), **stats})

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.readline()
    await timed_requests(host, port, a.count, a.requests, out)
    out({"event": "stats", **stats})
    await reader.read()  # until the harness closes stdin


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--relay", required=True, help="host:port of the relay server")
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--parallel-connects", type=int, default=32,
                   help="connections being opened at once (the server's listen backlog is small)")
    asyncio.run(main(p.parse_args()))
